"""`python -m specplan.runtime`: the specrun command."""

from specplan.entry import specrun

specrun()

"""`python -m specplan`: the specplan command."""

from specplan.entry import specplan

specplan()

"""The console entry points (`specplan`, `specrun`, `python -m specplan`).

Ctrl-C is honoured from the first instruction to the last. This module imports nothing
heavy: the SIGINT handler is in place before typer, torch or Ray are imported, so an
interrupt during those imports ends the command with 130 and one line, not a traceback.

The handler raises KeyboardInterrupt once and remembers that it did, so that an interrupt a
library swallowed (raised inside a finaliser or a callback: "Exception ignored in ...") is
raised again at the next `check()` (each progress update, each stage of a Ray start-up). A
second SIGINT (a wrapper and the terminal both sending one, or an impatient key) is ignored,
so that the interrupt path (the report of the finished rows, stopping workers and Ray) runs
to its end; a third ends the process at once, its child processes with it, without that path.
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_INTERRUPTED = 130

_interrupts = 0


def _on_sigint(signum, frame) -> None:
    global _interrupts
    _interrupts += 1
    if _interrupts == 1:
        raise KeyboardInterrupt
    if _interrupts == 2:
        os.write(2, b"stopping: finishing what is being written (Ctrl-C again to stop at once)\n")
        return
    os.write(2, b"interrupted again: stopping at once\n")
    from . import procs

    procs.end(procs.descendants(os.getpid()), grace_s=0.0)
    os._exit(EXIT_INTERRUPTED)


def _unraisable(info) -> None:
    """An interrupt raised where Python cannot pass it on (a finaliser, a weakref callback) is
    remembered for check(), not printed as "Exception ignored" with a traceback."""
    global _interrupts
    if isinstance(info.exc_value, KeyboardInterrupt):
        _interrupts = max(_interrupts, 1)
        return
    sys.__unraisablehook__(info)


def install() -> None:
    """Put the handler in place (the main thread only, as Python requires)."""
    signal.signal(signal.SIGINT, _on_sigint)
    sys.unraisablehook = _unraisable


def interrupted() -> bool:
    return _interrupts > 0


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed, even if a library swallowed it."""
    if _interrupts:
        raise KeyboardInterrupt


def _run(module: str, function: str) -> None:
    install()
    try:
        from importlib import import_module

        main = getattr(import_module(module), function)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    main()


def specplan() -> None:
    """The `specplan` command."""
    _run("specplan.cli", "console_main")


def specrun() -> None:
    """The `specrun` command."""
    _run("specplan.runtime.cli", "console_main")

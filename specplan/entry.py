"""The console entry points (`specplan`, `specrun`, `python -m specplan`).

Ctrl-C is honoured from the first instruction to the last. This module imports nothing
heavy: the SIGINT handler is in place before typer, torch or Ray are imported, so an
interrupt during those imports ends the command with 130 and one line, not a traceback.

The handler raises KeyboardInterrupt once and remembers that it did, so that an interrupt a
library swallowed (raised inside a finaliser or a callback: "Exception ignored in ...") is
raised again at the next `check()` (each progress update, each stage of a Ray start-up).
A second SIGINT within FORCE_AFTER_S of the first (a wrapper and the terminal both sending
one) is ignored, so the interrupt path (writing the report of the finished rows, stopping
workers) runs to its end; one sent later ends the process at once, without that path.
"""

from __future__ import annotations

import os
import signal
import sys
import time

FORCE_AFTER_S = 2.0
EXIT_INTERRUPTED = 130

_first_s: float | None = None


def _on_sigint(signum, frame) -> None:
    global _first_s
    now = time.monotonic()
    if _first_s is None:
        _first_s = now
        raise KeyboardInterrupt
    if now - _first_s >= FORCE_AFTER_S:
        os.write(2, b"interrupted again: stopping at once\n")
        os._exit(EXIT_INTERRUPTED)


def _unraisable(info) -> None:
    """An interrupt raised where Python cannot pass it on (a finaliser, a weakref callback) is
    remembered for check(), not printed as "Exception ignored" with a traceback."""
    global _first_s
    if isinstance(info.exc_value, KeyboardInterrupt):
        _first_s = _first_s or time.monotonic()
        return
    sys.__unraisablehook__(info)


def install() -> None:
    """Put the handler in place (the main thread only, as Python requires)."""
    signal.signal(signal.SIGINT, _on_sigint)
    sys.unraisablehook = _unraisable


def interrupted() -> bool:
    return _first_s is not None


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed, even if a library swallowed it."""
    if _first_s is not None:
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

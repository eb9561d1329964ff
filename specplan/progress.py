"""Progress on stderr for long work: what is being done, counts, elapsed time and ETA.

Shown only on a terminal and never under --json (a transient Rich line that leaves nothing
behind); a log or a pipe gets nothing from it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .entry import check


class Steps:
    """The handle a long task reports through: `say(what)` for the current step, `advance()`
    when one of `total` units is done, `set(done, total)` for counts known as they come. Each
    is also where a Ctrl-C that a library swallowed is raised again (specplan.entry.check)."""

    def __init__(self, bar: Progress | None, task):
        self._bar, self._task = bar, task

    def say(self, what: str) -> None:
        check()
        if self._bar is not None:
            self._bar.update(self._task, description=what)

    def advance(self, n: float = 1) -> None:
        check()
        if self._bar is not None:
            self._bar.update(self._task, advance=n)

    def set(self, done: float, total: float | None = None) -> None:
        check()
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total)


@contextmanager
def steps(console: Console, what: str, total: float | None = None, quiet: bool = False) -> Iterator[Steps]:
    if quiet or not console.is_terminal:
        yield Steps(None, None)
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                  transient=True) as bar:
        yield Steps(bar, bar.add_task(what, total=total))

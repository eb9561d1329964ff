"""Errors a user can act on: each names where the bad value came from and what was expected."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SpecplanError(Exception):
    """Base class for errors that the CLI prints as one line and exits non-zero."""

    exit_code = 2


class InputError(SpecplanError):
    """A value from a file, flag or preset is malformed or out of range."""

    def __init__(self, source: str, field: str, problem: str, expected: str | None = None):
        self.source, self.field, self.problem, self.expected = source, field, problem, expected
        msg = f"{source}: {field}: {problem}"
        if expected:
            msg += f" (expected {expected})"
        super().__init__(msg)

    def __reduce__(self):  # rebuilt from its parts when it crosses a process boundary (the planner's workers)
        return type(self), (self.source, self.field, self.problem, self.expected)


class UnknownNameError(SpecplanError):
    """A preset or profile name that does not exist; suggests the closest names."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        known = sorted(known)
        close = difflib.get_close_matches(name.lower(), known, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        super().__init__(f"unknown {kind} '{name}'{hint} (known: {', '.join(known)})")
        self.suggestions = close
        self._parts = (kind, name, known)

    def __reduce__(self):
        return type(self), self._parts


class InfeasibleError(SpecplanError):
    """No plan fits; the message names the binding constraint and by how much."""

    exit_code = 3


def require(cond: bool, source: str, field: str, problem: str, expected: str | None = None) -> None:
    if not cond:
        raise InputError(source, field, problem, expected)

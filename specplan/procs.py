"""The processes a command started, found and ended (Linux /proc; nothing elsewhere).

A process is named by its pid and its start time (the clock ticks after boot at which it
started, field 22 of /proc/PID/stat), so a pid the system reused for another process after
ours ended is never signalled.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

Proc = tuple[int, int]  # (pid, start time in clock ticks)


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after "pid (name)": state first; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def descendants(pid: int) -> list[Proc]:
    """Every process below `pid`, children first."""
    children: dict[int, list[Proc]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat(entry.name)
        if fields is not None:
            children.setdefault(int(fields[1]), []).append((int(entry.name), int(fields[19])))
    found: list[Proc] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def alive(proc: Proc) -> bool:
    """Still running: there, started when it did, and not a zombie awaiting its parent."""
    fields = _stat(proc[0])
    return fields is not None and int(fields[19]) == proc[1] and fields[0] != "Z"


def end(procs: list[Proc], grace_s: float = 3.0) -> None:
    """SIGTERM each of `procs` still alive, then SIGKILL what is left after `grace_s`."""
    def send(to: list[Proc], sig: int) -> None:
        for pid, _ in to:
            try:
                os.kill(pid, sig)
            except OSError:  # ended meanwhile
                pass

    left = [p for p in procs if alive(p)]
    send(left, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if alive(p)]
    send(left, signal.SIGKILL)

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


def adopt_orphans() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux PR_SET_CHILD_SUBREAPER):
    a process whose parent ends (an agent whose server a shutdown stopped while it was being
    started) is then re-parented here, not to init, so `descendants` still finds it. False
    where the system has no such call."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # 36 = PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def end_all_below(pid: int, known: list[Proc] = (), grace_s: float = 3.0, rounds: int = 4) -> None:
    """End `known` and every process below `pid`, again while ending them leaves new orphans
    here (see adopt_orphans) or a process was mid-start."""
    todo = list(dict.fromkeys([*known, *descendants(pid)]))
    for _ in range(rounds):
        todo = [p for p in todo if alive(p)]
        if not todo:
            return
        end(todo, grace_s)
        todo = descendants(pid)


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

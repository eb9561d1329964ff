"""Facts about the machine this process runs on: memory it can still give, and whether other
processes are holding its cores (which makes every timing here slow and noisy).

Linux reads /proc; elsewhere the functions return None and nothing is checked."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

# Other processes using more than this many cores in all make a timing untrustworthy
BUSY_CORES = 0.3


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_device_name() -> str:
    """What a profile measured with the CPU as its device calls that device."""
    return f"CPU as device ({cpu_model()})"


def usable_cores() -> int:
    """The cores this process may run on (its affinity), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_warning(threads: int | None, flag: str = "--threads") -> str | None:
    """Why a thread count is a mistake that still runs: more threads than cores make torch
    slower (each waits for the others' time slices), not faster."""
    cores = usable_cores()
    if threads and threads > cores:
        return (f"{flag} {threads} is more than the {cores} cores this process may use: torch will run slower, "
                f"not faster (at most {cores})")
    return None


def meminfo_bytes(key: str) -> float | None:
    """A /proc/meminfo field (MemTotal, MemAvailable, ...) in bytes, or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name == key:
                return float(rest.split()[0]) * 1024
    except OSError:
        return None
    return None


def _busy_jiffies() -> tuple[float, float] | None:
    """(busy, total) jiffies over all cores since boot, from /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    v = [float(x) for x in first[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0.0)  # idle + iowait
    return sum(v[:8]) - idle, sum(v[:8])


def machine_load(sample_s: float = 0.3) -> dict:
    """How busy the cores are with work that is not this process's, sampled over `sample_s`.

    Returns cores (usable by this process), loadavg_1m, and others_busy_cores: cores' worth of
    CPU time other processes used while we slept (None where /proc is missing)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = {"cores": cores, "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "others_busy_cores": None}
    a, t_a, own_a = _busy_jiffies(), time.monotonic(), os.times()
    if a is None:
        return load
    time.sleep(sample_s)
    b, t_b, own_b = _busy_jiffies(), time.monotonic(), os.times()
    ncpu = os.cpu_count() or 1
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    dt = t_b - t_a
    all_busy = (b[0] - a[0]) / hz / dt if b[1] > a[1] else 0.0
    own = ((own_b.user - own_a.user) + (own_b.system - own_a.system)
           + (own_b.children_user - own_a.children_user) + (own_b.children_system - own_a.children_system)) / dt
    load["others_busy_cores"] = round(max(0.0, min(float(ncpu), all_busy - own)), 3)
    return load


def busy_warning(load: dict, what: str) -> str | None:
    """One line saying that other processes hold the cores, or None when they do not."""
    others = load.get("others_busy_cores")
    if others is None or others <= BUSY_CORES:
        return None
    return (f"other processes are using {others:.1f} of {load['cores']} cores "
            f"(load average {load['loadavg_1m']:.2f}); {what} will be slower and noisier than on a quiet machine")

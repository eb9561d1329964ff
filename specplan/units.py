"""Parsing and printing sizes. SI units everywhere: 1 GB = 1e9 bytes, 1 GiB = 2**30 bytes."""

from __future__ import annotations

import math
import re

from .errors import InputError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50,
}
_SIZE_RE = re.compile(r"^\s*([+-]?[0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def size_bytes(text: str | int | float, source: str = "argument", field: str = "size") -> tuple[float, bool]:
    """'256GB' -> (256e9, True), '24GiB' -> (24*2**30, True), 1e9 -> (1e9, False): the size in
    bytes, not rounded, and whether it had a unit. Anything but a finite number with a known
    unit raises InputError; the sign is the caller's to judge."""
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        m = _SIZE_RE.match(str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise InputError(source, field, f"'{text}' is not a size", "a number with an optional unit, e.g. 256GB or 24GiB")
        value, unit = float(m.group(1)), m.group(2).lower()
    if not math.isfinite(value * _UNITS[unit]):
        raise InputError(source, field, f"'{text}' is not a finite size", "a number with an optional unit, e.g. 256GB")
    return value * _UNITS[unit], unit not in ("", "b")


def parse_bytes(text: str | int | float, source: str = "argument", field: str = "size") -> int:
    """'256GB' -> 256e9, '24GiB' -> 24*2**30, 1e9 -> 1e9. Negative or unknown units raise InputError."""
    n, _ = size_bytes(text, source, field)
    if n < 0:
        raise InputError(source, field, f"negative size {text}", "a size >= 0")
    return int(round(n))


def fmt_bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def fmt_duration(s: float) -> str:
    """A duration for a person: 45 s, 12 min 05 s, 3 h 20 min."""
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def fmt_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"

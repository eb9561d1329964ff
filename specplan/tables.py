"""Measured kernel tables: seconds over a grid of sizes, with interpolation.

Interpolation is piecewise linear on the grid, so it is exact at measured points and
monotone between them when the measurements are. Outside the measured range the table
extrapolates linearly from its edge segment (time grows with work), holds the first value
below it, and warns once per table axis, since a prediction there is a guess.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError


class OutOfProfiledRange(UserWarning):
    """A kernel-table query left the measured grid."""


@dataclass(frozen=True)
class KernelTable:
    op: str
    axes: tuple[str, ...]
    grid: tuple[tuple[float, ...], ...]  # one ascending tuple per axis
    seconds: tuple  # nested tuples, shape = lengths of grid axes
    _warned: set = field(default_factory=set, compare=False, repr=False)

    @classmethod
    def from_dict(cls, op: str, d: dict[str, Any], source: str) -> "KernelTable":
        where = f"kernels.{op}"
        try:
            axes = tuple(str(a) for a in d["axes"])
            grid = tuple(tuple(float(x) for x in g) for g in d["grid"])
            sec = np.asarray(d["seconds"], dtype=float)
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(source, where, f"malformed table ({e})", "{axes: [..], grid: [[..]..], seconds: nested list}") from None
        if len(axes) != len(grid) or sec.shape != tuple(len(g) for g in grid):
            raise InputError(source, where, f"seconds has shape {sec.shape}, grid has {[len(g) for g in grid]}",
                             "one seconds entry per grid point")
        for name, g in zip(axes, grid):
            if any(b <= a for a, b in zip(g, g[1:])):
                raise InputError(source, f"{where}.grid[{name}]", "is not strictly ascending", "ascending sizes")
        if (sec < 0).any() or not np.isfinite(sec).all():
            raise InputError(source, f"{where}.seconds", "has negative or non-finite values", "times >= 0")
        return cls(op, axes, grid, _to_tuple(sec))

    def to_dict(self) -> dict[str, Any]:
        return {"axes": list(self.axes), "grid": [list(g) for g in self.grid], "seconds": _to_list(self.seconds)}

    def __call__(self, *point: float) -> float:
        if len(point) != len(self.axes):
            raise ValueError(f"{self.op} takes {len(self.axes)} sizes ({', '.join(self.axes)}), got {len(point)}")
        values = np.asarray(self.seconds, dtype=float)
        for axis, (x, g) in enumerate(zip(point, self.grid)):
            values = _interp_axis(values, np.asarray(g), float(x), axis=0)
            if (x < g[0] or x > g[-1]) and self.axes[axis] not in self._warned:
                self._warned.add(self.axes[axis])
                warnings.warn(f"kernel table '{self.op}': {self.axes[axis]}={x:g} is outside the profiled range "
                              f"[{g[0]:g}, {g[-1]:g}]; extrapolating", OutOfProfiledRange, stacklevel=2)
        return max(float(values), 0.0)


def _interp_axis(values: np.ndarray, g: np.ndarray, x: float, axis: int) -> np.ndarray:
    """Linear interpolation along the leading axis.

    Below the grid the first value holds (small kernels are latency-bound, so time does
    not keep falling); above it the last segment is extended (time grows with work).
    """
    if len(g) == 1:
        return values[0] * max(x / g[0], 1.0) if g[0] > 0 else values[0]
    if x <= g[0]:
        return values[0]
    i = int(min(np.searchsorted(g, x) - 1, len(g) - 2))
    t = (x - g[i]) / (g[i + 1] - g[i])
    lo, hi = values[i], values[i + 1]
    # anchor at the nearer end so a flat segment stays exactly flat (monotone to the last bit)
    return lo + t * (hi - lo) if t < 0.5 else hi - (1 - t) * (hi - lo)


def _to_tuple(a: np.ndarray):
    return tuple(_to_tuple(x) for x in a) if a.ndim > 1 else tuple(float(x) for x in a)


def _to_list(t):
    return [_to_list(x) for x in t] if isinstance(t, tuple) and t and isinstance(t[0], tuple) else list(t)

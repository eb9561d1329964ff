"""Stage timers and counters shared by the engine and the weight store.

On a GPU a stage is timed with a pair of CUDA events on the stream that runs it, so timing
never synchronises and overlapped stages each report their own busy time; the events are
resolved when a report is asked for. On the CPU the same regions use perf_counter. Both the
main thread (target) and the draft thread record here, hence the lock.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

PER_LAYER, PER_PASS = "per-layer", "per-pass"  # a report's measured.stage_timing


def timed_per_layer(measured: dict) -> bool:
    """Whether a report's run timed the per-layer stages (reports from before the field: yes)."""
    return measured.get("stage_timing", PER_LAYER) == PER_LAYER


class Stats:
    """`per_layer`: time the stages that run once per layer (the target's proj / attention /
    ffn / head, each weight copy). Off by default: those timers cost 2-7% of a run on a CPU
    and 8 CUDA events per layer on a GPU; the per-pass stages (prefill, draft, verify) and the
    byte counts are always recorded."""

    def __init__(self, device: torch.device, per_layer: bool = False):
        self.cuda = device.type == "cuda"
        self.per_layer = per_layer
        self.prefix = ""  # "prefill." while prompts are being prefilled
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._lock = threading.Lock()
        self.label_regions = False  # set while torch.profiler records

    @contextmanager
    def region(self, stage: str):
        """Device time of the work issued inside, on the current stream (and, while
        torch.profiler runs with `label_regions`, a labelled range in its tables)."""
        if self.label_regions:
            with torch.profiler.record_function(self.prefix + stage), self._region(stage):
                yield
        else:
            with self._region(stage):
                yield

    @contextmanager
    def _region(self, stage: str):
        key = self.prefix + stage
        if not self.cuda:
            with self.wall(stage):
                yield
            return
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.add_events(key, start, end)

    @contextmanager
    def wall(self, stage: str):
        """Host time of the code inside (bookkeeping, whole phases)."""
        key = self.prefix + stage
        t = time.perf_counter()
        yield
        self.add(key, time.perf_counter() - t)

    def add(self, key: str, seconds: float) -> None:
        with self._lock:
            self.seconds[key] += seconds

    def add_events(self, key: str, start: torch.cuda.Event, end: torch.cuda.Event) -> None:
        with self._lock:
            self._events.append((key, start, end))
            if len(self._events) > 4096:
                self._resolve(block=False)

    def count(self, key: str, n: float) -> None:
        with self._lock:
            self.counts[key] += n

    def _resolve(self, block: bool) -> None:
        pending = []
        for key, start, end in self._events:
            if block:
                end.synchronize()
            if end.query():
                self.seconds[key] += start.elapsed_time(end) / 1e3
            else:
                pending.append((key, start, end))
        self._events = pending

    def reset(self) -> None:
        """Forget everything recorded so far (after a warm-up)."""
        with self._lock:
            self._resolve(block=True)
            self.seconds.clear()
            self.counts.clear()
            self.prefix = ""

    def stage_s(self) -> dict[str, float]:
        with self._lock:
            self._resolve(block=True)
            return dict(sorted(self.seconds.items()))

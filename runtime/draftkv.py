"""The draft's KV cache on the host, swapped through two GPU buffers (placement.draft_kv == "cpu").

The whole cache (every row of the wave) lives in pinned host memory. The draft works on one
micro-batch at a time in one of two GPU buffers of `draft_batch` rows each, which is what
`specplan.memory.plan_memory` counts as "draft KV swap buffers" (2 x draft_batch rows):

    load(mb 0 -> buffer 0)
    for micro-batch i (buffer s = i % 2):
        load(mb i+1 -> buffer 1-s)    # copied in while micro-batch i drafts
        acquire(s)                    # the draft's stream waits for mb i's load, nothing else
        ... gamma draft steps on buffer s ...
        store(s)                      # only the positions this round wrote go back; nothing waits

Both caches are row-major (`KVCache(row_major=True)`): one row's positions [a, b), all layers,
keys and values, are one contiguous block, so a load copies exactly [0, L - 2) of each active
row and a store exactly the gamma + 1 positions the draft wrote, one copy per row each way and
no temporary on either side.

On a GPU, loads run on their own H2D stream and stores on their own D2H stream, ordered by
events only: a load into a buffer waits for that buffer's last store (`freed`), the draft
waits for its buffer's load (`loaded`), a store waits for the draft work queued before it
(`drafted`), and the first load of each `begin()` waits for every earlier store (`written`),
since a later round reads host rows an earlier store wrote. The CPU thread never waits for a
copy. On the CPU the same calls run synchronously, in the same order.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from .kvcache import KVCache
from .stats import Stats


class DraftKVSwap:
    def __init__(self, layers: int, rows: int, buffer_rows: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, stats: Stats | None = None):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stats = stats
        self.host = KVCache(layers, rows, max_len, kv_heads, head_dim, dtype, "cpu", pin=self.cuda, row_major=True)
        self.buffers = [KVCache(layers, buffer_rows, max_len, kv_heads, head_dim, dtype, device, row_major=True)
                        for _ in range(2)]
        if self.cuda:
            self.h2d = torch.cuda.Stream(device)
            self.d2h = torch.cuda.Stream(device)
            self.loaded = [torch.cuda.Event() for _ in self.buffers]
            self.drafted = [torch.cuda.Event() for _ in self.buffers]
            self.freed = [torch.cuda.Event() for _ in self.buffers]
            self.written = torch.cuda.Event()

    @property
    def device_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    # ---- the protocol --------------------------------------------------------------------------
    def begin(self) -> None:
        """Before a round's loads: they may read host rows that an earlier store is still writing."""
        if self.cuda:
            self.h2d.wait_event(self.written)

    def load(self, slot: int, host_rows: list[int], ends: list[int]) -> None:
        """Queue the copy of positions [0, ends[i]) of host row host_rows[i] into row i of buffer `slot`.
        A row with end <= 0 copies nothing (a finished row, or nothing cached yet)."""
        buf = self.buffers[slot]
        with self._stream(self.h2d if self.cuda else None):
            if self.cuda:
                self.h2d.wait_event(self.freed[slot])  # the buffer's last micro-batch has been written back
            t = self._start()
            n = sum(buf.copy_positions_(self.host, r, i, 0, e) for i, (r, e) in enumerate(zip(host_rows, ends)))
            self._stop("draft_kv_h2d", t, n)
            if self.cuda:
                self.loaded[slot].record(self.h2d)

    def acquire(self, slot: int, fresh: bool = False) -> KVCache:
        """Buffer `slot`, for work queued next on the current stream: after its load, or, `fresh`
        (nothing to load: a prefill), after its last store."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.freed[slot] if fresh else self.loaded[slot])
        return self.buffers[slot]

    def store(self, slot: int, host_rows: list[int], spans: list[tuple[int, int]]) -> None:
        """Queue the copy of positions [a, b) = spans[i] of buffer row i back to host row host_rows[i],
        after the work queued so far on the current stream; the caller does not wait for it."""
        buf = self.buffers[slot]
        if self.cuda:
            self.drafted[slot].record(torch.cuda.current_stream(self.device))
        with self._stream(self.d2h if self.cuda else None):
            if self.cuda:
                self.d2h.wait_event(self.drafted[slot])
            t = self._start()
            n = sum(self.host.copy_positions_(buf, i, r, a, b) for i, (r, (a, b)) in enumerate(zip(host_rows, spans)))
            self._stop("draft_kv_d2h", t, n)
            if self.cuda:
                self.freed[slot].record(self.d2h)
                self.written.record(self.d2h)

    def synchronize(self) -> None:
        if self.cuda:
            self.h2d.synchronize()
            self.d2h.synchronize()

    # ---- timing: copy-stream time on a GPU (event pairs, resolved at report time), else perf_counter ----
    @staticmethod
    def _stream(stream):
        return torch.cuda.stream(stream) if stream is not None else nullcontext()

    def _start(self):
        if not self.cuda:
            return time.perf_counter()
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        return start

    def _stop(self, stage: str, start, nbytes: int) -> None:
        stats = self.stats
        if stats is None:
            return
        key = stats.prefix + stage
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            stats.add_events(key, start, end)
        else:
            stats.add(key, time.perf_counter() - start)
        stats.count(key + "_bytes", nbytes)

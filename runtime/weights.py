"""WeightStore: every tensor at the home the Placement gives it, and the stream that
brings off-GPU layers in.

Homes: "gpu" (resident on the compute device), "cpu_pinned", "cpu_pageable", "disk"
(written to a temporary file and memory-mapped back). The units a pass walks are the
layers 0..L-1 and then the head (final norm + LM head), always in that order, pass after
pass. A unit's off-GPU tensors are packed at build time into one flat host buffer per home,
laid out exactly as in a GPU slot, so bringing a layer in is one large copy per home, not
dozens of small ones (copies under ~1 MB are far below link bandwidth). With routed experts
(placement.experts = routed) the ring copies a MoE layer without its experts, and the FFN
copies in each expert its router picked (fetch_experts, on the compute stream, after the
ring's copy of that slot: acquire waited for it).

The ring: prefetch_depth + 1 preallocated GPU slots, filled round-robin on a dedicated
copy stream. The per-layer protocol is

    w = store.acquire(i)   # the compute stream waits on slot(i)'s `ready` event
    ... compute layer i with w ...
    store.release(i)       # records slot(i)'s `free` event on the compute stream and
                           # queues the next unit into the same slot; the copy stream waits
                           # on `free` before overwriting it

so the copy of the unit prefetch_depth + 1 ahead overlaps the compute of the ones in
between and no copy ever runs on the default stream. The ring continues across passes:
while the head of pass n computes, layer 0 of pass n + 1 is already streaming in. Disk
units are first read from the memory map into a pinned staging buffer (one per slot) by the
issuing thread, then copied like pinned memory. On the CPU the same code runs with plain
synchronous copies into the same preallocated slots, which is what lets tests check that
streamed execution equals resident execution bit for bit.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from specplan.formats import DEQUANT_BLOCK_ELEMS
from specplan.memory import STAGED_HOMES
from specplan.plan import Placement

from .checkpoint import Checkpoint, tensor_group
from .model import FETCH_EXPERTS, fuse_layer
from .quant import PARTS, QWeight, assemble, fused_layout
from .stats import Stats

ALIGN = 256  # bytes; keeps every tensor view in a slot aligned for vectorised kernels


def _expert_of(name: str) -> int:
    """The expert a layer tensor belongs to (block_sparse_moe.experts.E...), -1 for the rest."""
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 3 and parts[0] == "block_sparse_moe" and parts[1] == "experts" else -1
RESIDENT = Placement(attention="gpu", ffn="gpu", embed="gpu", lm_head="gpu")


@dataclass
class _Part:
    """A run of one unit's streamed bytes that share a home: host[:] -> slot[offset:offset + n]."""

    home: str
    host: torch.Tensor  # flat uint8: pinned, pageable, or memory-mapped from a file
    offset: int
    prefetched: int = -1  # bytes of it the ring copies ahead (-1: all; routed experts come after, on demand)


@dataclass
class _Unit:
    resident: dict[str, torch.Tensor] = field(default_factory=dict)
    layout: dict[str, tuple[int, torch.dtype, torch.Size]] = field(default_factory=dict)  # name -> (offset, dtype, shape)
    compressed: dict[str, tuple] = field(default_factory=dict)  # name -> (format, shape): its parts are "name#part"
    parts: list[_Part] = field(default_factory=list)
    nbytes: int = 0  # the slot bytes it fills, alignment padding included
    payload: int = 0  # its tensors' own bytes: a whole layer's stream (routed experts: at most this)
    # routed streaming: expert -> (part index, start, end) within the part's host buffer, its payload
    experts: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class WeightStore:
    def __init__(self, checkpoint: Checkpoint, placement: Placement, device: torch.device,
                 prefetch_depth: int = 1, stats: Stats | None = None):
        self.device = device
        self.routed = placement.experts == "routed" and checkpoint.spec.is_moe
        self._fetched: dict[int, set[int]] = {}  # slot -> the experts of its unit copied in so far
        self.cuda = device.type == "cuda"
        self.stats = stats
        self.bytes = {"gpu": 0, "cpu_pinned": 0, "cpu_pageable": 0, "disk": 0}
        self._spill: tempfile.TemporaryDirectory | None = None
        spec = checkpoint.spec
        self.dtype = checkpoint.dtype  # the compute dtype every compressed weight is dequantized to
        self.scratch_numel = 0  # the largest compressed matrix: the one dequantization buffer's size
        self.resident_q: list[QWeight] = []

        g = checkpoint.globals()
        self.embed_weight = self._place(g["model.embed_tokens.weight"], placement.embed, dense_use=False)
        self.units = [self._build_unit(i, self._kernel_layout(fuse_layer(checkpoint.layer(i))),
                                       lambda name, i=i: self._home(placement, i, name))
                      for i in range(spec.layers)]
        head = {"model.norm.weight": g["model.norm.weight"], "lm_head.weight": g["lm_head.weight"]}
        # a tied LM head on the GPU beside the embedding is the embedding, as plan_memory counts it
        tied_on_gpu = head["lm_head.weight"] is g["model.embed_tokens.weight"] and placement.lm_head == placement.embed == "gpu"
        if tied_on_gpu:
            del head["lm_head.weight"]
        self.units.append(self._build_unit(spec.layers, head, lambda name: placement.lm_head if name == "lm_head.weight" else "gpu"))
        if tied_on_gpu:
            self.units[-1].resident["lm_head.weight"] = self.embed_weight
            if isinstance(self.embed_weight, QWeight):
                self.scratch_numel = max(self.scratch_numel, self.embed_weight.shape[0] * self.embed_weight.shape[1])

        self.scratch = self.block = None
        if self.scratch_numel:
            self.scratch = torch.empty(self.scratch_numel, dtype=self.dtype, device=device)
            self.bytes["gpu"] += self.scratch.nbytes
            if self.dtype != torch.float32:  # the float32 arithmetic's band buffer (QWeight.dequantize)
                self.block = torch.empty(min(self.scratch_numel, DEQUANT_BLOCK_ELEMS), dtype=torch.float32, device=device)
                self.bytes["gpu"] += self.block.nbytes
            for q in self.resident_q:
                q.scratch, q.block = self.scratch, self.block
        self.order = [u for u, unit in enumerate(self.units) if unit.parts]  # units that stream
        n_slots = min(prefetch_depth + 1, len(self.order))
        slot_bytes = max((self.units[u].nbytes for u in self.order), default=0)
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(n_slots)]
        self.bytes["gpu"] += slot_bytes * n_slots
        self.staging: list[torch.Tensor] = []
        if self.cuda and any(p.home in STAGED_HOMES for u in self.order for p in self.units[u].parts):
            self.staging = [torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(n_slots)]
            self.bytes["cpu_pinned"] += slot_bytes * n_slots
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self.ready = [torch.cuda.Event() for _ in self.slots]
            self.free = [torch.cuda.Event() for _ in self.slots]
            self.staged = [torch.cuda.Event() for _ in self.slots]
        # unit u's tensors as views of slot s, made on first use: (u, s) -> name -> tensor
        self._views: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.inflight: dict[int, int] = {}  # unit -> slot holding (or receiving) it
        self._next = 0  # index into self.order of the next unit to fetch

    # ---- building ---------------------------------------------------------------------------
    @staticmethod
    def _home(placement: Placement, layer: int, name: str) -> str:
        group = tensor_group(name)
        if group == "attention":
            return placement.attention
        if group == "ffn":
            return placement.ffn_home(layer)
        return "gpu"  # norms and the router are small and needed to route before experts arrive

    def _kernel_layout(self, tensors: dict) -> dict:
        """A fused format's matrices in this device's kernel layout (int4: repacked once here)."""
        return {n: fused_layout(t, self.device) if isinstance(t, QWeight) else t for n, t in tensors.items()}

    def _dequantized(self, t: QWeight) -> None:
        """`t` is dequantized before use (not a fused kernel's): the scratch buffer holds it."""
        if not t.fmt.fused:
            self.scratch_numel = max(self.scratch_numel, t.shape[0] * t.shape[1])

    def _place(self, t: torch.Tensor | QWeight, home: str, dense_use: bool = True) -> torch.Tensor | QWeight:
        """`t` at `home`; a compressed matrix used whole (not the embedding's row lookups)
        sizes the scratch buffer it is dequantized into."""
        if isinstance(t, QWeight):
            if dense_use:
                self._dequantized(t)
            placed = replace(t, **{k: self._place(p, home) for k, p in t.parts().items()})
            self.resident_q.append(placed)
            return placed
        if home == "gpu":
            self.bytes["gpu"] += t.nbytes
            return t.to(self.device).contiguous()
        pin = home == "cpu_pinned" and self.cuda
        self.bytes[home if home != "disk" else "cpu_pageable"] += t.nbytes
        return t.contiguous().pin_memory() if pin else t.contiguous()

    def _build_unit(self, u: int, tensors: dict[str, torch.Tensor], home_of) -> _Unit:
        unit = _Unit()
        by_home: dict[str, list[str]] = {}
        for name, t in list(tensors.items()):
            home = home_of(name)
            if home == "gpu":
                unit.resident[name] = self._place(t, "gpu")
                continue
            if isinstance(t, QWeight):  # streamed as its parts, put back together by acquire
                unit.compressed[name] = (t.fmt, t.shape)
                self._dequantized(t)
                del tensors[name]
                for part, p in t.parts().items():
                    tensors[f"{name}#{part}"] = p
                    by_home.setdefault(home, []).append(f"{name}#{part}")
            else:
                by_home.setdefault(home, []).append(name)
        offset = 0
        for home, names in by_home.items():
            start = offset
            if self.routed:  # what the ring prefetches first, then each expert's tensors together
                names = sorted(names, key=_expert_of)
            prefetched, spans = -1, {}
            for name in names:
                e = _expert_of(name) if self.routed else -1
                if e >= 0 and prefetched < 0:
                    prefetched = offset - start
                unit.layout[name] = (offset, tensors[name].dtype, tensors[name].shape)
                lo = spans.get(e, (offset - start, 0))[0]
                offset = _align(offset + tensors[name].nbytes)
                unit.payload += tensors[name].nbytes
                if e >= 0:
                    spans[e] = (lo, offset - start, spans.get(e, (0, 0, 0))[2] + tensors[name].nbytes)
            flat = torch.zeros(offset - start, dtype=torch.uint8, pin_memory=home == "cpu_pinned" and self.cuda)
            for name in names:
                off, t = unit.layout[name][0] - start, tensors[name].contiguous()
                flat[off:off + t.nbytes].copy_(t.view(-1).view(torch.uint8))
            if home == "disk":
                flat = self._spill_to_disk(flat, f"unit{u}")
            for e, (lo, hi, payload) in spans.items():
                unit.experts[e] = (len(unit.parts), lo, hi, payload)
            unit.parts.append(_Part(home, flat, start, prefetched))
            self.bytes[home] += flat.nbytes
        unit.nbytes = offset
        return unit

    def fetch_experts(self, u: int, experts: list[int]) -> None:
        """Routed streaming: copy unit u's experts in `experts` that its slot does not hold yet
        (its router has picked them), on the compute stream, before their FFN."""
        unit, slot = self.units[u], self.inflight[u]
        have = self._fetched.setdefault(slot, set())
        dst = self.slots[slot]
        nbytes, copied, t = 0, 0, time.perf_counter()
        timed = self.stats is not None and self.stats.per_layer
        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if timed and self.cuda else None
        if events:
            events[0].record()
        for e in experts:
            if e in have or e not in unit.experts:
                continue
            pi, lo, hi, payload = unit.experts[e]
            p = unit.parts[pi]
            dst[p.offset + lo:p.offset + hi].copy_(p.host[lo:hi], non_blocking=self.cuda and p.home == "cpu_pinned")
            have.add(e)
            nbytes, copied = nbytes + payload, copied + 1
        if events:
            events[1].record()
        if copied and self.stats is not None:
            self.stats.count(self.stats.prefix + "experts_streamed", copied)
            self._record_copy(nbytes, seconds=time.perf_counter() - t if timed and not self.cuda else None, events=events)

    def _spill_to_disk(self, flat: torch.Tensor, name: str) -> torch.Tensor:
        if self._spill is None:
            self._spill = tempfile.TemporaryDirectory(prefix="specrun-weights-")
        path = Path(self._spill.name) / f"{name}.pt"
        torch.save(flat, path)
        return torch.load(path, mmap=True, weights_only=True)  # pages are read when copied

    # ---- the per-layer protocol ----------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if isinstance(self.embed_weight, QWeight):  # only the rows looked up are dequantized
            return self.embed_weight.rows(tokens.to(self.embed_weight.codes.device), self.dtype)
        return F.embedding(tokens.to(self.embed_weight.device), self.embed_weight)

    def acquire(self, u: int) -> dict[str, torch.Tensor]:
        """Unit u's tensors on the compute device, ready for the current stream to use."""
        unit = self.units[u]
        if not unit.parts:
            return unit.resident
        if u not in self.inflight:
            self._restart(u)
        slot = self.inflight[u]
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        views = self._views.get((u, slot))
        if views is None:
            buf = self.slots[slot]
            views = unit.resident | {
                name: buf[off:off + dtype.itemsize * shape.numel()].view(dtype).view(shape)
                for name, (off, dtype, shape) in unit.layout.items()}
            for name, (fmt, shape) in unit.compressed.items():
                parts = {p: views.pop(f"{name}#{p}") for p in PARTS if f"{name}#{p}" in views}
                views[name] = assemble(fmt, shape, parts, self.scratch, self.block)
            if unit.experts:  # routed: the FFN asks for the experts its router picked
                views[FETCH_EXPERTS] = lambda experts, u=u: self.fetch_experts(u, experts)
            self._views[(u, slot)] = views
        return views

    def release(self, u: int) -> None:
        """Unit u's compute is queued: hand its slot to the next unit in the ring."""
        if not self.units[u].parts:
            return
        slot = self.inflight.pop(u)
        if self.cuda:
            self.free[slot].record(torch.cuda.current_stream(self.device))
        self._fetch_next(slot)

    def reset(self) -> None:
        """Empty the ring (copies finished): the next pass starts as the first one did."""
        if self.cuda:
            self.copy_stream.synchronize()
        self.inflight.clear()
        self._next = 0

    def _restart(self, u: int) -> None:
        """(Re)fill the ring starting at unit u: the first pass, or a pass that broke the order."""
        if self.cuda:
            self.copy_stream.synchronize()
        self.inflight.clear()
        self._next = self.order.index(u)
        for slot in range(len(self.slots)):
            self._fetch_next(slot)

    def _fetch_next(self, slot: int) -> None:
        u = self.order[self._next]
        self._next = (self._next + 1) % len(self.order)
        self.inflight[u] = slot
        self._fetched[slot] = set()
        unit, dst = self.units[u], self.slots[slot]
        timed = self.stats is not None and self.stats.per_layer  # copy times: only with per-layer timing
        ahead = unit.payload - sum(e[3] for e in unit.experts.values())  # routed experts come on demand
        if not self.cuda:
            t = time.perf_counter()
            for p in unit.parts:
                src = p.host if p.prefetched < 0 else p.host[:p.prefetched]
                dst[p.offset:p.offset + src.numel()].copy_(src)
            self._record_copy(ahead, seconds=time.perf_counter() - t if timed else None)
            return
        # Disk and pageable parts go through pinned staging first, on this thread: a copy from
        # pageable memory would block this thread until the copy stream reached it, i.e. until
        # the slot's previous unit was computed, and leave the GPU without queued work.
        if any(p.home in STAGED_HOMES for p in unit.parts):
            self.staged[slot].synchronize()  # the last copy out of this staging buffer is done
        srcs = []
        for p in unit.parts:
            src = p.host if p.prefetched < 0 else p.host[:p.prefetched]
            if p.home in STAGED_HOMES:
                t = time.perf_counter()
                src = self.staging[slot][p.offset:p.offset + src.numel()].copy_(src)
                if self.stats is not None:
                    self.stats.add(self.stats.prefix + ("disk_read" if p.home == "disk" else "host_stage"),
                                   time.perf_counter() - t)
            srcs.append(src)
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.free[slot])  # slot's previous unit has been computed
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if timed else None
            if events:
                events[0].record()
            for p, src in zip(unit.parts, srcs):
                dst[p.offset:p.offset + src.numel()].copy_(src, non_blocking=True)
            if events:
                events[1].record()
            self.ready[slot].record()
            if self.staging:
                self.staged[slot].record()
        self._record_copy(ahead, events=events)

    def _record_copy(self, nbytes: int, seconds: float | None = None, events=None) -> None:
        if self.stats is None:
            return
        key = self.stats.prefix + "h2d"
        self.stats.count(key + "_bytes", nbytes)
        if events is not None:
            self.stats.add_events(key, *events)
        elif seconds is not None:
            self.stats.add(key, seconds)

    def close(self) -> None:
        if self.cuda and self.slots:
            self.copy_stream.synchronize()
        if self._spill is not None:
            self._spill.cleanup()
            self._spill = None

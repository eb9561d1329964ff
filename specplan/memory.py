"""Memory a plan needs on the GPU and on the host: one formula shared by the planner's
constraints, the simulator's memory containers and the runtime's refusal check."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import NamedTuple

from .cost import activation_bytes, expected_experts_touched, kv_cache_bytes
from .hardware import HardwareProfile
from .models import ModelSpec
from .plan import Placement, Schedule
from .units import fmt_bytes
from .workload import Workload


@dataclass(frozen=True)
class MemoryNeed:
    gpu: dict  # component -> bytes
    host: dict  # component -> bytes (pinned and pageable)
    pinned: dict  # the page-locked subset of host

    @property
    def gpu_bytes(self) -> float:
        return sum(self.gpu.values())

    @property
    def host_bytes(self) -> float:
        return sum(self.host.values())

    @property
    def pinned_bytes(self) -> float:
        return sum(self.pinned.values())

    def fits(self, profile: HardwareProfile) -> bool:
        """Within every limit (what `violations` checks, without saying it)."""
        return (self.gpu_bytes <= profile.gpu.memory_bytes - profile.gpu.reserved_bytes
                and self.host_bytes <= profile.host.memory_bytes
                and self.pinned_bytes <= profile.host.memory_bytes * profile.host.pinned_fraction)

    def violations(self, profile: HardwareProfile) -> list[str]:
        """Each limit the plan exceeds, as 'what: needs X, has Y' (empty when it fits)."""
        out = []
        gpu_cap = profile.gpu.memory_bytes - profile.gpu.reserved_bytes
        if self.gpu_bytes > gpu_cap:
            top = max(self.gpu, key=self.gpu.get)
            out.append(f"GPU memory: needs {fmt_bytes(self.gpu_bytes)}, has {fmt_bytes(gpu_cap)} "
                       f"after {fmt_bytes(profile.gpu.reserved_bytes)} reserved (largest part: {top} {fmt_bytes(self.gpu[top])})")
        if self.host_bytes > profile.host.memory_bytes:
            top = max(self.host, key=self.host.get)
            out.append(f"host memory: needs {fmt_bytes(self.host_bytes)}, has {fmt_bytes(profile.host.memory_bytes)} "
                       f"(largest part: {top} {fmt_bytes(self.host[top])})")
        pin_cap = profile.host.memory_bytes * profile.host.pinned_fraction
        if self.pinned_bytes > pin_cap:
            out.append(f"pinned host memory: needs {fmt_bytes(self.pinned_bytes)}, may pin {fmt_bytes(pin_cap)} "
                       f"({profile.host.pinned_fraction:.0%} of host memory)")
        return out


def routed(target: ModelSpec, placement: Placement) -> bool:
    """The plan streams a MoE layer's experts on demand, once its router has picked them."""
    return placement.experts == "routed" and target.is_moe


def streamed_chunks(target: ModelSpec, placement: Placement, layer: int) -> list[tuple[str, str, float]]:
    """The copies the ring makes of one streamed layer ahead of its compute, as (group, home,
    bytes): the attention block, then each expert (or the dense MLP); with routed experts, the
    experts come later (routed_expert_chunks). The runtime copies at the same granularity."""
    b = target.layer_bytes
    chunks = []
    if placement.attention != "gpu":
        chunks.append(("attention", placement.attention, b.attention))
    if placement.ffn_home(layer) != "gpu" and not routed(target, placement):
        if target.is_moe:
            chunks += [("expert", placement.ffn, b.expert)] * target.experts
        else:
            chunks.append(("mlp", placement.ffn, b.expert))
    return chunks


def routed_expert_chunks(target: ModelSpec, placement: Placement, layer: int, tokens_before: float,
                         tokens: float) -> list[tuple[str, str, float]]:
    """Routed streaming: the experts one layer copies for a group of `tokens` tokens after the
    pass's earlier groups (`tokens_before`) brought theirs: the expected distinct experts of
    all of them less those already in (cost.expected_experts_touched)."""
    if not routed(target, placement) or placement.ffn_home(layer) == "gpu":
        return []
    new = (expected_experts_touched(tokens_before + tokens, target.experts, target.top_k)
           - (expected_experts_touched(tokens_before, target.experts, target.top_k) if tokens_before else 0.0))
    return [("expert", placement.ffn, new * target.layer_bytes.expert)] if new > 0 else []


def _target_activation_bytes(target: ModelSpec, schedule: Schedule, workload: Workload) -> float:
    """Activation memory of the target's largest pass (a prefill chunk, or a verify or decode
    batch; flexgen's micro-batches share one pass), in bytes. Continuous admission computes a
    pass's rows one run after another, so its largest piece is a decode batch, the start-up's
    prefill_chunk prompts, or the prompts of at most prefill_tokens tokens a later pass carries."""
    seq = workload.max_seq_len + schedule.gamma
    q = schedule.gamma + 1 if schedule.speculative else 1
    rows = schedule.target_batch * (schedule.num_batches if schedule.policy == "flexgen" else 1)
    p = workload.max_prompt_len
    # waves' prefill passes, and continuous admission's start-up passes, take prefill_chunk prompts
    prefill = activation_bytes(target, schedule.prefill_chunk, p, p)
    if schedule.admission == "continuous":
        chunk = min(schedule.prefill_tokens, p)
        prefill = max(prefill, activation_bytes(target, max(1, min(rows, schedule.prefill_tokens // chunk)), chunk, p))
    return max(prefill, activation_bytes(target, rows, q, seq))


def _draft_activation_bytes(draft: ModelSpec, schedule: Schedule, workload: Workload, draft_kv: str) -> float:
    """The draft's largest pass: its prefill in draft_batch rows, or a decode step over 2 tokens
    a row (a draft that keeps no KV reads whole contexts), in bytes."""
    seq = workload.max_seq_len + schedule.gamma
    read = seq if draft_kv == "recompute" else workload.max_prompt_len
    return max(activation_bytes(draft, schedule.draft_batch, read, read),
               activation_bytes(draft, schedule.draft_batch, 2, seq))


def streamed_bytes_per_pass(target: ModelSpec, placement: Placement) -> float:
    """The weight bytes one pass of the target copies to the GPU ahead of its compute: every
    streamed layer's chunks (all experts, unless routed: those come as the routers pick them)
    and the LM head if it streams."""
    layers = sum(c[2] for i in range(target.layers) for c in streamed_chunks(target, placement, i))
    return layers + (target.head_bytes if placement.lm_head != "gpu" else 0.0)


def stream_slot_bytes(target: ModelSpec, placement: Placement) -> float:
    """One weight-stream buffer: the largest unit that streams, a layer (its FFN unless every FFN
    is resident, plus its attention unless resident) or the LM head with the final norm when the
    head streams. The program's GPU memory row and plan_memory both take it from here."""
    b, L = target.layer_bytes, target.layers
    streamed = (b.ffn if placement.ffn_gpu_layers < L else 0.0) + (b.attention if placement.attention != "gpu" else 0.0)
    if placement.lm_head != "gpu":  # the head streams through the same slots
        streamed = max(streamed, target.head_bytes + target.hidden * target.dtype_bytes)
    return streamed


def logits_bytes(target: ModelSpec, schedule: Schedule) -> float:
    """fp32 logits of the largest decode pass: every verified position of a batch (prefill
    keeps one position per row)."""
    q = schedule.gamma + 1 if schedule.speculative else 1
    rows = schedule.target_batch * (schedule.num_batches if schedule.policy == "flexgen" else 1)
    return max(rows * q, schedule.prefill_chunk) * target.vocab * 4


STAGED_HOMES = ("disk", "cpu_pageable")  # streamed weights copied through pinned staging buffers


def streamed_homes(placement: Placement, layers: int) -> set[str]:
    """Where the weights that stream to the GPU live (empty when nothing streams)."""
    homes = set()
    if placement.attention != "gpu":
        homes.add(placement.attention)
    if placement.ffn_gpu_layers < layers:
        homes.add(placement.ffn)
    if placement.lm_head != "gpu":
        homes.add(placement.lm_head)
    return homes


def _homed(parts: list[tuple[str, str, float]]) -> MemoryNeed:
    """(name, where, bytes) parts as GPU, host and pinned components (where: gpu, cpu_pinned,
    cpu_pageable; disk takes no memory); a name that recurs adds up."""
    gpu: dict[str, float] = {}
    host: dict[str, float] = {}
    pinned: dict[str, float] = {}
    for name, where, nbytes in parts:
        if nbytes <= 0:
            continue
        if where == "gpu":
            gpu[name] = gpu.get(name, 0.0) + nbytes
        elif where in ("cpu_pinned", "cpu_pageable"):
            host[name] = host.get(name, 0.0) + nbytes
            if where == "cpu_pinned":
                pinned[name] = pinned.get(name, 0.0) + nbytes
    return MemoryNeed(gpu, host, pinned)


def weights_memory(target: ModelSpec, placement: Placement, prefetch_depth: int) -> list[tuple[str, str, float]]:
    """The target's weights where the placement keeps them, and the stream buffers (a ring of
    prefetch_depth + 1 slots, staged through pinned buffers when weights stream from disk or
    pageable memory): what a plan's memory owes to its placement, as (name, where, bytes)."""
    b = target.layer_bytes
    L = target.layers
    parts = [("target attention weights", placement.attention, b.attention * L),
             ("target FFN weights (resident)", "gpu", b.ffn * placement.ffn_gpu_layers),
             ("target FFN weights (streamed)", placement.ffn, b.ffn * (L - placement.ffn_gpu_layers)),
             ("router and norms", "gpu", (b.router + b.norms) * L + target.hidden * target.dtype_bytes),
             ("embedding", placement.embed, target.embed_bytes)]
    # tied and both on the GPU: one tensor; a head that streams is packed into its own copy
    if not (target.head_is_embedding and placement.lm_head == placement.embed == "gpu"):
        parts.append(("lm_head", placement.lm_head, target.head_bytes))
    if target.dequant_scratch_bytes:  # where a compressed matrix is dequantized before its matmul
        parts.append(("dequantization scratch", "gpu", target.dequant_scratch_bytes))
    streamed = stream_slot_bytes(target, placement)
    if streamed > 0:
        slots = prefetch_depth + 1
        parts.append(("weight stream buffers", "gpu", slots * streamed))
        if streamed_homes(placement, L) & set(STAGED_HOMES):
            parts.append(("pinned staging buffers", "cpu_pinned", slots * streamed))
    return parts


def target_rows_memory(target: ModelSpec, schedule: Schedule, workload: Workload) -> list[tuple[str, str, float]]:
    """What a plan's memory owes to the target's rows: its KV cache, activations and logits,
    as (name, where, bytes). The prefetch depth, the draft batch and the draft play no part."""
    seq = workload.max_seq_len + schedule.gamma  # room for the drafted tokens being verified
    return [("target KV cache", "gpu" if schedule.attention_device == "gpu" else "cpu_pinned",
             kv_cache_bytes(target, schedule.rows, seq)),
            ("activations (target)", "gpu", _target_activation_bytes(target, schedule, workload)),
            ("logits (target)", "gpu", logits_bytes(target, schedule))]


def draft_rows_memory(draft: ModelSpec | None, schedule: Schedule, workload: Workload,
                      draft_kv: str) -> list[tuple[str, str, float]]:
    """What a speculative plan's memory owes to the draft: its weights, its KV where
    `draft_kv` keeps it, and its activations, as (name, where, bytes); nothing without one."""
    if draft is None or not schedule.speculative:
        return []
    seq = workload.max_seq_len + schedule.gamma
    parts = [("draft weights", "gpu", draft.total_bytes)]
    if draft.dequant_scratch_bytes:
        parts.append(("draft dequantization scratch", "gpu", draft.dequant_scratch_bytes))
    draft_kv_all = kv_cache_bytes(draft, schedule.rows, seq)
    if draft_kv == "gpu":
        parts.append(("draft KV cache", "gpu", draft_kv_all))
    elif draft_kv == "recompute":  # one micro-batch's context, refilled every round
        parts.append(("draft KV recompute buffer", "gpu", kv_cache_bytes(draft, schedule.draft_batch, seq)))
    else:
        # two micro-batches' worth: one drafts while the next is swapped in
        parts += [("draft KV swap buffers", "gpu", 2 * kv_cache_bytes(draft, schedule.draft_batch, seq)),
                  ("draft KV cache", "cpu_pinned", draft_kv_all)]
    parts.append(("activations (draft)", "gpu", _draft_activation_bytes(draft, schedule, workload, draft_kv)))
    return parts


def plan_memory(target: ModelSpec, draft: ModelSpec | None, schedule: Schedule, placement: Placement,
                workload: Workload) -> MemoryNeed:
    """Memory of a plan by component: its weights and stream buffers (weights_memory), the
    target's rows (target_rows_memory), then the draft's (draft_rows_memory)."""
    return _homed(weights_memory(target, placement, schedule.prefetch_depth)
                  + target_rows_memory(target, schedule, workload)
                  + draft_rows_memory(draft, schedule, workload, placement.draft_kv))


class MemoryTotals(NamedTuple):
    """A plan's GPU, host and pinned bytes, without the components (what fits() needs)."""

    gpu_bytes: float
    host_bytes: float
    pinned_bytes: float

    fits = MemoryNeed.fits

    @classmethod
    def of(cls, need: MemoryNeed) -> "MemoryTotals":
        return cls(need.gpu_bytes, need.host_bytes, need.pinned_bytes)


class MemoryTotalsCache:
    """plan_memory's totals for many schedules and placements of one target, draft and
    workload, each the sum of its three parts, each part worked out once: the weights part
    per placement and prefetch depth, the target's rows per what of the schedule they depend
    on, the draft's per rows, gamma, draft batch and draft KV home. The planner's shortlist
    asks for tens of thousands."""

    def __init__(self, target: ModelSpec, draft: ModelSpec | None, workload: Workload):
        self.target, self.draft, self.workload = target, draft, workload
        self._weights: dict = {}  # (placement, prefetch depth) -> totals
        self._target_rows: dict = {}  # what of the schedule they depend on -> totals
        self._draft_rows: dict = {}  # the same, and the draft KV's home -> totals

    def _weights_part(self, placement: Placement, depth: int) -> MemoryTotals:
        key = (placement, depth)
        got = self._weights.get(key)
        if got is None:
            got = self._weights[key] = MemoryTotals.of(_homed(weights_memory(self.target, placement, depth)))
        return got

    def _target_part(self, s: Schedule) -> MemoryTotals:
        key = (s.policy, s.target_batch, s.num_batches, s.prefill_chunk, s.gamma, s.attention_device, s.admission,
               s.prefill_tokens)
        got = self._target_rows.get(key)
        if got is None:
            got = self._target_rows[key] = MemoryTotals.of(_homed(target_rows_memory(self.target, s, self.workload)))
        return got

    def _draft_part(self, s: Schedule, draft_kv: str) -> MemoryTotals:
        key = (s.policy, s.rows, s.gamma, s.draft_batch, draft_kv)
        got = self._draft_rows.get(key)
        if got is None:
            got = self._draft_rows[key] = MemoryTotals.of(_homed(draft_rows_memory(self.draft, s, self.workload, draft_kv)))
        return got

    def __call__(self, schedule: Schedule, placement: Placement) -> MemoryTotals:
        w = self._weights_part(placement, schedule.prefetch_depth)
        t = self._target_part(schedule)
        d = self._draft_part(schedule, placement.draft_kv)
        return MemoryTotals(w[0] + t[0] + d[0], w[1] + t[1] + d[1], w[2] + t[2] + d[2])

    def first_fit(self, schedule: Schedule, placements, profile: HardwareProfile) -> Placement | None:
        """The first of `placements` whose plan fits `profile`, or None."""
        return next((pl for pl in placements if self(schedule, pl).fits(profile)), None)


@functools.lru_cache(maxsize=None)
def placement_ladder(draft_kv: str | None = None) -> tuple[Placement, ...]:
    """Placements from the most GPU-hungry to the least: draft KV on the GPU, then on the
    host, then the LM head streamed, then weights in pageable memory, then on disk. With
    `draft_kv` given, every rung keeps the draft's KV there."""
    base = Placement(attention="cpu_pinned", ffn="cpu_pinned", embed="cpu_pageable", lm_head="gpu", draft_kv="gpu")
    if draft_kv is not None:
        return tuple(dict.fromkeys(replace(pl, draft_kv=draft_kv) for pl in placement_ladder()))
    return (base,
            replace(base, draft_kv="cpu"),
            replace(base, draft_kv="cpu", lm_head="cpu_pinned"),
            replace(base, draft_kv="cpu", lm_head="cpu_pinned", ffn="cpu_pageable", attention="cpu_pageable"),
            replace(base, draft_kv="cpu", lm_head="cpu_pageable", ffn="disk", attention="disk"))


def least_placement(target: ModelSpec, draft: ModelSpec | None, schedule: Schedule, workload: Workload,
                    profile: HardwareProfile, draft_kv: str | None = None,
                    explain: bool = True, needs: MemoryTotalsCache | None = None) -> tuple[Placement | None, list[str]]:
    """The first placement of the ladder that fits `schedule` (no FFN layer resident), or
    None and the limits the last one breaks (unless not `explain`: the planner's shortlist
    asks for one shape's reasons, not thousands). The planner starts its search from it; a
    schedule given by flags (`specplan simulate`) is placed with it. `needs`, kept for one
    target, draft and workload, holds the memory totals already worked out (they depend on
    the machine only through whether they fit)."""
    needs = needs or MemoryTotalsCache(target, draft, workload)
    ladder = placement_ladder(draft_kv)
    pl = needs.first_fit(schedule, ladder, profile)
    if pl is not None:
        return pl, []
    return None, plan_memory(target, draft, schedule, ladder[-1], workload).violations(profile) if explain else []

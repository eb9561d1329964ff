"""Memory a plan needs on the GPU and on the host: one formula shared by the planner's
constraints, the simulator's memory containers and the runtime's refusal check."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

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


def streamed_chunks(target: ModelSpec, placement: Placement, layer: int,
                    tokens: float | None = None) -> list[tuple[str, str, float]]:
    """The copies one streamed layer takes, as (group, home, bytes): the attention block,
    then each expert (or the dense MLP). The runtime copies at the same granularity."""
    b = target.layer_bytes
    chunks = []
    if placement.attention != "gpu":
        chunks.append(("attention", placement.attention, b.attention))
    if placement.ffn_home(layer) != "gpu":
        if target.is_moe:
            n = target.experts if tokens is None else expected_experts_touched(tokens, target.experts, target.top_k)
            whole, frac = int(n), n - int(n)
            chunks += [("expert", placement.ffn, b.expert)] * whole
            if frac > 1e-9:
                chunks.append(("expert", placement.ffn, b.expert * frac))
        else:
            chunks.append(("mlp", placement.ffn, b.expert))
    return chunks


def pass_activation_bytes(target: ModelSpec, draft: ModelSpec | None, schedule: Schedule,
                          workload: Workload, draft_kv: str = "gpu") -> tuple[float, float]:
    """Activation memory of the largest pass of the target (a prefill chunk, or a verify or
    decode batch; flexgen's micro-batches share one pass) and of the draft (its prefill in
    draft_batch rows, or a decode step over 2 tokens a row; a recomputing draft reads whole
    contexts), in bytes. Continuous admission computes a pass's rows one run after another, so
    its largest piece is a decode batch, the start-up's prefill_chunk prompts, or the prompts
    of at most prefill_tokens tokens a later pass carries."""
    seq = workload.max_seq_len + schedule.gamma
    q = schedule.gamma + 1 if schedule.speculative else 1
    rows = schedule.target_batch * (schedule.num_batches if schedule.policy == "flexgen" else 1)
    p = workload.max_prompt_len
    # waves' prefill passes, and continuous admission's start-up passes, take prefill_chunk prompts
    prefill = activation_bytes(target, schedule.prefill_chunk, p, p)
    if schedule.admission == "continuous":
        chunk = min(schedule.prefill_tokens, p)
        prefill = max(prefill, activation_bytes(target, max(1, min(rows, schedule.prefill_tokens // chunk)), chunk, p))
    target_act = max(prefill, activation_bytes(target, rows, q, seq))
    draft_act = 0.0
    if draft is not None:
        read = seq if draft_kv == "recompute" else p
        draft_act = max(activation_bytes(draft, schedule.draft_batch, read, read),
                        activation_bytes(draft, schedule.draft_batch, 2, seq))
    return target_act, draft_act


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


def plan_memory(target: ModelSpec, draft: ModelSpec | None, schedule: Schedule, placement: Placement,
                workload: Workload, activations: tuple[float, float] | None = None) -> MemoryNeed:
    """`activations`: pass_activation_bytes of this schedule and draft KV home, when the caller
    has it already (the placement ladder tries several placements of one schedule)."""
    b = target.layer_bytes
    L = target.layers
    rows = schedule.rows
    seq = workload.max_seq_len + schedule.gamma  # room for the drafted tokens being verified
    gpu: dict[str, float] = {}
    host: dict[str, float] = {}
    pinned: dict[str, float] = {}

    def home(name: str, where: str, nbytes: float) -> None:
        if nbytes <= 0:
            return
        if where == "gpu":
            gpu[name] = gpu.get(name, 0.0) + nbytes
        elif where in ("cpu_pinned", "cpu_pageable"):
            host[name] = host.get(name, 0.0) + nbytes
            if where == "cpu_pinned":
                pinned[name] = pinned.get(name, 0.0) + nbytes

    home("target attention weights", placement.attention, b.attention * L)
    home("target FFN weights (resident)", "gpu", b.ffn * placement.ffn_gpu_layers)
    home("target FFN weights (streamed)", placement.ffn, b.ffn * (L - placement.ffn_gpu_layers))
    home("router and norms", "gpu", (b.router + b.norms) * L + target.hidden * target.dtype_bytes)
    home("embedding", placement.embed, target.embed_bytes)
    # tied and both on the GPU: one tensor; a head that streams is packed into its own copy
    if not (target.tie_embeddings and placement.lm_head == placement.embed == "gpu"):
        home("lm_head", placement.lm_head, target.head_bytes)

    streamed = stream_slot_bytes(target, placement)
    if streamed > 0:
        slots = schedule.prefetch_depth + 1
        gpu["weight stream buffers"] = slots * streamed
        if streamed_homes(placement, L) & set(STAGED_HOMES):
            home("pinned staging buffers", "cpu_pinned", slots * streamed)

    target_kv = kv_cache_bytes(target, rows, seq)
    if schedule.attention_device == "gpu":
        gpu["target KV cache"] = target_kv
    else:
        home("target KV cache", "cpu_pinned", target_kv)

    act_target, act_draft = activations or pass_activation_bytes(
        target, draft if schedule.speculative else None, schedule, workload, placement.draft_kv)
    gpu["activations (target)"] = act_target
    gpu["logits (target)"] = logits_bytes(target, schedule)
    if draft is not None and schedule.speculative:
        gpu["draft weights"] = draft.total_bytes
        draft_kv_all = kv_cache_bytes(draft, rows, seq)
        if placement.draft_kv == "gpu":
            gpu["draft KV cache"] = draft_kv_all
        elif placement.draft_kv == "recompute":  # one micro-batch's context, refilled every round
            gpu["draft KV recompute buffer"] = kv_cache_bytes(draft, schedule.draft_batch, seq)
        else:
            # two micro-batches' worth: one drafts while the next is swapped in
            gpu["draft KV swap buffers"] = 2 * kv_cache_bytes(draft, schedule.draft_batch, seq)
            home("draft KV cache", "cpu_pinned", draft_kv_all)
        gpu["activations (draft)"] = act_draft
    return MemoryNeed(gpu, host, pinned)


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
                    explain: bool = True, needs: dict | None = None) -> tuple[Placement | None, list[str]]:
    """The first placement of the ladder that fits `schedule` (no FFN layer resident), or
    None and the limits the last one breaks (unless not `explain`: the planner's shortlist
    asks for one shape's reasons, not thousands). The planner starts its search from it; a
    schedule given by flags (`specplan simulate`) is placed with it. `needs`, a dict kept for
    one target, draft and workload, holds the memory needs already worked out (they depend on
    the machine only through whether they fit)."""
    need = None
    acts: dict[bool, tuple[float, float]] = {}  # activations differ only for a draft that keeps no KV
    for pl in placement_ladder(draft_kv):
        need = needs.get((schedule, pl)) if needs is not None else None
        if need is None:
            key = pl.draft_kv == "recompute"
            if key not in acts:
                acts[key] = pass_activation_bytes(target, draft if schedule.speculative else None, schedule, workload,
                                                  pl.draft_kv)
            need = plan_memory(target, draft, schedule, pl, workload, acts[key])
            if needs is not None:
                needs[(schedule, pl)] = need
        if need.fits(profile):
            return pl, []
    return None, need.violations(profile) if explain else []

"""Memory a plan needs on the GPU and on the host: one formula shared by the planner's
constraints, the simulator's memory containers and the runtime's refusal check."""

from __future__ import annotations

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
                          workload: Workload) -> tuple[float, float]:
    """Activation memory of the largest pass of the target (a prefill chunk, or a verify or
    decode batch; flexgen's micro-batches share one pass) and of the draft (its prefill in
    draft_batch rows, or a decode step over 2 tokens a row), in bytes."""
    seq = workload.max_seq_len + schedule.gamma
    q = schedule.gamma + 1 if schedule.speculative else 1
    rows = schedule.target_batch * (schedule.num_batches if schedule.policy == "flexgen" else 1)
    target_act = max(activation_bytes(target, schedule.prefill_chunk, workload.max_prompt_len, workload.max_prompt_len),
                     activation_bytes(target, rows, q, seq))
    draft_act = 0.0
    if draft is not None:
        draft_act = max(activation_bytes(draft, schedule.draft_batch, workload.max_prompt_len, workload.max_prompt_len),
                        activation_bytes(draft, schedule.draft_batch, 2, seq))
    return target_act, draft_act


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
                workload: Workload) -> MemoryNeed:
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

    # the largest layer that streams: its FFN unless every FFN is resident, plus attention unless resident
    streamed = (b.ffn if placement.ffn_gpu_layers < L else 0.0) + (b.attention if placement.attention != "gpu" else 0.0)
    if placement.lm_head != "gpu":  # the head streams through the same slots
        streamed = max(streamed, target.head_bytes + target.hidden * target.dtype_bytes)
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

    act_target, act_draft = pass_activation_bytes(target, draft if schedule.speculative else None, schedule, workload)
    gpu["activations (target)"] = act_target
    gpu["logits (target)"] = logits_bytes(target, schedule)
    if draft is not None and schedule.speculative:
        gpu["draft weights"] = draft.total_bytes
        draft_kv_all = kv_cache_bytes(draft, rows, seq)
        if placement.draft_kv == "gpu":
            gpu["draft KV cache"] = draft_kv_all
        else:
            # two micro-batches' worth: one drafts while the next is swapped in
            gpu["draft KV swap buffers"] = 2 * kv_cache_bytes(draft, schedule.draft_batch, seq)
            home("draft KV cache", "cpu_pinned", draft_kv_all)
        gpu["activations (draft)"] = act_draft
    return MemoryNeed(gpu, host, pinned)


def placement_ladder() -> tuple[Placement, ...]:
    """Placements from the most GPU-hungry to the least: draft KV on the GPU, then on the
    host, then the LM head streamed, then weights in pageable memory, then on disk."""
    base = Placement(attention="cpu_pinned", ffn="cpu_pinned", embed="cpu_pageable", lm_head="gpu", draft_kv="gpu")
    return (base,
            replace(base, draft_kv="cpu"),
            replace(base, draft_kv="cpu", lm_head="cpu_pinned"),
            replace(base, draft_kv="cpu", lm_head="cpu_pinned", ffn="cpu_pageable", attention="cpu_pageable"),
            replace(base, draft_kv="cpu", lm_head="cpu_pageable", ffn="disk", attention="disk"))


def least_placement(target: ModelSpec, draft: ModelSpec | None, schedule: Schedule, workload: Workload,
                    profile: HardwareProfile) -> tuple[Placement | None, list[str]]:
    """The first placement of the ladder that fits `schedule` (no FFN layer resident), or
    None and the limits the last one breaks. The planner starts its search from it; a
    schedule given by flags (`specplan simulate`) is placed with it."""
    problems: list[str] = []
    for pl in placement_ladder():
        problems = plan_memory(target, draft, schedule, pl, workload).violations(profile)
        if not problems:
            return pl, []
    return None, problems

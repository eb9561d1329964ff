"""Shapes: the discrete part of a plan (policy, batch sizes, gamma, attention device) and
the per-shape coefficients of the linear cost model, all from the shared cost primitives.

For one shape, every stage time of a round is a constant except the weight-stream time,
which is linear in where the weights live. That is what makes the program linear.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

from specplan.cost import (
    d2h_time_s,
    draft_step_s,
    expected_accepted_tokens_table,
    expected_verify_passes,
    h2d_time_s,
    pool_pair_s,
    target_head_s,
    target_layer_costs,
)
from specplan.hardware import HardwareProfile
from specplan.models import ModelSpec
from specplan.plan import Schedule
from specplan.workload import Workload

BATCHES = (8, 16, 32, 64, 96, 128, 192, 256, 320, 384, 512, 768, 1024)
GAMMAS = (1, 2, 3, 4, 5, 6, 7, 8)
DRAFT_BATCHES = (8, 16, 32, 64, 128, 256)
PREFILL_CHUNKS = (4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Shape:
    policy: str
    target_batch: int
    num_batches: int
    gamma: int
    draft_batch: int
    prefill_chunk: int  # waves: rows per prefill pass
    attention_device: str
    admission: str = "waves"
    prefill_tokens: int = 512  # continuous: prompt tokens a pass may carry
    recompute: bool = False  # the draft keeps no KV (placement.draft_kv = "recompute")

    @functools.lru_cache(maxsize=1 << 16)  # noqa: B019 - shapes are few and live for the process
    def schedule(self, prefetch_depth: int) -> Schedule:
        return Schedule(policy=self.policy, target_batch=self.target_batch, num_batches=self.num_batches,
                        prefill_chunk=self.prefill_chunk, draft_batch=self.draft_batch, gamma=self.gamma,
                        attention_device=self.attention_device,
                        prefetch_depth=0 if self.policy == "sequential" else prefetch_depth,
                        admission=self.admission, prefill_tokens=self.prefill_tokens)

    @property
    def rows(self) -> int:
        return self.target_batch * self.num_batches

    @property
    def but_chunk(self) -> tuple:
        """Every field but the prefill chunk: shapes alike in this decode alike."""
        return (self.policy, self.target_batch, self.num_batches, self.gamma, self.draft_batch, self.attention_device,
                self.admission, self.prefill_tokens, self.recompute)


class Coeffs(NamedTuple):  # immutable, and cheap to make: the shortlist makes thousands
    """Per-shape constants of the linear model (seconds unless named otherwise)."""

    tokens: float  # tokens one wave of rows earns the job (a partial last wave costs a whole one)
    phases: float  # round-time units per wave (verify phases or decode steps)
    gpu_s: float  # GPU busy time per phase: target compute (+ the draft where they share a phase)
    cpu_s: float  # CPU attention per phase
    chain_s: float  # one target pass's critical path, copies excluded
    draft_s: float  # draft time per phase
    serial_s: float  # time per phase that overlaps with nothing else (spec-serial's draft)
    kv_swap_s: float  # draft KV in and out per phase, if the draft KV lives on the host
    prefill_passes: float  # separate prefill passes per wave of rows (continuous: start-up, spread over the job)
    prefill_gpu_s: float  # all prefill compute, target and draft
    prefill_chain_s: float  # critical path of all prefill passes, copies excluded


def continuous_prefill_tokens(policy: str, batch: int, batches: int, gamma: int, workload: Workload) -> int:
    """The prompt-token budget of a continuous pass: room for twice the prompts the rows a
    pass serves admit per pass in steady state (rows finish in bunches), in whole prompts,
    one at least; a flexgen pass serves every batch."""
    per_row = row_passes(policy, gamma, workload)
    served = batch * (batches if policy == "flexgen" else 1)
    return int(workload.max_prompt_len * max(1, math.ceil(2 * served / per_row)))


def row_passes(policy: str, gamma: int, workload: Workload) -> float:
    """Passes a row spends in its slot under continuous admission: one being prefilled, then
    (gen - 1) / E decoding, E the tokens it gains a pass (1 without a draft)."""
    spec = policy in ("specoffload", "spec-serial")
    tokens = expected_accepted_tokens_table(workload.acceptance_rates(gamma)) if spec else 1.0
    return 1.0 + (workload.gen_len - 1) / tokens


def enumerate_shapes(policy: str, workload: Workload, attention_devices=("cpu", "gpu"),
                     admissions=("waves", "continuous")) -> list[Shape]:
    """Every shape of a policy: batch sizes, attention device, gamma and draft batch, and per
    admission mode what it varies (the prefill chunk in waves; the prompt-token budget follows
    from the batch in continuous, offered when there are more prompts than rows: else no
    slot is ever refilled); a speculative shape also with a draft that keeps no KV."""
    spec = policy in ("specoffload", "spec-serial")
    nb = 2 if policy in ("specoffload", "flexgen") else 1
    out = []
    max_b = max(1, workload.num_prompts // nb)
    batches = sorted({min(b, max_b) for b in BATCHES})
    for b in batches:
        rows = b * nb
        chunks = sorted({min(c, rows) for c in PREFILL_CHUNKS})
        for attn in attention_devices:
            for g, db in ([(g, db) for g in GAMMAS for db in sorted({min(d, b) for d in DRAFT_BATCHES})]
                          if spec else [(0, b)]):
                if "waves" in admissions:
                    out += [Shape(policy, b, nb, g, db, pc, attn) for pc in chunks]
                    if spec:
                        out.append(Shape(policy, b, nb, g, db, chunks[-1], attn, recompute=True))
                if "continuous" in admissions and workload.num_prompts > rows:  # else nothing to refill
                    # the prefill chunk sets the start-up passes (scheduler: prefill_rows prompts a pass)
                    budget = continuous_prefill_tokens(policy, b, nb, g, workload)
                    out.append(Shape(policy, b, nb, g, db, chunks[-1], attn, "continuous", budget))
                    if spec:
                        out.append(Shape(policy, b, nb, g, db, chunks[-1], attn, "continuous", budget, True))
    return out


def coefficients(shape: Shape, target: ModelSpec, draft: ModelSpec | None, profile: HardwareProfile,
                 workload: Workload, memo: dict | None = None) -> Coeffs:
    """The shape's constants. `memo`, a dict kept for one target, draft, profile and workload,
    keeps them, and shares the decode terms between shapes that differ only in their prefill
    chunk."""
    if memo is None:
        return _coefficients(shape, target, draft, profile, workload)
    got = memo.get(shape)
    if got is None:
        if shape.admission == "continuous":
            got = _coefficients(shape, target, draft, profile, workload, memo)
        else:
            key = shape.but_chunk
            base = memo.get(key)
            if base is None:
                base = memo[key] = _coefficients(shape, target, draft, profile, workload, memo)
            got = _with_wave_prefill(base, shape, target, draft, profile, workload, memo)
        memo[shape] = got
    return got


def useful_share(rows: int, workload: Workload) -> float:
    """The share of a wave's tokens the job earns: a last, partial wave takes a whole wave's time."""
    n_waves = workload.num_prompts / rows
    return 1.0 if n_waves <= 1 else n_waves / math.ceil(n_waves)


def _with_wave_prefill(co: Coeffs, shape: Shape, target: ModelSpec, draft: ModelSpec | None,
                       profile: HardwareProfile, workload: Workload, memo: dict | None = None) -> Coeffs:
    """`co` with the prefill terms of a waves shape: passes of prefill_chunk rows each (which
    depend on the rows, the chunk, where attention runs and whether a draft reads the
    prompts; `memo` keeps them for the shapes alike in those)."""
    spec = shape.policy in ("specoffload", "spec-serial")
    key = ("wave prefill", shape.rows, shape.prefill_chunk, shape.attention_device, spec)
    terms = memo.get(key) if memo is not None else None
    if terms is None:
        P, T, p = profile, target, workload.mean_prompt_len
        n_pre = math.ceil(shape.rows / shape.prefill_chunk)
        chunk_rows = shape.rows / n_pre
        pc = target_layer_costs(P, T, chunk_rows, p, p / 2, shape.attention_device, prefill=True)
        pre_gpu = T.layers * (pc.proj + pc.attention + pc.ffn + pc.host) + target_head_s(P, T, chunk_rows)
        draft_pre = draft_step_s(P, draft, chunk_rows, p, p / 2) if spec else 0.0
        terms = (n_pre, n_pre * (pre_gpu + draft_pre), n_pre * pre_gpu)
        if memo is not None:
            memo[key] = terms
    n_pre, gpu_s, chain_s = terms
    return co._replace(prefill_passes=n_pre, prefill_gpu_s=gpu_s, prefill_chain_s=chain_s)


def _coefficients(shape: Shape, target: ModelSpec, draft: ModelSpec | None, profile: HardwareProfile,
                  workload: Workload, memo: dict | None = None) -> Coeffs:
    P, T, D = profile, target, draft
    b, g, nb = shape.target_batch, shape.gamma, shape.num_batches
    spec = shape.policy in ("specoffload", "spec-serial")
    continuous = shape.admission == "continuous"
    q = g + 1 if spec else 1
    gen = workload.gen_len
    p = workload.mean_prompt_len
    ctx = p + gen / 2  # mean context over the decode
    rows = shape.rows
    if continuous:
        # Steady state: every slot holds a row; a row spends one pass being prefilled and
        # (gen - 1) / E decoding, so each pass also carries the prompts of the rows that
        # finished (pre_rows of them). Start-up (the slots filling at the budget's pace) and
        # drain (rows of every age thinning out, and the slowest row's tail) are paid once
        # per job, spread over its waves.
        per_row = row_passes(shape.policy, g, workload)
        live = float(b) * (per_row - 1.0) / per_row
        pre_rows = b / per_row
        waves = max(1.0, workload.num_prompts / rows)
        passes = per_row * (1 if shape.policy == "flexgen" else nb)
        # drain: when no prompt is left, the slots' rows are at every age, so the passes go on
        # for a row's lifetime with the rows thinning out: half a lifetime of passes lost
        passes += 0.5 * per_row * (1 if shape.policy == "flexgen" else nb) / waves
        if spec:
            tail, _ = expected_verify_passes("spec-serial", workload.acceptance_rates(g), gen - 1, b, 1,
                                             workload.acceptance_spread, workload.mean_acceptance)
            passes += max(0.0, tail - (per_row - 1.0)) * nb / waves
        startup_tokens = max(shape.prefill_tokens, shape.prefill_chunk * workload.max_prompt_len)
        startup_passes = math.ceil(rows * p / startup_tokens) / waves
    elif spec:
        # The prefill yields the first token; a static batch runs until its slowest row is done,
        # so the passes follow the slowest row, while row-proportional work (draft, KV swaps,
        # attention, FFN tokens) is done by the mean live rows of a pass (cost.expected_verify_passes).
        passes, live = expected_verify_passes(shape.policy, workload.acceptance_rates(g), gen - 1, b, nb,
                                              workload.acceptance_spread, workload.mean_acceptance)
    else:
        passes, live = float(gen - 1), float(b)
    b_act = max(1.0, live)

    def kept(key: tuple, compute):
        """compute(), kept in `memo` under `key`: the shapes alike in what it depends on share it."""
        got = memo.get(key) if memo is not None else None
        if got is None:
            got = compute()
            if memo is not None:
                memo[key] = got
        return got

    def pass_costs(rows: float, q_len: float, context: float, device: str):
        """(GPU busy, CPU busy, critical path) of one target pass, from the simulator's layer
        costs (shared by the shapes that differ only in their draft batch)."""
        return kept(("pass costs", rows, q_len, context, device), lambda: _pass_costs(rows, q_len, context, device))

    def _pass_costs(rows: float, q_len: float, context: float, device: str):
        c = target_layer_costs(P, T, rows, q_len, context, device)
        head = target_head_s(P, T, rows * q_len)
        on_cpu = c.attention_on_cpu and not P.gpu.shares_host_cores  # else the "GPU"'s own cores run it
        gpu = T.layers * (c.proj + c.ffn + c.host + (0.0 if on_cpu else c.attention)) + head
        cpu = T.layers * c.attention if on_cpu else 0.0
        chain = T.layers * (c.proj + c.ffn + c.host + c.attention + c.act_d2h + c.act_h2d) + head
        return gpu, cpu, chain

    def draft_step(rows: float, q_len: float, context: float) -> float:
        return kept(("draft step", rows, q_len, context), lambda: draft_step_s(P, D, rows, q_len, context))

    # a flexgen pass serves every batch: their decoding rows go through each layer as one
    # batch (Pass.runs), as the engine runs them
    served = nb if shape.policy == "flexgen" else 1
    gpu_s, cpu_s, chain_s = pass_costs(served * b_act, q, ctx, shape.attention_device)

    draft_s = kv_swap_s = 0.0
    if spec:
        n_mb = math.ceil(b_act / shape.draft_batch)
        mb = min(shape.draft_batch, b_act)
        draft_s = n_mb * g * draft_step(mb, 1, ctx)
        if shape.recompute:  # every round reads each row's context again, and swaps nothing
            draft_s += n_mb * draft_step(mb, ctx, ctx / 2)
        else:
            kv_swap_s = (h2d_time_s(P, b_act * ctx * D.kv_bytes_per_token)
                         + d2h_time_s(P, b_act * (g + 1) * D.kv_bytes_per_token))

    if continuous:  # the prompt chunks riding in each pass, and the draft reading them beside it
        pc = target_layer_costs(P, T, pre_rows, p, p / 2, shape.attention_device, prefill=True)
        pre = T.layers * (pc.proj + pc.attention + pc.ffn + pc.host) + target_head_s(P, T, pre_rows)
        mult = nb if shape.policy == "flexgen" else 1
        gpu_s += mult * pre
        chain_s += mult * pre
        if spec and not shape.recompute:
            read = draft_step(pre_rows, p, p / 2)
            if shape.policy == "specoffload":
                draft_s += read
            else:
                gpu_s += read

    if shape.policy == "specoffload":
        # target and draft kernels share the GPU (a pool of host cores may run them at once)
        phases, serial_s, gpu_total = passes, 0.0, pool_pair_s(P, gpu_s, draft_s)
    elif shape.policy == "spec-serial":
        phases, serial_s, gpu_total = passes, draft_s, gpu_s
    elif continuous:
        phases, serial_s, gpu_total = passes, 0.0, gpu_s
    else:
        phases, serial_s, gpu_total = (gen - 1) * (1 if shape.policy == "flexgen" else nb), 0.0, gpu_s

    if continuous:  # start-up: passes of prompts alone, at the budget a pass
        n_pre = startup_passes
        chunk_tokens = float(min(startup_tokens, rows * p))
        pc = target_layer_costs(P, T, chunk_tokens / p, p, p / 2, shape.attention_device, prefill=True)
        pre_gpu = T.layers * (pc.proj + pc.attention + pc.ffn + pc.host) + target_head_s(P, T, chunk_tokens / p)
        draft_pre = draft_step_s(P, D, chunk_tokens / p, p, p / 2) if spec and not shape.recompute else 0.0
    else:
        return _with_wave_prefill(Coeffs(
            tokens=rows * gen * useful_share(rows, workload), phases=phases, gpu_s=gpu_total, cpu_s=cpu_s,
            chain_s=chain_s, draft_s=draft_s, serial_s=serial_s, kv_swap_s=kv_swap_s,
            prefill_passes=0.0,
            prefill_gpu_s=0.0, prefill_chain_s=0.0), shape, target, draft, profile, workload)
    return Coeffs(  # continuous admission has no waves: its start-up and drain are spread above
        tokens=rows * gen, phases=phases, gpu_s=gpu_total, cpu_s=cpu_s, chain_s=chain_s, draft_s=draft_s,
        serial_s=serial_s, kv_swap_s=kv_swap_s, prefill_passes=n_pre,
        prefill_gpu_s=n_pre * (pre_gpu + draft_pre), prefill_chain_s=n_pre * pre_gpu,
    )

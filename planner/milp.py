"""The placement-and-shape program (PuLP), solved by Dinkelbach's method.

Throughput is a ratio, tokens / time, so the program maximises tokens - lambda * time and
updates lambda to the ratio of the solution until it stops improving (Dinkelbach, 1967).
Each solve is a mixed-integer linear program:

  one-hot x_c over candidate shapes c (policy, batch, gamma, draft batch, prefill chunk,
  attention device); integer n_gpu (FFN layers resident on the GPU); one-hot homes for the
  streamed FFN, the attention weights and the LM head; binaries for the draft KV cache on
  the host (dk) and for prefetching one layer ahead (k);
  round time t_c >= each resource's busy time in a round of shape c, written in x_c times
  the stream time and x_c times the shape's constants (so 0 unless c is chosen), with draft
  and target sharing one GPU; prefill time p_c likewise;
  GPU, host and pinned memory <= capacity, the same terms as specplan.memory.plan_memory.

docs/planner.md writes it out in full.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace

import pulp

from specplan.cost import copies_overlap_compute, disk_read_time_s, weights_h2d_s
from specplan.hardware import HardwareProfile
from specplan.memory import STAGED_HOMES, plan_memory, stream_slot_bytes
from specplan.models import ModelSpec
from specplan.plan import Placement
from specplan.workload import Workload

from .shapes import Coeffs, Shape, coefficients

STREAM_HOMES = ("cpu_pinned", "cpu_pageable", "disk")
HEAD_HOMES = ("gpu", "cpu_pinned", "cpu_pageable")


@dataclass(frozen=True)
class Candidate:
    shape: Shape
    placement: Placement
    prefetch_depth: int
    estimate_tok_s: float  # the program's own estimate
    round_s: float
    prefill_s: float


MEMORY_UNIT_BYTES = 1e9  # the program's memory rows are in GB


def _solver(time_limit_s: float = 20.0):
    try:
        import highspy  # noqa: F401

        # one thread: the planner already runs one program per core, and HiGHS's own worker
        # threads then spin against the other process (on 2 cores, optimize --gpu rtx4090 took
        # 8.2 s median with HiGHS's default threads and 6.7 s with one, to the same plans)
        # the programs are small (a few dozen shapes): HiGHS's primal heuristics (the root's
        # feasibility jump, RINS, RENS and reduced-cost fixing run even at effort 0) and its
        # restarts cost more than they find (the four policies' programs of optimize --gpu
        # rtx4090 solved in 0.48 s with them on, 0.36 s with them off, to the same optima);
        # so does strong branching (pseudocosts from the first node on: 22 programs of six
        # machines solved in 2.2-2.5 s against 2.8-2.9 s, to the same optima)
        return pulp.HiGHS(msg=False, timeLimit=time_limit_s, gapRel=1e-6, threads=1,
                          mip_heuristic_effort=0.0, mip_allow_restart=False,
                          mip_heuristic_run_feasibility_jump=False, mip_heuristic_run_rins=False,
                          mip_heuristic_run_rens=False, mip_heuristic_run_root_reduced_cost=False,
                          mip_pscost_minreliable=0)
    except Exception:  # noqa: BLE001 - fall back to the CBC binary that ships with PuLP
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=1e-6)


@contextmanager
def _quiet_stdout():
    """HiGHS prints a banner from C++ straight to file descriptor 1; keep stdout for results."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def solver_name() -> str:
    return type(_solver()).__name__


def link_s(profile: HardwareProfile, home: str, nbytes: float) -> float:
    """Seconds to bring `nbytes` from `home` to the GPU (the simulator's loader rule: disk
    reads land in pinned staging buffers)."""
    if nbytes <= 0:
        return 0.0
    if home == "cpu_pageable":
        return weights_h2d_s(profile, 0.0, nbytes)
    t = weights_h2d_s(profile, nbytes, 0.0)
    return t + (disk_read_time_s(profile, nbytes) if home == "disk" else 0.0)


def stream_parts_s(profile: HardwareProfile, target: ModelSpec, placement: Placement) -> tuple[float, float]:
    """Weight-stream time of one pass for a fixed placement (the program's linear form,
    evaluated): the streamed FFN layers' whole (a pass streams its share of the experts) and
    the rest (attention, LM head)."""
    b, L = target.layer_bytes, target.layers
    streamed = L - placement.ffn_gpu_layers
    ffn = streamed * link_s(profile, placement.ffn, b.ffn) if streamed else 0.0
    rest = 0.0
    if placement.attention != "gpu":
        rest += L * link_s(profile, placement.attention, b.attention)
    if placement.lm_head != "gpu":
        rest += link_s(profile, placement.lm_head, target.head_bytes)
    return ffn, rest


def worst_stream_s(profile: HardwareProfile, target: ModelSpec) -> float:
    b = target.layer_bytes
    return target.layers * link_s(profile, "disk", b.ffn + b.attention) + link_s(profile, "cpu_pageable", target.head_bytes)


def big_m(co: Coeffs, worst_stream: float) -> float:
    return worst_stream + co.gpu_s + co.cpu_s + co.chain_s + co.draft_s + co.kv_swap_s + co.serial_s


def big_m_prefill(co: Coeffs, worst_stream: float) -> float:
    return co.prefill_passes * worst_stream + co.prefill_gpu_s + co.prefill_chain_s


def round_bounds(policy: str, co: Coeffs, stream, dk, k, M: float, one=1) -> list:
    """Lower bounds on one round's time. `stream`, `dk` (draft KV on the host), `k` (prefetch)
    and `one` (the shape is chosen) may be numbers or program variables: the same formula
    serves both. The program passes its shape's own share of the stream time, of dk and of 1
    (each x_c times the quantity), so that every bound vanishes for a shape not chosen."""
    swap = co.kv_swap_s * dk
    gpu, cpu, chain, draft, serial = (one * v for v in (co.gpu_s, co.cpu_s, co.chain_s, co.draft_s, co.serial_s))
    if policy == "specoffload":
        return [stream + swap,  # the H2D link carries the weights and the draft's KV
                gpu,  # target and draft kernels share the GPU
                cpu, chain, draft, swap,  # KV swaps overlap the drafting
                # without prefetch each layer's copy waits for the last layer's compute, and the
                # swap-ins, queued on the same link, land in those gaps only in part: the
                # simulator's no-prefetch rounds come within a few percent of this sum, not of the max
                stream + swap + chain - M * k]
    if policy == "spec-serial":  # draft (its KV swaps overlapping it), then verify
        out = []
        for verify in (stream, chain, stream + chain - M * k):
            out += [serial + verify, swap + verify]
        return out
    if policy == "flexgen":
        return [stream, gpu, cpu, chain, stream + chain - M * k]
    return [stream + chain]  # sequential: nothing overlaps


def prefill_bounds(policy: str, co: Coeffs, pre_stream, k, Mp: float, one=1) -> list:
    gpu, chain = one * co.prefill_gpu_s, one * co.prefill_chain_s
    if policy == "sequential":
        return [pre_stream + gpu]
    return [pre_stream, gpu, pre_stream + chain - Mp * k]


def estimate(shape: Shape, co: Coeffs, profile: HardwareProfile, target: ModelSpec, placement: Placement,
             prefetch_depth: int, worst: float | None = None, streams: dict | None = None) -> tuple[float, float, float]:
    """(tokens/s, round s, prefill s) of a fixed shape and placement under the program's model
    (`worst`: worst_stream_s of this profile and target, where the caller has it; `streams`,
    a dict kept for them, their stream_parts_s by placement)."""
    worst = worst_stream_s(profile, target) if worst is None else worst
    k = 1 if prefetch_depth > 0 and copies_overlap_compute(profile) else 0
    dk = 1 if placement.draft_kv == "cpu" else 0
    parts = streams.get(placement) if streams is not None else None
    if parts is None:
        parts = stream_parts_s(profile, target, placement)
        if streams is not None:
            streams[placement] = parts
    ffn, rest = parts
    rs = max(round_bounds(shape.policy, co, ffn + rest, dk, k, big_m(co, worst)))
    pre = (ffn + rest) * co.prefill_passes
    ps = max(prefill_bounds(shape.policy, co, pre, k, big_m_prefill(co, worst)))
    total = co.phases * rs + ps
    return (co.tokens / total if total > 0 else 0.0), rs, ps


class ShapeProgram:
    """One program over a set of shapes of one policy; solve() returns the best candidate."""

    def __init__(self, shapes: list[Shape], target: ModelSpec, draft: ModelSpec | None,
                 profile: HardwareProfile, workload: Workload):
        self.shapes, self.T, self.D, self.P, self.W = shapes, target, draft, profile, workload
        self.coeffs: list[Coeffs] = [coefficients(s, target, draft, profile, workload) for s in shapes]
        self.solves, self.last_status = 0, None
        self._build()

    # ---- construction ------------------------------------------------------------------------
    def _memory_coeffs(self, shape: Shape):
        """Placement-independent memory of a shape, from plan_memory by subtraction, so the
        program and the checker share one formula."""
        T = self.T
        b = T.layer_bytes
        p0 = Placement(attention="cpu_pinned", ffn="cpu_pinned", ffn_gpu_layers=0, embed="cpu_pageable",
                       lm_head="cpu_pinned", draft_kv="gpu")
        sch = shape.schedule(prefetch_depth=0)
        if shape.recompute:  # no draft KV to place: the host/GPU choice (dk) costs and saves nothing
            p0 = replace(p0, draft_kv="recompute")
        m_gpu_kv = plan_memory(T, self.D, sch, p0, self.W)
        m_cpu_kv = m_gpu_kv if shape.recompute else plan_memory(T, self.D, sch, replace(p0, draft_kv="cpu"), self.W)
        weights_host = T.layers * (b.attention + b.ffn) + T.head_bytes
        buffer = stream_slot_bytes(T, p0)  # one slot (prefetch 0), as plan_memory counts it
        g0 = m_gpu_kv.gpu_bytes - buffer
        h0 = m_gpu_kv.host_bytes - weights_host - T.embed_bytes
        pin0 = m_gpu_kv.pinned_bytes - weights_host
        return (g0, h0, pin0, m_cpu_kv.gpu_bytes - m_gpu_kv.gpu_bytes, m_cpu_kv.host_bytes - m_gpu_kv.host_bytes,
                m_cpu_kv.pinned_bytes - m_gpu_kv.pinned_bytes)

    def _build(self) -> None:
        T, P = self.T, self.P
        L = T.layers
        b = T.layer_bytes
        F, A, H = b.ffn, b.attention, T.head_bytes
        prob = pulp.LpProblem("specplan", pulp.LpMaximize)
        C = range(len(self.shapes))
        x = [pulp.LpVariable(f"x_{c}", cat="Binary") for c in C]
        v = [pulp.LpVariable(f"v_{c}", lowBound=0, upBound=1) for c in C]  # x_c * dk
        t = [pulp.LpVariable(f"t_{c}", lowBound=0) for c in C]
        p = [pulp.LpVariable(f"p_{c}", lowBound=0) for c in C]
        n_gpu = pulp.LpVariable("n_gpu", lowBound=0, upBound=L, cat="Integer")
        f = {h: pulp.LpVariable(f"ffn_{h}", cat="Binary") for h in STREAM_HOMES}
        y = {h: pulp.LpVariable(f"y_{h}", lowBound=0, upBound=L) for h in STREAM_HOMES}  # f_h * (L - n_gpu)
        a = {h: pulp.LpVariable(f"attn_{h}", cat="Binary") for h in ("gpu", *STREAM_HOMES)}
        hd = {h: pulp.LpVariable(f"head_{h}", cat="Binary") for h in HEAD_HOMES}
        dk = pulp.LpVariable("draft_kv_host", cat="Binary")
        k = pulp.LpVariable("prefetch", cat="Binary")
        s_ffn = pulp.LpVariable("any_ffn_streamed", cat="Binary")
        s_staged = pulp.LpVariable("any_staged", cat="Binary")  # something streams from disk or pageable memory
        # Memory rows are written in GB (MEMORY_UNIT_BYTES), not bytes: with byte coefficients
        # (1e9-1e11) beside binaries and seconds, HiGHS declared feasible programs infeasible.
        Fm, Am, Hm = F / MEMORY_UNIT_BYTES, A / MEMORY_UNIT_BYTES, H / MEMORY_UNIT_BYTES
        # one stream slot holds the largest streamed unit: a layer, or the LM head when it streams
        head_unit = (H + T.hidden * T.dtype_bytes) / MEMORY_UNIT_BYTES
        slot_max = max(Fm + Am, head_unit)
        slot = pulp.LpVariable("slot_gb", lowBound=0, upBound=slot_max)
        k_slot = pulp.LpVariable("prefetch_x_slot_gb", lowBound=0, upBound=slot_max)  # k * slot

        prob += pulp.lpSum(x) == 1
        prob += pulp.lpSum(f.values()) == 1
        prob += pulp.lpSum(a.values()) == 1
        prob += pulp.lpSum(hd.values()) == 1
        prob += pulp.lpSum(y.values()) == L - n_gpu
        for h in STREAM_HOMES:
            prob += y[h] <= L * f[h]
        prob += L * s_ffn >= L - n_gpu
        for h in STAGED_HOMES:
            prob += L * s_staged >= y[h]
            prob += s_staged >= a[h]
            if h in hd:
                prob += s_staged >= hd[h]
        prob += slot >= Fm * s_ffn + Am * (1 - a["gpu"])
        prob += slot >= head_unit * (1 - hd["gpu"])
        prob += k_slot >= slot - slot_max * (1 - k)
        for c in C:
            prob += v[c] <= x[c]
            prob += v[c] <= dk
            prob += v[c] >= x[c] + dk - 1
        if not any(s.policy in ("specoffload", "spec-serial") for s in self.shapes):
            prob += dk == 0
        if all(s.policy == "sequential" for s in self.shapes):
            prob += k == 0

        # weight-stream time of one pass: FFN (scaled by the share of experts a pass touches), attention, head
        ffn_s = pulp.lpSum(y[h] * link_s(P, h, F) for h in STREAM_HOMES)
        att_s = pulp.lpSum(a[h] * L * link_s(P, h, A) for h in STREAM_HOMES)
        head_s = pulp.lpSum(hd[h] * link_s(P, h, H) for h in HEAD_HOMES if h != "gpu")
        # Each shape's bounds are written in its own share of the stream time, FFN and the rest
        # apart (a pass streams a shape's share of the experts): ffn_c = x_c * ffn_s and
        # rest_c = x_c * (att_s + head_s), linearised, summing to the whole. With every term a
        # multiple of x_c the bounds need no big-M for the shapes not chosen, and the
        # relaxation pays each shape's time in proportion to x_c: the solver prunes by bound
        # (each solve took 2-3x less time than with t_c >= e - M (1 - x_c), to the same optima)
        ffn_max = L * max(link_s(P, h, F) for h in STREAM_HOMES)
        rest_max = L * max(link_s(P, h, A) for h in STREAM_HOMES) + max(link_s(P, h, H) for h in STREAM_HOMES)
        ffn_c = [pulp.LpVariable(f"ffn_s_{c}", lowBound=0, upBound=ffn_max) for c in C]
        rest_c = [pulp.LpVariable(f"rest_s_{c}", lowBound=0, upBound=rest_max) for c in C]
        prob += pulp.lpSum(ffn_c) == ffn_s
        prob += pulp.lpSum(rest_c) == att_s + head_s
        for c in C:
            prob += ffn_c[c] <= ffn_max * x[c]
            prob += ffn_c[c] >= ffn_s - ffn_max * (1 - x[c])
            prob += rest_c[c] <= rest_max * x[c]
            prob += rest_c[c] >= att_s + head_s - rest_max * (1 - x[c])
        self.round_bounds: list[list] = []  # per shape: expressions t_c must exceed (all 0 unless x_c = 1)
        self.prefill_bounds: list[list] = []
        worst = worst_stream_s(self.P, T)
        k_overlap = k if copies_overlap_compute(P) else 0  # what a prefetch buys the rounds
        for c, (shape, co) in enumerate(zip(self.shapes, self.coeffs)):
            bounds = round_bounds(shape.policy, co, ffn_c[c] + rest_c[c], v[c], k_overlap,
                                  big_m(co, worst), one=x[c])
            pre = prefill_bounds(shape.policy, co, co.prefill_passes * (ffn_c[c] + rest_c[c]),
                                 k_overlap, big_m_prefill(co, worst), one=x[c])
            for e in bounds:
                prob += t[c] >= e
            for e in pre:
                prob += p[c] >= e
            self.round_bounds.append(bounds)
            self.prefill_bounds.append(pre)

        # memory (GB): the terms of plan_memory, split into shape constants and placement terms
        mem = [[m / MEMORY_UNIT_BYTES for m in self._memory_coeffs(s)] for s in self.shapes]
        gpu_cap = (P.gpu.memory_bytes - P.gpu.reserved_bytes) / MEMORY_UNIT_BYTES
        weights_gpu = Fm * n_gpu + L * Am * a["gpu"] + Hm * hd["gpu"] + slot + k_slot
        prob += (pulp.lpSum(x[c] * mem[c][0] + v[c] * mem[c][3] for c in C) + weights_gpu <= gpu_cap), "gpu_memory"
        # pinned staging buffers, one per stream slot, when something is staged: (slot + k_slot) * s_staged
        staging = pulp.LpVariable("staging_gb", lowBound=0)
        prob += staging >= slot + k_slot - 2 * slot_max * (1 - s_staged)
        host_w = Fm * (y["cpu_pinned"] + y["cpu_pageable"]) + L * Am * (a["cpu_pinned"] + a["cpu_pageable"]) \
            + Hm * (hd["cpu_pinned"] + hd["cpu_pageable"]) + T.embed_bytes / MEMORY_UNIT_BYTES + staging
        host_cap = P.host.memory_bytes / MEMORY_UNIT_BYTES
        prob += (pulp.lpSum(x[c] * mem[c][1] + v[c] * mem[c][4] for c in C) + host_w <= host_cap), "host_memory"
        pinned_w = Fm * y["cpu_pinned"] + L * Am * a["cpu_pinned"] + Hm * hd["cpu_pinned"] + staging
        prob += (pulp.lpSum(x[c] * mem[c][2] + v[c] * mem[c][5] for c in C) + pinned_w
                 <= host_cap * P.host.pinned_fraction), "pinned_memory"

        self.prob, self.x, self.t, self.p = prob, x, t, p
        self.n_gpu, self.f, self.a, self.hd, self.dk, self.k = n_gpu, f, a, hd, dk, k
        self.excluded: set[int] = set()

    # ---- solving --------------------------------------------------------------------------------
    def _objective(self, lam: float):
        C = range(len(self.shapes))
        tokens = pulp.lpSum(self.x[c] * self.coeffs[c].tokens for c in C)
        time = pulp.lpSum(self.coeffs[c].phases * self.t[c] + self.p[c] for c in C)
        return tokens - lam * time

    def exclude_like(self, shape: Shape) -> bool:
        """Forbid `shape` and every shape that differs from it only in the prefill chunk.
        Returns False when no shape is left."""
        key = lambda s: (s.policy, s.target_batch, s.gamma, s.draft_batch, s.attention_device,  # noqa: E731
                         s.admission, s.recompute)
        for i, s in enumerate(self.shapes):
            if key(s) == key(shape) and i not in self.excluded:
                self.prob += self.x[i] == 0, f"exclude_{i}"
                self.excluded.add(i)
        return len(self.excluded) < len(self.shapes)

    def solve(self, lam0: float = 0.0, max_iter: int = 12, tol: float = 1e-4, floor: float = 0.0) -> Candidate | None:
        """Dinkelbach: maximise tokens - lam * time, set lam to the solution's ratio, repeat
        until lam stops moving. Converges from any start; a start near the optimum saves solves.
        With a `floor` (tok/s), only a candidate at or above it is wanted: a solve at lam =
        floor whose best falls below it proves there is none, and ends the search (None)."""
        lam, best = max(lam0, floor), None
        self.solves, self.last_status = 0, None
        for _ in range(max_iter):
            self.prob.setObjective(self._objective(lam))
            with _quiet_stdout():
                status = self.prob.solve(_solver())
            self.solves += 1
            self.last_status = pulp.LpStatus[status]
            if self.last_status != "Optimal":
                return best
            cand = self._read()
            if best is None or cand.estimate_tok_s > best.estimate_tok_s:
                best = cand
            if abs(cand.estimate_tok_s - lam) <= tol * max(lam, 1e-9):
                break
            if cand.estimate_tok_s < lam <= floor:  # every shape's ratio is below lam, so below the floor
                return None
            # below lam, the optimum lies in [ratio, lam): go on from the ratio, or test the floor first
            lam = max(cand.estimate_tok_s, floor) if cand.estimate_tok_s < lam else cand.estimate_tok_s
        return best if best is None or best.estimate_tok_s >= floor * (1 - tol) else None

    def _read(self) -> Candidate:
        val = lambda var: round(var.value() or 0.0)  # noqa: E731
        c = max(range(len(self.shapes)), key=lambda i: self.x[i].value() or 0.0)
        co = self.coeffs[c]
        pick = lambda d: next(h for h, var in d.items() if val(var) == 1)  # noqa: E731
        placement = Placement(attention=pick(self.a), ffn=pick(self.f), ffn_gpu_layers=int(val(self.n_gpu)),
                              embed="cpu_pageable", lm_head=pick(self.hd),
                              draft_kv="recompute" if self.shapes[c].recompute else "cpu" if val(self.dk) else "gpu")
        # evaluate the bounds rather than read t_c: at small lambda the solver need not push t_c down
        round_s = max(pulp.value(e) if not isinstance(e, (int, float)) else e for e in self.round_bounds[c])
        prefill_s = max(pulp.value(e) if not isinstance(e, (int, float)) else e for e in self.prefill_bounds[c])
        total = co.phases * round_s + prefill_s
        return Candidate(self.shapes[c], placement, int(val(self.k)), co.tokens / total if total > 0 else 0.0,
                         round_s, prefill_s)


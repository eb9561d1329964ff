"""optimize(): shapes -> program -> top candidates -> simulator -> the plan.

1. Enumerate shapes per policy; drop those that cannot fit even with every weight offloaded.
2. Rank the rest by the program's model at a simple placement and keep the best few dozen
   per policy (the program then chooses among them and places the tensors).
3. Solve the program (Dinkelbach) repeatedly, excluding each winner, for the top shapes.
4. Replay every candidate in the simulator (per-row acceptance, contention, bubbles) and
   return them ranked by simulated throughput.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass, replace

from specplan import __version__
from specplan.errors import InfeasibleError
from specplan.fileio import sha256_of
from specplan.hardware import HardwareProfile
from specplan.memory import plan_memory
from specplan.models import ModelSpec, model_shape
from specplan.plan import POLICIES, Placement, Plan
from specplan.simulator.run import SimConfig, SimResult, simulate
from specplan.workload import Workload

from .milp import Candidate, ShapeProgram, estimate, solver_name
from .shapes import Shape, coefficients, enumerate_shapes

PER_POLICY = {"specoffload": 4, "spec-serial": 2, "flexgen": 2, "sequential": 1}
SHAPES_IN_PROGRAM = 32


@dataclass
class Ranked:
    candidate: Candidate
    sim: SimResult

    @property
    def tok_s(self) -> float:
        return self.sim.throughput_tok_s


@dataclass
class OptimizeResult:
    ranked: list[Ranked]  # best simulated first
    infeasible: dict  # policy -> why no shape of it fits
    shapes_considered: int
    solver: str

    @property
    def best(self) -> Ranked:
        return self.ranked[0]

    def best_of(self, policies) -> Ranked | None:
        return next((r for r in self.ranked if r.candidate.shape.policy in policies), None)


def minimal_placement(target: ModelSpec, draft: ModelSpec | None, shape: Shape, workload: Workload,
                      profile: HardwareProfile) -> tuple[Placement | None, list[str]]:
    """The least memory-hungry placement that fits this shape (draft KV on the GPU when it
    can be), or None and the limits it breaks."""
    sch = shape.schedule(prefetch_depth=0)
    base = Placement(attention="cpu_pinned", ffn="cpu_pinned", embed="cpu_pageable", lm_head="gpu", draft_kv="gpu")
    problems: list[str] = []
    for pl in (base, replace(base, draft_kv="cpu"), replace(base, draft_kv="cpu", lm_head="cpu_pinned"),
               replace(base, draft_kv="cpu", lm_head="cpu_pinned", ffn="cpu_pageable", attention="cpu_pageable"),
               replace(base, draft_kv="cpu", lm_head="cpu_pageable", ffn="disk", attention="disk")):
        v = plan_memory(target, draft, sch, pl, workload).violations(profile)
        if not v:
            return pl, []
        problems = v
    return None, problems


def _shortlist(policy: str, target, draft, profile, workload) -> tuple[list[Shape], list[str], int, float]:
    shapes = enumerate_shapes(policy, workload)
    scored: list[tuple[float, Shape]] = []
    closest = None
    for s in shapes:
        pl, why = minimal_placement(target, draft, s, workload, profile)
        if pl is None:
            closest = closest or why
            continue
        tok_s, _, _ = estimate(s, coefficients(s, target, draft, profile, workload), profile, target, pl, 1)
        scored.append((tok_s, s))
    scored.sort(key=lambda ts: -ts[0])
    top = scored[:SHAPES_IN_PROGRAM]
    return [s for _, s in top], closest or [], len(shapes), (top[0][0] if top else 0.0)


def to_sim_config(c: Candidate, target, draft, profile, workload, mode: str = "sampled") -> SimConfig:
    sch = c.shape.schedule(c.prefetch_depth)
    return SimConfig(target, draft if sch.speculative else None, profile, workload, sch, c.placement, mode=mode)


def optimize(target: ModelSpec, draft: ModelSpec | None, profile: HardwareProfile, workload: Workload,
             policies: tuple[str, ...] = POLICIES, progress: Callable[[str], None] | None = None,
             per_policy: dict | None = None) -> OptimizeResult:
    say = progress or (lambda msg: None)
    per_policy = per_policy or PER_POLICY
    if draft is None:
        policies = tuple(p for p in policies if p not in ("specoffload", "spec-serial"))
    candidates: list[Candidate] = []
    infeasible: dict[str, str] = {}
    considered = 0
    for policy in policies:
        say(f"{policy}: enumerating shapes")
        shortlist, why, n, first_guess = _shortlist(policy, target, draft, profile, workload)
        considered += n
        if not shortlist:
            infeasible[policy] = "; ".join(why) or "no shape fits"
            continue
        say(f"{policy}: solving the program over {len(shortlist)} of {n} shapes")
        program = ShapeProgram(shortlist, target, draft, profile, workload)
        lam = first_guess  # a feasible shape's ratio: Dinkelbach starts close
        for _ in range(per_policy.get(policy, 1)):
            cand = program.solve(lam0=lam)
            if cand is None:
                break
            candidates.append(cand)
            # the runner-up must differ in more than the prefill chunk
            if not program.exclude_like(cand.shape):
                break
            lam = cand.estimate_tok_s * 0.9
    if not candidates:
        raise InfeasibleError("no plan fits: " + " | ".join(f"{p}: {w}" for p, w in infeasible.items()))

    ranked: list[Ranked] = []
    for i, c in enumerate(candidates):
        say(f"simulating candidate {i + 1}/{len(candidates)} ({c.shape.policy})")
        try:
            res = simulate(to_sim_config(c, target, draft, profile, workload))
        except InfeasibleError as e:  # the program's memory terms are an upper bound; this is a guard
            infeasible.setdefault(c.shape.policy, str(e))
            continue
        ranked.append(Ranked(c, res))
    if not ranked:
        raise InfeasibleError("no plan fits: " + " | ".join(f"{p}: {w}" for p, w in infeasible.items()))
    ranked.sort(key=lambda r: -r.tok_s)
    return OptimizeResult(ranked, infeasible, considered, solver_name())


def make_plan(r: Ranked, target_name: str, draft_name: str | None, target: ModelSpec, draft: ModelSpec | None,
              profile: HardwareProfile, workload: Workload) -> Plan:
    import pulp
    import simpy

    c, s = r.candidate, r.sim
    sch = c.shape.schedule(c.prefetch_depth)
    prediction = {
        "throughput_tok_s": s.throughput_tok_s,
        "program_estimate_tok_s": c.estimate_tok_s,
        "program_round_s": c.round_s,
        "program_prefill_s": c.prefill_s,
        "total_s": s.total_s, "prefill_s": s.prefill_s, "decode_s": s.decode_s,
        "rounds": s.rounds, "tokens_per_round": s.tokens_per_round,
        "stage_s": s.stage_s, "utilisation": s.utilisation,
        "peak_gpu_bytes": s.peak_gpu_bytes, "peak_pinned_bytes": s.peak_pinned_bytes,
        "memory": s.memory, "rows": s.rows, "waves": s.waves, "workload_s": s.workload_s,
    }
    return Plan(
        target=target_name, draft=draft_name if sch.speculative else None, hardware=profile.name,
        schedule=sch, placement=c.placement, workload=workload.to_dict(), prediction=prediction,
        inputs={"target": sha256_of(target.hf_config), "draft": sha256_of(draft.hf_config) if draft else None,
                "hardware": sha256_of(profile.to_dict()), "workload": sha256_of(workload.to_dict()),
                "target_shape": model_shape(target), "draft_shape": model_shape(draft) if draft else None},
        profile=profile.to_dict(),
        versions={"specplan": __version__, "python": platform.python_version(), "simpy": simpy.__version__,
                  "pulp": pulp.__version__, "solver": solver_name()},
    )

"""simulate(): replay a plan on the simulated machine and summarise what happened."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import simpy

from specplan.cost import row_acceptance_factors
from specplan.errors import InfeasibleError
from specplan.hardware import HardwareProfile
from specplan.memory import plan_memory, routed
from specplan.models import ModelSpec
from specplan.plan import Placement, Plan, Schedule
from specplan.scheduler import Request, SchedulerConfig, StepScheduler
from specplan.workload import Workload

from .machine import Machine, Span
from .scenario import Scenario

MODES = ("sampled", "expected")
# Continuous admission is simulated over at most this many waves' worth of prompts; the rest
# of a larger dataset runs at the steady rate: the slope of finish time over finished rows,
# fitted from the first wave's worth to half a wave before the end (start-up and drain are
# simulated, the middle is repeated). At 4096 prompts, 512 rows, spec-serial on rtx4090 it is
# within 2% of simulating all of them.
STEADY_WAVES = 4


@dataclass(frozen=True)
class SimConfig:
    target: ModelSpec
    draft: ModelSpec | None
    profile: HardwareProfile
    workload: Workload
    schedule: Schedule
    placement: Placement
    mode: str = "sampled"  # per-row acceptance drawn with `seed`, or every row gains E tokens
    check_memory: bool = True  # False: simulate even if the plan does not fit (for comparisons)
    all_prompts: bool = False  # simulate every prompt of the workload, none scaled or extrapolated

    def __post_init__(self) -> None:
        self.schedule.validate("simulate")
        self.placement.validate("simulate", self.target.layers)
        if self.schedule.speculative and self.draft is None:
            raise InfeasibleError(f"policy {self.schedule.policy} needs a draft model")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")


@dataclass
class SimResult:
    throughput_tok_s: float  # the job's: every prompt's tokens over workload_s
    total_s: float  # one wave of rows in flight (continuous: every prompt)
    prefill_s: float
    decode_s: float
    generated_tokens: float
    rows: int
    waves: int  # num_prompts / rows in flight, rounded up
    workload_s: float  # all prompts: full waves * total_s + the last, partial wave (continuous: total_s)
    rounds: int
    tokens_per_round: float  # mean tokens a row gains per verification (1 without a draft)
    accepted_per_round: float  # the same before the last round's cap at gen_len (estimates E)
    stage_s: dict
    utilisation: dict
    peak_gpu_bytes: float
    peak_pinned_bytes: float
    memory: dict  # the plan's memory need, GPU and host, by component
    events: int
    wall_s: float
    spans: list[Span] | None = field(default=None, repr=False)
    admission: str = "waves"
    simulated_prompts: int = 0  # continuous: prompts simulated; the rest of the workload at the steady rate
    pass_counts: dict = field(default_factory=dict)  # the scheduler's counts: passes, admissions, prompt tokens carried
    experts_per_pass: float | None = None  # routed experts: the expected experts a target pass copies in
    passes: list | None = field(default=None, repr=False)  # the scheduler's passes, with record_spans
    marks: list | None = field(default=None, repr=False)  # per pass (start s, admitted, prompt tokens), with record_spans

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("spans", "passes", "marks")}
        return d


def make_scheduler(cfg: SimConfig) -> StepScheduler:
    """The plan's step scheduler over the prompts it simulates: in waves mode one wave (the
    result is scaled by the number of waves: they run alike), in continuous mode up to
    STEADY_WAVES waves' worth (the rest extrapolated at the steady rate); every prompt with
    `all_prompts`."""
    sch, wl = cfg.schedule, cfg.workload
    if cfg.all_prompts:
        n = wl.num_prompts
    elif sch.admission == "continuous":
        n = min(STEADY_WAVES * sch.rows, wl.num_prompts)
    else:
        n = min(sch.rows, wl.num_prompts)
    config = SchedulerConfig.from_schedule(sch, wl.gen_len, n, cfg.placement.draft_kv)
    return StepScheduler(config, [Request(i, wl.prompt_len_of(i)) for i in range(n)])


def acceptance_factors(cfg: SimConfig, n: int, seed: int | None = None) -> dict[int, float] | None:
    """Each prompt's acceptance over the mean, drawn from a generator of its own (seeded by
    `seed`) so that a spread of 0 leaves the round draws as they were; None when rows are alike."""
    wl = cfg.workload
    spread = wl.acceptance_spread if cfg.schedule.speculative else 0.0
    if spread <= 0:
        return None
    rng_rows = np.random.default_rng((wl.seed if seed is None else seed, 1))
    return dict(enumerate(row_acceptance_factors(wl.mean_acceptance, spread, n, rng_rows).tolist()))


def _run(cfg: SimConfig, sched: StepScheduler, need, seed: int, record_spans: bool, outcomes):
    """One scenario to its end on a fresh machine: (scenario, machine, end time s)."""
    env = simpy.Environment()
    machine = Machine(env, cfg.profile, record_spans=record_spans)
    if cfg.check_memory:
        static = need.gpu_bytes - sum(v for k, v in need.gpu.items() if k.startswith("activations"))
        machine.allocate("gpu", static, "resident weights, buffers and caches")
        machine.allocate("pinned", need.pinned_bytes, "pinned weights and caches")
    rng = np.random.default_rng(seed)
    scenario = Scenario(machine, cfg, rng, sched, acceptance_factors(cfg, len(sched.requests), seed), outcomes)
    env.process(scenario.run())
    env.run()
    return scenario, machine, env.now


def checked_need(cfg: SimConfig):
    """The plan's memory need; InfeasibleError if it does not fit the machine (with check_memory)."""
    need = plan_memory(cfg.target, cfg.draft, cfg.schedule, cfg.placement, cfg.workload)
    if cfg.check_memory:
        problems = need.violations(cfg.profile)
        if problems:
            raise InfeasibleError("plan does not fit: " + "; ".join(problems))
    return need


def simulate(cfg: SimConfig, *, record_spans: bool = False, seed: int | None = None, outcomes=None) -> SimResult:
    """Simulate the plan. `throughput_tok_s` is the job's: all its prompts' tokens over
    `workload_s` (waves: full waves alike, and a last, partial wave simulated on its own)."""
    t0 = time.perf_counter()
    need = checked_need(cfg)
    seed = cfg.workload.seed if seed is None else seed
    sched = make_scheduler(cfg)
    scenario, machine, total = _run(cfg, sched, need, seed, record_spans, outcomes)
    generated = float(sum(r.generated for r in sched.finished))
    wl = cfg.workload
    prompts = len(sched.requests)
    rows = min(cfg.schedule.rows, prompts)
    continuous = cfg.schedule.admission == "continuous"
    waves = 1 if continuous or prompts == wl.num_prompts else -(-wl.num_prompts // prompts)
    scale = 1.0
    job_s, job_tokens = total, generated
    if continuous and prompts < wl.num_prompts:
        a, b = rows, prompts - rows // 2
        steady_s_per_prompt = float(np.polyfit(np.arange(a, b), np.asarray(scenario.finish_s[a:b]), 1)[0])
        scale = (total + (wl.num_prompts - prompts) * steady_s_per_prompt) / total
        generated *= wl.num_prompts / prompts
        total *= scale
        job_s, job_tokens = total, generated
    elif waves > 1:
        job_s, job_tokens = (waves - 1) * total, (waves - 1) * generated
        rest = wl.num_prompts - (waves - 1) * prompts
        last = StepScheduler(sched.config, [Request(i, wl.prompt_len_of((waves - 1) * prompts + i)) for i in range(rest)])
        _, _, last_s = _run(cfg, last, need, seed + 1, False, None)
        job_s += last_s
        job_tokens += float(sum(r.generated for r in last.finished))
    row_rounds = max(scenario.row_rounds, 1)
    return SimResult(
        throughput_tok_s=job_tokens / job_s if job_s > 0 else 0.0,
        total_s=total,
        prefill_s=scenario.prefill_done_s,
        decode_s=total - scenario.prefill_done_s,
        generated_tokens=generated,
        rows=rows,
        waves=waves,
        workload_s=job_s,
        rounds=scenario.verify_rounds,
        tokens_per_round=scenario.gained_tokens / row_rounds,
        accepted_per_round=scenario.drawn_tokens / row_rounds,
        stage_s={k: v * scale for k, v in sorted(machine.stage_s.items())},
        utilisation=machine.utilisation(),
        peak_gpu_bytes=machine.peak_gpu_bytes if cfg.check_memory else need.gpu_bytes,
        peak_pinned_bytes=machine.peak_pinned_bytes if cfg.check_memory else need.pinned_bytes,
        memory={"gpu": need.gpu, "host": need.host, "pinned": need.pinned},
        events=machine.events,
        wall_s=time.perf_counter() - t0,
        spans=machine.spans,
        admission=cfg.schedule.admission,
        simulated_prompts=prompts,
        pass_counts=sched.counts.to_dict(),
        experts_per_pass=(scenario.routed_experts / scenario.target_passes
                          if scenario.target_passes and routed(cfg.target, cfg.placement) else None),
        passes=scenario.passes if record_spans else None,
        marks=scenario.marks if record_spans else None,
    )


def simulate_plan(plan: Plan, target: ModelSpec, draft: ModelSpec | None, profile: HardwareProfile,
                  acceptance: float | None = None, num_prompts: int | None = None,
                  acceptance_spread: float | None = None) -> SimResult:
    """A plan simulated again on `profile`, at the per-token `acceptance`, its spread between
    rows and the number of prompts a run measured (the plan's own where not given), without
    the memory check. The models are taken in the plan's weight formats."""
    from specplan.models import apply_weights

    target, draft = apply_weights(target, draft, plan.weight_formats(), "plan")
    wl = Workload.from_dict(plan.workload, "plan workload")
    if acceptance is not None and plan.schedule.speculative:
        wl = wl.at_acceptance(acceptance, acceptance_spread)
    if num_prompts:
        wl = replace(wl, num_prompts=int(num_prompts))
    return simulate(SimConfig(target, draft if plan.schedule.speculative else None, profile, wl, plan.schedule,
                              plan.placement, check_memory=False))


def simulate_as_run(plan: Plan, target: ModelSpec, draft: ModelSpec | None, profile: HardwareProfile,
                    measured: dict) -> SimResult:
    """The plan simulated as a run went, from its report's `measured`: the per-token acceptance,
    how much it differed between rows, and the prompts that ran. With a spread, the rows' own
    mean alpha (a pooled rate is pulled down by the slow rows' extra rounds). What specrun's
    report, `specplan validate` and `specplan calibrate` compare a run with."""
    spread = measured.get("acceptance_spread")
    alpha = measured.get("acceptance_row_mean") if spread else None
    return simulate_plan(plan, target, draft, profile, alpha if alpha is not None else measured.get("acceptance_per_token"),
                         measured.get("rows"), spread)

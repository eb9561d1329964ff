"""optimize(): shapes -> program -> top candidates -> simulator -> the plan.

1. Enumerate shapes per policy; drop those that cannot fit even with every weight offloaded.
2. Rank the rest by the program's model at a simple placement and keep the best few dozen
   per policy (the program then chooses among them and places the tensors).
3. Solve the program (Dinkelbach) for each policy's best candidate.
4. Replay the candidates that can win in the simulator (per-row acceptance, contention,
   bubbles), the runner-ups of the policies near the best too, and return them ranked by
   simulated throughput (optimize() states the rules; Jobs runs them over the cores).
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import platform
import signal
import sys
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace

from specplan import __version__
from specplan.cost import dequant_op_name, expected_experts_touched, fused_op_name
from specplan.errors import InfeasibleError, InputError
from specplan.fileio import sha256_of
from specplan.hardware import HardwareProfile
from specplan.memory import MemoryTotalsCache, least_placement, stream_slot_bytes
from specplan.models import ModelSpec, model_shape, pair_weights
from specplan.plan import POLICIES, Placement, Plan
from specplan.progress import Steps
from specplan.simulator.run import SimConfig, SimResult, checked_need, simulate
from specplan.workload import Workload

from .milp import Candidate, ShapeProgram, estimate, solver_name, worst_stream_s
from .shapes import Shape, coefficients, enumerate_shapes

PER_POLICY = {"specoffload": 4, "spec-serial": 2, "flexgen": 2, "sequential": 1}
# Candidates the simulator replays: each policy's best; and the runner-ups of a policy whose
# best came within RUNNER_UP_WITHIN of the best simulated plan, those the program puts within
# RERANK_WITHIN of the best estimate (the simulator moved no default candidate by more than
# 10% from its estimate but flexgen 2 x 192, which it put at 0.67x; validation.md section 5)
RERANK_WITHIN = 0.8
RUNNER_UP_WITHIN = 0.9
# Taken in order of their program estimates, a policy's best is simulated unless its estimate
# times SIM_OVER_ESTIMATE falls below a plan already simulated: over 48 jobs (Mixtral-8x7B and
# Llama-3.3-70B, 6 GPUs, 2 links, 2 workloads; 232 candidates) the simulator put none above
# 1.09x its estimate; 1.15 skipped 79 of 184 policies' bests there, never the winner
# (validation.md, "planner speed")
SIM_OVER_ESTIMATE = 1.15
# Shapes per policy the program chooses among, the best by the shortlist's score. With HiGHS's
# heuristics off a 32-shape program solves about as fast as a 12-shape one (optimize --gpu
# rtx4090: 2.1 s against 2.1 s), and 12 lost up to 5.5% on Llama-3.3-70B jobs (h100-sxm,
# PCIe 3) whose best shape the score ranks 13th-32nd
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
    unsimulated: dict = field(default_factory=dict)  # policy -> its best, not simulated (SIM_OVER_ESTIMATE)
    formats: dict = field(default_factory=dict)  # each format assignment weighed -> its best tok/s (None: no plan fits)

    @property
    def best(self) -> Ranked:
        return self.ranked[0]

    def best_of(self, policies) -> Ranked | None:
        return next((r for r in self.ranked if r.candidate.shape.policy in policies), None)


def minimal_placement(target: ModelSpec, draft: ModelSpec | None, shape: Shape, workload: Workload,
                      profile: HardwareProfile, prefetch_depth: int = 0,
                      explain: bool = True, needs: MemoryTotalsCache | None = None) -> tuple[Placement | None, list[str]]:
    """The least memory-hungry placement that fits this shape (draft KV on the GPU when it
    can be), or None and the limits it breaks."""
    return least_placement(target, draft, shape.schedule(prefetch_depth), workload, profile,
                           "recompute" if shape.recompute else None, explain, needs)


ADMISSIONS = ("waves", "continuous")


@dataclass
class Memo:
    """What planning a machine lends planning the same machine with another host memory size
    (`specplan sweep` plans such points one after another): the shapes' cost coefficients,
    their memory totals and the simulations, none of which depends on how much host memory
    there is, only on whether the plan fits it (checked again each time); and each policy's
    last best estimate, where Dinkelbach starts next. `scope` is the hash of everything else;
    a memo handed inputs of another scope starts empty."""

    scope: str = ""
    coefficients: dict = field(default_factory=dict)
    sims: dict = field(default_factory=dict)
    needs: MemoryTotalsCache | None = None  # memory totals by schedule and placement
    optima: dict = field(default_factory=dict)  # policy -> its program's last best estimate (a Dinkelbach start)

    def enter(self, target, draft, profile, workload) -> "Memo":
        d = profile.to_dict()  # but for the host memory size, and the names and notes that say it
        d["host"] = {k: v for k, v in d["host"].items() if k != "memory_bytes"}
        d.pop("name", None)
        d.pop("provenance", None)
        scope = sha256_of({"profile": d, "target": target.hf_config, "draft": draft.hf_config if draft else None,
                           "dtypes": [target.dtype, draft.dtype if draft else None], "workload": workload.to_dict()})
        if scope != self.scope:
            self.scope, self.coefficients, self.sims, self.optima = scope, {}, {}, {}
            self.needs = MemoryTotalsCache(target, draft, workload)
        return self


def _shortlist(policy: str, target, draft, profile, workload,
               admissions=ADMISSIONS, memo: Memo | None = None) -> tuple[list[Shape], list[str], int, float]:
    """The SHAPES_IN_PROGRAM shapes of a policy the program's model scores best at their least
    placement, the limits the first shape that fits nowhere breaks, how many shapes there
    were, and the best score."""
    shapes = enumerate_shapes(policy, workload, admissions=admissions)
    if not shapes:  # only continuous admission asked, and no shape has more prompts than rows
        return [], [f"continuous admission needs more prompts than rows in flight, and {workload.num_prompts} prompts "
                    "fill every shape's rows at once (more prompts, or --admission waves)"], 0, 0.0
    scored: list[tuple[float, Shape]] = []
    closest = None
    coeffs = memo.coefficients if memo is not None else {}
    needs = memo.needs if memo is not None else MemoryTotalsCache(target, draft, workload)
    worst = worst_stream_s(profile, target)
    streams: dict = {}  # placement -> its stream times (milp.estimate)
    # memory grows with the prefill chunk: where a chunk fits nowhere (with prefetch 0, or
    # with prefetch 1), no larger chunk of that shape fits either
    fails_from: dict[tuple[tuple, int], int] = {}
    for s in shapes:
        key = s.but_chunk
        if s.prefill_chunk >= fails_from.get((key, 0), 1 << 30):
            continue
        pl, why = minimal_placement(target, draft, s, workload, profile, explain=closest is None, needs=needs)
        if pl is None:
            closest = closest or why
            fails_from[(key, 0)] = min(s.prefill_chunk, fails_from.get((key, 0), 1 << 30))
            continue
        co = coefficients(s, target, draft, profile, workload, coeffs)
        # scored with prefetch only where its second stream buffer fits too (a shape that
        # cannot afford it, scored as if it could, crowds out the shapes the program picks),
        # and with the GPU memory the shape leaves filled with FFN layers, as the program would
        tok_s = estimate(s, co, profile, target, _fill_gpu(target, draft, s, 0, pl, workload, profile, needs), 0, worst,
                         streams)[0]
        if s.prefill_chunk < fails_from.get((key, 1), 1 << 30):
            pl1, _ = minimal_placement(target, draft, s, workload, profile, prefetch_depth=1, explain=False, needs=needs)
            if pl1 is not None:
                pl1 = _fill_gpu(target, draft, s, 1, pl1, workload, profile, needs)
                tok_s = max(tok_s, estimate(s, co, profile, target, pl1, 1, worst, streams)[0])
            else:
                fails_from[(key, 1)] = min(s.prefill_chunk, fails_from.get((key, 1), 1 << 30))
        scored.append((tok_s, s))
    scored.sort(key=lambda ts: -ts[0])
    top = scored[:SHAPES_IN_PROGRAM]
    return [s for _, s in top], closest or [], len(shapes), (top[0][0] if top else 0.0)


def _fill_gpu(target, draft, shape: Shape, depth: int, placement: Placement, workload, profile,
              needs: MemoryTotalsCache) -> Placement:
    """`placement` with the GPU memory the shape leaves filled, as the program would fill it:
    the attention weights first if they fit (each pass streams all of them; an MoE pass only
    the experts it touches), then as many FFN layers as fit (the stream buffers are kept: a
    score, not a plan; the program places for real)."""
    sch = shape.schedule(depth)
    free = profile.gpu.memory_bytes - profile.gpu.reserved_bytes - needs(sch, placement).gpu_bytes
    b, L = target.layer_bytes, target.layers
    if placement.attention != "gpu" and free >= L * b.attention:
        placement, free = _placed(placement, "gpu", placement.ffn_gpu_layers, placement.lm_head), free - L * b.attention
    n = min(L, int(free // b.ffn)) if b.ffn > 0 else 0
    if n < L and placement.attention == "gpu" \
            and (L - n) * b.ffn <= free - n * b.ffn + (depth + 1) * stream_slot_bytes(target, placement):
        # nothing left to stream frees the stream buffers too: the whole model may fit
        resident = _placed(placement, placement.attention, L, "gpu")
        if needs(sch, resident).fits(profile):
            return resident
    return _placed(placement, placement.attention, n, placement.lm_head) if n > 0 else placement


@functools.lru_cache(maxsize=1 << 14)
def _placed(placement: Placement, attention: str, ffn_gpu_layers: int, lm_head: str) -> Placement:
    """`placement` with these homes (the shortlist asks for the same few hundred thousands of times)."""
    return replace(placement, attention=attention, ffn_gpu_layers=ffn_gpu_layers, lm_head=lm_head)


def to_sim_config(c: Candidate, target, draft, profile, workload, mode: str = "sampled") -> SimConfig:
    sch = c.shape.schedule(c.prefetch_depth)
    return SimConfig(target, draft if sch.speculative else None, profile, workload, sch, c.placement, mode=mode)


def parallel_workers(n: int) -> int:
    """Processes for n independent jobs (per-policy programs, simulations): one per core up to
    n (the work is pure Python or a single-threaded solve, so threads would not help), at
    most $SPECPLAN_WORKERS (1 turns processes off), and none where processes cannot be
    forked cheaply."""
    if n < 2 or sys.platform != "linux":
        return 1
    cap = os.environ.get("SPECPLAN_WORKERS", "")
    cores = int(cap) if cap.isdigit() and int(cap) > 0 else len(os.sched_getaffinity(0))
    return max(1, min(n, cores))


def map_in_processes(fn: Callable, jobs: list, workers: int, done: Callable[[], None] | None = None) -> list:
    """[fn(*job) for job in jobs], in forked processes when workers > 1 (Jobs, each asked for),
    calling `done()` as each job ends. Every job is deterministic (seeded simulations, a
    deterministic solver), so results do not depend on `workers`."""
    tick = done or (lambda: None)
    with Jobs(workers, lambda finished, known: tick()) as pool:
        for i, job in enumerate(jobs):
            pool.want(i, fn, *job)
        return [pool.result(i) for i in range(len(jobs))]


def _after_fork() -> None:
    """Ctrl-C is the parent's to handle, and so is the console: a warning in a worker goes
    to stderr as one plain line (the parent's Rich console, and its lock, stay the parent's).
    HiGHS keeps a pool of worker threads; a forked child inherits the pool's state but not
    its threads, and its first solve then spins forever: start the child with a fresh pool."""
    import warnings

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the parent across the fork
    warnings.showwarning = lambda message, category, *a, **k: sys.stderr.write(f"warning: {message}\n")
    try:
        import highspy
    except ImportError:
        return
    highspy.Highs.resetGlobalScheduler(True)


class Jobs:
    """The jobs of one planning (programs, simulations), run in forked processes, `workers` at
    most, or, with one worker, here and only when their result is asked for. A job is wanted
    (`want`) before its result is asked (`result`). A job wanted `ahead` is one the planner's
    rules may yet ask for: it runs on a process only while no job asked for waits, least
    priority first, and never with one worker; `drop` takes it back if it has not started. Which
    results the planner uses depends on its rules alone and every job is deterministic, so
    the plan does not depend on `workers`. `done(finished, known)` hears each job end. The
    workers ignore Ctrl-C; on any error (a dead worker: BrokenProcessPool) the parent
    terminates them, so nothing runs on and no worker prints a traceback."""

    def __init__(self, workers: int, done: Callable[[int, int], None] | None = None):
        self.workers, self.done = workers, done or (lambda finished, known: None)
        self.jobs: dict = {}  # key -> (fn, args)
        self.queue: list = []  # wanted, not started, in the order wanted
        self.asked: set = set()
        self.running: dict = {}  # future -> key
        self.results: dict = {}
        self.priority: dict = {}  # key -> priority, for jobs wanted ahead
        self.then: dict = {}  # key -> what to do with its result
        self.pool = (ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"),
                                         initializer=_after_fork) if workers > 1 else None)

    def __enter__(self) -> "Jobs":
        return self

    def __exit__(self, kind, *_) -> None:
        if self.pool is None:
            return
        if kind is None and not self.running:
            self.pool.shutdown()
            return
        for proc in list(getattr(self.pool, "_processes", {}).values()):  # jobs nobody will read
            proc.terminate()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def want(self, key, fn: Callable, *args, ahead: tuple | None = None, then: Callable | None = None) -> None:
        """Want fn(*args) under `key`: asked for, or, with `ahead` (a priority, least first; the
        latest given holds), only perhaps; `then(result)` runs here when it has run."""
        if key not in self.jobs:
            self.jobs[key] = (fn, args)
            self.queue.append(key)
            if then is not None:
                self.then[key] = then
        if ahead is None:
            self.asked.add(key)
        else:
            self.priority[key] = ahead  # wanted again: the newer priority holds
        self._fill()

    def drop(self, key) -> None:
        if key in self.queue and key not in self.asked:
            self.queue.remove(key)

    def result(self, key):
        self.asked.add(key)
        if key not in self.results and key not in self.queue and key not in self.running.values():
            self.queue.append(key)  # dropped, and asked for after all
        while key not in self.results:
            if self.pool is None:
                self.queue.remove(key)
                fn, args = self.jobs[key]
                self._finish(key, fn(*args))
                break
            self._fill()
            finished, _ = wait(self.running, return_when=FIRST_COMPLETED)
            for f in finished:  # an error raises where its job's result is asked for, and only there
                self._finish(self.running.pop(f), f)
        got = self.results[key]
        return got.result() if isinstance(got, Future) else got

    def _finish(self, key, value) -> None:
        self.results[key] = value
        self.done(len(self.results), len(self.results) + len(self.running) + len(self.asked.intersection(self.queue)))
        then = self.then.pop(key, None)
        if then is not None and not (isinstance(value, Future) and value.exception() is not None):
            then(value.result() if isinstance(value, Future) else value)

    def _fill(self) -> None:
        while self.pool is not None and len(self.running) < self.workers and self.queue:
            # a job asked for first; else the one wanted ahead with the least priority
            key = next((k for k in self.queue if k in self.asked), None)
            if key is None:
                key = min(self.queue, key=lambda k: self.priority[k])
            self.queue.remove(key)
            fn, args = self.jobs[key]
            # a worker forked here starts with Ctrl-C blocked until _after_fork ignores it: a
            # SIGINT in between reaches the parent alone, not a child that would print a traceback
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                self.running[self.pool.submit(fn, *args)] = key
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _program_candidates(policy: str, shortlist: list[Shape], first_guess: float, target, draft, profile, workload,
                        wanted: int, exclude: tuple[Shape, ...] = (), floor: float = 0.0) -> tuple[list[Candidate], str | None]:
    """Up to `wanted` candidates from the program over `shortlist` (each differing from the
    ones before, and from `exclude`, in more than the prefill chunk), at `floor` tok/s or
    above, or why there is none."""
    program = ShapeProgram(shortlist, target, draft, profile, workload)
    for shape in exclude:
        if not program.exclude_like(shape):
            return [], None
    found: list[Candidate] = []
    lam = first_guess  # a feasible shape's ratio: Dinkelbach starts close
    for _ in range(wanted):
        cand = program.solve(lam0=lam, floor=floor)
        if cand is None:
            break
        found.append(cand)
        if not program.exclude_like(cand.shape):
            break
        lam = cand.estimate_tok_s * 0.9
    if not found and not exclude:  # shapes fit, yet the program found no plan: say so rather than drop the policy
        return [], (f"the program over {len(shortlist)} shapes that fit found no plan "
                    f"(solver status {program.last_status})")
    return found, None


def _policy_candidates(policy: str, target: ModelSpec, draft: ModelSpec | None, profile: HardwareProfile,
                       workload: Workload, wanted: int,
                       admissions=ADMISSIONS) -> tuple[list[Candidate], str | None, int]:
    """Up to `wanted` candidates of one policy from its program (each runner-up differing in
    more than the prefill chunk), why none fits if so, and how many shapes were considered."""
    shortlist, why, n, first_guess = _shortlist(policy, target, draft, profile, workload, admissions)
    if not shortlist:
        return [], "; ".join(why) or "no shape fits", n
    found, why_not = _program_candidates(policy, shortlist, first_guess, target, draft, profile, workload, wanted)
    return found, why_not, n


def _simulate_or_refusal(cfg: SimConfig, memo: Memo | None = None):
    """The simulation, or the simulator's refusal; from `memo` where it ran this schedule and
    placement on the same machine with another host memory size and the plan fits this one."""
    key = (cfg.schedule, cfg.placement, cfg.mode)
    try:
        if memo is not None and key in memo.sims:
            checked_need(cfg)  # the simulator's own memory check, on this machine
            return memo.sims[key]
        res = simulate(cfg)
    except InfeasibleError as e:
        return e
    if memo is not None:
        memo.sims[key] = res
    return res


@dataclass
class PolicySearch:
    """One policy's first round: its shortlist (for the runner-ups), its best candidate and
    that candidate simulated (or the simulator's refusal), why nothing fits, shapes considered."""

    policy: str
    shortlist: list[Shape]
    first: Candidate | None
    sim: SimResult | InfeasibleError | None
    why: str | None
    considered: int
    skipped: bool = False  # not simulated: its estimate cannot reach a plan simulated before it


def _policy_first(policy: str, target, draft, profile, workload, admissions, memo: Memo | None = None) -> PolicySearch:
    """Shortlist and program for one policy's best candidate."""
    shortlist, why, n, first_guess = _shortlist(policy, target, draft, profile, workload, admissions, memo)
    if not shortlist:
        return PolicySearch(policy, [], None, None, "; ".join(why) or "no shape fits", n)
    # Dinkelbach converges from any start, in one solve from the optimum itself: with more host
    # memory the best of less is still there, and often still the best
    start = max(first_guess, memo.optima.get(policy, 0.0)) if memo is not None else first_guess
    found, why_not = _program_candidates(policy, shortlist, start, target, draft, profile, workload, 1)
    if not found:
        return PolicySearch(policy, shortlist, None, None, why_not, n)
    if memo is not None:
        memo.optima[policy] = found[0].estimate_tok_s
    return PolicySearch(policy, shortlist, found[0], None, None, n)


def _runner_ups(search: PolicySearch, target, draft, profile, workload, wanted: int, floor: float = 0.0) -> list[Candidate]:
    """The policy's next `wanted` candidates from its program, those at `floor` tok/s or above
    (Dinkelbach starts at the floor: one solve shows there is none)."""
    return _program_candidates(search.policy, search.shortlist, floor or search.first.estimate_tok_s * 0.9, target, draft,
                               profile, workload, wanted, exclude=(search.first.shape,), floor=floor)[0]


def optimize(target: ModelSpec, draft: ModelSpec | None, profile: HardwareProfile, workload: Workload,
             policies: tuple[str, ...] = POLICIES, progress: Steps | None = None,
             per_policy: dict | None = None, admissions: tuple[str, ...] = ADMISSIONS,
             processes: int | None = None, memo: Memo | None = None) -> OptimizeResult:
    """The best plans, ranked by simulated throughput: shapes of `policies` and `admissions`
    (waves, continuous) proposed by the program, re-ranked by the simulator.
    1. Each policy's program proposes its best candidate.
    2. The bests are simulated in order of their estimates, skipping (SIM_OVER_ESTIMATE) those
       that cannot reach a plan simulated before them.
    3. The policies whose best came within RUNNER_UP_WITHIN of the best simulated plan (or
       whose best the simulator refused) get their program's runner-ups, simulated where their
       estimate is within RERANK_WITHIN of the best estimate. A runner-up's estimate never
       exceeds its policy's best, and the simulator moves the candidates of one policy alike,
       so a policy well behind cannot win by its runner-ups.
    In processes (one per core, at most `processes`) the jobs a step may ask for start ahead
    while a core would idle (Jobs); the rules alone decide which results count, so the plan
    is the one a single process finds. `progress` hears each step and counts its jobs; `memo`
    (with processes=1) carries work over from planning this machine with another host memory
    size."""
    bar = progress or Steps(None, None)
    per_policy = per_policy or PER_POLICY
    if draft is None:
        policies = tuple(p for p in policies if p not in ("specoffload", "spec-serial"))
    workers = min(parallel_workers(len(policies)), processes or len(policies))
    memo = memo.enter(target, draft, profile, workload) if memo is not None and workers == 1 else None
    bar.say(f"{', '.join(policies)}: each policy's shapes and program, then the simulator"
            + (f", in {workers} processes" if workers > 1 else ""))
    def sim_job(c: Candidate):
        return ("sim", c.shape, c.placement, c.prefetch_depth), _simulate_or_refusal, \
            to_sim_config(c, target, draft, profile, workload), memo

    with Jobs(workers, bar.set) as jobs:
        # the largest shape spaces first, so that the small ones fill in beside them; a
        # policy's best is simulated ahead while the other programs still run
        for policy in sorted(policies, key=lambda p: p not in ("spec-serial", "specoffload")):
            jobs.want(("first", policy), _policy_first, policy, target, draft, profile, workload, admissions, memo,
                      then=lambda s: s.first and jobs.want(*sim_job(s.first), ahead=(-1, -s.first.estimate_tok_s)))
        searches: list[PolicySearch] = [jobs.result(("first", p)) for p in policies]
        found = sorted((s for s in searches if s.first is not None), key=lambda s: -s.first.estimate_tok_s)
        if not found:
            raise InfeasibleError("no plan fits: " + " | ".join(f"{s.policy}: {s.why}" for s in searches))
        top_estimate = found[0].first.estimate_tok_s
        floor = RERANK_WITHIN * top_estimate  # a runner-up below it is not simulated

        def may_want_more(s: PolicySearch) -> bool:
            return per_policy.get(s.policy, 1) > 1 and s.first.estimate_tok_s >= floor

        # what steps 2 and 3 may ask for, by the rank of the policy's estimate: its best's
        # simulation, its runner-ups, and (as they come in) their simulations

        def want_reruns(rank: int, candidates: list[Candidate]) -> None:
            for c in candidates:
                if c.estimate_tok_s >= floor:
                    jobs.want(*sim_job(c), ahead=(rank, 2))

        for rank, s in enumerate(found):
            jobs.want(*sim_job(s.first), ahead=(rank, 0))
            if may_want_more(s):
                jobs.want(("more", s.policy), _runner_ups, s, target, draft, profile, workload,
                          per_policy[s.policy] - 1, floor, ahead=(rank, 1),
                          then=lambda got, rank=rank: want_reruns(rank, got))
        best_sim = 0.0
        for s in found:  # step 2
            if s.first.estimate_tok_s * SIM_OVER_ESTIMATE < best_sim:
                s.skipped = True
                jobs.drop(sim_job(s.first)[0])
                jobs.drop(("more", s.policy))
                continue
            key, *job = sim_job(s.first)
            jobs.want(key, *job)
            s.sim = jobs.result(key)
            if isinstance(s.sim, SimResult):
                best_sim = max(best_sim, s.sim.throughput_tok_s)
        close = [s for s in found if may_want_more(s) and not s.skipped
                 and (not isinstance(s.sim, SimResult) or s.sim.throughput_tok_s >= RUNNER_UP_WITHIN * best_sim)]
        for s in found:
            if s not in close:
                jobs.drop(("more", s.policy))
        more = {s.policy: jobs.result(("more", s.policy)) for s in close}  # step 3
        rerun = [(s, c) for s in close for c in more[s.policy] if c.estimate_tok_s >= floor]
        for s, c in rerun:
            jobs.want(*sim_job(c))
        rerun_sims = [(s, c, jobs.result(sim_job(c)[0])) for s, c in rerun]

    infeasible: dict[str, str] = {}
    ranked: list[Ranked] = []
    for s in searches:
        if s.why is not None:
            infeasible[s.policy] = s.why
        elif isinstance(s.sim, InfeasibleError):  # the program's memory terms are an upper bound; this is a guard
            infeasible[s.policy] = str(s.sim)
        elif s.sim is not None:
            ranked.append(Ranked(s.first, s.sim))
    for s, c, res in rerun_sims:
        if isinstance(res, InfeasibleError):
            infeasible.setdefault(s.policy, str(res))
        else:
            ranked.append(Ranked(c, res))
    if not ranked:
        raise InfeasibleError("no plan fits: " + " | ".join(f"{p}: {w}" for p, w in infeasible.items()))
    skipped = [s.first for s in searches if s.skipped and s.first is not None]
    ranked += routed_variants(ranked, target, draft, profile, workload, memo, skipped)
    for r in ranked:  # a policy with a plan is not infeasible, whatever a runner-up hit
        infeasible.pop(r.candidate.shape.policy, None)
    ranked.sort(key=lambda r: -r.tok_s)
    simulated = {r.candidate.shape.policy for r in ranked}
    return OptimizeResult(ranked, infeasible, sum(s.considered for s in searches), solver_name(),
                          {s.policy: s.first for s in searches if s.skipped and s.policy not in simulated})


ROUTED_TRIED = 3  # the best simulated plans (and each policy's best) also simulated with routed experts
ROUTED_WORTH = 0.9  # ... where a decode pass is expected to touch at most this share of the experts


def routed_variants(ranked: list[Ranked], target: ModelSpec, draft, profile, workload, memo=None,
                    skipped: list[Candidate] = ()) -> list[Ranked]:
    """The best plans that stream MoE experts (and each policy's best, simulated or skipped),
    simulated once more with routed experts (only the experts a layer's router picks are
    copied, after it has; the rest of the layer is prefetched as before): the simulator, not
    the program, weighs the smaller stream against the copy the layer now waits for. Those
    that fit are added for the ranking to choose."""
    out = []
    order = sorted(ranked, key=lambda r: -r.tok_s)
    best_of = {}
    for r in order:  # each policy's best too: routing can lift a policy the others beat whole
        best_of.setdefault(r.candidate.shape.policy, r)
    tried = [r.candidate for i, r in enumerate(order) if i < ROUTED_TRIED or best_of[r.candidate.shape.policy] is r]
    for cand in tried + list(skipped):  # a policy the simulator skipped for its whole-layer estimate too
        pl = cand.placement
        # routed experts are copied straight from pinned host memory (a pageable or disk home would
        # need staging the ring does for whole layers and the expert copies do not have)
        if not target.is_moe or pl.ffn != "cpu_pinned" or pl.ffn_gpu_layers >= target.layers or pl.experts == "routed":
            continue
        sh = cand.shape  # a decode pass's tokens touch nearly every expert: nothing to save, skip the simulation
        tokens = sh.num_batches * sh.target_batch * (sh.gamma + 1 if sh.policy in ("specoffload", "spec-serial") else 1)
        if expected_experts_touched(tokens, target.experts, target.top_k) > ROUTED_WORTH * target.experts:
            continue
        c = replace(cand, placement=replace(pl, experts="routed"))
        res = _simulate_or_refusal(to_sim_config(c, target, draft, profile, workload), memo)
        if isinstance(res, SimResult):
            out.append(Ranked(c, res))
    return out


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
        "pass_counts": s.pass_counts, "simulated_prompts": s.simulated_prompts,
        **({"experts_streamed_per_pass": s.experts_per_pass} if s.experts_per_pass is not None else {}),
    }
    return Plan(
        target=target_name, draft=draft_name if sch.speculative else None, hardware=profile.name,
        schedule=sch, placement=c.placement, workload=workload.to_dict(), prediction=prediction,
        inputs={"target": sha256_of(target.hf_config), "draft": sha256_of(draft.hf_config) if draft else None,
                "hardware": sha256_of(profile.to_dict()), "workload": sha256_of(workload.to_dict()),
                "target_shape": model_shape(target), "draft_shape": model_shape(draft) if draft else None,
                "dtype": target.dtype},
        profile=profile.to_dict(), weights=pair_weights(target, draft if sch.speculative else None).to_dict(),
        versions={"specplan": __version__, "python": platform.python_version(), "simpy": simpy.__version__,
                  "pulp": pulp.__version__, "solver": solver_name()},
    )


# ---- weight formats: the plan over each assignment --------------------------------------------------


def weight_candidates(choice, tgt: ModelSpec, drf: ModelSpec | None, profile) -> list[tuple[ModelSpec, ModelSpec | None]]:
    """The (target, draft) pairs in each assignment of formats --weights allows: one, or with
    `auto` one per choice (a draft group only where there is a draft)."""
    from specplan.formats import WeightsChoice
    from specplan.models import apply_weights

    if drf is None:
        choice = WeightsChoice(replace(choice.fixed, draft=None), {g: o for g, o in choice.auto.items() if g != "draft"})
    assignments = choice.candidates()
    for fmts in assignments:
        check_formats_on(profile, *apply_weights(tgt, drf, fmts))
    return [apply_weights(tgt, drf, f) for a in assignments for f in kernel_variants(a, tgt, drf, profile)]


def self_draft_depth(draft: str | None, tgt: ModelSpec, drf: ModelSpec | None, profile, workload,
                     admissions=ADMISSIONS) -> tuple[str | None, ModelSpec | None]:
    """A self-draft named without a depth (`self:int4`) keeps as many of the target's layers
    as fit on the GPU: all of them where a speculative plan fits with them, else the deepest
    of L/2, L/4, ... (with the LM head) beside the smallest speculative shape's least
    placement. A deeper copy of the target agrees with it more often and costs more GPU
    memory and draft time; which depth is accepted how often is the dataset's to say, so
    the rule is the memory's, and `self:FORMAT:LAYERS` sets the depth outright."""
    from specplan.models import resolve_draft

    if drf is None or not drf.self_draft or draft is None or draft.count(":") > 1:
        return draft, drf
    shapes = [sh for pol in ("spec-serial", "specoffload") for sh in enumerate_shapes(pol, workload, admissions=admissions)]
    if not shapes:
        return draft, drf
    small = min(shapes, key=lambda sh: (sh.num_batches * sh.target_batch, sh.draft_batch, sh.gamma))
    depth = tgt.layers
    while True:
        name = f"{draft}:{depth}" if depth < tgt.layers else draft
        cand = resolve_draft(name, tgt)
        if minimal_placement(tgt, cand, small, workload, profile, explain=False)[0] is not None or depth == 1:
            return name, cand
        depth = max(1, depth // 2)


def kernel_variants(fmts, tgt: ModelSpec, drf: ModelSpec | None, profile) -> list:
    """`fmts`, and each way of running its int8 / int4 layer groups through the fused kernel
    where the profile measured one (cost.fused_key): the planner prices both paths and keeps
    the faster plan, so the profile's measurement decides which the runtime takes."""
    from specplan.cost import fused_key

    out = [fmts]
    for group in ("attention", "experts", "draft"):
        f, model = getattr(fmts, group), drf if group == "draft" else tgt
        if f is None or model is None or f.fused or not f.can_fuse:
            continue
        if profile.kernel(fused_key(f, model.dtype, "gpu")) is not None:
            out += [replace(o, **{group: replace(f, fused=True)}) for o in out]
    return out


def check_formats_on(profile, tgt: ModelSpec, drf: ModelSpec | None) -> None:
    """Refuse a format the profile's device could not run: a fused kernel the profile did not
    measure, or, in a profile that measured dequantization (specplan profile), a format it
    has no table for (a shipped or composed profile prices dequantization from its peaks)."""
    measured = any("_dequant:" in k for k in profile.kernels)
    for m in (tgt, drf):
        for g in ("attention", "experts", "lm_head") if m is not None else ():
            f = m.fmt(g)
            if f.fused and profile.kernel(fused_op_name(m, g, "gpu")) is None:
                raise InputError("argument", "--weights", f"{g}={f.label}: the profile '{profile.name}' measured "
                                 f"no fused {f.name} kernel on its device (torch has none there, or it disagreed "
                                 "with dequantization)", f"{g}={f.name} (dequantized before the matmul)")
            if (measured and not f.fused and m.converted(g) and f.compressed
                    and profile.kernel(dequant_op_name(m, g, "gpu")) is None):
                raise InputError("argument", "--weights", f"{g}={f.name}: the profile '{profile.name}' measured "
                                 f"no {f.name} dequantization on its device (it cannot run it there)",
                                 "a format the profile measured (specplan hardware PROFILE lists them)")


def optimize_formats(pairs, profile, workload, policies, admissions, bar=None) -> tuple[OptimizeResult, ModelSpec, ModelSpec | None]:
    """The best plan over the weight-format assignments in `pairs` (one unless --weights auto)."""
    best = None
    why = []
    weighed: dict[str, float | None] = {}
    for i, (t, d) in enumerate(pairs):
        if bar is not None and len(pairs) > 1:
            bar.say(f"formats {i + 1}/{len(pairs)}: {pair_label(t, d)}")
        try:
            res = optimize(t, d, profile, workload, policies, progress=bar, admissions=admissions)
        except InfeasibleError as e:
            if len(pairs) == 1:
                raise
            why.append(f"{pair_label(t, d)}: {e}")
            weighed[pair_label(t, d)] = None
            continue
        weighed[pair_label(t, d)] = res.best.tok_s
        if best is None or res.best.tok_s > best[0].best.tok_s:
            best = (res, t, d)
    if best is None:
        raise InfeasibleError("no plan fits with any format: " + " | ".join(why))
    if len(pairs) > 1:
        best[0].formats = weighed
    return best


def pair_label(t: ModelSpec, d: ModelSpec | None) -> str:
    return pair_weights(t, d).describe()

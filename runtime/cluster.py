"""`specplan batch`: one dataset job over a Ray cluster, a plan per machine, no row lost or run twice.

The driver (the process that runs `specplan batch`) reads and checks the dataset, then:

1. connects to the cluster (`--address`: `local` starts Ray on this machine; `auto` or
   HOST:PORT joins one started with `ray start`) and places one worker actor per GPU, or per
   `--cpus-per-worker` cores of a node without one;
2. asks each worker for its node's hardware profile: the file or shipped name in the node's
   SPECPLAN_PROFILE, else the shipped profile of its GPU's name, else the driver's
   `--profile`; a node with none is an error;
3. plans once per distinct profile (the planner, as `specplan optimize`), so unlike machines
   get plans of their own; a profile that cannot hold the model leaves its workers out;
4. has each worker check its plan against its machine and read the weights (once), then
   hands out shards of rows, sized to each worker's plan, until none is left. A worker gives
   its finished rows to the driver as they finish (`take`, polled); the driver appends them
   to that shard's file (runtime.shards). A lost worker (its actor killed, its process or node
   gone) loses only rows it had not handed over; they go out again as a new shard.
5. merges the shards into OUT in input order and writes the job report: per worker its
   node, profile, plan, predicted and measured tok/s; for the job, where the wall time went.

Ray is imported only here, and only when a batch job runs (`pip install "specplan[ray]"`).
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from specplan import procs
from specplan.entry import check as check_interrupt
from specplan.errors import InfeasibleError, InputError, SpecplanError
from specplan.models import is_self_draft, resolve_draft
from specplan.units import fmt_duration

from .jobio import JobRow

PROFILE_ENV = "SPECPLAN_PROFILE"
NAMESPACE, ACTOR_PREFIX = "specplan", "batch-"  # workers are named batch-<driver pid>-<index> in namespace specplan
POLL_S = 0.25  # how often the driver collects finished rows from the workers
START_TIMEOUT_S = 300.0  # a worker that has not answered by then is left out (its node may lack resources)


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker needs to build its engine: the models and the settings that change
    what a row generates (the same on every worker), and its share of the node."""

    target: str
    draft: str | None
    source: str  # the dataset's path, for the rows' error messages
    device: str = "auto"
    random_weights: bool = False
    dtype: str | None = None
    ignore_eos: bool | None = None
    seed: int = 0
    draft_seed: int | None = None
    sampling: dict = field(default_factory=dict)
    threads: int = 1
    force: bool = False
    profile: dict | None = None  # the driver's --profile, for nodes that have none of their own


# ---- the worker --------------------------------------------------------------------------------------


def node_profile(device_name: str, fallback: dict | None) -> tuple[dict | None, str]:
    """This node's profile as a dict, and where it came from; (None, why) when it has none."""
    from specplan.hardware import HardwareProfile, load_profile, shipped_names

    named = os.environ.get(PROFILE_ENV)
    if named:
        try:
            return load_profile(named).to_dict(), f"{PROFILE_ENV}={named}"
        except (SpecplanError, OSError) as e:
            return None, f"{PROFILE_ENV}={named}: {e}"
    for name in shipped_names():
        prof = load_profile(name)
        if prof.gpu.name and prof.gpu.name == device_name:
            return prof.to_dict(), f"shipped {name} (the GPU's name)"
    if fallback is not None:
        return HardwareProfile.from_dict(fallback, "--profile").to_dict(), "--profile"
    return None, (f"{PROFILE_ENV} is not set there, no shipped profile is for its device ({device_name}) "
                  "and no --profile was given")


def profile_hint(fallback: dict | None) -> str:
    """What to do about a node without a usable profile: --profile is only suggested where it
    was not given (a node whose own SPECPLAN_PROFILE is broken does not fall back to it)."""
    if fallback is not None:
        return f"fix the profile {PROFILE_ENV} names there, or start the node without {PROFILE_ENV} so --profile applies"
    return f"run `specplan profile --out FILE` there and start the node with {PROFILE_ENV}=FILE, or give --profile"


class Worker:
    """One GPU (or CPU slot) of the cluster: its engine, built once, runs shard after shard.
    Methods return {"error": one line} for what the user can act on; Ray carries the rest."""

    def __init__(self, cfg: WorkerConfig):
        import torch

        torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.runner = None
        self.tokenizer = None
        self._out: list[dict] = []
        self._lock = threading.Lock()

    # what the driver asks before any weight is read

    def describe(self) -> dict:
        from .run import device_name, pick_device, resolve_model

        node = {"host": socket.gethostname(), "pid": os.getpid(), "node_id": _node_id()}
        try:
            node["device"] = device_name(pick_device(self.cfg.device))
        except SpecplanError as e:
            return node | {"error": f"node {node['host']}: --device: {e}"}
        for flag, name in (("--target", self.cfg.target), ("--draft", self.cfg.draft)):
            try:
                if name is not None and not is_self_draft(name):
                    resolve_model(name)  # the model must be there on every node, at the same path
            except SpecplanError as e:
                return node | {"error": f"node {node['host']}: {flag}: {e}"}
        profile, why = node_profile(node["device"], self.cfg.profile)
        if profile is None:
            return node | {"error": f"node {node['host']}: no hardware profile: {why} ({profile_hint(self.cfg.profile)})"}
        return node | {"profile": profile, "profile_from": why}

    def prepare(self, plan: dict, longest_prompt: int, rows: int) -> dict:
        """Check the plan against this machine, then read the weights and build the engine."""
        from specplan.plan import Plan

        from .jobio import load_tokenizer
        from .run import PlanRunner, model_folder

        warnings: list[str] = []
        t0 = time.perf_counter()
        try:
            c = self.cfg
            self.runner = PlanRunner(Plan.from_dict(plan, "plan"), c.target, c.draft, [longest_prompt], rows=rows,
                                     device=c.device, random_weights=c.random_weights, dtype=c.dtype,
                                     ignore_eos=c.ignore_eos, seed=c.seed, draft_seed=c.draft_seed, force=c.force,
                                     warn=warnings.append, sampling=c.sampling)
            self.tokenizer = load_tokenizer(model_folder(c.target))
        except SpecplanError as e:
            return {"error": str(e)}
        return {"warnings": warnings, "load_s": time.perf_counter() - t0}

    # the shards

    def run_shard(self, shard: int, rows: list[tuple[int, JobRow]]) -> dict:
        from .job import Job

        runner = self.runner
        places = [p for p, _ in rows]
        try:
            job = Job(dict(rows), places, self.cfg.source, self, self.tokenizer, runner.gen_len, base=runner.base)
        except SpecplanError as e:
            return {"error": str(e)}
        job.engine = runner.engine
        rep = runner.run(job.prompts, limits=job.limits, stop=job.stops, on_finish=job.finish,
                         row_sampling=job.sampling, simulate_again=False)  # the driver reports per worker
        m = rep["measured"]
        return {"shard": shard, "rows": m["rows"], "generated_tokens": m["generated_tokens"], "wall_s": m["wall_s"],
                "tokens_per_round": m["tokens_per_round"], "acceptance_per_token": m["acceptance_per_token"]}

    def write(self, record: dict) -> None:  # Job's writer: rows wait here until the driver takes them
        with self._lock:
            self._out.append(record)

    def take(self) -> list[dict]:
        with self._lock:
            out, self._out = self._out, []
        return out


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray (a test calling the class directly)
        return None


# ---- the cluster -------------------------------------------------------------------------------------


def _ray():
    try:
        import ray
    except ImportError:
        raise InputError("argument", "--address", "a batch job runs on Ray, which is not installed",
                         'pip install "specplan[ray]"') from None
    return ray


def connect(address: str, num_cpus: int | None = None) -> None:
    """Join (or with `local`, start) the cluster, or raise a one-line InputError saying why not."""
    ray = _ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kw = dict(logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    if address == "local":
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), **kw)  # a new instance, never a running one
        check_interrupt()  # a Ctrl-C that Ray's start-up swallowed
        return
    if address != "auto" and not address.startswith("ray://"):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise InputError("argument", "--address", f"got {address!r}",
                             "local, auto, or HOST:PORT as `ray start --head` printed it")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as e:
            raise InputError("argument", "--address", f"nothing answers at {address} ({e.strerror or e})",
                             "the address `ray start --head` printed, with that node up") from None
    try:
        ray.init(address=address, **{k: v for k, v in kw.items() if k != "include_dashboard"})
        check_interrupt()
    except (ConnectionError, RuntimeError, ValueError) as e:
        check_interrupt()  # an interrupted ray.init may end in one of these
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError("argument", "--address", f"cannot join a Ray cluster at {address}: {first}",
                         "local, or the address of a running cluster (`ray start --head`)") from None


@dataclass(frozen=True)
class Slot:
    node_id: str
    host: str
    gpus: int  # 1 for a GPU worker, 0 for a CPU slot
    cpus: int


def worker_slots(nodes: list[dict], device: str, cpus_per_worker: int, max_workers: int | None) -> list[Slot]:
    """One slot per GPU of each live node, or, on nodes without one (or with --device cpu), one
    per `cpus_per_worker` cores; at most `max_workers` in all, spread over the nodes in turn."""
    per_node: list[list[Slot]] = []
    for n in nodes:
        if not n.get("Alive", n.get("alive", False)):
            continue
        res = n.get("Resources", {})
        host = n.get("NodeManagerHostname") or n.get("NodeManagerAddress") or "?"
        gpus = int(res.get("GPU", 0)) if device != "cpu" else 0
        if gpus:
            per_node.append([Slot(n["NodeID"], host, 1, 1) for _ in range(gpus)])
        elif device != "cuda":
            per_node.append([Slot(n["NodeID"], host, 0, cpus_per_worker)
                             for _ in range(int(res.get("CPU", 0)) // cpus_per_worker)])
    slots = []
    while any(per_node):  # round robin: --workers 2 on two nodes takes one of each
        for s in per_node:
            if s:
                slots.append(s.pop(0))
    if not slots:
        raise InfeasibleError("the cluster has no worker slot: " + (
            "no node has a GPU (--device cuda)" if device == "cuda" else
            f"no live node has {cpus_per_worker} free CPUs (--cpus-per-worker)"))
    return slots[:max_workers] if max_workers else slots


# ---- the driver --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanRequest:
    """What the planner is asked for each profile (the `specplan optimize` knobs)."""

    gen_len: int
    acceptance: float = 0.7
    policies: tuple[str, ...] = ()
    admissions: tuple[str, ...] = ()
    gpu_memory_bytes: float | None = None
    host_memory_bytes: float | None = None
    weights: str | None = None  # --weights: the formats (or auto) each profile's plan may use


@dataclass
class _Running:
    shard: Any  # shards.Shard
    ref: Any  # the run_shard ObjectRef
    writer: Any  # jobio.JobWriter of the shard's file
    received: set = field(default_factory=set)  # ids handed over
    started: float = 0.0


@dataclass
class _Worker:
    index: int
    actor: Any
    slot: Slot
    info: dict
    plan: Any = None  # specplan.plan.Plan
    shard_rows: int = 0
    running: _Running | None = None
    rows: int = 0
    tokens: int = 0
    busy_s: float = 0.0
    shards: int = 0
    lost: str | None = None
    load_s: float | None = None
    warnings: list = field(default_factory=list)

    def summary(self) -> dict:
        pred = (self.plan.prediction or {}).get("throughput_tok_s") if self.plan is not None else None
        measured = self.tokens / self.busy_s if self.busy_s > 0 else None
        s = self.plan.schedule if self.plan is not None else None
        return {"worker": self.index, "host": self.info.get("host"), "node_id": self.slot.node_id,
                "device": self.info.get("device"), "gpus": self.slot.gpus, "cpus": self.slot.cpus,
                "profile": (self.info.get("profile") or {}).get("name"), "profile_from": self.info.get("profile_from"),
                "plan": None if s is None else {"policy": s.policy, "admission": s.admission,
                                                "rows": s.rows, "gamma": s.gamma, "schedule": asdict(s),
                                                "placement": asdict(self.plan.placement)},
                "predicted_tok_s": pred, "measured_tok_s": measured,
                "error_pct": (100 * (measured - pred) / pred) if measured and pred else None,
                "rows": self.rows, "generated_tokens": self.tokens, "busy_s": self.busy_s, "shards": self.shards,
                "load_s": self.load_s, "lost": self.lost, "warnings": self.warnings}


def _planning_workload(rows: list[JobRow], todo: list[int], req: PlanRequest, workers: int):
    from specplan.workload import Workload

    lens = [len(rows[i].ids) for i in todo]
    step = max(1, len(lens) // 256)  # the lengths' spread, not a million entries in every plan
    sample = lens[::step] + [max(lens)]
    return Workload.make(prompt_len=sample, gen_len=req.gen_len, num_prompts=max(1, math.ceil(len(lens) / workers)),
                         acceptance=req.acceptance, source="batch")


def plan_per_profile(infos: list[dict], target: str, draft: str | None, workload, req: PlanRequest,
                     say: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, str]]:
    """A plan per distinct profile (by content), and why the others cannot hold the model."""
    from specplan.fileio import sha256_of
    from specplan.hardware import HardwareProfile
    from specplan.plan import ADMISSIONS, POLICIES
    from specplan.formats import parse_weights
    from specplan.planner.optimize import make_plan, optimize_formats, self_draft_depth, weight_candidates

    from .run import resolve_model

    tspec = resolve_model(target)[0]
    dspec = resolve_draft(draft, tspec)
    plans: dict[str, Any] = {}
    refused: dict[str, str] = {}
    for info in infos:
        key = sha256_of(info["profile"])
        if key in plans or key in refused:
            continue
        prof = HardwareProfile.from_dict(info["profile"], f"node {info['host']} profile")
        caps = {"gpu_memory_bytes": req.gpu_memory_bytes, "host_memory_bytes": req.host_memory_bytes}
        if any(v is not None for v in caps.values()):
            prof = prof.compose(**{k: v for k, v in caps.items() if v is not None})
        say(f"planning for {prof.name} ({info['host']})")
        try:
            name, node_draft = self_draft_depth(draft, tspec, dspec, prof, workload, req.admissions or ADMISSIONS)
            pairs = weight_candidates(parse_weights(req.weights), tspec, node_draft, prof)
            res, t, d = optimize_formats(pairs, prof, workload, req.policies or POLICIES, req.admissions or ADMISSIONS)
        except InfeasibleError as e:
            refused[key] = f"{prof.name}: {e}"
            continue
        plans[key] = make_plan(res.best, target, name if d is not None else None, t, d, prof, workload)
    return plans, refused


@dataclass(frozen=True)
class BatchRun:
    """Where and how the job runs (the `specplan batch` flags that are not the rows' settings)."""

    address: str = "local"
    max_workers: int | None = None
    cpus_per_worker: int = 1
    shard_rows: int | None = None  # default: four times the worker's rows in flight
    num_cpus: int | None = None  # `local`: cores the local Ray instance offers (default: all)


class Driver:
    """The job's driver: see the module docstring. `say` hears one-line news (planning, a
    worker lost), `progress(rows_done, rows_total, line)` the aggregated progress."""

    def __init__(self, cfg: WorkerConfig, req: PlanRequest, where: BatchRun, say: Callable[[str], None],
                 progress: Callable[[int, int, str], None]):
        self.cfg, self.req, self.where, self.say, self.progress = cfg, req, where, say, progress
        self.workers: list[_Worker] = []
        self.times: dict[str, float] = {}
        self.refused: dict[str, str] = {}
        self.started: list[procs.Proc] = []  # the processes Ray started here (procs.descendants)

    # before any weight is read

    def start(self, rows: list[JobRow], todo: list[int]) -> None:
        """Connect, place the workers, find their profiles, plan per profile, check every row
        against the plans. Raises a one-line error for what stops the job; reads no weight."""
        from specplan.fileio import sha256_of
        from specplan.workload import check_row_positions

        from .job import check_rows
        from .jobio import has_tokenizer
        from .run import model_folder, resolve_model, run_sampling

        ray = _ray()
        t0 = time.perf_counter()
        procs.adopt_orphans()  # Ray's agents, orphaned by a shutdown mid-start, stay findable below this process
        connect(self.where.address, self.where.num_cpus)
        self.started = procs.descendants(os.getpid())  # Ray's processes, should an interrupt orphan them
        slots = worker_slots(ray.nodes(), self.cfg.device, self.where.cpus_per_worker, self.where.max_workers)
        self.times["connect_s"] = time.perf_counter() - t0
        self.say(f"{len(slots)} worker slot{'s' * (len(slots) != 1)} on {len({s.node_id for s in slots})} node(s)")
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        remote = ray.remote(Worker)
        actors = []
        for i, s in enumerate(slots):
            cfg = self.cfg if s.gpus else replace(self.cfg, threads=s.cpus)
            # named, so `ray list actors` (or a test) can find a job's workers
            actors.append(remote.options(num_gpus=s.gpus, num_cpus=s.cpus, max_restarts=0, max_concurrency=2,
                                         name=f"{ACTOR_PREFIX}{os.getpid()}-{i}", namespace=NAMESPACE,
                                         scheduling_strategy=NodeAffinitySchedulingStrategy(s.node_id, soft=False))
                          .remote(cfg))
        check_interrupt()
        infos = self._answers([a.describe.remote() for a in actors], "start")
        self.started = list(dict.fromkeys(self.started + procs.descendants(os.getpid())))
        check_interrupt()
        self.workers = [_Worker(i, a, s, info or {"host": s.host}) for i, (a, s, info) in enumerate(zip(actors, slots, infos))]
        self._drop([w for w in self.workers if not w.info.get("profile") and not w.info.get("error")],
                   "did not start in time")
        errors = [w.info["error"] for w in self._live() if w.info.get("error")]
        if errors:
            raise SpecplanError(errors[0])
        if not self._live():
            raise InfeasibleError("no worker started on the cluster")
        self.times["workers_start_s"] = time.perf_counter() - t0 - self.times["connect_s"]

        t1 = time.perf_counter()
        workload = _planning_workload(rows, todo, self.req, len(self._live()))
        plans, self.refused = plan_per_profile([w.info for w in self._live()], self.cfg.target, self.cfg.draft,
                                               workload, self.req, self.say)
        for w in self._live():
            w.plan = plans.get(sha256_of(w.info["profile"]))
        if not plans:
            raise InfeasibleError("no worker can hold the model: " + "; ".join(sorted(set(self.refused.values()))))
        self._drop([w for w in self._live() if w.plan is None], "its profile cannot hold the model")
        self.times["plan_s"] = time.perf_counter() - t1
        tspec = resolve_model(self.cfg.target)[0]
        dspec = resolve_draft(self.cfg.draft, tspec)
        gammas = {w.plan.schedule.gamma if w.plan.schedule.speculative else 0 for w in self._live()}
        for i in todo:  # named by id, before any weight is read
            for g in gammas:
                check_row_positions(self.cfg.source, f"id {rows[i].id!r}", len(rows[i].ids), self.req.gen_len, g,
                                    tspec, dspec if g else None)
        # the workers' sampling, as each will build it from its plan's workload (PlanRunner.base)
        base = run_sampling(workload, self.cfg.sampling, self.cfg.seed)
        check_rows(rows, todo, self.cfg.source, has_tokenizer(model_folder(self.cfg.target)), self.req.gen_len, base)
        for w in self._live():
            w.shard_rows = self.where.shard_rows or 4 * w.plan.schedule.rows

    def load(self, longest_prompt: int) -> None:
        """Each worker checks its plan against its machine, then reads the weights."""
        t0 = time.perf_counter()
        live = self._live()
        answers = self._answers([w.actor.prepare.remote(w.plan.to_dict(), longest_prompt, w.shard_rows)
                                 for w in live], "load")
        for w, a in zip(live, answers):
            if a is None:
                self._drop([w], "lost while reading the weights")
            elif a.get("error"):
                self._drop([w], a["error"])
            else:
                w.load_s, w.warnings = a["load_s"], a["warnings"]
                for m in a["warnings"]:
                    self.say(f"worker {w.index} ({w.info['host']}): {m}")
        if not self._live():
            raise InfeasibleError("no worker could run its plan: " + "; ".join(f"worker {w.index}: {w.lost}"
                                                                             for w in self.workers))
        self.times["load_s"] = time.perf_counter() - t0

    # the shards

    def run(self, rows: list[JobRow], queue, open_shard: Callable[[int], Any]) -> None:
        """Hand out `queue`'s shards until every row is back; `open_shard(id)` gives a shard's
        writer (jobio.JobWriter). Returns when done; raises when every worker is lost."""
        ray = _ray()
        from ray.exceptions import RayActorError

        lost_errors = (RayActorError,) + tuple(getattr(ray.exceptions, n) for n in ("ActorUnavailableError",)
                                                if hasattr(ray.exceptions, n))
        total = len(queue)
        t0 = time.perf_counter()
        last_line = 0.0
        try:
            while True:
                live = self._live()
                if not live:
                    raise SpecplanError(f"every worker was lost; {len(queue)} rows are left: run the same command "
                                        "with --resume")
                # the rows left spread over the workers now asking, each at most its shard size
                idle = [w for w in live if w.running is None]
                share = math.ceil(len(queue) / len(idle)) if idle else 0
                for w in idle:
                    if len(queue):
                        n = max(1, min(w.shard_rows, share))
                        shard = queue.cut(n)
                        writer = open_shard(shard.id)
                        ref = w.actor.run_shard.remote(shard.id, [(p, rows[p]) for p in shard.places])
                        w.running = _Running(shard, ref, writer, started=time.perf_counter())
                busy = [w for w in live if w.running is not None]
                if not busy:
                    break
                ready = set(ray.wait([w.running.ref for w in busy], num_returns=len(busy), timeout=POLL_S)[0])
                takes = [(w, w.actor.take.remote()) for w in busy]
                for w, ref in takes:
                    r = w.running
                    try:
                        self._hand_over(w, ray.get(ref))
                        if r.ref in ready:
                            result = ray.get(r.ref)
                            if result.get("error"):
                                raise SpecplanError(result["error"])
                            self._hand_over(w, ray.get(w.actor.take.remote()))  # any that came after the take
                            w.busy_s += time.perf_counter() - r.started
                            w.shards += 1
                            r.writer.close()
                            w.running = None
                    except lost_errors as e:
                        left = [p for p in r.shard.places if rows[p].id not in r.received]
                        r.writer.close()
                        w.busy_s += time.perf_counter() - r.started
                        w.running = None
                        queue.give_back(left)
                        self._drop([w], f"lost ({type(e).__name__}) with {len(left)} rows of shard {r.shard.id} "
                                        "not handed over; they run again elsewhere")
                now = time.perf_counter()
                if now - last_line >= 1.0 or not len(queue):
                    last_line = now
                    done = sum(w.rows for w in self.workers)
                    self.progress(done, total, self._progress_line(done, total, now - t0))
        finally:
            for w in self.workers:
                if w.running is not None:
                    w.running.writer.close()
        self.times["run_s"] = time.perf_counter() - t0

    @staticmethod
    def _hand_over(w: _Worker, records: list[dict]) -> None:
        """Append a worker's finished rows to its shard's file (each id once)."""
        r = w.running
        for rec in records:
            if rec["id"] in r.received:
                continue
            r.writer.write(rec)
            r.received.add(rec["id"])
            w.rows += 1
            w.tokens += rec["generated_tokens"]

    def _progress_line(self, done: int, total: int, elapsed_s: float) -> str:
        rates = [(w.index, w.tokens / max(w.busy_s + (time.perf_counter() - w.running.started
                                                        if w.running else 0.0), 1e-9)) for w in self._live()]
        tok = sum(w.tokens for w in self.workers)
        eta = (total - done) * elapsed_s / done if done else None
        per = ", ".join(f"w{i} {r:.1f}" for i, r in rates)
        return (f"{done}/{total} rows, {tok / max(elapsed_s, 1e-9):.1f} tok/s ({per})"
                + (f", ETA {fmt_duration(eta)}" if eta is not None else ""))

    def report(self) -> dict:
        tok = sum(w.tokens for w in self.workers)
        run_s = self.times.get("run_s")
        return {"workers": [w.summary() for w in self.workers],
                "refused_profiles": sorted(set(self.refused.values())),
                "times_s": dict(self.times),
                "generated_tokens": tok,
                "throughput_tok_s": tok / run_s if run_s else None,
                "predicted_tok_s": sum((w.plan.prediction or {}).get("throughput_tok_s", 0.0)
                                       for w in self.workers if w.plan is not None and w.lost is None) or None}

    def close(self) -> None:
        """Stop the workers and leave the cluster (a `local` one stops with it), whatever state
        an interrupt left Ray in (mid-import, mid-start); then end every process this one
        started that outlived the shutdown (Ray's agents, orphaned when their raylet stops)."""
        started = list(dict.fromkeys(self.started + procs.descendants(os.getpid())))
        try:
            import ray

            if ray.is_initialized():
                for w in self.workers:
                    try:
                        ray.kill(w.actor)
                    except Exception:  # noqa: BLE001 - already gone
                        pass
            ray.shutdown()  # also after a ray.init that an interrupt cut short
        except Exception:  # noqa: BLE001 - Ray half imported or half started: its processes are ended below
            pass
        finally:
            procs.end_all_below(os.getpid(), started)

    # helpers

    def _live(self) -> list[_Worker]:
        return [w for w in self.workers if w.lost is None]

    def _drop(self, workers: list[_Worker], why: str) -> None:
        for w in workers:
            if w.lost is None:
                w.lost = why
                self.say(f"worker {w.index} ({w.info.get('host')}): {why}")
                try:
                    _ray().kill(w.actor)
                except Exception:  # noqa: BLE001 - already gone
                    pass

    def _answers(self, refs: list, what: str) -> list[dict | None]:
        """Each ref's answer, or None for a worker that died or did not answer in time."""
        ray = _ray()
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=START_TIMEOUT_S)
        out = []
        for r in refs:
            try:
                out.append(ray.get(r) if r in ready else None)
            except ray.exceptions.RayActorError:
                out.append(None)
        return out

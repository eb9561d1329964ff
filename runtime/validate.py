"""`specplan validate`: plan a set of workloads, run each with specrun, compare with the
simulator, and (optionally) run peers on the same model and workload.

Two predictions are reported per workload:
* `planned`: the plan's own prediction, made before running with the workload's assumed
  acceptance rate;
* `timing`: the same plan re-simulated with the acceptance the run measured and the rows it
  ran. The error of this one is the error of the time model (link, kernels, overlap), which
  is what the profile and simulator can be held to; acceptance is a property of the model
  pair and the data, which the run measures.
"""

from __future__ import annotations

import csv
import io
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import typer

from specplan.cost import error_pct, stage_total
from specplan.hwprofiles.calibrate import CALIBRATED_STAGES
from specplan.fileio import write_atomic, write_json
from specplan.hardware import HardwareProfile
from specplan.models import ModelSpec, apply_weights
from specplan.plan import Plan, Schedule
from specplan.workload import Workload


@dataclass(frozen=True)
class Case:
    policy: str
    target_batch: int
    num_batches: int
    gamma: int
    prompt_len: int
    gen_len: int
    draft_batch: int = 8
    prefill_chunk: int = 8
    attention_device: str = "cpu"
    weights: str | None = None  # --weights of the plan: the layers' format (None: the dtype)

    @property
    def label(self) -> str:
        g = f" g{self.gamma}" if self.gamma else ""
        w = f" {self.weights}" if self.weights else ""
        return f"{self.policy} {self.num_batches}x{self.target_batch}{g} p{self.prompt_len} n{self.gen_len}{w}"

    def schedule(self) -> Schedule:
        return Schedule(self.policy, self.target_batch, self.num_batches, self.prefill_chunk, self.draft_batch,
                        self.gamma, self.attention_device, 0 if self.policy == "sequential" else 1)


QUICK_CASES = (  # the first four: one workload (16 rows, prompt 64, 24 new tokens) under every policy
    Case("sequential", 16, 1, 0, 64, 24),
    Case("flexgen", 8, 2, 0, 64, 24),
    Case("spec-serial", 16, 1, 3, 64, 24),
    Case("specoffload", 8, 2, 3, 64, 24),
    Case("spec-serial", 16, 1, 5, 128, 24, draft_batch=16),
    Case("flexgen", 16, 2, 0, 128, 16, attention_device="gpu"),
    Case("flexgen", 8, 2, 0, 64, 24, weights="int8"),  # the first workload again, its layers compressed
    Case("flexgen", 8, 2, 0, 64, 24, weights="int4g64"),
)
FULL_CASES = QUICK_CASES + (
    Case("sequential", 32, 1, 0, 128, 32, prefill_chunk=16),
    Case("specoffload", 16, 2, 4, 128, 32, draft_batch=16),
    Case("spec-serial", 32, 1, 2, 64, 48, draft_batch=32),
    Case("flexgen", 32, 2, 0, 64, 48, prefill_chunk=16),
)


@dataclass
class Row:
    case: Case
    plan: Plan
    measured_tok_s: list[float]
    planned_tok_s: float
    timing_tok_s: float
    acceptance: float | None
    tokens_per_round: float | None
    stage_errors: dict = field(default_factory=dict)  # stage -> (measured s, simulated s)
    peer: dict = field(default_factory=dict)

    @property
    def measured(self) -> float:
        return statistics.median(self.measured_tok_s)

    @property
    def spread(self) -> float:
        return (max(self.measured_tok_s) - min(self.measured_tok_s)) / self.measured if self.measured else 0.0

    @property
    def error_pct(self) -> float:
        return error_pct(self.measured, self.timing_tok_s)

    @property
    def planned_error_pct(self) -> float:
        return error_pct(self.measured, self.planned_tok_s)


def _spec(name: str, dtype: str | None) -> ModelSpec:
    spec = ModelSpec.resolve(name)
    return spec.with_dtype(dtype) if dtype else spec


def make_case_plan(case: Case, target_name: str, draft_name: str | None, target: ModelSpec, draft: ModelSpec | None,
                   profile: HardwareProfile, acceptance: float) -> Plan:
    from specplan.planner.optimize import Candidate, Ranked, make_plan
    from specplan.planner.shapes import Shape
    from specplan.simulator.cli import default_placement
    from specplan.simulator.run import SimConfig, simulate

    from specplan.formats import parse_weights

    target, draft = apply_weights(target, draft, parse_weights(case.weights).fixed)
    sch = case.schedule()
    wl = Workload.make(case.prompt_len, case.gen_len, case.target_batch * case.num_batches, acceptance)
    pl = default_placement(target, draft if sch.speculative else None, sch, wl, profile)
    res = simulate(SimConfig(target, draft if sch.speculative else None, profile, wl, sch, pl))
    shape = Shape(sch.policy, sch.target_batch, sch.num_batches, sch.gamma, sch.draft_batch, sch.prefill_chunk,
                  sch.attention_device)
    cand = Candidate(shape, pl, sch.prefetch_depth, res.throughput_tok_s, 0.0, 0.0)
    return make_plan(Ranked(cand, res), target_name, draft_name, target, draft, profile, wl)


def plan_weight_bytes_on_device(plan: Plan) -> float:
    """What the plan keeps of the target's weights on the device (stream buffers included):
    the memory cap the peer gets, so it has to offload the rest as specrun does."""
    gpu = plan.prediction["memory"]["gpu"]
    keys = ("target attention weights", "target FFN weights (resident)", "router and norms", "lm_head", "embedding",
            "weight stream buffers")
    return float(sum(gpu.get(k, 0.0) for k in keys))


def run_peer_accelerate(target_name: str, plan: Plan, max_memory_bytes: float, seed: int, dtype: str | None = None) -> dict:
    """The same model (same random weights) and workload through transformers + accelerate
    offload: device_map with a memory cap equal to the plan's, the rest offloaded to disk."""
    import tempfile

    import torch
    from accelerate import dispatch_model, infer_auto_device_map
    from transformers import AutoConfig, AutoModelForCausalLM

    from .checkpoint import random_checkpoint, torch_dtype
    from .run import random_prompts

    spec = _spec(target_name, dtype)
    dtype = torch_dtype(spec)
    cfg = {k: v for k, v in spec.hf_config.items() if not k.startswith("_")}
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    ck = random_checkpoint(spec, dtype, seed)  # the very weights specrun runs
    model.load_state_dict({name: ck.tensor(name) for name, _ in model.named_parameters()}, strict=False)
    model.tie_weights()
    model.eval()
    wl = Workload.from_dict(plan.workload, "plan")
    prompts = random_prompts(wl, spec.vocab, wl.num_prompts, wl.seed + seed)
    with tempfile.TemporaryDirectory() as offload:
        dmap = infer_auto_device_map(model, max_memory={"cpu": int(max_memory_bytes), "disk": 10**12},
                                     no_split_module_classes=[type(model.model.layers[0]).__name__])
        model = dispatch_model(model, device_map=dmap, offload_dir=offload)
        batch = torch.tensor([p[: wl.prompt_lens[0]] for p in prompts])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(batch, max_new_tokens=wl.gen_len, min_new_tokens=wl.gen_len, do_sample=False,
                                 pad_token_id=0)
        wall = time.perf_counter() - t0
    gen = (out.shape[1] - batch.shape[1]) * out.shape[0]
    on_disk = sum(1 for v in dmap.values() if v == "disk")
    return {"peer": "transformers+accelerate", "tok_s": gen / wall, "wall_s": wall, "modules_on_disk": on_disk}


def validate(target_name: str, draft_name: str, profile: HardwareProfile, cases=QUICK_CASES, repeat: int = 3,
             acceptance: float = 0.7, peers: bool = False, device: str = "cpu",
             progress: Callable[[str], None] | None = None,
             run_done: Callable[[], None] | None = None, dtype: str | None = None, timing: bool = False) -> list[Row]:
    from specplan.simulator.run import simulate_as_run

    from .run import run_plan

    say = progress or (lambda m: None)
    target, draft = _spec(target_name, dtype), _spec(draft_name, dtype)
    # presets run with random weights (the draft with the target's seed: a truncated self-draft);
    # model directories with safetensors run their real weights
    random_weights = not any(Path(target_name).glob("*.safetensors")) if Path(target_name).is_dir() else True
    rows: list[Row] = []
    for i, case in enumerate(cases):
        say(f"[{i + 1}/{len(cases)}] {case.label}: planning")
        plan = make_case_plan(case, target_name, draft_name, target, draft, profile, acceptance)
        measured, reports = [], []
        for r in range(repeat):
            say(f"[{i + 1}/{len(cases)}] {case.label}: run {r + 1}/{repeat}")
            rep = run_plan(plan, target_name, draft_name if plan.schedule.speculative else None, device=device,
                           random_weights=random_weights, seed=0, draft_seed=0, dtype=dtype, timing=timing)
            measured.append(rep["measured"]["throughput_tok_s"])
            reports.append(rep)
            if run_done is not None:
                run_done()
        mid = sorted(range(repeat), key=lambda k: measured[k])[repeat // 2]
        rep = reports[mid]
        m = rep["measured"]
        sim = simulate_as_run(plan, target, draft, profile, m)
        stages = {}
        for st in CALIBRATED_STAGES:
            ms, ss = stage_total(m["stage_s"], st), stage_total(sim.stage_s, st)
            if ms > 0 or (timing and ss > 0):  # without timing, the per-layer stages were not measured
                stages[st] = (ms, ss)
        row = Row(case, plan, measured, plan.prediction["throughput_tok_s"], sim.throughput_tok_s,
                  m.get("acceptance_per_token"), m.get("tokens_per_round"), stages)
        if peers and not plan.schedule.speculative:
            say(f"[{i + 1}/{len(cases)}] {case.label}: transformers + accelerate")
            runs = []
            for _ in range(repeat):
                runs.append(run_peer_accelerate(target_name, plan, plan_weight_bytes_on_device(plan), seed=0, dtype=dtype))
                if run_done is not None:
                    run_done()
            row.peer = {**sorted(runs, key=lambda p: p["tok_s"])[repeat // 2], "runs_tok_s": [p["tok_s"] for p in runs]}
        rows.append(row)
    return rows


def same_workload(c: Case) -> tuple[int, int, int]:
    """Rows in flight, prompt and generation length: what makes two runs comparable."""
    return (c.target_batch * c.num_batches, c.prompt_len, c.gen_len)


def to_records(rows: list[Row]) -> list[dict]:
    out = []
    for r in rows:
        out.append({
            "workload": r.case.label, "policy": r.case.policy, "rows": r.case.target_batch * r.case.num_batches,
            "gamma": r.case.gamma, "prompt_len": r.case.prompt_len, "gen_len": r.case.gen_len,
            "measured_tok_s": r.measured, "measured_runs_tok_s": r.measured_tok_s, "spread_pct": 100 * r.spread,
            "predicted_tok_s": r.timing_tok_s, "error_pct": r.error_pct,
            "planned_tok_s": r.planned_tok_s, "planned_error_pct": r.planned_error_pct,
            "acceptance": r.acceptance, "tokens_per_round": r.tokens_per_round,
            "stage_s": {k: {"measured": a, "simulated": b, "error_pct": error_pct(a, b)}
                        for k, (a, b) in r.stage_errors.items()},
            "placement": r.plan.placement.__dict__, "peer": r.peer,
        })
    return out


def write_outputs(rows: list[Row], out_dir: str, meta: dict) -> dict[str, str]:
    d = Path(out_dir)
    records = to_records(rows)
    paths = {"json": str(write_json(d / "validation.json", {"meta": meta, "rows": records}))}
    buf = io.StringIO()
    cols = ["workload", "policy", "rows", "gamma", "measured_tok_s", "predicted_tok_s", "error_pct", "spread_pct",
            "planned_tok_s", "planned_error_pct", "acceptance"]
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for rec in records:
        w.writerow(rec)
    paths["csv"] = str(write_atomic(d / "validation.csv", buf.getvalue()))
    paths["png"] = str(plot(rows, d / "validation.png", meta.get("title", "")))
    return paths


def plot(rows: list[Row], path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for policy, marker in (("sequential", "s"), ("flexgen", "o"), ("spec-serial", "^"), ("specoffload", "D")):
        pts = [(r.measured, r.timing_tok_s) for r in rows if r.case.policy == policy]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, label=policy)
    vals = [v for r in rows for v in (r.measured, r.timing_tok_s) if v > 0]
    lo, hi = min(vals) / 1.5, max(vals) * 1.5
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured tok/s (specrun)")
    ax.set_ylabel("predicted tok/s (simulator)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return write_atomic(path, buf.getvalue())


def validate_cmd(
    quick: Annotated[bool, typer.Option("--quick", help="8 workloads (2 with compressed layers), 2 runs each: about 5 minutes on a 2-core CPU.")] = False,
    profile: Annotated[Optional[str], typer.Option("--profile", help="Profile to predict with; default: profile this machine now (--quick).")] = None,
    target: Annotated[str, typer.Option(help="Target model: a preset (random weights) or a HF directory (its weights).")] = "smollm2-135m",
    draft: Annotated[str, typer.Option(help="Draft: with random weights and the target's seed, a truncated self-draft.")] = "smollm2-135m-4l",
    gpu_mem: Annotated[str, typer.Option("--gpu-mem", help="Memory the plans may use on the compute device (forces streaming).")] = "300MB",
    repeat: Annotated[Optional[int], typer.Option(min=1, help="Runs per workload (default 2 quick, 3 full).")] = None,
    peers: Annotated[bool, typer.Option("--peers", help="Also run transformers + accelerate offload on the non-speculative workloads.")] = False,
    out_dir: Annotated[str, typer.Option("--out-dir", help="Where to write validation.json, .csv and .png.")] = "validation",
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="torch intra-op threads for profiling and runs.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Run (and profile) the models in this dtype instead of their own, e.g. float32 on a CPU without native bfloat16 matmul.")] = None,
    timing: Annotated[bool, typer.Option("--timing", help="Time the per-layer stages too (specrun --timing), for the stage column; their timers slow the runs a little.")] = False,
) -> None:
    """Profile, plan a set of workloads, run each with specrun, and compare measured with predicted."""
    from rich.table import Table

    from specplan.cli import err, out, print_json
    from specplan.hardware import load_profile, memory_size, profile_path

    from .cli import set_threads

    set_threads(threads)
    from specplan.fileio import check_not_inputs, check_writable
    from specplan.host import busy_warning, machine_load
    from specplan.progress import steps

    t0 = time.perf_counter()
    cap = memory_size(gpu_mem, "argument", "--gpu-mem")
    written = [Path(out_dir) / name for name in ("validation.json", "validation.csv", "validation.png", "profile.json")]
    for path in written:
        check_writable(path, "--out-dir")
    check_not_inputs([("--out-dir", p) for p in written], [("--profile", profile and profile_path(profile)),
                                                           ("--target", ModelSpec.files_of(target)),
                                                           ("--draft", ModelSpec.files_of(draft))])
    load = machine_load()
    if busy := busy_warning(load, "the measured throughputs"):
        err.print(f"[yellow]warning:[/] {busy}", highlight=False, soft_wrap=True)
    cases = QUICK_CASES if quick else FULL_CASES
    runs = repeat or (2 if quick else 3)
    # units of work: each run, each peer run, and the profile when one is taken
    total = len(cases) * runs + (0 if profile else runs) + (runs * sum(c.policy in ("flexgen", "sequential") for c in cases) if peers else 0)
    with steps(err, "validating", total=total, quiet=as_json) as bar:
        if profile:
            prof = load_profile(profile, gpu_memory_bytes=cap)
        else:
            from specplan.hwprofiles.profiler import profile_machine

            bar.say("profiling this machine (--quick)")
            prof = profile_machine([_spec(target, dtype), _spec(draft, dtype)], quick=True, device=device,
                                   gpu_memory_bytes=cap, on_progress=lambda msg, rate=None: bar.say(f"profiling: {msg}"))
            bar.advance(runs)
            prof.save(f"{out_dir}/profile.json")
        rows = validate(target, draft, prof, cases, runs, peers=peers, device=device, progress=bar.say,
                        run_done=bar.advance, dtype=dtype, timing=timing)
    abs_err = [abs(r.error_pct) for r in rows]
    meta = {"target": target, "draft": draft, "profile": prof.name, "device": device, "gpu_mem": gpu_mem,
            "threads": threads, "dtype": dtype, "timing": timing, "repeat": repeat or (2 if quick else 3), "cpu": prof.provenance.cpu_model,
            "median_abs_error_pct": statistics.median(abs_err), "max_abs_error_pct": max(abs_err),
            "wall_s": time.perf_counter() - t0, "machine_load_at_start": load, "machine_load_at_end": machine_load(0.1),
            "title": f"{target} + {draft} on {prof.provenance.device_name}"}
    paths = write_outputs(rows, out_dir, meta)
    err.print(f"wrote {', '.join(paths.values())} in {meta['wall_s']:.0f} s")
    if as_json:
        return print_json({"meta": meta, "rows": to_records(rows), "files": paths})
    t = Table(title=f"Validation: {meta['title']}")
    for col in ("workload", "measured tok/s", "spread", "predicted tok/s", "error %", "planned tok/s", "acceptance",
                "vs specoffload", "largest stage error"):
        t.add_column(col)
    ref = {same_workload(r.case): r.measured for r in rows if r.case.policy == "specoffload"}
    for r in rows:
        worst = max(r.stage_errors.items(), key=lambda kv: abs(kv[1][1] - kv[1][0]), default=None)
        worst_s = f"{worst[0]} {worst[1][0]:.2f}s vs {worst[1][1]:.2f}s" if worst else ""
        t.add_row(r.case.label, f"{r.measured:.2f}", f"{100 * r.spread:.0f}%", f"{r.timing_tok_s:.2f}",
                  f"{r.error_pct:+.1f}", f"{r.planned_tok_s:.2f}", "" if r.acceptance is None else f"{r.acceptance:.2f}",
                  f"{r.measured / ref[same_workload(r.case)]:.2f}x" if same_workload(r.case) in ref else "", worst_s)
    out.print(t)
    out.print(f"median |error| {meta['median_abs_error_pct']:.1f}%, max {meta['max_abs_error_pct']:.1f}%")
    peer_rows = [r for r in rows if r.peer]
    if peer_rows:
        p = Table(title="Peers on the same model, workload and memory cap")
        for col in ("workload", "specrun tok/s", "transformers+accelerate tok/s", "ratio"):
            p.add_column(col)
        for r in peer_rows:
            p.add_row(r.case.label, f"{r.measured:.2f}", f"{r.peer['tok_s']:.2f}", f"{r.measured / r.peer['tok_s']:.2f}x")
        out.print(p)

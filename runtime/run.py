"""run_plan: a plan, a target and a draft, and prompts in; a report of what was measured,
next to what the plan predicted, out.

Everything that can refuse a plan runs before any weight is read: the models must have the
shapes the plan was made for, the plan must fit the memory of the hardware profile it
names (the same plan_memory the planner constrains), and on a GPU the memory free now.
"""

from __future__ import annotations

import random
import resource
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from specplan import __version__
from specplan.cost import acceptance_for_tokens_per_round, error_pct, row_acceptance_stats
from specplan.errors import InfeasibleError, InputError, SpecplanError
from specplan.fileio import write_atomic
from specplan.memory import MemoryNeed, plan_memory
from specplan.models import (SHAPE_FIELDS, ModelSpec, apply_weights, is_self_draft, model_shape, pair_weights,
                             resolve_draft)
from specplan.plan import Plan
from specplan.simulator.run import simulate_as_run
from specplan.units import fmt_bytes
from specplan.workload import Workload, check_row_positions

from .checkpoint import open_checkpoint, torch_dtype
from .engine import Engine
from .model import check_supported
from .sampling import SamplingParams
from .stats import PER_LAYER, PER_PASS, Stats


# ---- models and prompts ------------------------------------------------------------------------


AT_MEASURED_ACCEPTANCE = "throughput_tok_s at measured acceptance"


def resolve_model(name_or_path: str | ModelSpec) -> tuple[ModelSpec, Path | None]:
    """A preset name, a HF model directory or its config.json -> (spec, directory holding weights or None)."""
    if isinstance(name_or_path, ModelSpec):
        return name_or_path, None
    spec = ModelSpec.resolve(str(name_or_path))
    p = Path(name_or_path)
    if spec.weights_file:  # a GGUF file holds its weights
        return spec, p
    folder = p if p.is_dir() else p.parent if p.is_file() else None
    has_weights = folder is not None and any(folder.glob("*.safetensors"))
    return spec, folder if has_weights else None


def model_folder(name: str) -> Path | None:
    """Where a model's tokenizer and generation config are read from: the directory given, the
    one holding the weights of a config.json given, a GGUF file itself (None for a preset)."""
    _, weights_dir = resolve_model(name)
    return Path(name) if Path(name).is_dir() else weights_dir


def random_prompts(workload: Workload, vocab: int, n: int, seed: int | None = None) -> list[list[int]]:
    """n prompts of the workload's lengths (cycled), random token ids, seeded."""
    rng = random.Random(workload.seed if seed is None else seed)
    return [[rng.randrange(vocab) for _ in range(workload.prompt_len_of(i))] for i in range(n)]


def eos_ids(spec: ModelSpec, folder: Path | None) -> list[int] | None:
    """The ids that end a row: config.json's eos_token_id and generation_config.json's (a chat
    model often ends its turn with a token only the latter names)."""
    found: list[int] = []
    sources = [spec.hf_config]
    if folder is not None and (folder / "generation_config.json").exists():
        from specplan.fileio import read_json

        sources.append(read_json(folder / "generation_config.json"))
    for d in sources:
        v = d.get("eos_token_id") if isinstance(d, dict) else None
        for i in ([v] if isinstance(v, int) else v if isinstance(v, list) else []):
            if isinstance(i, int) and i not in found:
                found.append(i)
    return found or None


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InputError("argument", "--device", f"got {device!r}", "auto | cpu | cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("argument", "--device", "cuda was asked for but torch sees no CUDA device", "auto or cpu")
    return torch.device(device)


# ---- refusing a plan before loading anything ----------------------------------------------------


def check_device_formats(models: list[ModelSpec], device: torch.device) -> None:
    """Refuse a format this device cannot run, before any weight is read: fp8 where torch has
    no float8 or cannot convert it on the device, a fused kernel torch lacks there."""
    from .checkpoint import TORCH_DTYPES
    from .quant import fp8_dtype, fused_ok

    for m in models:
        for group in ("attention", "experts", "lm_head", "embed"):
            why = fused_ok(m.fmt(group), device, TORCH_DTYPES[m.dtype])
            if why is not None:
                raise InputError("plan", f"weights.{group}", f"{m.fmt(group).label}: {why}",
                                 f"a plan with {group}={m.fmt(group).name} (specplan optimize on this device's profile)")
            if m.fmt(group).name not in ("fp8", "fp8s", "fp8b128"):
                continue
            dt = fp8_dtype()
            try:
                if dt is None:
                    raise TypeError("no float8_e4m3fn in this torch")
                torch.zeros(2, dtype=dt, device=device).float()
            except (RuntimeError, TypeError) as e:
                raise InputError("plan", f"weights.{group}", f"fp8 cannot run on {device} here ({e})",
                                 "int8 or int4 (specplan optimize --weights int8)") from None


def _check_model(plan: Plan, role: str, given: ModelSpec) -> None:
    planned = plan.inputs.get(f"{role}_shape")
    name = getattr(plan, role)
    if not isinstance(planned, dict):
        try:
            planned = model_shape(ModelSpec.resolve(name))
        except SpecplanError:
            return  # the plan's model cannot be found here; nothing to compare against
    diff = [f"{k} {planned[k]} vs {getattr(given, k)}" for k in SHAPE_FIELDS if k in planned and planned[k] != getattr(given, k)]
    if diff:
        raise InputError("plan", role, f"was made for '{name}', which does not match the given {role} '{given.name}' "
                         f"({', '.join(diff)})", f"--{role} with the model the plan was made for")


def check_plan(plan: Plan, target: ModelSpec, draft: ModelSpec | None, device: torch.device,
               prompt_lens: list[int] | None = None) -> MemoryNeed:
    """Raise a SpecplanError saying why, if this plan cannot run with these models here."""
    s = plan.schedule
    plan.placement.validate("plan", layers=target.layers)
    _check_model(plan, "target", target)
    check_supported(target, target.name)
    torch_dtype(target, target.name)
    check_device_formats([m for m in (target, draft) if m is not None], device)
    if s.speculative:
        if draft is None:
            raise InputError("plan", "draft", f"policy {s.policy} drafts tokens but no draft model was given", "--draft")
        _check_model(plan, "draft", draft)
        check_supported(draft, draft.name)
        if draft.vocab != target.vocab:
            raise InputError(draft.name, "vocab_size", f"{draft.vocab} differs from the target's {target.vocab}",
                             "a draft that shares the target's tokenizer")
    workload = Workload.from_dict(plan.workload, "plan workload")
    longer = ""
    if prompt_lens:
        longest = max(prompt_lens)
        check_row_positions("prompts", f"prompt {prompt_lens.index(longest)}", longest, workload.gen_len,
                            s.gamma if s.speculative else 0, target, draft if s.speculative else None)
        if max(prompt_lens) > workload.max_prompt_len:
            # size every row's KV for what will run, and say so if that no longer fits
            longer = (f" with prompts of up to {max(prompt_lens)} tokens (the plan was made for "
                      f"{workload.max_prompt_len}; each row's KV is reserved at prompt + gen_len)")
            workload = replace(workload, prompt_lens=tuple(prompt_lens))
    need = plan_memory(target, draft if s.speculative else None, s, plan.placement, workload)
    profile = plan.hardware_profile()
    problems = need.violations(profile)
    if problems:
        raise InfeasibleError(f"plan does not fit {profile.name}{longer}: " + "; ".join(problems))
    return need


def device_name(device: torch.device) -> str:
    """The name a profile measured on this device carries (HardwareProfile.gpu.name)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from specplan.host import cpu_device_name

    return cpu_device_name()


def machine_problems(plan: Plan, need: MemoryNeed, device: torch.device) -> list[str]:
    """Why this plan should not run on this machine: made for another device (its
    predictions would be another machine's), or more host, pinned or device memory than
    this machine has now. Empty when it may run."""
    from specplan.host import meminfo_bytes

    problems = []
    profile = plan.hardware_profile()
    here = device_name(device)
    if profile.gpu.name and profile.gpu.name != here:
        problems.append(f"it was made for {profile.name} ({profile.gpu.name}) and this device is {here}, "
                        "so its predictions are not this machine's (profile it: specplan profile, then "
                        "specplan optimize --gpu hwprofiles/measured/NAME.json)")
    available = meminfo_bytes("MemAvailable")
    host_need = need.host_bytes + (need.gpu_bytes if device.type == "cpu" else 0.0)
    if available is not None and host_need > available:
        problems.append(f"it needs {fmt_bytes(host_need)} of host memory"
                        + (" (on the CPU the device's share is host memory too)" if device.type == "cpu" else "")
                        + f" and {fmt_bytes(available)} is available here")
    if device.type == "cuda":
        total = meminfo_bytes("MemTotal")
        if total is not None and need.pinned_bytes > total * profile.host.pinned_fraction:
            problems.append(f"it pins {fmt_bytes(need.pinned_bytes)} of host memory, more than "
                            f"{profile.host.pinned_fraction:.0%} of this machine's {fmt_bytes(total)}")
        free, _ = torch.cuda.mem_get_info(device)
        if need.gpu_bytes > free:
            problems.append(f"it needs {fmt_bytes(need.gpu_bytes)} of GPU memory and {here} has {fmt_bytes(free)} free now")
    return problems


def check_machine(plan: Plan, need: MemoryNeed, device: torch.device, force: bool,
                  warn: Callable[[str], None] | None = None) -> list[str]:
    """Refuse (InfeasibleError) a plan this machine cannot run as planned, or with `force`
    pass each reason to `warn` and go on. Returns the reasons."""
    problems = machine_problems(plan, need, device)
    if problems and not force:
        raise InfeasibleError("the plan does not fit this machine: " + "; ".join(problems)
                              + " (--force runs it anyway)")
    for p in problems:
        (warn or (lambda m: None))(p)
    return problems


# ---- running -----------------------------------------------------------------------------------------


def run_sampling(workload: Workload, sampling: dict | None, seed: int = 0) -> SamplingParams:
    """A run's sampling: the plan's workload (greedy, or its temperature), its seed offset by
    the run's `seed`, and what `sampling` ({temperature, top_p, top_k, seed}) sets."""
    base = {"temperature": workload.temperature if workload.sampling != "greedy" else 0.0, "top_p": 1.0,
            "top_k": 0, "seed": workload.seed + seed}
    return SamplingParams(**(base | (sampling or {})))


def run_plan(plan: Plan | str | Path, target: str | ModelSpec, draft: str | ModelSpec | None = None, *,
             device: str = "auto", prompts: list[list[int]] | None = None, random_weights: bool = False,
             max_rows: int | None = None, dtype: str | None = None, ignore_eos: bool | None = None,
             seed: int = 0, draft_seed: int | None = None, warmup: bool | None = None,
             torch_profile: str | Path | None = None, force: bool = False,
             warn: Callable[[str], None] | None = None,
             progress: Callable[[int, int], None] | None = None, sampling: dict | None = None,
             limits: list[int] | None = None, stop: Callable[[int, list[int]], bool] | None = None,
             on_finish: Callable[[int, list[int], str], None] | None = None,
             on_engine: Callable[[Any], None] | None = None, load: dict | None = None,
             row_sampling: list[dict] | None = None, timing: bool = False) -> dict[str, Any]:
    """Execute `plan` and return the report (see build_report). `progress(done, total)` gets
    generated-token counts. `warmup` (default: on CUDA) runs the first wave's prefill and one
    decode round untimed first; `torch_profile` writes torch.profiler's operator table there.
    A plan made for another device, or that this machine's memory cannot hold, is refused
    before any weight is read, unless `force` (then each reason goes to `warn`).
    `sampling` ({temperature, top_p, top_k, seed}; temperature 0 is greedy) overrides the
    plan's; `row_sampling` gives per prompt the fields its row sets itself and "index" (its
    place in the input, which with the seed keys a row's stream when it sets no seed); `limits`, `stop` and `on_finish` go to Engine.generate (the dataset job);
    `on_engine(engine)` hears the engine once it is built; `load` (specplan.host.machine_load,
    sampled by the caller before the run) is recorded in the report. `timing` turns on the
    per-layer stage timers (runtime.stats.Stats.per_layer): off, the report holds the per-pass
    stages only and says so."""
    plan = plan if isinstance(plan, Plan) else Plan.load(str(plan))
    if prompts is None:
        workload = Workload.from_dict(plan.workload, "plan workload")
        n = min(max_rows or workload.num_prompts, workload.num_prompts)
        prompts = random_prompts(workload, resolve_model(target)[0].vocab, n, workload.seed + seed)
    prompts = prompts[:max_rows] if max_rows else prompts
    if not prompts or min(len(p) for p in prompts) < 1:
        raise InputError("prompts", "prompts", "are empty", "at least one prompt of at least one token")
    runner = PlanRunner(plan, target, draft, [len(p) for p in prompts], device=device, random_weights=random_weights,
                        dtype=dtype, ignore_eos=ignore_eos, seed=seed, draft_seed=draft_seed, force=force, warn=warn,
                        sampling=sampling, load=load, timing=timing)
    try:
        if on_engine is not None:
            on_engine(runner.engine)
        return runner.run(prompts, progress=progress, limits=limits, stop=stop, on_finish=on_finish,
                          row_sampling=row_sampling, warmup=warmup, torch_profile=torch_profile)
    finally:
        runner.close()


class PlanRunner:
    """One plan's engine, built once and run over one or more lists of prompts (a dataset
    job's worker runs one shard after another on it: the weights are read once).

    Everything that can refuse the plan runs first, before any weight is read: the models
    must have the plan's shapes, the plan must fit its profile's memory at `prompt_lens` (every
    row's KV is reserved at the longest of them, the longest any run may carry), and this
    machine (check_machine, or `force`). `rows`: the most prompts one run carries (default:
    len(prompt_lens)), which with the plan's rows in flight sizes the engine."""

    def __init__(self, plan: Plan, target: str | ModelSpec, draft: str | ModelSpec | None, prompt_lens: list[int], *,
                 device: str = "auto", random_weights: bool = False, dtype: str | None = None,
                 ignore_eos: bool | None = None, seed: int = 0, draft_seed: int | None = None, force: bool = False,
                 warn: Callable[[str], None] | None = None, sampling: dict | None = None, load: dict | None = None,
                 timing: bool = False, rows: int | None = None):
        self.plan = plan
        tspec, tdir = resolve_model(target)
        planned = plan.inputs.get("dtype")
        if dtype and planned and dtype != planned and not force:
            raise InputError("argument", "--dtype", f"{dtype}, and the plan was made for {planned}",
                             f"--dtype {planned}, or a plan made with optimize --dtype {dtype}")
        dtype = dtype or (planned if planned != tspec.dtype else None)
        if dtype:
            tspec = tspec.with_dtype(dtype)
        self_draft = plan.schedule.speculative and is_self_draft(draft)
        if self_draft:  # the target's own weights, compressed: read from the target's directory
            dspec, ddir = resolve_draft(draft, tspec), tdir
            planned = plan.weights.get("draft")
            if planned and planned != dspec.fmt("attention").label:
                raise InputError("plan", "draft", f"was made for a self-draft in {planned}, not {draft}",
                                 f"--draft self:{planned}, as the plan says")
        else:
            dspec, ddir = resolve_model(draft) if draft is not None and plan.schedule.speculative else (None, None)
            dspec = dspec.with_dtype(dtype) if dspec and dtype else dspec
        # the plan's weight formats: refused here, before any weight is read, where a matrix of
        # these models cannot hold its format
        tspec, dspec = apply_weights(tspec, dspec, plan.weight_formats(), "plan")
        self.tspec, self.dspec = tspec, dspec
        self.dev = dev = pick_device(device)
        workload = Workload.from_dict(plan.workload, "plan workload")
        self.gen_len = workload.gen_len
        self.need = check_plan(plan, tspec, dspec, dev, prompt_lens)
        self.forced = check_machine(plan, self.need, dev, force, warn)
        self.load = load

        # Only now is any weight read.
        tck = open_checkpoint(tspec, tdir, random_weights, seed)
        # random weights are drawn per tensor name, so a draft with the target's seed is a truncated
        # copy of the target (a self-draft); another seed gives an unrelated draft
        dseed = seed if self_draft else seed + 1 if draft_seed is None else draft_seed
        dck = open_checkpoint(dspec, ddir, random_weights, dseed) if dspec is not None else None
        if ignore_eos is None:
            ignore_eos = random_weights  # a random model's EOS means nothing; run the planned lengths
        eos = None if ignore_eos else eos_ids(tspec, tdir)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        self.stats = Stats(dev, per_layer=timing)
        self.base = run_sampling(workload, sampling, seed)
        slots = min(rows or len(prompt_lens), plan.schedule.rows)
        self.engine = Engine(plan.schedule, plan.placement, tck, dck, dev, rows=slots, max_prompt_len=max(prompt_lens),
                             gen_len=self.gen_len, sampling=self.base, eos=eos, stats=self.stats)

    def run(self, prompts: list[list[int]], *, progress: Callable[[int, int], None] | None = None,
            limits: list[int] | None = None, stop: Callable[[int, list[int]], bool] | None = None,
            on_finish: Callable[[int, list[int], str], None] | None = None, row_sampling: list[dict] | None = None,
            warmup: bool | None = None, torch_profile: str | Path | None = None,
            simulate_again: bool = True) -> dict[str, Any]:
        """Generate for `prompts` (each at most the longest prompt length the runner was built
        for) and return this run's report (see run_plan for the arguments; without
        `simulate_again` the report does not simulate the plan again at the measured acceptance,
        which a caller keeping only the measured counts does not need)."""
        engine, stats, dev, plan = self.engine, self.stats, self.dev, self.plan
        assert max(len(p) for p in prompts) <= engine.max_prompt_len
        rows = None if row_sampling is None else [self.base.row(**r) for r in row_sampling]
        total = len(prompts) * self.gen_len
        done = [0]

        def tick(n: int) -> None:
            done[0] += n
            if progress is not None:
                progress(done[0], total)

        stats.reset()  # the report is this run's, not the runner's earlier ones
        if dev.type == "cuda" if warmup is None else warmup:
            engine.warmup(prompts)
            stats.reset()
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
        stats.label_regions = torch_profile is not None
        need, tspec, dspec = self.need, self.tspec, self.dspec
        t0 = time.perf_counter()
        try:
            with _maybe_profiled(torch_profile, dev):
                outputs = engine.generate(prompts, tick, limits=limits, stop=stop, on_finish=on_finish,
                                          keep_outputs=on_finish is None, sampling=rows)
                wall_s = time.perf_counter() - t0
        except KeyboardInterrupt:
            # the report of what ran: the rows that finished, over the time until the interrupt
            wall_s = time.perf_counter() - t0
            done = [i for i, n in enumerate(engine.row_tokens) if n is not None]
            kept = [engine.finished_outputs[i] for i in done] if on_finish is None else None
            rep = build_report(plan, engine, stats, kept, wall_s, dev, need, tspec, dspec, simulate_again=False,
                               lengths=[engine.row_tokens[i] for i in done])
            rep["interrupted"] = {"after_s": wall_s, "rows_finished": len(done), "rows": len(prompts)}
            rep["machine"] = {"load_at_start": self.load, "forced_past": self.forced}
            raise Interrupted(rep) from None
        rep = build_report(plan, engine, stats, outputs if on_finish is None else None, wall_s, dev, need, tspec,
                           dspec, simulate_again=simulate_again, lengths=engine.row_tokens)
        rep["machine"] = {"load_at_start": self.load, "forced_past": self.forced}
        return rep

    def close(self) -> None:
        self.engine.close()


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run, carrying the report of what ran (finished rows only; the
    throughput counts their tokens over the time until the interrupt)."""

    def __init__(self, report: dict):
        super().__init__()
        self.report = report


@contextmanager
def _maybe_profiled(path: str | Path | None, device: torch.device):
    """torch.profiler around the run when `path` is given; its operator tables, by device time
    and by host time, are written there (atomically)."""
    if path is None:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ops = prof.key_averages()
    by_device = ops.table(sort_by="self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total", row_limit=40)
    by_host = ops.table(sort_by="cpu_time_total", row_limit=40)
    write_atomic(Path(path), f"# by device time\n{by_device}\n\n# by host time (inclusive)\n{by_host}\n")


# ---- the report ---------------------------------------------------------------------------------------


def build_report(plan: Plan, engine: Engine, stats: Stats, outputs: list[list[int]] | None, wall_s: float,
                 device: torch.device, need: MemoryNeed, target: ModelSpec, draft: ModelSpec | None,
                 simulate_again: bool = True, lengths: list[int] | None = None) -> dict[str, Any]:
    """The report of a run: `lengths` are the tokens each reported row generated; `outputs`
    their token ids, or None when they went elsewhere (a dataset job's output file)."""
    stage_s = stats.stage_s()
    c = stats.counts
    lengths = [len(o) for o in outputs] if lengths is None else lengths
    generated = sum(lengths)
    h2d_bytes = c.get("h2d_bytes", 0.0) + c.get("prefill.h2d_bytes", 0.0)
    h2d_s = stage_s.get("h2d", 0.0) + stage_s.get("prefill.h2d", 0.0)
    rounds = c.get("rounds", 0.0)
    tokens_per_round = 1.0 + c.get("accepted", 0.0) / rounds if rounds else None
    if device.type == "cuda":
        peak_gpu = torch.cuda.max_memory_allocated(device)
    else:
        peak_gpu = engine.device_bytes()  # what would sit on the GPU: weights, stream slots, device KV caches
    measured = {
        "throughput_tok_s": generated / wall_s if wall_s > 0 else None,
        "decode_tok_s": (generated - len(lengths)) / max(wall_s - stage_s.get("prefill", 0.0), 1e-12),
        "wall_s": wall_s,
        "generated_tokens": generated,
        "rows": len(lengths),
        "stage_s": stage_s,
        "stage_timing": PER_LAYER if stats.per_layer else PER_PASS,  # per-pass: run with --timing for the rest
        "h2d_bytes": h2d_bytes,
        "h2d_bytes_per_s": h2d_bytes / h2d_s if h2d_s > 0 else None,
        # the draft's KV swaps (draft KV on the host), decode and prefill together
        "draft_kv_h2d_bytes": c.get("draft_kv_h2d_bytes", 0.0) + c.get("prefill.draft_kv_h2d_bytes", 0.0),
        "draft_kv_d2h_bytes": c.get("draft_kv_d2h_bytes", 0.0) + c.get("prefill.draft_kv_d2h_bytes", 0.0),
        "tokens_per_round": tokens_per_round,
        "acceptance_rate": c["accepted"] / c["drafted"] if c.get("drafted") else None,  # accepted / drafted
        # the per-token alpha the simulator takes, from tokens per round (E(alpha, gamma) inverted)
        "acceptance_per_token": (acceptance_for_tokens_per_round(tokens_per_round, plan.schedule.gamma)
                                 if rounds and c.get("drafted") else None),
        # how alpha differed between rows (their own mean, and spread): the slowest row sets a
        # static batch's passes
        **dict(zip(("acceptance_row_mean", "acceptance_spread"),
                   row_acceptance_stats(engine.row_rounds, engine.row_accepted, plan.schedule.gamma)
                   if rounds and c.get("drafted") else (None, None))),
        "rounds": rounds,
        "passes": c.get("passes", 0.0),  # decode passes of the target over its weights (verify or decode steps)
        # routed experts: the experts a target pass copied in, over every pass (prompts' too)
        "experts_streamed_per_pass": ((c.get("experts_streamed", 0.0) + c.get("prefill.experts_streamed", 0.0))
                                      / engine.pass_counts["passes"]
                                      if engine.pass_counts.get("passes") and plan.placement.experts == "routed" else None),
        # the scheduler's passes as run: all of them, prompts alone, prompts beside decode rows, admissions
        "pass_composition": dict(engine.pass_counts),
        "peak_gpu_bytes": peak_gpu,
        "gpu_bytes_by_part": engine.device_parts(),  # what the engine allocated up front, by plan_memory's names
        "host_bytes": engine.host_bytes(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    pred = plan.prediction or {}
    comparison = []
    for key in ("throughput_tok_s", "tokens_per_round", "peak_gpu_bytes", "experts_streamed_per_pass"):
        if key in pred:
            comparison.append({"metric": key, "measured": measured[key], "predicted": pred[key],
                               "error_pct": error_pct(measured[key], pred[key])})
    # A speculative plan assumed an acceptance; simulated again at the measured one, what is
    # left of the error is the timing model's. Stage times are compared with that simulation.
    at_measured, sim = None, None
    alpha = measured["acceptance_per_token"]
    if pred and alpha is not None and simulate_again:  # alpha: only a speculative run drafts
        try:
            sim = simulate_as_run(plan, target, draft, plan.hardware_profile(), measured)
        except SpecplanError as e:  # a finished run's report is kept whatever the simulator says
            measured["resimulation_error"] = str(e)
    if sim is not None:
        at_measured = {"acceptance": alpha, "throughput_tok_s": sim.throughput_tok_s,
                       "tokens_per_round": sim.tokens_per_round, "stage_s": sim.stage_s,
                       "pass_composition": sim.pass_counts}
        comparison.append({"metric": AT_MEASURED_ACCEPTANCE, "measured": measured["throughput_tok_s"],
                           "predicted": sim.throughput_tok_s,
                           "error_pct": error_pct(measured["throughput_tok_s"], sim.throughput_tok_s)})
    stage_pred = at_measured["stage_s"] if at_measured else (pred.get("stage_s") or {})
    for stage, seconds in stage_pred.items():
        if not stats.per_layer and stage not in stage_s:
            continue  # a per-layer stage this run did not time
        comparison.append({"metric": f"stage_s.{stage}", "measured": stage_s.get(stage), "predicted": seconds,
                           "error_pct": error_pct(stage_s.get(stage), seconds)})
    return {
        "tool": {"specplan": __version__, "torch": torch.__version__},
        "device": {"type": device.type, "name": device_name(device)},  # as a profile of this device names it
        "plan": {"target": plan.target, "draft": plan.draft, "hardware": plan.hardware,
                 "schedule": plan.to_dict()["schedule"], "placement": plan.to_dict()["placement"]},
        "weights": pair_weights(target, draft).to_dict(),
        "models": {"target": model_shape(target) | {"name": target.name, "dtype": target.dtype},
                   "draft": model_shape(draft) | {"name": draft.name, "dtype": draft.dtype} if draft else None},
        "planned_memory": {"gpu_bytes": need.gpu_bytes, "host_bytes": need.host_bytes, "pinned_bytes": need.pinned_bytes,
                           "gpu": dict(need.gpu)},
        "measured": measured,
        "predicted": pred,
        "predicted_at_measured_acceptance": at_measured,
        "comparison": comparison,
        # what ran against what the simulator ran for the same plan (at the measured acceptance
        # where there is one, else the plan's own prediction)
        "pass_composition": {"measured": dict(engine.pass_counts),
                             "simulated": (sim.pass_counts if sim is not None else pred.get("pass_counts")),
                             "simulated_prompts": (sim.simulated_prompts if sim is not None
                                                   else pred.get("simulated_prompts"))},
        **({"outputs": outputs} if outputs is not None else {}),
    }

"""The `specrun` command: execute a plan with torch and report measured against predicted.

    specrun --plan plan.json --target DIR_OR_PRESET --draft DIR_OR_PRESET [--prompts FILE]
            [--random-weights] [--device auto|cpu|cuda] [--report report.json] [--json] [--max-rows N]

Progress goes to stderr, the result table (or --json) to stdout, the full report (token ids
included) to --report, written atomically. A plan that cannot run here is refused with one
line saying why, before any weight is read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from specplan.errors import InputError
from specplan.fileio import check_not_inputs, check_writable, write_json
from specplan.units import fmt_bytes, fmt_seconds

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Execute a specplan plan with torch and compare what it measures with what the plan predicted.")
out = Console()
err = Console(stderr=True)

# Options shared with `specplan batch` (runtime.batch): one definition each.
TargetOpt = Annotated[str, typer.Option("--target", help="Target model: HF directory (config.json + *.safetensors) or preset.")]
DraftOpt = Annotated[Optional[str], typer.Option("--draft", help="Draft model (speculative policies): directory or preset.")]
RandomWeightsOpt = Annotated[bool, typer.Option("--random-weights", help="Seeded random weights instead of a checkpoint.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="Override the weights' dtype: float32 | bfloat16 | float16.")]
IgnoreEosOpt = Annotated[Optional[bool], typer.Option("--ignore-eos/--stop-at-eos", help="Default: ignore EOS with random weights.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for random weights and prompts.")]
DraftSeedOpt = Annotated[Optional[int], typer.Option("--draft-seed", help="Seed of a random draft; the target's seed makes a truncated self-draft.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the job whose --output exists: skip the ids it holds (refused if the plan, models, input or sampling differ, or if it holds an id twice or one the input lacks).")]
RepairOpt = Annotated[bool, typer.Option("--repair", help="With --resume: drop the output's lines of ids it holds twice or the input lacks, and say so, instead of refusing.")]
ColumnOpt = Annotated[Optional[str], typer.Option("--column", help="The text column of a .jsonl, parquet or datasets input (default: prompt, else messages).")]
TemperatureOpt = Annotated[Optional[float], typer.Option("--temperature", min=0.0, help="Sampling temperature; 0 is greedy (default: the plan's workload).")]
TopPOpt = Annotated[float, typer.Option("--top-p", max=1.0, help="Nucleus sampling: keep the most likely tokens up to this probability mass.")]
TopKOpt = Annotated[int, typer.Option("--top-k", min=0, help="Keep the k most likely tokens (0: all).")]
SampleSeedOpt = Annotated[Optional[int], typer.Option("--sample-seed", min=0, max=2 ** 63 - 1, help="Seed of the sampling streams: with a row's place in the input it keys that row's stream (default: the plan's workload seed). A dataset row's own temperature / top_p / top_k / seed override these flags.")]
StopOpt = Annotated[list[str], typer.Option("--stop", help="Stop string (repeatable); a row's own 'stop' replaces these.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Run a plan made for another device, or one this machine's memory looks too small for, with a warning instead of a refusal.")]


def warn(msg: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(msg)}", highlight=False, soft_wrap=True)


def set_threads(threads: int | None) -> None:
    """torch's intra-op threads, with a warning where they outnumber the cores."""
    if threads:
        from specplan.host import threads_warning

        if why := threads_warning(threads):
            warn(why)
        import torch

        torch.set_num_threads(threads)


def check_repair(resume: bool, repair: bool) -> None:
    if repair and not resume:
        raise InputError("argument", "--repair", "mends an output being resumed, and --resume is not given",
                         "--resume --repair")


def sampling_flags(temperature: float | None, top_p: float, top_k: int, sample_seed: int | None) -> dict:
    """The sampling the command line sets ({temperature, top_p, top_k, seed}), checked."""
    from .sampling import MIN_TEMPERATURE

    if temperature is not None and 0 < temperature < MIN_TEMPERATURE:
        raise InputError("argument", "--temperature", f"got {temperature}", f"0 (greedy) or at least {MIN_TEMPERATURE}")
    if not 0.0 < top_p <= 1.0:
        raise InputError("argument", "--top-p", f"got {top_p}", "a probability mass in (0, 1]")
    return {k: v for k, v in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("seed", sample_seed))
            if v is not None}


def job_rows(prompts: Path, target: str, column: str | None, stop: list[str]):
    """The dataset job's rows, read and checked (runtime.jobio.read_dataset), the command
    line's stop strings given to rows without their own; and the target's folder."""
    from dataclasses import replace

    from .jobio import has_tokenizer, read_dataset
    from .run import model_folder, resolve_model

    folder = model_folder(target)
    data = read_dataset(prompts, folder, resolve_model(target)[0].vocab, column)
    if stop and data.tokenizer is None and not has_tokenizer(folder):
        raise InputError("argument", "--stop", f"needs a tokenizer to find stop strings, and {target} has none",
                         "--target a model directory with a tokenizer")
    if stop:
        data.rows[:] = [r if r.stop else replace(r, stop=tuple(stop)) for r in data.rows]
    return data, folder


def job_settings(sampling: dict, stop: list[str], column: str | None, seed: int, draft_seed: int | None,
                 random_weights: bool, dtype: str | None, ignore_eos: bool | None) -> dict:
    """Every setting that changes what a row generates: part of the job's identity (resume
    refuses a change)."""
    return {"sampling": sampling, "stop": list(stop), "column": column, "seed": seed, "draft_seed": draft_seed,
            "random_weights": random_weights, "dtype": dtype, "ignore_eos": ignore_eos}



def check_plan_weights(plan, weights: str | None, source: str) -> None:
    """--weights names the formats the plan must have; the plan decides them."""
    from specplan.formats import parse_weights

    from specplan.models import is_self_draft

    if weights is None:
        return
    given = parse_weights(weights)
    want = plan.weight_formats()
    # a separate draft's format counts only where the plan has one (a self-draft's is in its name)
    separate = bool(plan.draft) and not is_self_draft(plan.draft)
    mine = {k: v for k, v in given.fixed.to_dict().items() if k != "draft" or separate}
    theirs = {k: v for k, v in want.to_dict().items() if k != "draft" or separate}
    if given.auto or mine != theirs:
        raise InputError(source, "weights", f"the plan's formats are {want.describe()}, not {weights}",
                         f"a plan made with specplan optimize --weights {weights}, or no --weights")


def read_prompts(path: Path, model_dir: Path | None, vocab: int) -> list[list[int]]:
    """The token ids of every prompt in a prompts file (runtime.jobio.read_dataset)."""
    from .jobio import read_dataset

    return [list(r.ids) for r in read_dataset(path, model_dir, vocab).rows]


def _fmt(metric: str, v) -> str:
    if v is None:
        return "-"
    if metric.startswith("stage_s."):
        return fmt_seconds(v)
    if "bytes" in metric:
        return fmt_bytes(v)
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def print_table(report: dict) -> None:
    m = report["measured"]
    s = report["plan"]["schedule"]
    title = (f"specrun {s['policy']} on {report['device']['name']}: {m['rows']} rows, "
             f"{m['generated_tokens']} tokens in {fmt_seconds(m['wall_s'])}")
    t = Table(title=title)
    for col in ("metric", "measured", "predicted", "error %"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    predicted = {row["metric"]: row for row in report["comparison"]}
    from .run import AT_MEASURED_ACCEPTANCE
    from .stats import timed_per_layer

    rows = [("throughput_tok_s", m["throughput_tok_s"]), (AT_MEASURED_ACCEPTANCE, m["throughput_tok_s"]),
            ("decode_tok_s", m["decode_tok_s"]),
            ("tokens_per_round", m["tokens_per_round"]), ("acceptance_rate", m["acceptance_rate"]),
            ("acceptance_per_token", m.get("acceptance_per_token")),
            ("h2d_bytes_per_s", m["h2d_bytes_per_s"]), ("h2d_bytes", m["h2d_bytes"]),
            *([("experts_streamed_per_pass", m["experts_streamed_per_pass"])] if m.get("experts_streamed_per_pass") else []),
            ("peak_gpu_bytes", m["peak_gpu_bytes"])]
    stages = set(m["stage_s"]) | {k.split(".", 1)[1] for k in predicted if k.startswith("stage_s.")}
    rows += [(f"stage_s.{k}", m["stage_s"].get(k)) for k in sorted(stages)]
    for metric, value in rows:
        if metric == AT_MEASURED_ACCEPTANCE and metric not in predicted:
            continue
        p = predicted.get(metric, {})
        e = p.get("error_pct")
        shown = f"{value / 1e9:.2f} GB/s" if metric == "h2d_bytes_per_s" and value else _fmt(metric, value)
        t.add_row(metric, shown, _fmt(metric, p.get("predicted")), "-" if e is None else f"{e:+.1f}")
    notes = []
    if report.get("predicted_at_measured_acceptance"):
        notes.append("stage times are predicted by simulating the plan again at the measured acceptance "
                     f"({report['predicted_at_measured_acceptance']['acceptance']:.3f})")
    if not timed_per_layer(m):
        notes.append("per-layer stages not timed: run with --timing to measure them")
    t.caption = "; ".join(notes) or None
    out.print(t)


@app.command()
def run(
    plan: Annotated[Path, typer.Option("--plan", help="plan.json written by `specplan optimize`.")],
    target: TargetOpt,
    draft: DraftOpt = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="One prompt per line; default: random ids of the plan's prompt lengths.")] = None,
    random_weights: RandomWeightsOpt = False,
    device: DeviceOpt = "auto",
    report: Annotated[Path, typer.Option("--report", help="Where to write the full report (JSON).")] = Path("specrun-report.json"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON instead of a table.")] = False,
    max_rows: Annotated[Optional[int], typer.Option("--max-rows", min=1, help="Run at most this many prompts.")] = None,
    dtype: DtypeOpt = None,
    ignore_eos: IgnoreEosOpt = None,
    seed: SeedOpt = 0,
    draft_seed: DraftSeedOpt = None,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="torch intra-op threads (default: torch's).")] = None,
    warmup: Annotated[Optional[bool], typer.Option("--warmup/--no-warmup", help="Before timing, prefill the first wave and decode one round, so one-time CUDA costs (kernel loading, library handles) are not timed. Default: on for CUDA, off for the CPU.")] = None,
    torch_profile: Annotated[Optional[Path], typer.Option("--torch-profile", help="Run under torch.profiler and write its per-operator table (CPU and CUDA time) to this text file. Slows the run: its numbers are for finding hot spots, not for the report.")] = None,
    force: ForceOpt = False,
    output: Annotated[Optional[Path], typer.Option("--output", help="The dataset job: write one JSON line per prompt as it finishes (id, text, token ids, finish reason, counts) to this file.")] = None,
    resume: ResumeOpt = False,
    repair: RepairOpt = False,
    column: ColumnOpt = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    sample_seed: SampleSeedOpt = None,
    stop: StopOpt = [],  # noqa: B006
    timing: Annotated[bool, typer.Option("--timing", help="Also time the stages that run once per layer (target proj / attention / ffn / head, each weight copy) and compare them with the simulator's. Off by default: those timers slow a run by a few percent.")] = False,
    weights: Annotated[Optional[str], typer.Option("--weights", help="The weight formats the plan must have (it records them; `specplan optimize --weights` chooses them): refused if it has others.")] = None,
) -> None:
    """Run a plan and report measured vs predicted throughput, stage times, H2D bandwidth and memory."""
    from specplan.models import ModelSpec
    from specplan.plan import Plan

    set_threads(threads)

    from specplan.workload import Workload

    from .jobio import sidecar_path
    from .run import model_folder, resolve_model, run_plan, run_sampling
    from specplan.progress import steps

    check_writable(report, "--report")
    if torch_profile is not None:
        check_writable(torch_profile, "--torch-profile")
    sampling = sampling_flags(temperature, top_p, top_k, sample_seed)
    if (resume or column) and output is None:
        raise InputError("argument", "--resume" if resume else "--column", "needs --output", "--output OUT.jsonl")
    check_repair(resume, repair)
    check_not_inputs([("--output", output), ("--output's job file", output and sidecar_path(output)),
                      ("--report", report), ("--torch-profile", torch_profile)],
                     [("--plan", plan), ("--prompts", prompts, True), ("--target", ModelSpec.files_of(target)),
                      ("--draft", ModelSpec.files_of(draft))])
    if output is not None and prompts is None:
        raise InputError("argument", "--output", "needs --prompts, the dataset to run", "--prompts data.jsonl")
    the_plan = Plan.load(str(plan))
    check_plan_weights(the_plan, weights, str(plan))
    workload = Workload.from_dict(the_plan.workload, "plan workload")
    base = run_sampling(workload, sampling, seed)
    if base.temperature == 0 and (top_p < 1.0 or top_k > 0) and output is None:  # a dataset job checks its rows
        raise InputError("argument", "--top-p" if top_p < 1.0 else "--top-k", "filters sampling, and this run is greedy",
                         "--temperature T (> 0) with it")

    from specplan.host import busy_warning, machine_load

    load = machine_load()  # once, before the run: other processes holding the cores slow every timing
    if busy := busy_warning(load, "this run's timings"):
        warn(busy)
    kw = dict(load=load, device=device, random_weights=random_weights, max_rows=max_rows, dtype=dtype, ignore_eos=ignore_eos,
              seed=seed, draft_seed=draft_seed, warmup=warmup, torch_profile=torch_profile, force=force, warn=warn,
              sampling=sampling, timing=timing)
    from .run import Interrupted

    try:
        if output is not None:
            result = _dataset_job(the_plan, workload, base, plan, target, draft, prompts, output, resume, column, stop,
                                  as_json, kw, repair)
            if result is None:
                return
        else:
            token_ids = None
            if prompts is not None:
                token_ids = read_prompts(prompts, model_folder(target), resolve_model(target)[0].vocab)
            with steps(err, f"{the_plan.schedule.policy}: generated tokens", quiet=as_json) as bar:
                result = run_plan(the_plan, target, draft, prompts=token_ids, progress=bar.set, **kw)
    except Interrupted as e:  # keep the report of what ran, then end as Ctrl-C does
        write_json(report, e.report)
        i = e.report["interrupted"]
        err.print(f"{i['rows_finished']} of {i['rows']} rows finished before the interrupt; their report: {report}",
                  highlight=False)
        raise KeyboardInterrupt from None
    write_json(report, result)
    err.print(f"report written to {report}", highlight=False)
    if as_json:
        sys.stdout.write(json.dumps({k: v for k, v in result.items() if k != "outputs"}, indent=2) + "\n")
    else:
        print_table(result)


def _dataset_job(the_plan, workload, base, plan_path: Path, target: str, draft: str | None, prompts: Path, output: Path,
                 resume: bool, column: str | None, stop: list[str], as_json: bool, kw: dict, repair: bool = False):
    """Run the rows of `prompts` not yet in `output`; the report, or None when none was left."""
    from specplan.progress import steps
    from specplan.workload import check_row_positions

    from .job import Job, identity_of
    from .jobio import JobWriter, legacy_identity, load_tokenizer
    from .run import resolve_model, run_plan

    check_writable(output, "--output")
    spec = resolve_model(target)[0]
    data, folder = job_rows(prompts, target, column, stop)
    settings = job_settings(kw["sampling"], stop, column, kw["seed"], kw["draft_seed"], kw["random_weights"],
                            kw["dtype"], kw["ignore_eos"])
    identity = identity_of(plan_path, target, draft, data, settings)
    writer, done = JobWriter.prepare(output, identity, resume, {r.id for r in data.rows}, repair, kw["warn"],
                                     legacy=lambda: legacy_identity(identity, data))
    try:
        todo = [i for i, r in enumerate(data.rows) if r.id not in done]
        if kw.get("max_rows"):
            todo = todo[:kw["max_rows"]]
        if done:
            err.print(f"resuming {output}: {len(done)} of {len(data.rows)} rows done, {len(todo)} to run", highlight=False)
        if not todo:
            err.print(f"{output}: every row is done", highlight=False)
            return None
        gen_len = workload.gen_len
        gamma = the_plan.schedule.gamma if the_plan.schedule.speculative else 0
        for i in todo:  # named by id here, before any weight is read (run_plan would name the index)
            check_row_positions(str(prompts), f"id {data.rows[i].id!r}", len(data.rows[i].ids), gen_len, gamma, spec)
        with steps(err, f"{the_plan.schedule.policy}: rows", total=len(todo), quiet=as_json) as bar:
            job = Job(data.rows, todo, str(data.path), writer, data.tokenizer or load_tokenizer(folder), gen_len, steps=bar,
                      base=base)
            def started(engine) -> None:  # every refusal has passed: the output may be written now
                job.engine = engine
                writer.start()

            result = run_plan(the_plan, target, draft, prompts=job.prompts, limits=job.limits, stop=job.stops,
                              on_finish=job.finish, on_engine=started, row_sampling=job.sampling, **{k: v for k, v in kw.items() if k != "max_rows"})
    finally:
        writer.close()
    err.print(f"wrote {writer.written} rows to {output}", highlight=False)
    return result


def main() -> None:
    from specplan.cli import run_app

    run_app(app, prog="specrun")


def console_main() -> None:
    """The `specrun` command, once specplan.entry has put its Ctrl-C handler in place (the
    console script and `python -m specplan.runtime` go through it)."""
    from specplan.cli import exit_without_teardown

    exit_without_teardown(main)


if __name__ == "__main__":  # python -m specplan.runtime.cli: the handler after this module's imports
    from specplan.entry import install

    install()
    console_main()

"""The `specplan batch` command: a dataset job over a Ray cluster (runtime.cluster), with a plan
per machine, per-shard outputs merged into OUT, and --resume across the cluster.

    specplan batch --prompts data.jsonl --output out.jsonl --target DIR --draft DIR
                   [--address local|auto|HOST:PORT] [--workers N] [--cpus-per-worker C]
                   [--gen-len N] [--policy P] [--gpu-mem 24GiB] [--profile FILE] [--resume] ...

Everything that can refuse the job runs before any weight is read: the rows, the output, the
cluster's address, every node's profile, a plan per profile, every row against the plans.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from specplan.cli import WeightsOpt
from specplan.errors import InputError
from specplan.fileio import check_not_inputs, check_writable, write_json

from .cli import (ColumnOpt, DeviceOpt, DraftSeedOpt, DtypeOpt, ForceOpt, IgnoreEosOpt, RandomWeightsOpt, RepairOpt, ResumeOpt,
                  SampleSeedOpt, SeedOpt, StopOpt, TargetOpt, TemperatureOpt, TopKOpt, TopPOpt, check_repair, job_rows,
                  job_settings, sampling_flags, warn)

out = Console()
err = Console(stderr=True)
LOG_EVERY_S = 10.0  # progress lines when stderr is not a terminal (a log file)


def batch_cmd(
    prompts: Annotated[Path, typer.Option("--prompts", help="The dataset: .jsonl (id, prompt or messages, per-row max_tokens / stop / sampling), .txt, .parquet or a datasets directory.")],
    output: Annotated[Path, typer.Option("--output", help="The merged results, one JSON line per row in input order (specrun --output's format); shards go to OUT.shards/ until the merge.")],
    target: TargetOpt,
    draft: Annotated[Optional[str], typer.Option("--draft", help="Draft model for the speculative policies, or 'none'. It must exist at the same path on every node.")] = None,
    address: Annotated[str, typer.Option("--address", help="local: start Ray on this machine; auto: the cluster `ray start` runs here; HOST:PORT: the head's address (`ray start --head` prints it).")] = "local",
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="At most this many workers (default: one per GPU, or per --cpus-per-worker cores of a node without one).")] = None,
    cpus_per_worker: Annotated[int, typer.Option("--cpus-per-worker", min=1, help="Cores of a CPU-only node per worker, and its torch threads.")] = 1,
    local_cpus: Annotated[Optional[int], typer.Option("--local-cpus", min=1, help="With --address local: cores the local Ray instance offers (default: all).")] = None,
    profile: Annotated[Optional[str], typer.Option("--profile", help="Hardware profile (file or shipped name) for nodes that have none of their own: a node's own is the file or name in its SPECPLAN_PROFILE, else the shipped profile of its GPU.")] = None,
    gen_len: Annotated[int, typer.Option("--gen-len", min=1, help="Tokens to generate per row at most (a row's max_tokens may ask fewer).")] = 128,
    acceptance: Annotated[float, typer.Option("--acceptance", min=0.0, max=1.0, help="The draft's per-token acceptance the planner assumes.")] = 0.7,
    policy: Annotated[list[str], typer.Option("--policy", help="Restrict the plans to these policies (repeatable).")] = [],  # noqa: B006
    admission: Annotated[list[str], typer.Option("--admission", help="Restrict the plans to these admission modes (repeatable): waves | continuous.")] = [],  # noqa: B006
    gpu_mem: Annotated[Optional[str], typer.Option("--gpu-mem", help="Cap the device memory every node's plan may use, e.g. 24GiB.")] = None,
    host_mem: Annotated[Optional[str], typer.Option("--host-mem", help="Cap the host memory every node's plan may use, e.g. 64GB.")] = None,
    shard_rows: Annotated[Optional[int], typer.Option("--shard-rows", min=1, help="Rows per shard (default: four times a worker's rows in flight). A lost worker's unfinished rows of its shard run again.")] = None,
    report: Annotated[Optional[Path], typer.Option("--report", help="The job report (JSON): per worker its node, profile, plan, predicted and measured tok/s. Default: OUT.report.json.")] = None,
    resume: ResumeOpt = False,
    repair: RepairOpt = False,
    column: ColumnOpt = None,
    random_weights: RandomWeightsOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    ignore_eos: IgnoreEosOpt = None,
    seed: SeedOpt = 0,
    draft_seed: DraftSeedOpt = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    sample_seed: SampleSeedOpt = None,
    stop: StopOpt = [],  # noqa: B006
    force: ForceOpt = False,
    weights: WeightsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the job report as JSON instead of a table.")] = False,
) -> None:
    """Run a dataset job on a Ray cluster: a worker per GPU (or CPU slot), a plan per machine, nothing lost or run twice."""
    from specplan.plan import ADMISSIONS, POLICIES
    from specplan.cli import memory_caps
    from specplan.hardware import profile_path
    from specplan.models import ModelSpec

    from . import shards
    from .cluster import Driver, BatchRun, PlanRequest, WorkerConfig
    from .job import identity_of_job
    from .jobio import legacy_identity, sidecar_path

    t_start = time.perf_counter()
    draft = None if draft is not None and draft.lower() == "none" else draft
    sampling = sampling_flags(temperature, top_p, top_k, sample_seed)
    check_repair(resume, repair)
    for flag, given, known in (("--policy", policy, POLICIES), ("--admission", admission, ADMISSIONS)):
        bad = [p for p in given if p not in known]
        if bad:
            raise InputError("argument", flag, f"unknown {', '.join(bad)}", " | ".join(known))
    if draft is None and policy and all(p in ("specoffload", "spec-serial") for p in policy):
        raise InputError("argument", "--policy", f"{', '.join(policy)} drafts tokens and there is no --draft",
                         "a --draft model, or --policy flexgen | sequential")
    report = report or output.with_name(output.name + ".report.json")
    check_not_inputs([("--output", output), ("--output's job file", sidecar_path(output)),
                      ("--output's shards", shards.shards_dir(output), True), ("--report", report)],
                     [("--prompts", prompts, True), ("--profile", profile and profile_path(profile)),
                      ("--target", ModelSpec.files_of(target)), ("--draft", ModelSpec.files_of(draft))])
    check_writable(output, "--output")
    check_writable(report, "--report")
    fallback = None
    if profile is not None:
        from specplan.hardware import load_profile

        fallback = load_profile(profile).to_dict()
    # the models by absolute path: a worker's working directory is not this one
    target = str(Path(target).resolve()) if Path(target).exists() else target
    draft = str(Path(draft).resolve()) if draft is not None and Path(draft).exists() else draft

    data, _ = job_rows(prompts, target, column, stop)
    settings = job_settings(sampling, stop, column, seed, draft_seed, random_weights, dtype, ignore_eos)
    identity = identity_of_job(target, draft, data, settings | {"gen_len": gen_len})
    done, first_shard = shards.prepare(output, identity, resume, {r.id for r in data.rows}, repair, warn,
                                       legacy=lambda: legacy_identity(identity, data))
    todo = [i for i, r in enumerate(data.rows) if r.id not in done]
    if done:
        err.print(f"resuming {output}: {len(done)} of {len(data.rows)} rows done, {len(todo)} to run", highlight=False)

    def say(msg: str) -> None:
        if not as_json:
            err.print(escape(msg), highlight=False, soft_wrap=True)

    last = [0.0]

    def progress(done_rows: int, total: int, line: str) -> None:
        now = time.perf_counter()
        if not as_json and (now - last[0] >= LOG_EVERY_S or done_rows == total):
            last[0] = now
            err.print(line, highlight=False, soft_wrap=True)

    cfg = WorkerConfig(target=target, draft=draft, source=str(prompts), device=device, random_weights=random_weights,
                       dtype=dtype, ignore_eos=ignore_eos, seed=seed, draft_seed=draft_seed, sampling=sampling,
                       force=force, profile=fallback)
    from specplan.formats import parse_weights

    parse_weights(weights)  # a bad format is refused before Ray starts
    req = PlanRequest(gen_len=gen_len, acceptance=acceptance, policies=tuple(policy), admissions=tuple(admission),
                      weights=weights, **memory_caps(host_mem, gpu_mem))
    driver = Driver(cfg, req, BatchRun(address, workers, cpus_per_worker, shard_rows, local_cpus), say, progress)
    job_report: dict = {"output": str(output), "rows": len(data.rows), "rows_before": len(done), "resumed": bool(done)}
    # Ray prints its own news (a worker died, ...) to stdout: it goes to stderr here, so that
    # stdout holds only the table or the --json report
    with contextlib.redirect_stdout(sys.stderr):
        try:
            if todo:
                driver.start(data.rows, todo)
                driver.load(max(len(data.rows[i].ids) for i in todo))
                # every refusal has passed: the job's files may be written now
                write_json(sidecar_path(output), identity)
                shards.shards_dir(output).mkdir(exist_ok=True)
                queue = shards.ShardQueue(todo, first_shard)
                driver.run(data.rows, queue, lambda n: _shard_writer(shards.shard_path(output, n)))
            else:
                err.print(f"{output}: every row is done", highlight=False)
            t0 = time.perf_counter()
            if shards.shards_dir(output).exists() or not output.exists():
                shards.merge(output, [r.id for r in data.rows])
            driver.times["merge_s"] = time.perf_counter() - t0
        finally:
            driver.close()
    job_report |= driver.report()
    job_report["times_s"]["total_s"] = time.perf_counter() - t_start
    write_json(report, job_report)
    err.print(f"wrote {len(data.rows)} rows to {output}; job report: {report}", highlight=False)
    if as_json:
        sys.stdout.write(json.dumps(job_report, indent=2) + "\n")
    else:
        print_report(job_report)


def _shard_writer(path: Path):
    from .jobio import JobWriter

    w = JobWriter(path, identity=None)
    w.start()
    return w


def print_report(rep: dict) -> None:
    t = Table(title=f"specplan batch: {rep['generated_tokens']} tokens at {rep['throughput_tok_s'] or 0:.1f} tok/s, "
                    f"{len(rep['workers'])} workers")
    for col in ("worker", "profile", "plan", "rows", "tok/s", "predicted", "state"):
        t.add_column(col, justify="right" if col in ("rows", "tok/s", "predicted") else "left")
    for w in rep["workers"]:
        p = w["plan"]
        plan = "-" if p is None else f"{p['policy']} x{p['rows']}" + (f" g{p['gamma']}" if p["gamma"] else "")
        f = (lambda v: "-" if v is None else f"{v:.1f}")
        t.add_row(f"{w['worker']} {w['host'] or ''}", w["profile"] or "-", plan, str(w["rows"]), f(w["measured_tok_s"]),
                  f(w["predicted_tok_s"]), "ok" if w["lost"] is None else "lost")
    times = rep["times_s"]
    t.caption = "seconds: " + ", ".join(f"{k[:-2]} {v:.1f}" for k, v in times.items() if v is not None)
    out.print(t)
    for w in rep["workers"]:
        if w["lost"]:
            out.print(f"worker {w['worker']}: {w['lost']}", highlight=False)

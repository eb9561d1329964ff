"""`specplan profile` and `specplan calibrate`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from specplan.cli import JsonOpt, err, hardware, print_json
from specplan.fileio import check_not_inputs, check_writable
from specplan.hardware import memory_size, profile_path

MEASURED_DIR = Path("hwprofiles") / "measured"


def profile_cmd(
    quick: Annotated[bool, typer.Option("--quick", help="Small sweep: under a minute on a CPU.")] = False,
    out: Annotated[Optional[str], typer.Option("--out", help="Profile file to write (default hwprofiles/measured/NAME.json).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Profile name (default from the device).")] = None,
    target: Annotated[str, typer.Option(help="Model whose kernels to time (preset, directory or config.json).")] = "tiny-mixtral",
    draft: Annotated[Optional[str], typer.Option(help="Draft model whose whole decode step to time.")] = "tiny-draft",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    gpu_mem: Annotated[Optional[str], typer.Option("--gpu-mem", help="Memory the plan may use on the device, e.g. 24GiB (CPU: default half of RAM).")] = None,
    show: Annotated[Optional[str], typer.Option("--show", help="Print an existing profile file instead of measuring.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure this machine (link, kernels, draft step) into a hardware profile."""
    if show:
        return hardware(show, None, None, None, None, as_json)
    from specplan.models import ModelSpec

    from .profiler import profile_machine

    from specplan.models import resolve_draft

    tspec = ModelSpec.resolve(target)
    models = [tspec] + ([resolve_draft(draft, tspec)] if draft and draft.lower() != "none" else [])
    cap = memory_size(gpu_mem, "argument", "--gpu-mem") if gpu_mem is not None else None
    # the default name comes from the device, known only after measuring: probe its folder
    check_writable(out or MEASURED_DIR / f"{name or 'profile'}.json", "--out")
    check_not_inputs([("--out", out)], [("--target", ModelSpec.files_of(target)), ("--draft", ModelSpec.files_of(draft))])
    from specplan.host import busy_warning, machine_load
    from specplan.progress import steps

    load = machine_load()
    if busy := busy_warning(load, "the measured speeds"):
        err.print(f"[yellow]warning:[/] {busy}", highlight=False, soft_wrap=True)
    t0 = time.perf_counter()
    # the profiler's stages: link, disk, GEMM, then per model shape FFN + projections and attention, the draft step
    shapes = {(m.hidden, m.ffn_inner, m.dtype) for m in models}
    stages = 4 + 2 * len(shapes) + len(models) + (len(models) > 1)
    with steps(err, "profiling", total=stages, quiet=as_json) as bar:
        started = [False]

        def progress(msg: str, rate: float | None = None) -> None:
            if rate is None:  # a new stage: the one before is done
                if started[0]:
                    bar.advance()
                started[0] = True
            bar.say(f"{msg}" + (f"  [{rate / 1e9:.2f} GB/s]" if rate else ""))

        prof = profile_machine(models, quick=quick, device=device, gpu_memory_bytes=cap, name=name, on_progress=progress,
                               load=load)
    path = Path(out) if out else MEASURED_DIR / f"{prof.name}.json"
    prof.save(path)
    err.print(f"profiled in {time.perf_counter() - t0:.1f} s; wrote {path}")
    if as_json:
        return print_json(prof.to_dict())
    hardware(str(path), None, None, None, None, False)


def check_same_plan(rep: dict, p, report_path: str, plan_path: str) -> None:
    """A report calibrates only the plan it ran: same models, hardware, schedule and placement."""
    from specplan.errors import InputError

    ran = rep.get("plan") if isinstance(rep.get("plan"), dict) else {}
    mine = p.to_dict()
    for key in ("target", "draft", "hardware", "schedule", "placement"):
        if ran.get(key) != mine.get(key):
            shown = (lambda v: v if isinstance(v, (str, type(None))) else "another")  # noqa: E731
            raise InputError(report_path, f"plan.{key}", f"the report ran {shown(ran.get(key))!s} {key}, "
                             f"{plan_path} has {shown(mine.get(key))!s}",
                             f"the report of a run of {plan_path} (specrun --plan {plan_path})")


def check_same_device(rep: dict, prof, report_path: str, whose: str) -> None:
    """A report calibrates only a profile of the device it ran on (as specrun refuses a plan
    made for another device): its times say nothing of another machine's stages."""
    from specplan.errors import InputError

    device = rep.get("device") if isinstance(rep.get("device"), dict) else {}
    ran = device.get("name")
    if not isinstance(ran, str) or not ran:
        raise InputError(report_path, "device.name", "is missing", "a report.json written by specrun")
    if prof.gpu.name and ran != prof.gpu.name:
        raise InputError(report_path, "device.name", f"the run was measured on {ran}, and {whose} is {prof.name} "
                         f"({prof.gpu.name})", "a profile of the device the run measured (specplan profile there)")


def calibrate_cmd(
    report: Annotated[str, typer.Argument(help="report.json written by specrun.")],
    plan: Annotated[str, typer.Option("--plan", help="The plan.json the report ran.")] = "plan.json",
    gpu: Annotated[Optional[str], typer.Option("--gpu", help="Profile to calibrate (default: the plan's hardware).")] = None,
    out: Annotated[Optional[str], typer.Option("--out", help="Calibrated profile to write (default hwprofiles/measured/NAME+calibrated.json).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Fold measured stage times and acceptance back into a profile; show how much the error drops."""
    from rich.table import Table

    from specplan.cli import out as console
    from specplan.errors import InputError
    from specplan.fileio import read_json
    from specplan.hardware import load_profile
    from specplan.plan import Plan
    from specplan.runtime.stats import timed_per_layer

    from .calibrate import calibrate, calibrated_name

    reads = [("REPORT", report), ("--plan", plan), ("--gpu", gpu and profile_path(gpu))]
    if out:  # the default path is known once the profile is
        check_writable(out, "--out")
        check_not_inputs([("--out", out)], reads)
    rep = read_json(report)
    if not isinstance(rep, dict) or "measured" not in rep or "throughput_tok_s" not in rep.get("measured", {}):
        raise InputError(report, "measured", "is missing", "a report.json written by specrun")
    if not timed_per_layer(rep["measured"]):
        raise InputError(report, "measured.stage_timing", "holds the per-pass stages only",
                         "the report of a run with --timing")
    p = Plan.load(plan)
    check_same_plan(rep, p, report, plan)
    prof = load_profile(gpu) if gpu else p.hardware_profile()
    check_same_device(rep, prof, report, "--gpu" if gpu else f"{plan}'s hardware")
    path = Path(out) if out else MEASURED_DIR / f"{calibrated_name(prof.name)}.json"
    if not out:
        check_not_inputs([("--out (default)", path)], reads)
    cal = calibrate(rep, p, prof)
    cal.profile.save(path)
    err.print(f"wrote {path}")
    if as_json:
        return print_json({"profile": str(path), "factors": cal.factors, "measured_acceptance": cal.measured_acceptance,
                           "measured_tok_s": cal.measured_tok_s, "simulated_before_tok_s": cal.before_tok_s,
                           "simulated_after_tok_s": cal.after_tok_s, "error_before_pct": cal.error_before_pct,
                           "error_after_pct": cal.error_after_pct})
    t = Table(title=f"Calibration of {prof.name} from {report}")
    for col in ("stage", "time multiplier"):
        t.add_column(col)
    for stage, f in cal.factors.items():
        t.add_row(stage, f"{f:.3f}")
    console.print(t)
    if cal.measured_acceptance is not None:
        console.print(f"measured acceptance: {cal.measured_acceptance:.3f}")
    console.print(f"measured {cal.measured_tok_s:.2f} tok/s; simulated before {cal.before_tok_s:.2f} "
                  f"({cal.error_before_pct:+.1f}%), after {cal.after_tok_s:.2f} ({cal.error_after_pct:+.1f}%)")

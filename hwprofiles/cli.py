"""`specplan profile` and `specplan calibrate`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from specplan.cli import JsonOpt, err, hardware, print_json
from specplan.units import parse_bytes

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

    models = [ModelSpec.resolve(target)] + ([ModelSpec.resolve(draft)] if draft else [])
    cap = parse_bytes(gpu_mem, "argument", "--gpu-mem") if gpu_mem else None
    t0 = time.perf_counter()
    with err.status("profiling ...") as status:
        def progress(msg: str, rate: float | None = None) -> None:
            status.update(f"{msg}" + (f"  [{rate / 1e9:.2f} GB/s]" if rate else ""))

        prof = profile_machine(models, quick=quick, device=device, gpu_memory_bytes=cap, name=name, on_progress=progress)
    path = Path(out) if out else MEASURED_DIR / f"{prof.name}.json"
    prof.save(path)
    err.print(f"profiled in {time.perf_counter() - t0:.1f} s; wrote {path}")
    if as_json:
        return print_json(prof.to_dict())
    hardware(str(path), None, None, None, None, False)

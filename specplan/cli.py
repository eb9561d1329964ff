"""The `specplan` command: hardware and model catalogues, simulate, optimize, profile.

Results go to stdout (a Rich table, or JSON with --json); progress and errors to stderr.
Every error a user can fix is one line naming the file, field and expected form.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import SpecplanError
from .units import fmt_bytes, fmt_count

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Plan, simulate and run offloaded speculative LLM inference on one small GPU.")
# Piped output gets a wide console rather than Rich's 80-column default, so names never fold.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
PcieOpt = Annotated[Optional[str], typer.Option("--pcie", help="Swap the host link: 3, 4, 5 or a link name in hwprofiles/parts.json.")]
HostOpt = Annotated[Optional[str], typer.Option("--host", help="Swap the host part: 'workstation' or 'server'.")]
HostMemOpt = Annotated[Optional[str], typer.Option("--host-mem", help="Host memory, e.g. 256GB.")]
WeightsOpt = Annotated[Optional[str], typer.Option(
    "--weights", help="Weight formats (docs/weights.md): bf16 | fp16 | fp32 | int8 | int4 (groups of 64; int4g32, "
    "int4g128) | fp8 for the layers; auto lets the planner choose each group (auto:int8+int4 among those; dtype is the model's own); or per "
    "group, e.g. experts=int4,attention=int8,lm_head=int8,embed=int8,draft=int8. Default: the model's dtype.")]
GpuMemOpt = Annotated[Optional[str], typer.Option("--gpu-mem", help="Cap usable GPU memory, e.g. 24GiB.")]


def memory_caps(host_mem: str | None, gpu_mem: str | None) -> dict:
    """--host-mem and --gpu-mem, checked, as HardwareProfile.compose's keywords (None: not given)."""
    from .hardware import memory_size

    return {"host_memory_bytes": None if host_mem is None else memory_size(host_mem, "argument", "--host-mem"),
            "gpu_memory_bytes": None if gpu_mem is None else memory_size(gpu_mem, "argument", "--gpu-mem")}


def profile_from_flags(gpu: str, pcie: str | None = None, host: str | None = None,
                       host_mem: str | None = None, gpu_mem: str | None = None):
    from .hardware import load_profile

    return load_profile(gpu, pcie=pcie, host=host, **memory_caps(host_mem, gpu_mem))


def given_options(ctx) -> set[str]:
    """The parameters the command line set itself (not left at their defaults)."""
    if ctx is None:
        return set()
    return {k for k in ctx.params if getattr(ctx.get_parameter_source(k), "name", None) == "COMMANDLINE"}


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


@app.command()
def hardware(
    name: Annotated[Optional[str], typer.Argument(help="Shipped profile name or a profile JSON file; omit to list.")] = None,
    pcie: PcieOpt = None, host: HostOpt = None, host_mem: HostMemOpt = None, gpu_mem: GpuMemOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the shipped hardware profiles, or show one (optionally composed with other parts)."""
    from .hardware import load_profile, shipped_names

    if name is None:
        profiles = [load_profile(n) for n in shipped_names()]
        if as_json:
            return print_json([p.to_dict() for p in profiles])
        t = Table(title="Shipped hardware profiles (datasheet unless measured)")
        for col in ("name", "GPU", "memory", "bf16 TFLOP/s", "HBM GB/s", "link", "H2D pinned GB/s", "host", "kind"):
            t.add_column(col)
        for p in profiles:
            t.add_row(p.name, p.gpu.name, fmt_bytes(p.gpu.memory_bytes), f"{p.gpu.flops_per_s('bfloat16') / 1e12:.1f}",
                      f"{p.gpu.memory_bandwidth_bytes_per_s / 1e9:.0f}", p.link.name,
                      f"{p.link.h2d_pinned.bytes_per_s / 1e9:.1f}", p.host.name, p.provenance.kind)
        out.print(t)
        return
    p = profile_from_flags(name, pcie, host, host_mem, gpu_mem)
    if as_json:
        return print_json(p.to_dict())
    t = Table(title=f"Hardware profile {p.name} ({p.provenance.kind})", show_header=False)
    t.add_column("field")
    t.add_column("value")
    g, lk, h = p.gpu, p.link, p.host
    rows = [
        ("GPU", g.name), ("GPU memory", fmt_bytes(g.memory_bytes)),
        *[(f"peak {k}", f"{v / 1e12:.1f} TFLOP/s") for k, v in g.peak_flops_per_s.items()],
        ("GPU memory bandwidth", f"{g.memory_bandwidth_bytes_per_s / 1e9:.0f} GB/s"),
        ("matmul / bandwidth efficiency", f"{g.matmul_efficiency:.2f} / {g.bandwidth_efficiency:.2f}"),
        ("link", lk.name),
        *[(k.replace("_", " "), f"{getattr(lk, k).bytes_per_s / 1e9:.1f} GB/s + {getattr(lk, k).latency_s * 1e6:.0f} us")
          for k in ("h2d_pinned", "h2d_pageable", "d2h_pinned", "d2h_pageable")],
        ("duplex factor", f"{lk.duplex_factor:.2f}"), ("disk read", f"{lk.disk_read_bytes_per_s / 1e9:.1f} GB/s"),
        ("host", h.name), ("host memory", fmt_bytes(h.memory_bytes)), ("host cores", str(h.cores)),
        *[(f"host matmul {k}", f"{v / 1e12:.2f} TFLOP/s") for k, v in h.matmul_flops_per_s.items()],
        ("host memory bandwidth", f"{h.memory_bandwidth_bytes_per_s / 1e9:.0f} GB/s"),
        ("kernel tables", ", ".join(p.kernels) or "none (roofline from peaks)"),
        ("sources", "\n".join(p.provenance.sources)), ("notes", p.provenance.notes),
    ]
    for r in rows:
        t.add_row(*r)
    out.print(t)


@app.command()
def models(
    name: Annotated[Optional[str], typer.Argument(help="Preset name, model directory or config.json; omit to list.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Override the compute dtype (activations, KV cache): bfloat16, float16, float32.")] = None,
    weights: WeightsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the model presets, or show one model's shapes and byte breakdown (per tensor group
    in its weight format with --weights)."""
    from .errors import InputError
    from .formats import parse_weights
    from .models import ModelSpec, apply_weights, preset_names

    choice = parse_weights(weights)
    if choice.auto:
        raise InputError("argument", "--weights", "auto: the planner chooses it", "fixed formats, e.g. int4")
    if name is None:
        specs = [ModelSpec.from_preset(n) for n in preset_names()]
        if dtype:
            specs = [s.with_dtype(dtype) for s in specs]
        specs = [apply_weights(s, None, choice.fixed)[0] for s in specs]
        if as_json:
            return print_json([s.to_dict() for s in specs])
        t = Table(title="Model presets")
        for col in ("name", "arch", "params", "layers", "hidden", "experts", "dtype", "weights", "KV / token"):
            t.add_column(col)
        for s in specs:
            t.add_row(s.name, s.arch, fmt_count(s.total_params), str(s.layers), str(s.hidden),
                      f"{s.experts} (top {s.top_k})" if s.is_moe else "dense", s.dtype, fmt_bytes(s.total_bytes),
                      fmt_bytes(s.kv_bytes_per_token))
        out.print(t)
        return
    s = ModelSpec.resolve(name)
    if dtype:
        s = s.with_dtype(dtype)
    s = apply_weights(s, None, choice.fixed)[0]
    if as_json:
        return print_json(s.to_dict())
    t = Table(title=f"{s.name} ({s.arch}, {s.dtype})", show_header=False)
    t.add_column("field")
    t.add_column("value")
    lb = s.layer_bytes
    rows = [
        ("parameters", f"{fmt_count(s.total_params)} ({s.total_params:,})"),
        ("active parameters / token", fmt_count(s.active_params_per_token)),
        ("layers / hidden / FFN inner", f"{s.layers} / {s.hidden} / {s.ffn_inner}"),
        ("heads / KV heads / head dim", f"{s.heads} / {s.kv_heads} / {s.head_dim}"),
        ("experts", f"{s.experts}, top {s.top_k}" if s.is_moe else "dense MLP"),
        ("vocab", str(s.vocab)),
        ("weight formats", ", ".join(f"{g} {s.fmt(g).label}" for g in ("attention", "experts", "lm_head", "embed"))),
        ("attention / layer", fmt_bytes(lb.attention)),
        ("router / layer", fmt_bytes(lb.router)),
        ("one expert" if s.is_moe else "MLP / layer", fmt_bytes(lb.expert)),
        ("all experts / layer" if s.is_moe else "FFN / layer", fmt_bytes(lb.ffn)),
        ("norms / layer", fmt_bytes(lb.norms)),
        ("one layer", fmt_bytes(lb.total)),
        ("attention, whole model", fmt_bytes(lb.attention * s.layers)),
        ("embedding", fmt_bytes(s.embed_bytes)),
        ("lm_head", fmt_bytes(s.lm_head_bytes) + (" (tied)" if s.tie_embeddings else "")),
        ("total weights", fmt_bytes(s.total_bytes)),
        ("KV cache / token", fmt_bytes(s.kv_bytes_per_token)),
        ("FLOPs / token (no context)", fmt_count(s.flops_per_token(0))),
    ]
    for r in rows:
        t.add_row(*r)
    out.print(t)


def _register_subcommands(argv: list[str] | None = None) -> None:
    """Commands whose code lives in the subpackages: the one `argv` names, or all of them
    (commands.register)."""
    from .commands import register

    register(app, argv)


EXIT_CODES = {0: "success", 1: "internal error (a bug: SPECPLAN_DEBUG=1 shows the traceback)",
              2: "usage or input error: the message names the option, file or field",
              3: "does not fit: no plan, or the plan does not fit this machine", 130: "interrupted (Ctrl-C)"}


def _usage_error(e: Exception) -> bool:
    """click's usage errors, from the click typer bundles (typer._click, typer >= 0.22) or from
    click itself (older typer): both carry exit_code and format_message."""
    return hasattr(e, "exit_code") and hasattr(e, "format_message") and type(e).__name__ != "Exit"


def _one_line_warnings() -> None:
    """Python warnings as one clean stderr line (no source line), once per kind and place:
    an out-of-range kernel lookup warns once, not once per context length."""
    import warnings

    seen: set = set()

    def show(message, category, filename, lineno, file=None, line=None):
        if (category, filename, lineno) in seen:
            return
        seen.add((category, filename, lineno))
        err.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)

    warnings.showwarning = show


def fail(message: str, code: int) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def run_app(typer_app: typer.Typer, prog: str = "specplan", before: Callable[[], None] | None = None) -> None:
    """Run a Typer app the specplan way: every error a user can make is one red line on stderr
    and a documented exit code (EXIT_CODES); Ctrl-C is 130 (specplan.entry), also where a
    library swallowed it; a traceback only for a bug with SPECPLAN_DEBUG=1. `before` runs
    first, under the same rules (registering the commands imports their modules)."""
    import os

    from . import entry

    debug = os.environ.get("SPECPLAN_DEBUG") == "1"

    def interrupted() -> None:
        err.print("interrupted", highlight=False)
        sys.exit(130)

    try:
        _one_line_warnings()
        if before is not None:
            before()
        rv = typer_app(standalone_mode=False, prog_name=prog)
        entry.check()
    except SpecplanError as e:
        if entry.interrupted():  # a library turned the interrupt into another error
            interrupted()
        fail(str(e), e.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        interrupted()
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - the one place every other error ends
        if entry.interrupted():
            interrupted()
        if _usage_error(e):
            ctx = getattr(e, "ctx", None)
            where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:
                sys.stdout.write(ctx.get_help() + "\n")
                sys.exit(0)
            fail(f"{e.format_message()}{where}", 2)  # a usage error is the user's: 2, whatever click says
        if isinstance(e, BrokenPipeError):  # `| head` closed the pipe: not an error of ours
            sys.exit(1)
        if debug:
            raise
        fail(f"internal error: {type(e).__name__}: {e} (set SPECPLAN_DEBUG=1 for the traceback)", 1)
    # without standalone mode typer returns an Exit's code (Ctrl-C inside a command is Exit(130))
    if rv == 130:
        interrupted()
    if isinstance(rv, int) and rv:
        sys.exit(rv)


def main() -> None:
    run_app(app, before=lambda: _register_subcommands(sys.argv[1:]))


def exit_without_teardown(entry: Callable[[], None]) -> None:
    """Run a console entry point, then end the process without tearing the interpreter down:
    once the output is flushed and the atexit handlers (multiprocessing's, tempfile's, Ray's)
    have run, freeing every object and module one by one only costs time (specplan optimize:
    0.13-0.15 s of a 1.1-1.5 s run). Where a thread other than this one still runs, the usual
    exit waits for it instead, unless the command failed or was interrupted: its error path has
    stopped what it started, and a process pool's manager thread, joined at teardown after the
    pool was abandoned, would only print a traceback of its closed pipe (CPython 3.11)."""
    import atexit
    import os
    import threading

    try:
        entry()
        code = 0
    except SystemExit as e:
        code = e.code
    if isinstance(code, str):  # sys.exit("message"): Python prints it and exits 1
        sys.stderr.write(code + "\n")
        code = 1
    code = int(code or 0)
    if code == 130:  # interrupted, and its interrupt path has run: a later Ctrl-C changes nothing
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # an exit handler of a library whose import the interrupt cut short (Ray's shutdown
        # importing more of a half-initialised ray) fails: a consequence of the interrupt
        # already reported, not an error to print
        sys.unraisablehook = lambda info: None
    if code == 0 and any(t.is_alive() and not t.daemon for t in threading.enumerate()
                         if t is not threading.current_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more to say
            pass
    os._exit(code)


def console_main() -> None:
    """The `specplan` command, once specplan.entry has put its Ctrl-C handler in place (the
    console script and `python -m specplan` go through it)."""
    exit_without_teardown(main)


if __name__ == "__main__":  # python -m specplan.cli: the handler after this module's imports
    from specplan.entry import install

    install()
    console_main()

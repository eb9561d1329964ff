"""`specplan sweep`: which machine for this job? The best plan at every point of a grid,
side by side, priced when prices are given."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from specplan.cli import JsonOpt, WeightsOpt, err, out, print_json
from specplan.errors import InfeasibleError, InputError
from specplan.fileio import check_not_inputs, check_writable, write_atomic, write_json
from specplan.units import fmt_seconds

from .sweep import (
    Grid,
    check_prices,
    csv_text,
    default_cache_dir,
    load_prices,
    parse_prices,
    price_rows,
    run_sweep,
    sort_rows,
)

SORTS = ("tok_s", "cost")


def _grid_from_flags(base: Grid | None, gpu, pcie, host_mem, target, draft, prompt_len, gen_len, num_prompts,
                     acceptance) -> Grid:
    """The grid file's axes (or the defaults), each replaced by its flags where they are given."""
    from specplan.hardware import shipped_names

    if draft and not target:
        raise InputError("argument", "--draft", "given without --target", "--target NAME --draft NAME, in pairs")
    if target and len(draft) not in (1, len(target)):
        raise InputError("argument", "--draft", f"{len(draft)} drafts for {len(target)} targets",
                         "one --draft per --target (or 'none'), or one for all")
    models = tuple(zip(target, draft if len(draft) == len(target) else draft * len(target))) if target else None
    from specplan.hardware import memory_size

    for h in host_mem:
        memory_size(h, "argument", "--host-mem")
    g = base or Grid(gpus=tuple(shipped_names()))  # workload values are checked where each point is made (Workload)
    pick = lambda flag, axis: tuple(dict.fromkeys(flag)) if flag else axis  # noqa: E731
    return Grid(gpus=pick(gpu, g.gpus), pcies=pick(pcie, g.pcies), host_mems=pick(host_mem, g.host_mems),
                models=models or g.models, prompt_lens=pick(prompt_len, g.prompt_lens),
                gen_lens=pick(gen_len, g.gen_lens), num_prompts=pick(num_prompts, g.num_prompts),
                acceptances=pick(acceptance, g.acceptances), prices=g.prices)


def _table(rows: list[dict], priced: bool, planned: int, sort: str) -> Table:
    varies = lambda key: len({r["point"][key] for r in rows}) > 1  # noqa: E731
    many_models = varies("target") or varies("draft")
    workload_keys = [k for k in ("prompt_len", "gen_len", "num_prompts", "acceptance") if varies(k)]
    t = Table(title=f"Sweep: {len(rows)} points, best {'cost' if sort == 'cost' else 'throughput'} first "
                    f"({planned} planned now, {len(rows) - planned} from the cache)")
    cols = ["#", *(["model"] if many_models else []), "machine", *(["workload"] if workload_keys else []),
            "policy", "rows / gamma", "tok/s", "job time"]
    if priced:
        cols += ["$/h", "$/M tok", "job $"]
    cols += ["binds"]
    for c in cols:
        t.add_column(c, overflow="fold")
    for i, r in enumerate(rows, 1):
        p = r["point"]
        cells = [str(i)]
        if many_models:
            cells.append(f"{p['target']} + {p['draft']}")
        cells.append(r["machine"])
        if workload_keys:
            cells.append(" ".join(f"{k}={p[k]}" for k in workload_keys))
        if r["status"] != "ok":
            cells += ["[yellow]no plan[/]", "", "", ""] + (["", "", ""] if priced else []) + [r["why"]]
        else:
            cells += [r["policy"], r["rows"] + (f" / {r['gamma']}" if r["gamma"] is not None else ""),
                      f"{r['tok_s']:.1f}", fmt_seconds(r["job_s"])]
            if priced:
                cells += ["" if r["usd_per_hour"] is None else f"{r['usd_per_hour']:.2f}",
                          "" if r["usd_per_mtok"] is None else f"{r['usd_per_mtok']:.2f}",
                          "" if r["job_usd"] is None else f"{r['job_usd']:.2f}"]
            cells.append(r["binds"])
        t.add_row(*cells)
    return t


def sweep_cmd(
    gpu: Annotated[list[str], typer.Option(help="GPU profile (repeatable); default: every shipped profile.")] = [],  # noqa: B006
    pcie: Annotated[list[str], typer.Option(help="Host link (repeatable): 3, 4, 5 or a link name; default: each profile's own.")] = [],  # noqa: B006
    host_mem: Annotated[list[str], typer.Option(help="Host memory (repeatable), e.g. 256GB; default: each profile's own.")] = [],  # noqa: B006
    target: Annotated[list[str], typer.Option(help="Target model (repeatable; pair each with a --draft). Default: mixtral-8x7b.")] = [],  # noqa: B006
    draft: Annotated[list[str], typer.Option(help="Draft model for the --target in the same place, or one for all; 'none' for no draft.")] = [],  # noqa: B006
    prompt_len: Annotated[list[int], typer.Option(help="Prompt length in tokens (repeatable). Default 512.")] = [],  # noqa: B006
    gen_len: Annotated[list[int], typer.Option(help="Tokens to generate per prompt (repeatable). Default 128.")] = [],  # noqa: B006
    num_prompts: Annotated[list[int], typer.Option(help="Prompts in the job (repeatable); the job's time and cost are for these. Default 512.")] = [],  # noqa: B006
    acceptance: Annotated[list[float], typer.Option(help="Per-token acceptance rate of the draft (repeatable). Default 0.7.")] = [],  # noqa: B006
    grid_file: Annotated[Optional[str], typer.Option("--grid", help="A grid file (JSON or YAML) with any of: gpu, pcie, host_mem, models, prompt_len, gen_len, num_prompts, acceptance, prices; flags given replace its axes.")] = None,
    price: Annotated[list[str], typer.Option(help="GPU price in $ per hour, NAME=PRICE (repeatable), e.g. rtx4090=0.35.")] = [],  # noqa: B006
    prices_file: Annotated[Optional[str], typer.Option("--prices", help="A prices file: {date, source, prices: {gpu: $/h}}; refused without its date and source.")] = None,
    sort: Annotated[str, typer.Option(help="Order of the table: tok_s (fastest first) or cost ($ per million tokens, cheapest first).")] = "tok_s",
    csv_path: Annotated[Optional[str], typer.Option("--csv", help="Also write every row to this CSV file.")] = None,
    plots: Annotated[Optional[str], typer.Option(help="Write PNG plots into this folder (tok/s and $/M tokens per GPU, link x host memory heat maps).")] = None,
    plan_out: Annotated[Optional[str], typer.Option("--plan-out", help="Write the best point's plan (as specplan optimize would) to this file.")] = None,
    cache: Annotated[Optional[str], typer.Option(help="Cache folder (one file per point, keyed by the hash of its inputs and of specplan's code). Default: ~/.cache/specplan/sweep.")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Plan every point again and cache nothing.")] = False,
    weights: WeightsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Plan every point of a grid of GPUs, links, host memory sizes, models and workloads
    (each as `specplan optimize` would, in parallel over the cores, cached), and compare them:
    throughput, what binds, and with prices the cost per million tokens and of the job."""
    if sort not in SORTS:
        raise InputError("argument", "--sort", f"'{sort}' is unknown", " | ".join(SORTS))
    from specplan.formats import parse_weights

    if parse_weights(weights).auto:
        raise InputError("argument", "--weights", "auto is not a sweep axis", "fixed formats, e.g. int4")
    bases = Grid.from_file(grid_file) if grid_file else [None]
    grids = [replace(_grid_from_flags(b, gpu, pcie, host_mem, target, draft, prompt_len, gen_len, num_prompts,
                                      acceptance), weights=weights) for b in bases]
    gpus = tuple(dict.fromkeys(g for grid in grids for g in grid.gpus))
    # a grid file's prices for GPUs that --gpu flags leave out price nothing, and are no mistake
    prices = {k: v for grid in grids for k, v in grid.prices.items() if not gpu or k in gpus}
    check_prices(prices, gpus, f"{grid_file}: prices")
    if prices_file:
        prices.update(check_prices(load_prices(prices_file), gpus, f"{prices_file}: prices"))
    prices.update(check_prices(parse_prices(price, "argument", "--price"), gpus, "--price"))
    if sort == "cost" and not prices:
        raise InputError("argument", "--sort", "cost needs prices", "--price GPU=$/h or --prices FILE")
    points = list(dict.fromkeys(p for grid in grids for p in grid.points()))
    for path, flag in ((csv_path, "--csv"), (plan_out, "--plan-out")):
        if path:
            check_writable(path, flag)
    if plots:
        check_writable(Path(plots) / "tok_s_by_gpu.png", "--plots")
    from specplan.hardware import profile_path
    from specplan.models import ModelSpec

    from .sweep_plots import plot_names

    plot_files = [Path(plots) / n for n in plot_names(dict.fromkeys(p.target for p in points))] if plots else []
    check_not_inputs([("--csv", csv_path), ("--plan-out", plan_out), *(("--plots", f) for f in plot_files)],
                     [("--grid", grid_file), ("--prices", prices_file),
                      *(("--gpu", profile_path(g)) for g in dict.fromkeys(p.gpu for p in points)),
                      *(("--target", ModelSpec.files_of(m)) for m in dict.fromkeys(p.target for p in points)),
                      *(("--draft", ModelSpec.files_of(m)) for m in dict.fromkeys(p.draft for p in points))])
    if no_cache and cache:
        raise InputError("argument", "--cache", "is given with --no-cache, which caches nothing", "one of them")
    cache_dir = None if no_cache else (cache or default_cache_dir())
    if cache_dir:
        check_writable(Path(cache_dir) / "probe.json", "--cache")

    from specplan.progress import steps

    with steps(err, "sweeping", quiet=as_json) as bar:
        res = run_sweep(points, cache_dir, progress=bar)
    rows = res.rows
    price_rows(rows, prices)
    rows = sort_rows(rows, sort)
    best = next((r for r in rows if r["status"] == "ok"), None)
    if plan_out and best is not None:
        write_json(plan_out, best["plan"])
    if csv_path:
        write_atomic(csv_path, csv_text(rows))
    written = []
    if plots:
        from .sweep_plots import write_plots

        written = write_plots(rows, plots)
    if as_json:
        print_json({"planned": res.planned, "cached": len(rows) - res.planned, "sort": sort,
                    "prices_usd_per_hour": prices, "plots": written,
                    "rows": [{k: v for k, v in r.items() if k != "plan"} for r in rows]})
    else:
        out.print(_table(rows, bool(prices), res.planned, sort))
        for path in ([csv_path] if csv_path else []) + written + ([plan_out] if plan_out and best else []):
            err.print(f"wrote {path}")
    if best is None:
        whys = list(dict.fromkeys(r["why"] for r in rows))
        raise InfeasibleError(f"no point of the grid has a plan: {whys[0]}"
                              + (f" (and {len(whys) - 1} other reasons: see the table)" if len(whys) > 1 else ""))


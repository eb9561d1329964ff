"""`specplan optimize`: find the best plan for a model pair, a machine and a workload."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Optional

import typer
from rich.table import Table

from specplan.cli import (GpuMemOpt, HostMemOpt, HostOpt, JsonOpt, PcieOpt, WeightsOpt, err, out, print_json,
                          profile_from_flags)
from specplan.cost import max_acceptance_spread
from specplan.errors import InfeasibleError, InputError
from specplan.fileio import check_not_inputs, check_writable
from specplan.hardware import profile_path
from specplan.models import ModelSpec, resolve_draft
from specplan.plan import POLICIES, Plan
from specplan.units import fmt_bytes, fmt_seconds
from specplan.workload import Workload

from .optimize import (ADMISSIONS, SIM_OVER_ESTIMATE, OptimizeResult, Ranked, make_plan, optimize_formats,
                       self_draft_depth, to_sim_config, weight_candidates)


def _describe(r: Ranked) -> str:
    s, pl = r.candidate.shape, r.candidate.placement
    spec = (f" gamma {s.gamma}, draft batch {s.draft_batch}, draft KV {pl.draft_kv},"
            if s.policy in ("specoffload", "spec-serial") else "")
    admit = (f"continuous ({s.prefill_tokens} prompt tokens a pass)" if s.admission == "continuous"
             else f"waves (prefill chunk {s.prefill_chunk})")
    return (f"{s.policy}: {s.num_batches} x {s.target_batch} rows,{spec} {admit}, "
            f"attention on {s.attention_device}, FFN on GPU {pl.ffn_gpu_layers} layers"
            + (", routed experts" if pl.experts == "routed" else ""))


def placement_table(plan: Plan, target: ModelSpec) -> Table:
    pl, sch = plan.placement, plan.schedule
    from specplan.memory import streamed_bytes_per_pass

    streamed = fmt_bytes(streamed_bytes_per_pass(target, pl))
    routed = plan.prediction.get("experts_streamed_per_pass")
    if routed is not None:
        streamed += f" ahead + {routed:.0f} routed experts"
    t = Table(title=f"Placement ({streamed} of weights streamed per pass)",
              show_header=True)
    for col in ("tensor group", "format", "where", "bytes"):
        t.add_column(col)
    b = target.layer_bytes
    L = target.layers
    from specplan.formats import DTYPE_FORMAT

    dtype = DTYPE_FORMAT.get(target.dtype, target.dtype)
    t.add_row("target attention weights", target.fmt("attention").label, pl.attention, fmt_bytes(b.attention * L))
    t.add_row("target experts / MLP", target.fmt("experts").label, f"GPU: {pl.ffn_gpu_layers} layers, rest: {pl.ffn}",
              fmt_bytes(b.ffn * L))
    t.add_row("router and norms", dtype, "gpu", fmt_bytes((b.router + b.norms) * L))
    t.add_row("embedding", target.fmt("embed").label, pl.embed, fmt_bytes(target.embed_bytes))
    t.add_row("lm_head", target.fmt("lm_head").label, pl.lm_head, fmt_bytes(target.head_bytes))
    mem = plan.prediction["memory"]
    if mem["gpu"].get("dequantization scratch"):
        t.add_row("dequantization scratch", dtype, "gpu", fmt_bytes(mem["gpu"]["dequantization scratch"]))
    t.add_row("target KV cache", dtype, "gpu" if sch.attention_device == "gpu" else "cpu_pinned",
              fmt_bytes(mem["gpu"].get("target KV cache") or mem["host"].get("target KV cache", 0)))
    if plan.draft:
        t.add_row("draft weights", plan.weights.get("draft", "dtype"), "gpu", fmt_bytes(mem["gpu"].get("draft weights", 0)))
        where = {"gpu": "gpu", "cpu": "cpu_pinned (swapped in per micro-batch)",
                 "recompute": "none kept (each context re-read per round, one micro-batch's buffer on the GPU)"}
        t.add_row("draft KV cache", dtype, where[pl.draft_kv],
                  fmt_bytes(mem["gpu"].get("draft KV cache") or mem["host"].get("draft KV cache")
                            or mem["gpu"].get("draft KV recompute buffer", 0)))
    return t


def summary_table(plan: Plan, res: OptimizeResult) -> Table:
    pred, sch = plan.prediction, plan.schedule
    t = Table(title=f"Best plan: {plan.target} + {plan.draft or 'no draft'} on {plan.hardware}", show_header=False)
    t.add_column("")
    t.add_column("")
    t.add_row("policy", f"[bold]{sch.policy}[/]")
    t.add_row("rows", f"{sch.num_batches} x {sch.target_batch}")
    if sch.speculative:
        t.add_row("gamma / draft batch", f"{sch.gamma} / {sch.draft_batch}")
    if sch.admission == "continuous":
        t.add_row("admission", f"continuous: freed rows refilled, up to {sch.prefill_tokens} prompt tokens a pass")
    else:
        t.add_row("admission", f"waves: static batches, prefill passes of {sch.prefill_chunk} rows")
    t.add_row("attention device / prefetch depth", f"{sch.attention_device} / {sch.prefetch_depth}")
    t.add_row("throughput (simulated)", f"[bold green]{pred['throughput_tok_s']:.2f} tok/s[/]")
    t.add_row("throughput (program estimate)", f"{pred['program_estimate_tok_s']:.2f} tok/s")
    t.add_row("time per wave / all prompts", f"{fmt_seconds(pred['total_s'])} / {fmt_seconds(pred['workload_s'])}")
    counts = pred.get("pass_counts") or {}
    if counts:
        t.add_row("passes simulated", f"{counts['passes']}: {counts['prefill_passes']} prompts only, "
                  f"{counts['mixed_passes']} with prompts beside decode rows")
    t.add_row("prefill / decode", f"{fmt_seconds(pred['prefill_s'])} / {fmt_seconds(pred['decode_s'])}")
    t.add_row("tokens per row per round", f"{pred['tokens_per_round']:.2f}")
    t.add_row("peak GPU / pinned host memory", f"{fmt_bytes(pred['peak_gpu_bytes'])} / {fmt_bytes(pred['peak_pinned_bytes'])}")
    t.add_row("utilisation", ", ".join(f"{k} {v:.0%}" for k, v in pred["utilisation"].items() if v > 0))
    top = sorted(pred["stage_s"].items(), key=lambda kv: -kv[1])[:6]
    t.add_row("largest stage times", ", ".join(f"{k} {fmt_seconds(v)}" for k, v in top))
    t.add_row("search", f"{res.shapes_considered} shapes, {len(res.ranked)} simulated, solver {res.solver}")
    if res.formats:  # --weights auto, or a kernel choice the profile measured (FORMAT or FORMAT+fused)
        ranked = sorted(res.formats.items(), key=lambda kv: -(kv[1] or 0.0))
        t.add_row("formats weighed", "; ".join(f"{label} {'no plan' if v is None else f'{v:.2f} tok/s'}"
                                               for label, v in ranked))
    return t


def candidates_table(res: OptimizeResult) -> Table:
    t = Table(title="Candidates (program estimate vs simulator, best simulated first)")
    for col in ("#", "plan", "program tok/s", "simulated tok/s", "vs best"):
        t.add_column(col)
    best = res.best.tok_s
    for i, r in enumerate(res.ranked, 1):
        t.add_row(str(i), _describe(r), f"{r.candidate.estimate_tok_s:.2f}", f"{r.tok_s:.2f}", f"{r.tok_s / best:.2f}x")
    return t


def sensitivity(best: Ranked, target, draft, profile, workload) -> list[tuple[str, str, float]]:
    """How the best plan's simulated throughput moves with gamma, batch, acceptance, its spread
    between rows, and link."""
    from specplan.simulator.cli import default_placement
    from specplan.simulator.run import simulate

    from .optimize import minimal_placement

    rows: list[tuple[str, str, float]] = []
    cfg = to_sim_config(best.candidate, target, draft, profile, workload)
    sch = cfg.schedule

    def run(label: str, value: str, c) -> None:
        try:
            rows.append((label, value, simulate(c).throughput_tok_s))
        except InfeasibleError:
            rows.append((label, value, float("nan")))

    if sch.speculative:
        for g in sorted({max(1, sch.gamma + d) for d in (-2, -1, 1, 2)} - {sch.gamma}):
            run("gamma", str(g), replace(cfg, schedule=replace(sch, gamma=g)))
    for factor in (0.5, 2.0):
        b = max(1, int(sch.target_batch * factor))
        s2 = replace(sch, target_batch=b, prefill_chunk=min(sch.prefill_chunk, b * sch.num_batches))
        shape = replace(best.candidate.shape, target_batch=b, prefill_chunk=s2.prefill_chunk)
        pl, _ = minimal_placement(target, draft, shape, workload, profile)
        if pl is None:
            rows.append(("rows per batch", str(b), float("nan")))
            continue
        run("rows per batch", str(b), replace(cfg, schedule=s2, placement=default_placement(target, draft, s2, workload, profile)))
    if sch.speculative:
        for a in (0.5, 0.6, 0.8, 0.9):
            if abs(a - (workload.acceptance if isinstance(workload.acceptance, float) else -1)) > 1e-9:
                run("acceptance", f"{a:g}", replace(cfg, workload=workload.at_acceptance(a)))
        # rows that differ in acceptance: a static batch waits for its slowest row
        cap = max_acceptance_spread(workload.mean_acceptance)
        for spread in (0.05, 0.1, 0.2):
            if spread < cap and abs(spread - workload.acceptance_spread) > 1e-9:
                run("acceptance spread", f"{spread:g}", replace(cfg, workload=replace(workload, acceptance_spread=spread)))
    for gen in ("3", "4", "5"):
        try:
            p2 = profile.compose(pcie=gen)
        except Exception:  # noqa: BLE001
            continue
        if p2.link.h2d_pinned.bytes_per_s != profile.link.h2d_pinned.bytes_per_s:
            run("link", p2.link.name, replace(cfg, profile=p2))
    return rows


def optimize_cmd(
    gpu: Annotated[str, typer.Option(help="Hardware profile: shipped name (specplan hardware) or a JSON file.")] = "rtx4090",
    target: Annotated[str, typer.Option(help="Target model: preset, directory or config.json.")] = "mixtral-8x7b",
    dtype: Annotated[Optional[str], typer.Option(
        help="Compute dtype of the models: float32 | bfloat16 | float16 (default: the model's own). "
             "The plan records it and specrun runs in it.")] = None,
    draft: Annotated[Optional[str], typer.Option(
        help="Draft model, self:FORMAT[:LAYERS], or 'none' for non-speculative plans only. Default: the draft the "
             "target's preset names (mixtral-8x7b: mistral-7b-v0.2; qwen3-*: qwen3-0.6b), else none.")] = None,
    prompt_len: Annotated[int, typer.Option(help="Prompt length in tokens.")] = 512,
    gen_len: Annotated[int, typer.Option(help="Tokens to generate per prompt.")] = 128,
    num_prompts: Annotated[int, typer.Option(help="Prompts in the workload (caps the rows in flight).")] = 512,
    acceptance: Annotated[float, typer.Option(help="Per-token acceptance rate of the draft, in [0, 1].")] = 0.7,
    acceptance_spread: Annotated[float, typer.Option(help="Standard deviation of the acceptance between rows (specrun reports it); 0: rows alike.")] = 0.0,
    workload_file: Annotated[Optional[str], typer.Option("--workload", help="Workload JSON (overrides the four flags above).")] = None,
    policy: Annotated[list[str], typer.Option(help="Restrict to these policies (repeatable).")] = [],  # noqa: B006
    admission: Annotated[list[str], typer.Option(help="Restrict to these admission modes (repeatable): waves (static batches) | continuous (freed rows refilled, prompts prefilled inside decode passes).")] = [],  # noqa: B006
    out_path: Annotated[str, typer.Option("--out", help="Where to write the plan.")] = "plan.json",
    explain: Annotated[bool, typer.Option("--explain", help="Show how throughput moves with gamma, batch, acceptance and link.")] = False,
    pcie: PcieOpt = None, host: HostOpt = None, host_mem: HostMemOpt = None, gpu_mem: GpuMemOpt = None,
    weights: WeightsOpt = None, as_json: JsonOpt = False,
) -> None:
    """Find the best plan: placement, batch sizes, gamma and schedule, checked by the simulator."""
    from specplan.formats import parse_weights

    profile = profile_from_flags(gpu, pcie, host, host_mem, gpu_mem)
    tgt = ModelSpec.resolve(target)
    if dtype:  # the compute dtype of both models (specrun takes it from the plan)
        tgt = tgt.with_dtype(dtype)
    draft = draft if draft is not None else tgt.natural_draft or "none"
    drf = resolve_draft(draft, tgt)
    if dtype and drf is not None and not drf.self_draft:
        drf = drf.with_dtype(dtype)
    choice = parse_weights(weights)
    if drf is not None and drf.vocab != tgt.vocab:
        err.print(f"[yellow]warning:[/] draft vocab {drf.vocab} != target vocab {tgt.vocab}; speculative decoding needs a shared tokenizer")
    workload = (Workload.from_file(workload_file) if workload_file
                else Workload.make(prompt_len, gen_len, num_prompts, acceptance, source="argument",
                                   acceptance_spread=acceptance_spread))
    bad = [p for p in policy if p not in POLICIES]
    if bad:
        raise InputError("argument", "--policy", f"unknown {', '.join(bad)}", " | ".join(POLICIES))
    if drf is None and policy and all(p in ("specoffload", "spec-serial") for p in policy):
        raise InputError("argument", "--policy", f"{', '.join(policy)} drafts tokens and --draft is none",
                         "a --draft model, or --policy flexgen | sequential")
    bad = [a for a in admission if a not in ADMISSIONS]
    if bad:
        raise InputError("argument", "--admission", f"unknown {', '.join(bad)}", " | ".join(ADMISSIONS))
    workload.check_positions(workload_file or "argument", tgt, drf)
    asked = draft
    draft, drf = self_draft_depth(draft, tgt, drf, profile, workload, tuple(admission) or ADMISSIONS)
    if draft != asked and not as_json:
        err.print(f"self-draft: {drf.layers} of {tgt.layers} layers fit beside the target ({draft})")
    pairs = weight_candidates(choice, tgt, drf, profile)
    check_writable(out_path, "--out")
    check_not_inputs([("--out", out_path)], [("--gpu", profile_path(gpu)), ("--workload", workload_file),
                                             ("--target", ModelSpec.files_of(target)),
                                             ("--draft", ModelSpec.files_of(draft))])
    from specplan.progress import steps

    with steps(err, "optimizing", quiet=as_json) as bar:
        res, tgt, drf = optimize_formats(pairs, profile, workload, tuple(policy) or POLICIES,
                                         tuple(admission) or ADMISSIONS, bar)
    plan = make_plan(res.best, target, draft if drf else None, tgt, drf, profile, workload)
    plan.save(out_path)
    non_spec = res.best_of(("flexgen", "sequential"))
    sens = sensitivity(res.best, tgt, drf, profile, workload) if explain else []
    if as_json:
        return print_json({"plan": plan.to_dict(), "plan_path": out_path,
                           "candidates": [{"shape": r.candidate.shape.__dict__, "placement": r.candidate.placement.__dict__,
                                           "program_tok_s": r.candidate.estimate_tok_s, "simulated_tok_s": r.tok_s}
                                          for r in res.ranked],
                           "best_non_speculative_tok_s": non_spec.tok_s if non_spec else None,
                           "unsimulated_program_tok_s": {p: c.estimate_tok_s for p, c in res.unsimulated.items()},
                           "infeasible": res.infeasible,
                           "formats_weighed_tok_s": res.formats,
                           "sensitivity": [{"vary": a, "value": b, "simulated_tok_s": c} for a, b, c in sens]})
    out.print(summary_table(plan, res))
    out.print(placement_table(plan, tgt))
    out.print(candidates_table(res))
    if non_spec is not None and res.best.candidate.shape.policy not in ("flexgen", "sequential"):
        out.print(f"Best non-speculative plan: {_describe(non_spec)} at {non_spec.tok_s:.2f} tok/s; "
                  f"the chosen plan is {res.best.tok_s / non_spec.tok_s:.2f}x that.")
    for p, c in res.unsimulated.items():
        out.print(f"{p}: best {c.shape.num_batches} x {c.shape.target_batch} rows at {c.estimate_tok_s:.2f} tok/s by the "
                  f"program, not simulated: {SIM_OVER_ESTIMATE}x that is below a plan simulated before it")
    for p, why in res.infeasible.items():
        out.print(f"[yellow]{p}: no plan[/] ({why})")
    if sens:
        t = Table(title="Sensitivity around the best plan (simulated)")
        for col in ("vary", "value", "tok/s", "vs best"):
            t.add_column(col)
        for a, b, c in sens:
            t.add_row(a, b, "does not fit" if c != c else f"{c:.2f}", "" if c != c else f"{c / res.best.tok_s - 1:+.0%}")
        out.print(t)
        util = res.best.sim.utilisation
        top = max(util, key=util.get)
        out.print(f"Busiest resource: {top} at {util[top]:.0%} of the wall time.")
    err.print(f"wrote {out_path}")

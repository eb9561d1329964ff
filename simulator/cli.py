"""`specplan simulate`: replay a plan (a plan.json or flags) and print what the simulator saw."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from specplan.cli import (GpuMemOpt, HostMemOpt, HostOpt, JsonOpt, PcieOpt, WeightsOpt, err, given_options, memory_caps,
                          out, print_json, profile_from_flags)
from specplan.errors import InfeasibleError, InputError
from specplan.fileio import check_not_inputs, check_writable
from specplan.hardware import profile_path
from specplan.memory import least_placement, placement_ladder, plan_memory
from specplan.models import ModelSpec
from specplan.plan import Placement, Plan, Schedule
from specplan.units import fmt_bytes, fmt_seconds
from specplan.workload import Workload

from .run import SimConfig, SimResult, simulate


def default_placement(target: ModelSpec, draft: ModelSpec | None, schedule: Schedule, workload: Workload,
                      profile) -> Placement:
    """A reasonable placement for a schedule given by flags: the planner's first fitting
    placement (draft KV on the GPU if it fits, ...), then as many FFN layers resident on the
    GPU as fit. The planner optimises this properly. If nothing fits, the placement that
    needs least (the ladder's last rung), so the simulator can say what does not fit (or run
    with --ignore-memory)."""
    best, _ = least_placement(target, draft, schedule, workload, profile)
    if best is None:
        return placement_ladder()[-1]
    lo, hi = 0, target.layers
    while lo < hi:  # largest ffn_gpu_layers that still fits
        mid = (lo + hi + 1) // 2
        if plan_memory(target, draft, schedule, replace(best, ffn_gpu_layers=mid), workload).violations(profile):
            hi = mid - 1
        else:
            lo = mid
    return replace(best, ffn_gpu_layers=lo)


def result_table(title: str, r: SimResult) -> Table:
    t = Table(title=title, show_header=False)
    t.add_column("metric")
    t.add_column("value")
    t.add_row("throughput", f"[bold]{r.throughput_tok_s:.2f} tok/s[/]")
    t.add_row("rows in flight / waves", f"{r.rows} / {r.waves}")
    t.add_row("time (one wave)", f"{fmt_seconds(r.total_s)} (prefill {fmt_seconds(r.prefill_s)}, decode {fmt_seconds(r.decode_s)})")
    t.add_row("time (all prompts)", fmt_seconds(r.workload_s))
    t.add_row("tokens generated (one wave)", f"{r.generated_tokens:.0f}")
    t.add_row("rounds / tokens per row per round", f"{r.rounds} / {r.tokens_per_round:.2f}")
    t.add_row("peak GPU / pinned memory", f"{fmt_bytes(r.peak_gpu_bytes)} / {fmt_bytes(r.peak_pinned_bytes)}")
    t.add_row("utilisation", ", ".join(f"{k} {v:.0%}" for k, v in r.utilisation.items() if v > 0))
    for stage, s in sorted(r.stage_s.items(), key=lambda kv: -kv[1]):
        t.add_row(f"  stage {stage}", f"{fmt_seconds(s)} ({s / r.total_s:.0%} of wall)")
    t.add_row("events / wall", f"{r.events} / {r.wall_s:.2f} s")
    return t


COMPARE = ("specoffload", "spec-serial", "flexgen", "sequential")
# the flags a --plan fixes (refused beside it); the others apply to it
PLAN_SETS = {"gpu", "target", "draft", "policy", "batch", "num_batches", "prefill_chunk", "admission", "prefill_tokens",
             "draft_batch", "gamma", "attention", "prompt_len", "gen_len", "num_prompts", "acceptance",
             "acceptance_spread", "weights"}



def same_rows_schedule(base: Schedule, policy: str, gamma: int) -> Schedule:
    """Each policy with the same rows in flight as `base`, for a like-for-like comparison; the
    speculative ones draft `gamma` tokens a round (a non-speculative base has none)."""
    rows = base.rows
    if policy == "specoffload":
        return replace(base, policy=policy, num_batches=2, target_batch=max(1, rows // 2), gamma=gamma,
                       prefetch_depth=max(1, base.prefetch_depth))
    if policy == "spec-serial":
        return replace(base, policy=policy, num_batches=1, target_batch=rows, gamma=gamma)
    if policy == "flexgen":
        return replace(base, policy=policy, gamma=0, num_batches=2, target_batch=max(1, rows // 2),
                       prefetch_depth=max(1, base.prefetch_depth))
    return replace(base, policy=policy, gamma=0, num_batches=1, target_batch=rows, prefetch_depth=0)


def _window(text: str) -> tuple[float, float]:
    """START:END in seconds, START < END, both finite and >= 0."""
    import math

    expected = "START:END in seconds with START < END, e.g. 100:130"
    try:
        lo, hi = (float(v) for v in text.split(":"))
    except ValueError:
        raise InputError("argument", "--window", f"got {text!r}", expected) from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
        raise InputError("argument", "--window", f"got {text!r}", expected)
    return lo, hi


def simulate_cmd(
    plan: Annotated[Optional[str], typer.Option("--plan", help="A plan.json from `specplan optimize`: it sets the machine, models, schedule and workload (those flags are refused beside it); --pcie, --host, --host-mem, --gpu-mem, --mode, --seed, --compare and the outputs apply to it.")] = None,
    gpu: Annotated[str, typer.Option(help="Hardware profile: shipped name or JSON file.")] = "rtx4090",
    target: Annotated[str, typer.Option(help="Target model: preset, directory or config.json.")] = "mixtral-8x7b",
    draft: Annotated[str, typer.Option(help="Draft model (speculative policies), or 'none' (flexgen and sequential only).")] = "mistral-7b-v0.2",
    policy: Annotated[str, typer.Option(help="specoffload | spec-serial | flexgen | sequential")] = "specoffload",
    batch: Annotated[int, typer.Option(help="Rows per batch.")] = 256,
    num_batches: Annotated[Optional[int], typer.Option(help="Batches (specoffload: 2; flexgen: micro-batches, default 2; sequential and spec-serial: batches run one after another, default 1).")] = None,
    prefill_chunk: Annotated[int, typer.Option(help="Rows per prefill pass (waves).")] = 64,
    admission: Annotated[str, typer.Option(help="waves (static batches, prefill passes) | continuous (freed rows refilled, prompts prefilled inside decode passes)")] = "waves",
    prefill_tokens: Annotated[int, typer.Option(help="Continuous: prompt tokens one pass may carry beside its decode rows.")] = 512,
    draft_batch: Annotated[int, typer.Option(help="Speculative policies: rows the draft processes at once.")] = 16,
    gamma: Annotated[int, typer.Option(help="Speculative policies: tokens drafted per round.")] = 7,
    attention: Annotated[str, typer.Option(help="Target decode attention device: cpu | gpu.")] = "cpu",
    prompt_len: Annotated[int, typer.Option(help="Prompt length in tokens.")] = 512,
    gen_len: Annotated[int, typer.Option(help="Tokens to generate per prompt.")] = 128,
    num_prompts: Annotated[int, typer.Option(help="Prompts in the workload.")] = 512,
    acceptance: Annotated[float, typer.Option(help="Per-token acceptance rate of the draft, in [0, 1].")] = 0.7,
    acceptance_spread: Annotated[float, typer.Option(help="Standard deviation of the acceptance between rows (specrun reports it); 0: rows alike.")] = 0.0,
    mode: Annotated[str, typer.Option(help="sampled (per-row acceptance, seeded) | expected")] = "sampled",
    seed: Annotated[int, typer.Option(min=0, help="Seed for per-row acceptance.")] = 0,
    compare: Annotated[bool, typer.Option("--compare", help="Also run every other policy with the same rows in flight.")] = False,
    ignore_memory: Annotated[bool, typer.Option("--ignore-memory", help="Simulate even if the plan does not fit.")] = False,
    trace: Annotated[Optional[str], typer.Option("--trace", help="Write a Chrome trace-event JSON (Perfetto).")] = None,
    gantt: Annotated[Optional[str], typer.Option("--gantt", help="Write a Gantt chart PNG.")] = None,
    window: Annotated[Optional[str], typer.Option("--window", help="Gantt time window in seconds, START:END.")] = None,
    pcie: PcieOpt = None, host: HostOpt = None, host_mem: HostMemOpt = None, gpu_mem: GpuMemOpt = None,
    weights: WeightsOpt = None, as_json: JsonOpt = False,
    ctx: typer.Context = None,
) -> None:
    """Simulate offloaded (speculative) inference on a machine you may not have."""
    from specplan.formats import parse_weights
    from specplan.models import apply_weights, resolve_draft

    given = given_options(ctx)
    opt = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    if plan:
        fixed = sorted(given & PLAN_SETS)
        if fixed:
            keeps = sorted(opt(k) for k in set(ctx.params) - PLAN_SETS - {"plan", "as_json"})
            raise InputError("argument", opt(fixed[0]), "is set by --plan, which would ignore it",
                             f"--plan alone (with {', '.join(keeps)}), or no --plan")
        p = Plan.load(plan)
        tgt = ModelSpec.resolve(p.target)
        tgt, drf = apply_weights(tgt, resolve_draft(p.draft, tgt, "draft"), p.weight_formats(), plan)
        profile = p.hardware_profile().compose(pcie=pcie, host=host, **memory_caps(host_mem, gpu_mem))
        workload = Workload.from_dict(p.workload, plan)
        schedule, placement = p.schedule, p.placement
    else:
        if num_batches is None:
            num_batches = 2 if policy in ("specoffload", "flexgen") else 1
        speculative = policy in ("specoffload", "spec-serial")
        # the draft's flags do nothing for a policy without one (unless --compare runs those that have one)
        unused = ([k for k in ("gamma", "draft_batch") if k in given] if not speculative and not compare else []) \
            + (["prefill_tokens"] if admission == "waves" and "prefill_tokens" in given else [])
        if unused:
            why = f"{policy} drafts no tokens" if unused[0] != "prefill_tokens" else "waves admission prefills in chunks"
            raise InputError("argument", opt(unused[0]), f"does nothing here: {why}",
                             "a speculative --policy with it" if unused[0] != "prefill_tokens"
                             else "--admission continuous with it, or --prefill-chunk")
        if policy == "specoffload" and num_batches != 2:
            raise InputError("argument", "--num-batches", f"{num_batches} with specoffload, whose two batches "
                             "alternate", "2")
        if speculative and draft.lower() == "none":
            raise InputError("argument", "--policy", f"{policy} drafts tokens and --draft is none",
                             "a --draft model, or --policy flexgen | sequential")
        schedule = Schedule(policy=policy, target_batch=batch, num_batches=num_batches, prefill_chunk=prefill_chunk,
                            draft_batch=draft_batch, gamma=gamma if speculative else 0, attention_device=attention,
                            prefetch_depth=0 if policy == "sequential" else 1, admission=admission,
                            prefill_tokens=prefill_tokens).validate("argument")
        tgt = ModelSpec.resolve(target)
        drf = resolve_draft(draft, tgt) if speculative or compare else None
        choice = parse_weights(weights)
        if choice.auto:
            raise InputError("argument", "--weights", "auto: simulate runs the formats it is given; the planner "
                             "chooses among formats", "fixed formats, or specplan optimize --weights auto")
        tgt, drf = apply_weights(tgt, drf, choice.fixed)
        profile = profile_from_flags(gpu, pcie, host, host_mem, gpu_mem)
        workload = Workload.make(prompt_len, gen_len, num_prompts, acceptance, seed=seed, source="argument",
                                 acceptance_spread=acceptance_spread)
        placement = default_placement(tgt, drf, schedule, workload, profile)
    if mode not in ("sampled", "expected"):
        raise InputError("argument", "--mode", f"got {mode!r}", "sampled | expected")
    win = _window(window) if window else None
    if window and not gantt:
        raise InputError("argument", "--window", "is given without --gantt", "--gantt FILE.png --window START:END")
    if gantt and Path(gantt).suffix.lower() != ".png":
        raise InputError("argument", "--gantt", f"{gantt} does not end in .png, and the chart is a PNG", "FILE.png")
    workload.check_positions(plan or "argument", tgt, drf if schedule.speculative else None,
                             extra_tokens=schedule.gamma if schedule.speculative else 0)
    for path, flag in ((trace, "--trace"), (gantt, "--gantt")):
        if path:
            check_writable(path, flag)
    check_not_inputs([("--trace", trace), ("--gantt", gantt)],
                     [("--plan", plan), ("--gpu", profile_path(gpu)), ("--target", ModelSpec.files_of(target)),
                      ("--draft", ModelSpec.files_of(draft))])

    want_spans = bool(trace or gantt)
    cfg = SimConfig(tgt, drf, profile, workload, schedule, placement, mode=mode, check_memory=not ignore_memory)
    if not as_json and err.is_terminal:  # progress: a terminal's only
        err.print(f"simulating {schedule.policy} on {profile.name} ...")
    res = simulate(cfg, record_spans=want_spans, seed=seed)
    results = {schedule.policy: res}
    others: dict[str, str] = {}
    if compare:
        for pol in COMPARE:
            if pol == schedule.policy:
                continue
            sch = same_rows_schedule(schedule, pol, schedule.gamma or gamma)
            if sch.speculative and drf is None:
                others[pol] = "drafts tokens, and the plan has no draft" if plan else "drafts tokens, and --draft is none"
                continue
            pl = default_placement(tgt, drf, sch, workload, profile)
            try:
                results[pol] = simulate(SimConfig(tgt, drf if sch.speculative else None, profile, workload, sch, pl,
                                                  mode=mode, check_memory=not ignore_memory), seed=seed)
            except InfeasibleError as e:
                others[pol] = str(e)
    if trace and res.spans is not None:
        from .trace import write_chrome_trace

        write_chrome_trace(res.spans, trace, f"{schedule.policy} on {profile.name}")
        err.print(f"wrote {trace}")
    if gantt and res.spans is not None:
        from .trace import write_gantt

        if win is not None and win[0] >= res.total_s:
            raise InputError("argument", "--window", f"starts at {win[0]:g} s, after the run's end at {res.total_s:.1f} s",
                             f"a window inside 0:{res.total_s:.1f}")
        write_gantt(res.spans, gantt, f"{schedule.policy} ({schedule.admission}): {tgt.name} + "
                    f"{drf.name if drf else 'no draft'} on {profile.name}", window_s=win, marks=res.marks)
        err.print(f"wrote {gantt}")

    if as_json:
        return print_json({"profile": profile.name, "schedule": schedule.__dict__, "placement": placement.__dict__,
                           "results": {k: v.to_dict() for k, v in results.items()}, "infeasible": others})
    out.print(result_table(f"{schedule.policy}: {tgt.name} + {drf.name if drf and schedule.speculative else 'no draft'} "
                           f"on {profile.name}", res))
    if compare:
        t = Table(title=f"Policies with {schedule.rows} rows in flight (acceptance {workload.mean_acceptance:g})")
        for col in ("policy", "tok/s", f"vs {schedule.policy}", "rounds", "tok/row/round", "GPU util", "H2D util"):
            t.add_column(col)
        base = res.throughput_tok_s
        for pol, r in sorted(results.items(), key=lambda kv: -kv[1].throughput_tok_s):
            t.add_row(pol, f"{r.throughput_tok_s:.2f}", f"{r.throughput_tok_s / base:.2f}x", str(r.rounds),
                      f"{r.tokens_per_round:.2f}", f"{r.utilisation['gpu']:.0%}", f"{r.utilisation['h2d']:.0%}")
        for pol, why in others.items():
            t.add_row(pol, "does not fit", "", "", "", "", why[:60])
        out.print(t)
        rest = [r for p_, r in results.items() if p_ != schedule.policy]
        if rest:
            best_other = max(rest, key=lambda r: r.throughput_tok_s)
            name = next(p_ for p_, r in results.items() if r is best_other)
            out.print(f"{schedule.policy} is {base / best_other.throughput_tok_s:.2f}x the best other policy ({name}).")

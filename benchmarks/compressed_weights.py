"""What compressed weights buy, simulated: for each scenario, the best plan (planner +
simulator, every policy) with the weights in the model's dtype and in each format, and the
ratio of each to the dtype's. Formats apply to the target's attention and experts / MLP and
to the draft's layers (`--weights FORMAT`); `auto` lets the planner choose per group.

    python benchmarks/compressed_weights.py [--only mixtral-8x7b] [--quality quality.json] [--json out.json]

Deterministic (a simulation, on datasheet profiles): the machine's load does not matter.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from specplan.cli import profile_from_flags
from specplan.fileio import write_json
from specplan.formats import parse_weights
from specplan.models import ModelSpec, pair_weights
from specplan.plan import ADMISSIONS, POLICIES
from specplan.planner.optimize import optimize_formats, weight_candidates
from specplan.workload import Workload


@dataclass(frozen=True)
class Scenario:
    name: str
    target: str
    draft: str
    gpu: str = "rtx4090"
    pcie: str | None = None
    host_mem: str | None = None


SCENARIOS = (
    Scenario("mixtral-8x7b", "mixtral-8x7b", "mistral-7b-v0.2"),
    Scenario("llama-3.3-70b", "llama-3.3-70b", "llama-3.2-1b", pcie="4", host_mem="128GB"),
    Scenario("mixtral-8x22b", "mixtral-8x22b", "mistral-7b-v0.2", pcie="4", host_mem="448GB"),
)
FORMATS = ("", "int8", "fp8", "int4g128", "int4g64", "int4g32", "experts=int4g64,attention=int8", "auto")


def best(sc: Scenario, weights: str, workload: Workload) -> dict:
    profile = profile_from_flags(sc.gpu, sc.pcie, None, sc.host_mem, None)
    tgt, drf = ModelSpec.resolve(sc.target), ModelSpec.resolve(sc.draft)
    pairs = weight_candidates(parse_weights(weights or None), tgt, drf, profile)
    t0 = time.perf_counter()
    res, t, d = optimize_formats(pairs, profile, workload, POLICIES, ADMISSIONS)
    r = res.best
    s = r.candidate.shape
    stages = r.sim.stage_s
    return {"weights": weights or "dtype", "chosen": pair_weights(t, d if s.gamma else None).describe(),
            "policy": s.policy, "rows": f"{s.num_batches}x{s.target_batch}", "gamma": s.gamma, "tok_s": r.tok_s,
            "h2d_s": stages.get("h2d", 0.0) + stages.get("prefill.h2d", 0.0),
            "cpu_attention_s": stages.get("target_attention", 0.0), "plan_s": time.perf_counter() - t0}


def drafts(quality: dict[str, float], rows: list) -> None:
    """The target as its own draft, compressed (all its layers: the acceptance measured is a
    whole model's), against a separate draft and no draft, with the target's layers in
    int4g64. A self-draft's acceptance is the greedy agreement its format measured on
    SmolLM2-135M (benchmarks/weight_quality.py); the separate draft's is the default 0.7."""
    from specplan.models import resolve_draft

    for sc, gpu in ((SCENARIOS[0], "rtx4090"), (SCENARIOS[0], "h100-pcie")):
        print(f"\n{sc.target} (layers int4g64) on {gpu}: drafts")
        print(f"{'draft':18} {'acceptance':>10} {'best plan':24} {'tok/s':>8}   best speculative plan")
        profile = profile_from_flags(gpu, None, None, None, None)
        tgt = ModelSpec.resolve(sc.target)
        for name, acc in [("none", 0.7), (sc.draft, 0.7)] + [(f"self:{f}", a) for f, a in quality.items()]:
            drf = resolve_draft(name, tgt)
            wl = Workload.make(512, 128, 512, acc, source="benchmark")
            res, _, _ = optimize_formats(weight_candidates(parse_weights("int4g64"), tgt, drf, profile), profile, wl,
                                         POLICIES, ADMISSIONS)
            r, s = res.best, res.best.candidate.shape
            spec = res.best_of(("specoffload", "spec-serial"))
            unsim = [f"{p}: program {c.estimate_tok_s:.1f} tok/s, not simulated" for p, c in res.unsimulated.items()
                     if p in ("specoffload", "spec-serial")]
            why = "" if drf is None else (f"{spec.candidate.shape.policy} {spec.tok_s:.1f} tok/s" if spec else
                                          "; ".join([f"{p}: {w[:60]}" for p, w in res.infeasible.items()] + unsim))
            rows.append({"scenario": f"drafts {gpu}", "draft": name, "acceptance": acc, "policy": s.policy,
                         "rows": f"{s.num_batches}x{s.target_batch}", "tok_s": r.tok_s,
                         "speculative_tok_s": spec.tok_s if spec else None, "speculative": why})
            print(f"{name:18} {acc:10.3f} {s.policy + ' ' + f'{s.num_batches}x{s.target_batch}':24} {r.tok_s:8.1f}   {why}",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", help="scenario name (repeatable)")
    ap.add_argument("--quality", help="benchmarks/weight_quality.py --json output: adds the self-draft table")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    workload = Workload.make(512, 128, 512, 0.7, source="benchmark")
    rows = []
    if args.quality:
        import json
        from pathlib import Path

        measured = {r["weights"]: r["agreement"] for r in json.loads(Path(args.quality).read_text())
                    if r.get("agreement") and r["weights"] in ("int8", "int4g64")}
        drafts(measured, rows)
    for sc in SCENARIOS:
        if args.only and sc.name not in args.only:
            continue
        print(f"\n{sc.name} + {sc.draft} on {sc.gpu}" + (f", PCIe {sc.pcie}" if sc.pcie else "")
              + (f", {sc.host_mem} host" if sc.host_mem else "") + ": prompt 512, gen 128, 512 prompts, acceptance 0.7")
        print(f"{'--weights':32} {'chosen formats':44} {'policy':12} {'rows':8} {'tok/s':>8} {'x dtype':>8} "
              f"{'h2d s':>8} {'CPU attn s':>10}")
        base = None
        for w in FORMATS:
            row = best(sc, w, workload) | {"scenario": sc.name}
            base = base or row["tok_s"]
            row["ratio"] = row["tok_s"] / base
            rows.append(row)
            print(f"{row['weights']:32} {row['chosen'][:44]:44} {row['policy']:12} {row['rows']:8} {row['tok_s']:8.1f} "
                  f"{row['ratio']:8.2f} {row['h2d_s']:8.1f} {row['cpu_attention_s']:10.1f}", flush=True)
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()

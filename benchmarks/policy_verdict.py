"""Which policy wins, and by how much: the best simulated plan of each policy (from the
planner) for Mixtral + Mistral-7B on datasheet profiles, scenario by scenario. This is the
table of docs/validation.md section 4.

For each scenario it prints the four policies' best throughput (sampled per-row
acceptance, the default), the specoffload plan's ratio to the best non-speculative plan
(flexgen or sequential) and to the best plan overall, and the same specoffload plan
simulated in expected-value mode: every row gains E tokens per round, so no row lags and
there is no slowest-row tail. The gap between the two columns is what the tail costs.

    python benchmarks/policy_verdict.py [--only defaults] [--acceptance-spread 0.1] [--json out.json]

Takes about 10 s per scenario on a 2-core machine.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

from specplan.cli import profile_from_flags
from specplan.fileio import write_json
from specplan.models import ModelSpec
from specplan.plan import POLICIES
from specplan.planner.optimize import optimize, to_sim_config
from specplan.simulator.run import simulate
from specplan.workload import Workload


@dataclass(frozen=True)
class Scenario:
    name: str
    gpu: str = "rtx4090"
    target: str = "mixtral-8x7b"
    pcie: str | None = None
    host_mem: str | None = None
    workload: dict = field(default_factory=dict)  # Workload.make keywords


SCENARIOS = (
    Scenario("defaults"),
    Scenario("128 GB host", host_mem="128GB"),
    Scenario("PCIe 3.0", pcie="3"),
    Scenario("PCIe 5.0", pcie="5"),
    Scenario("acceptance 0.8, generation 512", workload={"acceptance": 0.8, "gen_len": 512}),
    Scenario("2048 prompts", workload={"num_prompts": 2048}),
    Scenario("Mixtral-8x22B, 512 GB host", target="mixtral-8x22b", host_mem="512GB"),
    Scenario("A100-80GB (PCIe 4.0)", gpu="a100-80gb"),
)


def describe(r) -> str:
    s = r.candidate.shape
    rows = f"{s.num_batches}x{s.target_batch}" + (", cont." if s.admission == "continuous" else "")
    return f"{rows}, g{s.gamma}" + (", kv recompute" if s.recompute else "") if s.gamma else rows


def run(sc: Scenario, spread: float = 0.0) -> dict:
    profile = profile_from_flags(sc.gpu, sc.pcie, None, sc.host_mem, None)
    target, draft = ModelSpec.from_preset(sc.target), ModelSpec.from_preset("mistral-7b-v0.2")
    wl = Workload.make(**{"prompt_len": 512, "gen_len": 128, "num_prompts": 512, "acceptance": 0.7,
                          "acceptance_spread": spread, **sc.workload})
    t0 = time.perf_counter()
    res = optimize(target, draft, profile, wl)
    best = {p: res.best_of((p,)) for p in POLICIES}
    row = {"scenario": sc.name, "wall_s": 0.0,
           "policies": {p: ({"tok_s": r.tok_s, "plan": describe(r)} if r else None) for p, r in best.items()},
           "infeasible": res.infeasible}
    so = best["specoffload"]
    if so is not None:
        expected = simulate(to_sim_config(so.candidate, target, draft, profile, wl, mode="expected"))
        plain = [r.tok_s for p, r in best.items() if r is not None and p in ("flexgen", "sequential")]
        row["specoffload_vs_best_plain"] = so.tok_s / max(plain) if plain else None
        row["specoffload_vs_best"] = so.tok_s / res.best.tok_s
        row["specoffload_expected_tok_s"] = expected.throughput_tok_s
        row["specoffload_rounds"] = {"sampled": so.sim.rounds, "expected": expected.rounds}
    row["wall_s"] = time.perf_counter() - t0
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", default=[], help="run only the scenario(s) with this name")
    ap.add_argument("--json", dest="json_path", help="also write the rows as JSON here")
    ap.add_argument("--acceptance-spread", type=float, default=0.0,
                    help="how much acceptance differs between rows (standard deviation), every scenario")
    args = ap.parse_args()
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only]
    if not chosen:
        ap.error(f"--only: no scenario named {args.only}; choose from {[s.name for s in SCENARIOS]}")
    cols = ("spec-serial", "flexgen", "specoffload", "sequential")
    print(f"{'scenario':32} " + " ".join(f"{c:>22}" for c in cols)
          + f" {'SO/plain':>8} {'SO/best':>8} {'SO exp.':>8}")
    rows = []
    for sc in chosen:
        r = run(sc, args.acceptance_spread)
        rows.append(r)
        cells = []
        for c in cols:
            v = r["policies"][c]
            cells.append(f"{v['tok_s']:7.1f} ({v['plan']})".rjust(22) if v else f"{'no plan':>22}")
        so = r["policies"]["specoffload"]
        plain = r.get("specoffload_vs_best_plain")
        tail = (f" {f'{plain:.2f}x' if plain else '-':>8} {r['specoffload_vs_best']:7.2f}x "
                f"{r['specoffload_expected_tok_s']:8.1f}") if so else ""
        print(f"{sc.name:32} " + " ".join(cells) + tail, flush=True)
    print("tok/s simulated, best plan of each policy (no plan: see the JSON's infeasible); SO/plain: specoffload over the best of flexgen and "
          "sequential; SO exp.: the same specoffload plan with every row gaining E tokens per round (no tail)")
    if args.json_path:
        write_json(args.json_path, rows)


if __name__ == "__main__":
    main()

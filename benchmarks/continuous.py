"""Continuous admission against static waves: what the planner predicts, and what the engine does.

Part 1, simulated: for each scenario the planner is run twice in one process, once over
waves shapes only and once over continuous shapes only (`specplan optimize --admission ...`),
and the best plan of each is printed with its simulated throughput and the ratio.

Part 2, the engine on this CPU: tiny-llama shapes with random weights as the target and a
noisy copy as the draft (as benchmarks/tail_check.py), 4x more prompts than rows, prompt
lengths 8..40; spec-serial and flexgen, waves and continuous, interleaved, median wall time
of --repeat runs; the measured pass count against the simulator's, both replaying the run's
own outcomes (equal by construction: one scheduler) and sampling at the acceptance the run
measured.

    python benchmarks/continuous.py [--part 1|2] [--repeat 5] [--json out.json]

Part 1 takes a few minutes on 2 cores (4096-prompt jobs are simulated over 4 waves' worth of
prompts and extrapolated); part 2 about a minute. Check the load first: nothing else should run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass, field

import torch

from specplan.hardware import load_profile
from specplan.models import ModelSpec
from specplan.plan import Placement, Schedule
from specplan.planner.optimize import optimize
from specplan.runtime.engine import Engine
from specplan.simulator.run import SimConfig, simulate
from specplan.workload import Workload

from tail_check import noisy_copy

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Scenario:
    name: str
    target: str = "mixtral-8x7b"
    draft: str = "mistral-7b-v0.2"
    pcie: str | None = None
    host_mem: float | None = None
    workload: dict = field(default_factory=dict)


SCENARIOS = (
    Scenario("rtx4090, PCIe 4.0, 256 GB host, 4096 prompts 512 -> 128", workload={"num_prompts": 4096}),
    Scenario("rtx4090, PCIe 3.0, 256 GB host, 4096 prompts 256 -> 32 (SpecOffload Env #1)", pcie="3",
             workload={"num_prompts": 4096, "prompt_len": 256, "gen_len": 32}),
    Scenario("Mixtral-8x22B, rtx4090, PCIe 4.0, 448 GB host, 4096 prompts 512 -> 128", target="mixtral-8x22b",
             host_mem=448e9, workload={"num_prompts": 4096}),
)


def describe(r) -> str:
    s, pl = r.candidate.shape, r.candidate.placement
    spec = f" g{s.gamma} db{s.draft_batch} kv:{pl.draft_kv}" if s.gamma else ""
    extra = f" budget {s.prefill_tokens}" if s.admission == "continuous" else f" chunk {s.prefill_chunk}"
    return f"{s.policy} {s.num_batches}x{s.target_batch}{spec}{extra} attn:{s.attention_device} ffn_gpu:{pl.ffn_gpu_layers}"


def part1() -> list[dict]:
    rows = []
    for sc in SCENARIOS:
        profile = load_profile("rtx4090").compose(pcie=sc.pcie, host_memory_bytes=sc.host_mem)
        wl = Workload.make(**{"prompt_len": 512, "gen_len": 128, "num_prompts": 512, "acceptance": 0.7, **sc.workload})
        t, d = ModelSpec.resolve(sc.target), ModelSpec.resolve(sc.draft)
        best = {}
        for adm in ("waves", "continuous"):
            t0 = time.perf_counter()
            res = optimize(t, d, profile, wl, admissions=(adm,))
            best[adm] = (res.best, time.perf_counter() - t0)
        w, c = best["waves"][0], best["continuous"][0]
        row = {"scenario": sc.name, "waves_tok_s": w.tok_s, "waves_plan": describe(w),
               "continuous_tok_s": c.tok_s, "continuous_plan": describe(c), "ratio": c.tok_s / w.tok_s,
               "continuous_pass_counts": c.sim.pass_counts, "planner_s": {k: v[1] for k, v in best.items()}}
        rows.append(row)
        print(f"{sc.name}\n  waves      {w.tok_s:8.1f} tok/s  {describe(w)}\n  continuous {c.tok_s:8.1f} tok/s  "
              f"{describe(c)}\n  ratio {row['ratio']:.2f}x   continuous passes: {c.sim.pass_counts}", flush=True)
    return rows


def part2(repeat: int) -> list[dict]:
    torch.set_num_threads(1)
    spec = ModelSpec.from_preset("tiny-llama")
    target, draft = noisy_copy(spec, 0, 0.002)
    g = torch.Generator().manual_seed(3)
    rows_in_flight, gen = 16, 32
    lens = [8 + (13 * i) % 33 for i in range(4 * rows_in_flight)]
    prompts = [torch.randint(0, spec.vocab, (n,), generator=g).tolist() for n in lens]
    placement = Placement(attention="cpu_pinned", ffn="cpu_pinned", embed="cpu_pinned", lm_head="gpu", draft_kv="gpu")
    cases = []
    for policy in ("spec-serial", "flexgen"):
        for adm in ("waves", "continuous"):
            nb = 2 if policy == "flexgen" else 1
            sch = Schedule(policy=policy, target_batch=rows_in_flight // nb, num_batches=nb, prefill_chunk=8,
                           draft_batch=8, gamma=3 if policy == "spec-serial" else 0, attention_device="cpu",
                           prefetch_depth=1, admission=adm, prefill_tokens=2 * max(lens)).validate()
            cases.append((policy, adm, sch))
    walls: dict[tuple, list[float]] = {(p, a): [] for p, a, _ in cases}
    last: dict[tuple, Engine] = {}
    for _ in range(repeat):  # interleaved: every case once per round
        for policy, adm, sch in cases:
            engine = Engine(sch, placement, target, draft if sch.speculative else None, CPU, rows=sch.rows,
                            max_prompt_len=max(lens), gen_len=gen)
            try:
                t0 = time.perf_counter()
                engine.generate(prompts)
                walls[(policy, adm)].append(time.perf_counter() - t0)
            finally:
                engine.close()
            last[(policy, adm)] = engine
    out = []
    profile = load_profile("rtx4090")
    for policy, adm, sch in cases:
        e = last[(policy, adm)]
        acc = sum(e.row_accepted) / max(1, sum(e.row_rounds)) / sch.gamma if sch.gamma else 0.7
        wl = Workload.make(lens, gen, len(lens), min(max(acc, 0.0), 1.0))
        cfg = SimConfig(spec, spec if sch.speculative else None, profile, wl, sch, placement, check_memory=False,
                        all_prompts=True)
        replay = {p.index: o for p, o in zip(e.passes, e.outcomes)}
        same = simulate(cfg, record_spans=True, outcomes=lambda p: replay[p.index])
        sampled = [simulate(cfg, seed=k).pass_counts["passes"] for k in range(10)]
        agree = [p.signature() for p in same.passes] == [p.signature() for p in e.passes]
        row = {"policy": policy, "admission": adm, "median_wall_s": statistics.median(walls[(policy, adm)]),
               "walls_s": walls[(policy, adm)], "passes_measured": len(e.passes),
               "passes_simulated_replayed": len(same.passes), "identical_pass_sequence": agree,
               "passes_simulated_sampled_median": statistics.median(sampled), "acceptance": acc,
               "pass_counts": e.pass_counts}
        out.append(row)
    print(f"{'policy':12} {'admission':11} {'median s':>9} {'passes':>7} {'sim (same outcomes)':>20} "
          f"{'identical':>9} {'sim (sampled)':>14}")
    for r in out:
        print(f"{r['policy']:12} {r['admission']:11} {r['median_wall_s']:9.3f} {r['passes_measured']:7d} "
              f"{r['passes_simulated_replayed']:20d} {str(r['identical_pass_sequence']):>9} "
              f"{r['passes_simulated_sampled_median']:14.1f}")
    for policy in ("spec-serial", "flexgen"):
        w = next(r for r in out if r["policy"] == policy and r["admission"] == "waves")
        c = next(r for r in out if r["policy"] == policy and r["admission"] == "continuous")
        print(f"{policy}: continuous / waves wall time {c['median_wall_s'] / w['median_wall_s']:.2f}, "
              f"passes {c['passes_measured']} / {w['passes_measured']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("1", "2", "all"), default="all")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", help="also write the rows as JSON here")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}", flush=True)
    result = {}
    if args.part in ("1", "all"):
        result["simulated"] = part1()
    if args.part in ("2", "all"):
        result["engine"] = part2(args.repeat)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()

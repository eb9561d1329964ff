"""Does the simulator's slowest-row tail match the runtime's? Counts, not timings.

A static batch runs until its slowest row is done, and every verification pass streams
all the weights. So the number of passes, not the mean tokens per round, decides a
speculative policy's decode time. The simulator draws each row's accepted length per
round from one per-token acceptance (sampled mode), or gives every row the mean (expected
mode, no tail). This script runs the real engine on the CPU and counts its verification
passes: tiny-llama shapes with random weights as the target, and as draft a copy of the
target with noise added, whose drafted tokens are accepted row by row as the models
happen to agree. Then it simulates the same schedule at the acceptance the run measured.

    python benchmarks/tail_check.py [--noise 0.002] [--prompts 64] [--gen 48] [--seeds 20]

Deterministic: the same flags give the same counts. About 30 s on 2 cores.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from specplan.cost import acceptance_for_tokens_per_round, expected_verify_passes, row_acceptance_stats
from specplan.hardware import load_profile
from specplan.models import ModelSpec
from specplan.plan import Placement, Schedule
from specplan.runtime.checkpoint import GLOBAL_NAMES, layer_tensor_names, random_checkpoint, state_dict_checkpoint
from specplan.runtime.engine import Engine
from specplan.runtime.stats import Stats
from specplan.runtime.weights import RESIDENT
from specplan.simulator.run import SimConfig, simulate
from specplan.workload import Workload

CPU = torch.device("cpu")


def noisy_copy(spec: ModelSpec, seed: int, noise: float):
    """The target's random weights, and a draft that is the same weights plus N(0, noise)."""
    target = random_checkpoint(spec, torch.float32, seed)
    names = list(GLOBAL_NAMES) + [f"model.layers.{i}.{n}" for i in range(spec.layers) for n in layer_tensor_names(spec)]
    g = torch.Generator().manual_seed(seed + 1)
    near = {n: target.tensor(n) + noise * torch.randn(target.tensor(n).shape, generator=g) for n in names}
    return target, state_dict_checkpoint(spec, near, torch.float32)


def run_engine(schedule: Schedule, target, draft, prompts: list[list[int]], gen_len: int):
    """The engine's counts, and its rows' own mean acceptance and spread."""
    stats = Stats(CPU)
    engine = Engine(schedule, RESIDENT, target, draft, CPU, rows=schedule.rows,
                    max_prompt_len=max(len(p) for p in prompts), gen_len=gen_len, stats=stats)
    try:
        engine.generate(prompts)
    finally:
        engine.close()
    return stats.counts, row_acceptance_stats(engine.row_rounds, engine.row_accepted, schedule.gamma)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--noise", type=float, default=0.002, help="std of the noise added to the draft's weights")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--gen", type=int, default=48)
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=20, help="simulator seeds for sampled mode")
    args = ap.parse_args()
    torch.set_num_threads(1)
    spec = ModelSpec.from_preset("tiny-llama")
    target, draft = noisy_copy(spec, 0, args.noise)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, spec.vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
    half = args.prompts // 2
    cases = {
        "specoffload 2 x %d" % half: Schedule("specoffload", half, 2, half, 16, args.gamma, "cpu", 0),
        "spec-serial 1 x %d" % args.prompts: Schedule("spec-serial", args.prompts, 1, half, 16, args.gamma, "cpu", 0),
    }
    profile = load_profile("rtx4090")  # pass counts do not depend on the machine
    print(f"{'schedule':22} {'alpha':>6} {'row mean':>8} {'spread':>6} {'passes':>7} {'sim, spread 0':>16} {'sim, spread':>16} "
          f"{'sim expected':>12} {'plan, spread':>12}")
    for name, sch in cases.items():
        c, (row_mean, spread) = run_engine(sch.validate("tail_check"), target, draft, prompts, args.gen)
        alpha = acceptance_for_tokens_per_round(1.0 + c["accepted"] / c["rounds"], sch.gamma)  # pooled
        cells = []
        for a, s in ((alpha, 0.0), (row_mean, spread)):  # as simulate_as_run does
            wl = Workload.make(prompt_len=args.prompt_len, gen_len=args.gen, num_prompts=args.prompts,
                               acceptance=a, acceptance_spread=s)
            cfg = dict(target=spec, draft=spec, profile=profile, workload=wl, schedule=sch,
                       placement=Placement(draft_kv="gpu"), check_memory=False)
            runs = [simulate(SimConfig(**cfg, mode="sampled"), seed=k).rounds for k in range(args.seeds)]
            cells.append(f"{statistics.median(runs):.1f} ({min(runs)}-{max(runs)})")
        expected = simulate(SimConfig(**cfg, mode="expected")).rounds
        planned, _ = expected_verify_passes(sch.policy, wl.acceptance_rates(sch.gamma), args.gen - 1, sch.target_batch,
                                            sch.num_batches, spread, wl.mean_acceptance)  # the planner's expectation
        print(f"{name:22} {alpha:6.3f} {row_mean:8.3f} {spread:6.3f} {c['passes']:7.0f} {cells[0]:>16} {cells[1]:>16} "
              f"{expected:12d} {planned:12.1f}")
    print("passes: the engine's verification passes; sim: the simulator's rounds (one pass each), median (min-max) "
          "over seeds, rows alike at the pooled alpha, or differing as measured around the rows' own mean; "
          "expected: every row the mean; plan: the planner's expected passes with the measured spread")


if __name__ == "__main__":
    main()

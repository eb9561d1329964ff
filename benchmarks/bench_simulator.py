"""Simulator speed: Mixtral-8x7B + Mistral-7B, specoffload, 2 x 256 rows, prompt 512,
generation 128, on the rtx4090 profile. Prints wall time (median of N) and events/s.

    python benchmarks/bench_simulator.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from specplan.hardware import load_profile
from specplan.models import ModelSpec
from specplan.plan import Placement, Schedule
from specplan.simulator.run import SimConfig, simulate
from specplan.workload import Workload


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    target, draft = ModelSpec.from_preset("mixtral-8x7b"), ModelSpec.from_preset("mistral-7b-v0.2")
    profile, wl = load_profile("rtx4090"), Workload.make(prompt_len=512, gen_len=128, num_prompts=512, acceptance=0.7)
    cases = {
        "published (prefill 80, draft batch 10, gamma 6)": Schedule("specoffload", 256, 2, 80, 10, 6, "cpu", 1),
        "draft batch 16, gamma 7": Schedule("specoffload", 256, 2, 256, 16, 7, "cpu", 1),
    }
    print(f"{'case':48} {'median s':>9} {'min s':>7} {'max s':>7} {'events':>8} {'events/s':>10} {'tok/s':>8}")
    for name, sch in cases.items():
        cfg = SimConfig(target, draft, profile, wl, sch, Placement(draft_kv="cpu"), check_memory=False)
        walls, res = [], None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            res = simulate(cfg)
            walls.append(time.perf_counter() - t0)
        med = statistics.median(walls)
        print(f"{name:48} {med:9.3f} {min(walls):7.3f} {max(walls):7.3f} {res.events:8d} {res.events / med:10.0f} "
              f"{res.throughput_tok_s:8.2f}")


if __name__ == "__main__":
    main()

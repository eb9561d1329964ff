"""Planner speed: wall time of `specplan optimize --gpu rtx4090` with its defaults (the
simulator re-ranking included), median of N runs, as a user would run it.

    python benchmarks/bench_optimize.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("extra", nargs="*", help="extra flags for specplan optimize")
    args = ap.parse_args()
    walls, plan = [], None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "specplan.cli", "optimize", "--gpu", "rtx4090", "--out", str(out),
                            *args.extra], check=True, capture_output=True)
            walls.append(time.perf_counter() - t0)
        plan = json.loads(out.read_text())
    sch, pred = plan["schedule"], plan["prediction"]
    print(f"{'command':40} {'median s':>9} {'min s':>7} {'max s':>7} {'runs':>5}")
    print(f"{'specplan optimize --gpu rtx4090':40} {statistics.median(walls):9.2f} {min(walls):7.2f} {max(walls):7.2f} "
          f"{len(walls):5d}")
    print(f"chosen: {sch['policy']} {sch['num_batches']}x{sch['target_batch']} gamma {sch['gamma']} "
          f"draft batch {sch['draft_batch']}: simulated {pred['throughput_tok_s']:.2f} tok/s, "
          f"program {pred['program_estimate_tok_s']:.2f} tok/s")


if __name__ == "__main__":
    main()

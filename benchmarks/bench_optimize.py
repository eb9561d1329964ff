"""Planner speed: wall time of `specplan optimize --gpu rtx4090` with its defaults (the
simulator re-ranking included), median of N runs, as a user would run it.

    python benchmarks/bench_optimize.py [--repeat 5] [--no-compile]

The package's modules are compiled to bytecode first, as an installed package has them (pip
compiles at install; a checkout writes __pycache__ on its first run), so that a machine with
PYTHONDONTWRITEBYTECODE set does not compile them again on every run (about 0.1 s of a run on
our 2-core VM); --no-compile leaves them as they are, and the table says which.
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
    ap.add_argument("--no-compile", action="store_true", help="do not compile the package's bytecode first")
    ap.add_argument("extra", nargs="*", help="extra flags for specplan optimize")
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    if not args.no_compile:
        import compileall

        for package in ("specplan", "planner", "simulator", "runtime", "hwprofiles"):
            compileall.compile_dir(str(root / package), quiet=1)
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
    print(f"{'command':46} {'median s':>9} {'min s':>7} {'max s':>7} {'runs':>5}")
    label = "specplan optimize --gpu rtx4090" + (" (no bytecode)" if args.no_compile else "")
    print(f"{label:46} {statistics.median(walls):9.2f} {min(walls):7.2f} {max(walls):7.2f} {len(walls):5d}")
    print(f"chosen: {sch['policy']} {sch['num_batches']}x{sch['target_batch']} gamma {sch['gamma']} "
          f"draft batch {sch['draft_batch']}: simulated {pred['throughput_tok_s']:.2f} tok/s, "
          f"program {pred['program_estimate_tok_s']:.2f} tok/s")


if __name__ == "__main__":
    main()

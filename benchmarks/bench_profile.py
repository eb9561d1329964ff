"""`specplan profile --quick` on this machine: wall time (goal: under 60 s on a 2-core CPU).

    python benchmarks/bench_profile.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    walls = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "specplan.cli", "profile", "--quick", "--target", "smollm2-135m",
                            "--draft", "smollm2-135m-4l", "--out", str(Path(tmp) / f"p{i}.json")],
                           check=True, capture_output=True)
            walls.append(time.perf_counter() - t0)
    print(f"{'command':62} {'median s':>9} {'min s':>7} {'max s':>7}")
    print(f"{'specplan profile --quick (SmolLM2-135M + 4-layer draft kernels)':62} {statistics.median(walls):9.1f} "
          f"{min(walls):7.1f} {max(walls):7.1f}")


if __name__ == "__main__":
    main()

"""Sweep speed: wall time of a 9 GPU x 3 link x 3 host-memory `specplan sweep` for one model
pair, from an empty cache (median of N runs), then the same grid with one point more (a grid
file joining the 81-point grid and a grid of one point: all but that one come from the
cache), as a user would run them.

    python benchmarks/bench_sweep.py [--repeat 3] [--target mixtral-8x7b --draft mistral-7b-v0.2]
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

GPUS = ["rtx4090", "rtx3090", "l4", "t4", "a100-40gb", "a100-80gb", "h100-pcie", "h100-sxm", "h200"]
LINKS = ["3", "4", "5"]
HOSTS = ["128GB", "256GB", "512GB"]


def sweep(args: list[str], cache: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "specplan.cli", "sweep", *args, "--cache", cache, "--json"],
                       check=True, capture_output=True, text=True)
    return time.perf_counter() - t0, json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--target", default="mixtral-8x7b")
    ap.add_argument("--draft", default="mistral-7b-v0.2")
    a = ap.parse_args()
    grid = {"gpu": GPUS, "pcie": LINKS, "host_mem": HOSTS, "models": [{"target": a.target, "draft": a.draft}]}
    one_more = {"gpu": "rtx4090", "pcie": "4", "host_mem": "1TB", "models": grid["models"]}
    full, more, last = [], [], None
    for _ in range(a.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            cache = str(Path(tmp) / "cache")
            f1, f2 = Path(tmp) / "grid.json", Path(tmp) / "grid-plus-one.json"
            f1.write_text(json.dumps(grid))
            f2.write_text(json.dumps({"grids": [grid, one_more]}))
            wall, out = sweep(["--grid", str(f1)], cache)
            full.append(wall)
            assert out["planned"] == len(GPUS) * len(LINKS) * len(HOSTS), out["planned"]
            wall2, out2 = sweep(["--grid", str(f2)], cache)
            more.append(wall2)
            assert out2["planned"] == 1 and len(out2["rows"]) == 82, (out2["planned"], len(out2["rows"]))
            last = out
    print(f"{'sweep (' + a.target + ')':44} {'points':>6} {'median s':>9} {'min s':>7} {'max s':>7} {'runs':>5}")
    print(f"{'9 GPUs x 3 links x 3 host sizes, no cache':44} {81:6d} {statistics.median(full):9.1f} {min(full):7.1f} "
          f"{max(full):7.1f} {len(full):5d}")
    print(f"{'the same and one point more, cached':44} {82:6d} {statistics.median(more):9.1f} {min(more):7.1f} "
          f"{max(more):7.1f} {len(more):5d}")
    best = next(r for r in last["rows"] if r["status"] == "ok")
    print(f"best: {best['machine']}: {best['policy']} {best['rows']} at {best['tok_s']:.1f} tok/s ({best['binds']})")


if __name__ == "__main__":
    main()

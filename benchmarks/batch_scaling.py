"""`specplan batch` on this machine with 1 and then 2 workers, one thread each (a local Ray
instance): the job's throughput, the ratio, and where the wall time goes (Ray start, workers
start, planning, weight loading, the rows, the merge), from each run's job report.

    python benchmarks/batch_scaling.py [--prompts 64] [--gen-len 32] [--repeat 3] [--target DIR_OR_PRESET]

The target defaults to out/smollm2-135m (scripts/smollm2.py convert) if it exists, else the
smollm2-135m preset with random weights; no draft (the planner picks among the
non-speculative policies). The profile is hwprofiles/measured/cpu-2core-xeon.json, passed with
--force when this CPU is another one (the plans' predictions are then that machine's). Runs
alternate 1 and 2 workers; medians of --repeat each.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--target", default=None)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from specplan.host import machine_load

    local = ROOT / "out" / "smollm2-135m"
    target = a.target or (str(local) if local.exists() else "smollm2-135m")
    random_weights = not Path(target).exists()
    load = machine_load()
    print(f"machine load before: {load}")
    rows: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        rng = random.Random(0)
        with open(d / "data.jsonl", "w") as f:
            for i in range(a.prompts):
                f.write(json.dumps({"id": f"r{i}", "prompt": [rng.randrange(10, 40000) for _ in range(rng.randrange(16, 65))]}) + "\n")
        for rep in range(a.repeat):
            for n in (1, 2):
                out = d / f"out-{n}-{rep}.jsonl"
                cmd = [sys.executable, "-m", "specplan.cli", "batch", "--prompts", str(d / "data.jsonl"), "--output", str(out),
                       "--target", target, "--draft", "none", "--device", "cpu", "--gen-len", str(a.gen_len),
                       "--address", "local", "--local-cpus", "2", "--workers", str(n), "--cpus-per-worker", "1",
                       "--profile", str(ROOT / "hwprofiles" / "measured" / "cpu-2core-xeon.json"), "--force", "--json",
                       "--stop-at-eos" if not random_weights else "--ignore-eos",
                       *(["--random-weights"] if random_weights else [])]
                r = subprocess.run(cmd, capture_output=True, text=True, cwd=d,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
                                        "PYTHONPATH": str(ROOT)})
                if r.returncode != 0:
                    print(r.stderr[-3000:])
                    return 1
                rep_ = json.loads(r.stdout)
                rows[n].append(rep_)
                t = rep_["times_s"]
                print(f"run {rep + 1}, {n} worker(s): {rep_['generated_tokens']} tokens, rows {t['run_s']:.1f} s, "
                      f"total {t['total_s']:.1f} s", flush=True)
    print(f"machine load after: {machine_load()}")
    for n in rows:  # what no stage names: reading the dataset, imports, the report
        for r in rows[n]:
            t = r["times_s"]
            t["other_s"] = t["total_s"] - sum(v for k, v in t.items() if k not in ("total_s", "other_s"))
    med = {n: {k: statistics.median(r["times_s"][k] for r in rows[n]) for k in rows[n][0]["times_s"]} for n in rows}
    tok = {n: statistics.median(r["throughput_tok_s"] for r in rows[n]) for n in rows}
    e2e = {n: statistics.median(r["generated_tokens"] / r["times_s"]["total_s"] for r in rows[n]) for n in rows}
    print(f"\n{target} ({'random weights' if random_weights else 'weights'}), {a.prompts} prompts x {a.gen_len} tokens, "
          f"median of {a.repeat}")
    keys = list(med[1])
    print(f"{'':<26}" + "".join(f"{k[:-2]:>14}" for k in keys))
    for n in (1, 2):
        print(f"{n} worker(s), seconds     " + "".join(f"{med[n][k]:>14.2f}" for k in keys))
    print(f"\nrows' tok/s: 1 worker {tok[1]:.1f}, 2 workers {tok[2]:.1f}: {tok[2] / tok[1]:.2f}x")
    print(f"end to end (tokens / total wall): 1 worker {e2e[1]:.1f}, 2 workers {e2e[2]:.1f}: {e2e[2] / e2e[1]:.2f}x")
    for n in (1, 2):
        for w in rows[n][-1]["workers"]:
            print(f"  {n} worker(s), worker {w['worker']}: measured {w['measured_tok_s']:.1f} tok/s "
                  f"(busy {w['busy_s']:.1f} s), plan {w['plan']['policy']} x{w['plan']['rows']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

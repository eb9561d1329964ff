"""Does writing results slow the engine? The dataset job (--output, one fsync'd JSON line
per finished row) against plain specrun on the same prompts (results only in the report),
runs interleaved, median of N; throughput as each report measures it (generation only).

    python benchmarks/job_overhead.py [--repeat 5] [--prompts 64] [--gen-len 32]

tiny-llama shapes, random weights, a self-draft, on this CPU, one thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kill_resume as kr  # noqa: E402  (the same job: plan, prompts, arguments)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=32)
    a = ap.parse_args()
    tok_s: dict[str, list[float]] = {"specrun": [], "dataset job": []}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        args = kr.make_job(d, a.prompts, a.gen_len)
        # the same prompts as token ids, one a line: plain specrun reads them without a job
        ids = [" ".join(map(str, json.loads(x)["prompt"])) for x in (d / "data.jsonl").read_text().splitlines()]
        (d / "ids.txt").write_text("\n".join(ids) + "\n")
        plain = [x if x != "data.jsonl" else "ids.txt" for x in args]
        for i in range(a.repeat):
            for name, cmd in (("specrun", plain + ["--report", "plain.json"]),
                              ("dataset job", args + ["--output", f"out{i}.jsonl", "--report", "job.json"])):
                kr.specrun(cmd, d)
                rep = json.loads((d / ("plain.json" if name == "specrun" else "job.json")).read_text())
                tok_s[name].append(rep["measured"]["throughput_tok_s"])
    base = statistics.median(tok_s["specrun"])
    print(f"{'run':14} {'median tok/s':>13} {'min':>8} {'max':>8} {'vs specrun':>11}")
    for name, v in tok_s.items():
        print(f"{name:14} {statistics.median(v):13.2f} {min(v):8.2f} {max(v):8.2f} {statistics.median(v) / base:10.3f}x")


if __name__ == "__main__":
    main()

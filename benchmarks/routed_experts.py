"""Routed expert streaming against whole-layer streaming, simulated: for each MoE scenario and
number of prompts, the planner's best plan (which may route experts) and the best plan that
streams whole layers, both from the same search (optimize simulates its best streamed-MoE
plans both ways). Deterministic; datasheet profiles.

    python benchmarks/routed_experts.py [--json out.json]
"""

from __future__ import annotations

import argparse

from specplan.fileio import write_json
from specplan.formats import WeightFormat, WeightFormats, parse_weights
from specplan.hardware import load_profile
from specplan.models import ModelSpec, apply_weights, resolve_draft
from specplan.planner.optimize import optimize
from specplan.workload import Workload

SCENARIOS = [  # name, target, draft, weights, profile composition
    ("Qwen3-235B-A22B, int4 experts, RTX 4090, PCIe 4, 256 GB", "qwen3-235b-a22b", "qwen3-0.6b", "experts=int4",
     dict(pcie=4, host_memory_bytes=256e9)),
    ("gpt-oss-120b, MXFP4 experts, RTX 4090, 128 GB", "gpt-oss-120b", "gpt-oss-20b", "experts=mxfp4",
     dict(host_memory_bytes=128e9)),
    ("Qwen3-30B-A3B, bf16, RTX 4090", "qwen3-30b-a3b", "qwen3-0.6b", "", {}),
    ("Mixtral-8x7B, bf16, RTX 4090", "mixtral-8x7b", "mistral-7b-v0.2", "", {}),
]
PROMPTS = (16, 64, 512)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for name, target, draft, weights, compose in SCENARIOS:
        for draft in (draft, "none"):
            prof = load_profile("rtx4090", **compose)
            tgt = ModelSpec.resolve(target)
            drf = resolve_draft(draft, tgt)
            if weights == "experts=mxfp4":  # the checkpoint's own format (not a --weights choice): its bytes
                mx = WeightFormats(experts=WeightFormat("mxfp4"))  # gpt-oss-20b, the draft, ships MXFP4 too
                tgt, drf = tgt.with_weights(mx), drf.with_weights(mx) if drf is not None else None
            else:
                tgt, drf = apply_weights(tgt, drf, parse_weights(weights).fixed)
            print(f"\n{name}, draft {draft}: prompt 512, gen 128, acceptance 0.7")
            print(f"{'prompts':>8} {'best plan':50} {'tok/s':>8} {'whole layers':>13} {'ratio':>6}")
            for n in PROMPTS:
                res = optimize(tgt, drf, prof, Workload.make(512, 128, n, 0.7))
                best = res.best
                layer = max((r for r in res.ranked if r.candidate.placement.experts == "layer"), key=lambda r: r.tok_s)
                s, pl = best.candidate.shape, best.candidate.placement
                label = f"{s.policy} {s.num_batches}x{s.target_batch}, {pl.experts} experts, FFN on GPU {pl.ffn_gpu_layers}"
                print(f"{n:>8} {label:50} {best.tok_s:8.2f} {layer.tok_s:13.2f} {best.tok_s / layer.tok_s:6.2f}")
                rows.append({"scenario": name, "draft": draft, "prompts": n, "best": label, "tok_s": best.tok_s, "whole_layer_tok_s": layer.tok_s,
                             "experts_per_pass": best.sim.experts_per_pass})
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()

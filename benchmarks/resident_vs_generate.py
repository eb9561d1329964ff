"""specrun's engine with every weight resident against transformers' `generate`, and the
runtime's host time per target layer.

Part 1: the same model (SmolLM2-135M's shape from its config, random weights drawn once by
transformers and handed to the engine), the same prompts (random ids, --prompt-len), greedy,
--gen-len new tokens per row with EOS ignored, at each --batch; the two systems alternate run
by run (after one untimed warm-up each) and the table gives the median tok/s of --repeat runs
and their ratio. The engine runs the `sequential` schedule (one batch, nothing streamed).

Part 2: the host's time to issue one target layer, from single-token passes of the model's
tiny twin (runtime.profiling.tiny_twin: the same code at hidden 64, where the kernels cost next
to nothing) at 2 and 18 layers: the slope, median of --passes passes, for 1 and 16 rows.

    python benchmarks/resident_vs_generate.py [--batch 1 16] [--repeat 5] [--threads 1] [--json out.json]

Nothing else should run while it does (check the load first). To compare two versions of the
runtime, run it from each checkout in turn.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import transformers

from specplan.host import machine_load
from specplan.models import ModelSpec
from specplan.plan import Schedule
from specplan.runtime.checkpoint import state_dict_checkpoint
from specplan.runtime.engine import Engine
from specplan.runtime.profiling import forward_timer, tiny_twin
from specplan.runtime.weights import RESIDENT

CPU = torch.device("cpu")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def hf_model(spec: ModelSpec, dtype: torch.dtype, seed: int = 0):
    cfg = transformers.CONFIG_MAPPING[spec.hf_config["model_type"]].from_dict(spec.hf_config)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()


def engine_for(spec: ModelSpec, weights: dict, dtype: torch.dtype, batch: int, prompt_len: int, gen_len: int) -> Engine:
    schedule = Schedule(policy="sequential", target_batch=batch, num_batches=1, prefill_chunk=batch, gamma=0,
                        attention_device="gpu", prefetch_depth=0).validate()
    return Engine(schedule, RESIDENT, state_dict_checkpoint(spec, weights, dtype), None, CPU, rows=batch,
                  max_prompt_len=prompt_len, gen_len=gen_len)


def time_engine(engine: Engine, prompts: list[list[int]]) -> float:
    t = time.perf_counter()
    out = engine.generate(prompts)
    dt = time.perf_counter() - t
    assert all(len(o) == engine.gen_len for o in out)
    return dt


@torch.inference_mode()
def time_generate(hf, ids: torch.Tensor, gen_len: int) -> float:
    t = time.perf_counter()
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen_len, min_new_tokens=gen_len,
                      do_sample=False, pad_token_id=0)
    dt = time.perf_counter() - t
    assert out.shape[1] == ids.shape[1] + gen_len
    return dt


def part1(spec: ModelSpec, dtype: torch.dtype, batches: list[int], prompt_len: int, gen_len: int, repeat: int) -> list[dict]:
    hf = hf_model(spec, dtype)
    weights = hf.state_dict()
    rows = []
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, spec.vocab, (batch, prompt_len), generator=g)
        prompts = ids.tolist()
        engine = engine_for(spec, weights, dtype, batch, prompt_len, gen_len)
        try:
            time_engine(engine, prompts), time_generate(hf, ids, gen_len)  # warm-up
            ours, theirs = [], []
            for _ in range(repeat):
                ours.append(time_engine(engine, prompts))
                theirs.append(time_generate(hf, ids, gen_len))
        finally:
            engine.close()
        tokens = batch * gen_len
        a, b = tokens / statistics.median(ours), tokens / statistics.median(theirs)
        rows.append({"batch": batch, "specrun_tok_s": a, "generate_tok_s": b, "ratio": a / b,
                     "specrun_runs_s": ours, "generate_runs_s": theirs})
        print(f"batch {batch:3d}: specrun {a:8.2f} tok/s   generate {b:8.2f} tok/s   ratio {a / b:.3f}x", flush=True)
    return rows


def host_layer_us(spec: ModelSpec, rows: int, passes: int) -> float:
    def median_pass_s(layers: int) -> float:
        run = forward_timer(tiny_twin(spec, layers), CPU, rows)
        for _ in range(3):
            run()
        times = []
        for _ in range(passes):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    return 1e6 * (median_pass_s(18) - median_pass_s(2)) / 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--passes", type=int, default=60, help="passes per host-time median (part 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both systems (default: torch's)")
    ap.add_argument("--part", type=int, choices=(1, 2), default=None, help="run one part only")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = ModelSpec.from_preset(args.model)
    load = machine_load()
    print(f"{args.model} {args.dtype}, {torch.get_num_threads()} torch threads, load at start {load}", flush=True)
    out: dict = {"model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads(), "load_at_start": load,
                 "prompt_len": args.prompt_len, "gen_len": args.gen_len, "repeat": args.repeat}
    if args.part in (None, 1):
        out["resident"] = part1(spec, DTYPES[args.dtype], args.batch, args.prompt_len, args.gen_len, args.repeat)
    if args.part in (None, 2):
        out["host_layer_us"] = {}
        for rows in (1, 16):
            us = host_layer_us(spec.with_dtype(args.dtype), rows, args.passes)
            out["host_layer_us"][rows] = us
            print(f"host time per target layer, {rows:2d} rows: {us:7.1f} us", flush=True)
    out["load_at_end"] = machine_load(0.1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

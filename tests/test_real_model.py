"""SmolLM2-135M, real weights: our forward against transformers', and greedy speculative
output against greedy target-only output.

Skipped unless the converted model exists: `python scripts/smollm2.py convert --draft-layers 4`
(see docs/real-model.md) writes out/smollm2-135m and out/smollm2-135m-draft4. Other places:
SPECPLAN_SMOLLM2_DIR (the target directory) and SPECPLAN_SMOLLM2_DRAFT (a draft directory;
default: the target's -draft4-distilled sibling if present, else -draft4, else any -draft*).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TARGET = Path(os.environ.get("SPECPLAN_SMOLLM2_DIR") or ROOT / "out" / "smollm2-135m")
PROMPTS = ["The capital of France is", "Explain why the sky is blue."]
CPU = torch.device("cpu")


def _is_model(d: Path) -> bool:
    return (d / "config.json").is_file() and any(d.glob("*.safetensors"))


def _draft_dir() -> Path | None:
    if os.environ.get("SPECPLAN_SMOLLM2_DRAFT"):
        return Path(os.environ["SPECPLAN_SMOLLM2_DRAFT"])
    for name in (f"{TARGET.name}-draft4-distilled", f"{TARGET.name}-draft4"):
        if _is_model(TARGET.parent / name):
            return TARGET.parent / name
    found = sorted(d for d in TARGET.parent.glob(f"{TARGET.name}-draft*") if _is_model(d))
    return found[0] if found else None


pytestmark = pytest.mark.skipif(not _is_model(TARGET) or not (TARGET / "tokenizer.json").is_file(),
                                reason=f"no converted SmolLM2-135M at {TARGET} (python scripts/smollm2.py convert)")


@pytest.fixture(scope="module")
def target():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specplan.models import ModelSpec

    spec = ModelSpec.resolve(str(TARGET)).with_dtype("float32")
    tok = AutoTokenizer.from_pretrained(str(TARGET), local_files_only=True)
    hf = AutoModelForCausalLM.from_pretrained(str(TARGET), dtype=torch.float32, attn_implementation="sdpa").eval()
    return spec, tok, hf


def test_shapes_match_preset(target):
    from specplan.models import SHAPE_FIELDS, ModelSpec

    spec, _, _ = target
    preset = ModelSpec.from_preset("smollm2-135m")
    assert {k: getattr(spec, k) for k in SHAPE_FIELDS} == {k: getattr(preset, k) for k in SHAPE_FIELDS}


def test_forward_matches_transformers(target):
    """A ragged prefill of two real prompts, then a 4-token step per row against the cache (the
    verify shape): logits within 1e-4 of transformers' on the converted weights, fp32."""
    from specplan.runtime.checkpoint import load_checkpoint
    from specplan.runtime.kvcache import KVCache
    from specplan.runtime.model import Model, Step
    from specplan.runtime.weights import RESIDENT, WeightStore

    spec, tok, hf = target
    seqs = []
    for p in PROMPTS:
        ids = tok.encode(p)
        with torch.no_grad():  # continue each prompt with 4 greedy tokens of the model itself
            cont = hf.generate(torch.tensor([ids]), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                               pad_token_id=tok.pad_token_id)[0].tolist()
        seqs.append(cont)
    lens = [len(s) - 4 for s in seqs]
    store = WeightStore(load_checkpoint(TARGET, spec, torch.float32), RESIDENT, CPU)
    cache = KVCache(spec.layers, len(seqs), 64, spec.kv_heads, spec.head_dim, torch.float32, CPU)
    model = Model(spec, store, cache, CPU)
    rows = slice(0, len(seqs))
    prompt = torch.zeros(len(seqs), max(lens), dtype=torch.long)
    for r, n in enumerate(lens):
        prompt[r, :n] = torch.tensor(seqs[r][:n])
    first = model.forward([Step(rows, prompt)])[0]
    cache.lengths[rows] = torch.tensor(lens)
    second = model.forward([Step(rows, torch.tensor([s[n:] for s, n in zip(seqs, lens)]))])[0]
    with torch.no_grad():
        for r, n in enumerate(lens):
            ref = hf(torch.tensor([seqs[r]])).logits[0].float()
            torch.testing.assert_close(first[r, :n], ref[:n], atol=1e-4, rtol=0)
            torch.testing.assert_close(second[r], ref[n:], atol=1e-4, rtol=0)
            assert ref[n - 1].argmax().item() == seqs[r][n]  # sanity: these are the model's own tokens


def _generate(spec, policy: str, gamma: int, draft_dir: Path | None, prompts: list[list[int]], gen_len: int):
    from specplan.models import ModelSpec
    from specplan.plan import Schedule
    from specplan.runtime.checkpoint import load_checkpoint
    from specplan.runtime.engine import Engine
    from specplan.runtime.weights import RESIDENT

    draft = None
    if draft_dir is not None:
        dspec = ModelSpec.resolve(str(draft_dir)).with_dtype("float32")
        draft = load_checkpoint(draft_dir, dspec, torch.float32)
    rows = len(prompts)
    sched = Schedule(policy=policy, target_batch=rows, num_batches=1, prefill_chunk=rows, draft_batch=rows,
                     gamma=gamma, attention_device="gpu", prefetch_depth=0 if policy == "sequential" else 1)
    engine = Engine(sched, RESIDENT, load_checkpoint(TARGET, spec, torch.float32), draft, CPU, rows=rows,
                    max_prompt_len=max(len(p) for p in prompts), gen_len=gen_len, eos=None)
    try:
        return engine.generate(prompts)
    finally:
        engine.close()


def test_greedy_speculative_equals_greedy_target(target):
    draft_dir = _draft_dir()
    if draft_dir is None:
        pytest.skip(f"no draft next to {TARGET} (python scripts/smollm2.py draft --draft-layers 4)")
    spec, tok, hf = target
    prompts = [tok.encode(p) for p in PROMPTS]
    gen_len = 24
    plain = _generate(spec, "sequential", 0, None, prompts, gen_len)
    spec_out = _generate(spec, "spec-serial", 3, draft_dir, prompts, gen_len)
    assert spec_out == plain
    # and both are transformers' greedy continuation
    for p, ours in zip(prompts, plain):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=gen_len, min_new_tokens=gen_len, do_sample=False,
                              pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        assert ours == ref, (tok.decode(ours), tok.decode(ref))

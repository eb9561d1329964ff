"""Our per-layer forward against transformers' on the same weights (fp32), with ragged rows.

Each config is built in transformers with its own random init; we read its weights (the
in-memory state dict, whose Mixtral experts are fused in transformers >= 5, or the
safetensors it saves) and compare logits of a ragged prefill and of a 4-token step that
attends to the cache at per-row positions (the verify shape).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from specplan.errors import InputError
from specplan.models import ModelSpec
from specplan.plan import Placement
from specplan.runtime.checkpoint import load_checkpoint, random_checkpoint, state_dict_checkpoint
from specplan.runtime.kvcache import KVCache
from specplan.runtime.model import Model, Step, check_supported
from specplan.runtime.weights import RESIDENT, WeightStore




CPU = torch.device("cpu")
SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, eos_token_id=1, bos_token_id=0)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
CONFIGS = {
    "tiny-llama preset": ("preset", "tiny-llama"),
    "tiny-mixtral preset": ("preset", "tiny-mixtral"),
    "llama3 rope scaling": ("LlamaConfig", dict(SMALL, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),
    "qwen2 (q/k/v bias)": ("Qwen2Config", dict(SMALL)),
    "mistral sliding window 5": ("MistralConfig", dict(SMALL, sliding_window=5)),
    "mixtral 4 experts top 2": ("MixtralConfig", dict(SMALL, num_local_experts=4, num_experts_per_tok=2)),
}


def hf_model(kind: str, arg) -> tuple[torch.nn.Module, ModelSpec]:
    torch.manual_seed(0)
    if kind == "preset":
        spec = ModelSpec.from_preset(arg)
        cfg = transformers.CONFIG_MAPPING[spec.hf_config["model_type"]].from_dict(spec.hf_config)
    else:
        cfg = getattr(transformers, kind)(**arg)
        spec = ModelSpec.from_hf_config(cfg.to_dict(), name=kind)
    cfg._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # HF init leaves norms at 1; make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model, spec


def our_model(spec: ModelSpec, checkpoint, rows: int, placement: Placement = RESIDENT, depth: int = 1) -> Model:
    store = WeightStore(checkpoint, placement, CPU, depth)
    cache = KVCache(spec.layers, rows, 64, spec.kv_heads, spec.head_dim, torch.float32, CPU)
    return Model(spec, store, cache, CPU)


def compare(hf, model: Model, vocab: int) -> float:
    """Max |ours - HF| over a ragged prefill and then a 4-token cached step per row."""
    g = torch.Generator().manual_seed(1)
    lens = [7, 12, 3]
    seqs = [torch.randint(0, vocab, (n + 4,), generator=g) for n in lens]
    prompt = torch.zeros(len(lens), max(lens), dtype=torch.long)
    for r, n in enumerate(lens):
        prompt[r, :n] = seqs[r][:n]
    rows = slice(0, len(lens))
    model.cache.lengths[rows] = 0
    first = model.forward([Step(rows, prompt)])[0]
    model.cache.lengths[rows] = torch.tensor(lens)
    second = model.forward([Step(rows, torch.stack([s[n:] for s, n in zip(seqs, lens)]))])[0]
    err = 0.0
    with torch.no_grad():
        for r, n in enumerate(lens):
            ref = hf(seqs[r][None]).logits[0].float()
            err = max(err, (first[r, :n] - ref[:n]).abs().max().item(), (second[r] - ref[n:]).abs().max().item())
    return err


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name):
    hf, spec = hf_model(*CONFIGS[name])
    model = our_model(spec, state_dict_checkpoint(spec, hf.state_dict(), torch.float32), rows=3)
    assert compare(hf, model, spec.vocab) < 1e-5


def test_logits_match_transformers_from_saved_checkpoint(tmp_path):
    """transformers writes per-expert Mixtral names to disk; the safetensors loader reads them."""
    hf, spec = hf_model(*CONFIGS["mixtral 4 experts top 2"])
    hf.save_pretrained(tmp_path)
    spec = ModelSpec.from_file(tmp_path)
    model = our_model(spec, load_checkpoint(tmp_path, spec, torch.float32), rows=3)
    assert compare(hf, model, spec.vocab) < 1e-5


def test_streamed_layers_equal_resident_bit_for_bit():
    spec = ModelSpec.from_preset("tiny-mixtral")
    ck = random_checkpoint(spec, torch.float32, seed=3)
    tokens = torch.randint(0, spec.vocab, (3, 9), generator=torch.Generator().manual_seed(0))

    def run(placement: Placement, depth: int) -> list[torch.Tensor]:
        m = our_model(spec, ck, rows=3, placement=placement, depth=depth)
        rows = slice(0, 3)
        outs = [m.forward([Step(rows, tokens)])[0]]
        for i in range(3):  # decode steps reuse the ring across passes
            m.cache.lengths[rows] = 9 + i
            outs.append(m.forward([Step(rows, tokens[:, i:i + 1])])[0])
        m.store.close()
        return outs

    resident = run(RESIDENT, 0)
    for placement, depth in [(Placement(attention="cpu_pinned", ffn="cpu_pageable", lm_head="cpu_pinned"), 1),
                             (Placement(attention="disk", ffn="disk", ffn_gpu_layers=2, embed="cpu_pageable", lm_head="disk"), 2),
                             (Placement(attention="gpu", ffn="disk", lm_head="gpu"), 0)]:
        streamed = run(placement, depth)
        assert all(torch.equal(a, b) for a, b in zip(resident, streamed)), placement


def test_random_weights_do_not_depend_on_read_order():
    spec = ModelSpec.from_preset("tiny-llama")
    a = random_checkpoint(spec, torch.float32, seed=7)
    b = random_checkpoint(spec, torch.float32, seed=7)
    assert torch.equal(a.layer(1)["self_attn.q_proj.weight"], b.layer(1)["self_attn.q_proj.weight"])
    assert not torch.equal(b.layer(0)["self_attn.q_proj.weight"], b.layer(1)["self_attn.q_proj.weight"])
    c = random_checkpoint(spec, torch.float32, seed=8)
    assert not torch.equal(a.layer(1)["mlp.up_proj.weight"], c.layer(1)["mlp.up_proj.weight"])


def test_random_layers_drawn_on_threads_equal_tensors_drawn_one_by_one(monkeypatch):
    import os

    spec = ModelSpec.from_preset("tiny-mixtral")
    ck = random_checkpoint(spec, torch.bfloat16, seed=3)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)  # a pool even on a one-core machine
    layer = ck.layer(1)
    assert len(layer) > 8
    for name, t in layer.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, ck.tensor(f"model.layers.1.{name}")), name


def test_unsupported_rope_is_refused_by_name():
    spec = ModelSpec.from_preset("tiny-llama")
    cfg = dict(spec.hf_config, rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    with pytest.raises(InputError, match="dynamic"):
        check_supported(ModelSpec.from_hf_config(cfg, name="dynamic-llama"))

"""The Qwen3 families against transformers: tiny random Qwen3 (q / k norms) and Qwen3-MoE (many
experts, norm_topk_prob either way) give transformers' greedy tokens under every policy; the
presets' sizes are transformers' own parameter counts of the same configs."""

from __future__ import annotations

import pytest
import torch
import transformers

from specplan.models import ModelSpec
from specplan.plan import SPECULATIVE
from specplan.runtime.checkpoint import random_checkpoint, state_dict_checkpoint
from test_runtime_engine import STREAMED, hf_from_preset, make_prompts, reference_greedy, run_engine

POLICIES = ["specoffload", "spec-serial", "flexgen", "sequential"]


def _family(name: str, **changes):
    hf, spec = hf_from_preset(name, seed=4)
    if changes:
        cfg = dict(spec.hf_config, **changes)
        spec = ModelSpec.from_hf_config(cfg, name=name)
        torch.manual_seed(4)
        hf = transformers.AutoModelForCausalLM.from_config(
            transformers.CONFIG_MAPPING[cfg["model_type"]].from_dict(cfg)).eval()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # norms that are not all ones, each its own: a swapped q / k norm shows
        for n, p in hf.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
    return hf, spec


@pytest.mark.parametrize("name,changes", [("tiny-qwen3", {}), ("tiny-qwen3-moe", {}),
                                          ("tiny-qwen3-moe", {"norm_topk_prob": False})],
                         ids=["qwen3", "qwen3-moe", "qwen3-moe-unnormalised"])
def test_tiny_qwen3_families_equal_transformers_greedy_under_every_policy(name, changes):
    hf, spec = _family(name, **changes)
    assert spec.qk_norm and spec.norm_topk_prob == changes.get("norm_topk_prob", True)
    prompts = make_prompts(spec.vocab, seed=7)[:5]
    expected = reference_greedy(hf, prompts, 12)
    target = state_dict_checkpoint(spec, hf.state_dict(), torch.float32)
    draft = random_checkpoint(ModelSpec.from_preset("tiny-draft"), torch.float32, seed=1)
    for policy in POLICIES:
        out, _ = run_engine(policy, target, draft if policy in SPECULATIVE else None, placement=STREAMED, prompts=prompts)
        assert out == expected, policy


def test_a_qwen3_moe_checkpoint_on_disk_is_read_by_its_own_expert_names(tmp_path):
    """transformers writes Qwen3-MoE's experts one by one (mlp.experts.E.gate_proj...)."""
    from specplan.runtime.checkpoint import load_checkpoint

    hf, spec = _family("tiny-qwen3-moe")
    hf.save_pretrained(tmp_path)
    ck = load_checkpoint(tmp_path, spec, torch.float32)
    layer = ck.layer(1)
    state = hf.state_dict()
    f = spec.ffn_inner
    assert torch.equal(layer["block_sparse_moe.experts.3.w2.weight"], state["model.layers.1.mlp.experts.down_proj"][3])
    assert torch.equal(layer["block_sparse_moe.experts.3.w3.weight"], state["model.layers.1.mlp.experts.gate_up_proj"][3][f:])
    assert torch.equal(layer["self_attn.k_norm.weight"], state["model.layers.1.self_attn.k_norm.weight"])


@pytest.mark.parametrize("preset", ["qwen3-0.6b", "qwen3-1.7b", "qwen3-8b", "qwen3-32b", "qwen3-30b-a3b", "qwen3-235b-a22b"])
def test_qwen3_presets_count_what_transformers_counts(preset):
    spec = ModelSpec.from_preset(preset)
    cfg = transformers.CONFIG_MAPPING[spec.hf_config["model_type"]].from_dict(spec.hf_config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    assert spec.total_params == sum(p.numel() for p in model.parameters())
    if preset != "qwen3-0.6b":
        assert spec.natural_draft == "qwen3-0.6b" and ModelSpec.from_preset("qwen3-0.6b").vocab == spec.vocab


def test_dense_layers_among_sparse_ones_are_refused_in_one_line():
    from specplan.errors import InputError

    cfg = dict(ModelSpec.from_preset("tiny-qwen3-moe").hf_config, mlp_only_layers=[0])
    with pytest.raises(InputError, match="mlp_only_layers: dense layers among the sparse ones are not supported"):
        ModelSpec.from_hf_config(cfg, source="config.json")

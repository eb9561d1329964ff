"""gpt-oss against transformers: attention sinks, sliding and full attention alternating, YaRN
rotary frequencies (and their attention factor), q / k / v / o biases, a biased router whose
softmax runs over the top-k logits, and clamped-GLU experts with biases. A tiny random gpt-oss
(sinks, biases and norms drawn away from their defaults) gives transformers' greedy tokens under
every policy, streamed and resident; turning the sinks or the window off changes the reference,
so the test sees both. The presets count what transformers counts."""

from __future__ import annotations

import pytest
import torch
import transformers

from specplan.models import ModelSpec
from specplan.plan import SPECULATIVE
from specplan.runtime.checkpoint import random_checkpoint, state_dict_checkpoint
from specplan.runtime.weights import RESIDENT
from test_runtime_engine import STREAMED, hf_from_preset, make_prompts, reference_greedy, run_engine


@pytest.fixture(scope="module")
def gpt_oss():
    hf, spec = hf_from_preset("tiny-gpt-oss", seed=4)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "bias" in n or "sinks" in n or "norm" in n:
                p.copy_((1.0 if "norm" in n else 0.0) + 0.3 * torch.randn(p.shape, generator=g))
    prompts = make_prompts(spec.vocab, seed=7)[:5]  # up to 11 tokens: past the window of 4
    return hf, spec, prompts, reference_greedy(hf, prompts, 12)


def _variant(hf, **changes):
    cfg = hf.config.to_dict() | changes
    other = transformers.AutoModelForCausalLM.from_config(transformers.GptOssConfig.from_dict(cfg)).eval()
    other.load_state_dict(hf.state_dict())
    return other


def test_sinks_and_windows_change_the_reference(gpt_oss):
    hf, _, prompts, expected = gpt_oss
    no_sinks = _variant(hf)
    with torch.no_grad():
        for layer in no_sinks.model.layers:
            layer.self_attn.sinks.fill_(-1e4)
    assert reference_greedy(no_sinks, prompts, 12) != expected
    assert reference_greedy(_variant(hf, sliding_window=64), prompts, 12) != expected


@pytest.mark.parametrize("policy", ["specoffload", "spec-serial", "flexgen", "sequential"])
def test_tiny_gpt_oss_equals_transformers_greedy(gpt_oss, policy):
    hf, spec, prompts, expected = gpt_oss
    assert spec.attn_sinks and spec.router_bias and spec.mlp_bias and spec.swiglu_limit == 7.0
    target = state_dict_checkpoint(spec, hf.state_dict(), torch.float32)
    draft = random_checkpoint(ModelSpec.from_preset("tiny-draft"), torch.float32, seed=1)
    for placement in (STREAMED, RESIDENT):
        out, _ = run_engine(policy, target, draft if policy in SPECULATIVE else None, placement=placement, prompts=prompts)
        assert out == expected, (policy, placement)


@pytest.mark.parametrize("preset,params", [("gpt-oss-20b", 20_914_757_184), ("gpt-oss-120b", 116_829_156_672)])
def test_gpt_oss_presets_count_what_transformers_counts(preset, params):
    spec = ModelSpec.from_preset(preset)
    cfg = transformers.GptOssConfig.from_dict(spec.hf_config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    assert spec.total_params == sum(p.numel() for p in model.parameters()) == params
    assert preset != "gpt-oss-120b" or spec.natural_draft == "gpt-oss-20b"

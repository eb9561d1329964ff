"""gpt-oss against transformers: attention sinks, sliding and full attention alternating, YaRN
rotary frequencies (and their attention factor), q / k / v / o biases, a biased router whose
softmax runs over the top-k logits, and clamped-GLU experts with biases. A tiny random gpt-oss
(sinks, biases and norms drawn away from their defaults) gives transformers' greedy tokens under
every policy, streamed and resident; turning the sinks or the window off changes the reference,
so the test sees both. The presets count what transformers counts."""

from __future__ import annotations

import numpy as np
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


FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)


def _mx(rng, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random MXFP4 blocks [..., rows, cols / 32, 16] and scales [..., rows, cols / 32], and their
    values [..., rows, cols] by the OCP MX rule: e2m1 code (low nibble first) x 2^(scale - 127)."""
    *lead, rows, cols = shape
    blocks = rng.integers(0, 256, (*lead, rows, cols // 32, 16), dtype=np.uint8)
    scales = rng.integers(118, 124, (*lead, rows, cols // 32), dtype=np.uint8)
    codes = np.stack([blocks & 0xF, blocks >> 4], axis=-1).reshape(*lead, rows, cols // 32, 32)
    values = FP4[codes] * np.exp2(scales.astype(np.float32) - 127.0)[..., None]
    return blocks, scales, values.reshape(*lead, rows, cols).astype(np.float32)


def test_an_mxfp4_gpt_oss_checkpoint_runs_as_transformers_on_its_values(tmp_path, gpt_oss):
    import json

    from safetensors.torch import save_file

    from test_gguf import run_engine as run_file

    hf, spec, prompts, _ = gpt_oss
    rng = np.random.default_rng(0)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    tensors = {}
    for i in range(spec.layers):
        p = f"model.layers.{i}.mlp.experts."
        e, h, f = spec.experts, spec.hidden, spec.ffn_inner
        gb, gs, gv = _mx(rng, (e, 2 * f, h))  # on disk rows = output features, gate and up alternating
        db, ds, dv = _mx(rng, (e, h, f))
        tensors |= {p + "gate_up_proj_blocks": torch.from_numpy(gb), p + "gate_up_proj_scales": torch.from_numpy(gs),
                    p + "down_proj_blocks": torch.from_numpy(db), p + "down_proj_scales": torch.from_numpy(ds)}
        state[p + "gate_up_proj"] = torch.from_numpy(gv).transpose(1, 2).contiguous()  # transformers: x @ W
        state[p + "down_proj"] = torch.from_numpy(dv).transpose(1, 2).contiguous()
    tensors |= {k: v for k, v in state.items() if not k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    folder = tmp_path / "ck"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(spec.hf_config, quantization_config={"quant_method": "mxfp4"})))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    ref = type(hf)(hf.config).eval()
    ref.load_state_dict(state)
    mx = ModelSpec.resolve(str(folder))
    assert mx.fmt("experts").name == "mxfp4" and mx.fmt("attention").name == "fp32"
    assert mx.layer_bytes.expert == 3 * h * f // 2 + 3 * h * f // 32 + (2 * f + h) * 4  # codes, scales, biases
    from test_gguf import GEN

    assert run_file(folder, prompts, STREAMED) == reference_greedy(ref, prompts, GEN)
    # a stacked tensor of another shape than the config's: one line, before any weight is read
    from specplan.errors import InputError
    from specplan.runtime.checkpoint import open_checkpoint

    tensors["model.layers.2.mlp.experts.down_proj_scales"] = tensors["model.layers.2.mlp.experts.down_proj_scales"][:, :-1]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    with pytest.raises(InputError, match="layers.2.mlp.experts.down_proj_scales: has shape"):
        open_checkpoint(ModelSpec.resolve(str(folder)), folder, False)

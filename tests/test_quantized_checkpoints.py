"""AWQ, GPTQ and FP8 checkpoint directories (runtime/readers/) against transformers.

Each tiny checkpoint is packed here, with numpy, as its format documents it (AutoAWQ's GEMM
layout, GPTQ's, compressed-tensors' and DeepSeek-style fp8); the reference is transformers'
model on the same weights dequantized here by numpy, W = (q - z) * s or q * s. The engine reads
the packed tensors, keeps them in their own bits, and must give the same greedy tokens,
streamed and resident."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from specplan.errors import InputError
from specplan.models import ModelSpec
from specplan.runtime.checkpoint import open_checkpoint
from test_compressed import STREAMED
from test_gguf import assert_streams_the_plans_bytes, run_engine
from test_runtime_engine import hf_from_preset, reference_greedy
from specplan.runtime.weights import RESIDENT

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
GEN = 8


def _pack8(nibbles: np.ndarray) -> torch.Tensor:
    """[..., 8] 4-bit values -> int32 [...]: value i in bits 4 i .. 4 i + 3."""
    out = np.zeros(nibbles.shape[:-1], dtype=np.uint32)
    for i in range(8):
        out |= nibbles[..., i].astype(np.uint32) << np.uint32(4 * i)
    return torch.from_numpy(out.view(np.int32).copy())


def awq_pack(q: np.ndarray) -> torch.Tensor:
    """codes [K, N] -> AutoAWQ GEMM int32 [K, N / 8] (column 8 j + ORDER[i] in nibble i of column j)."""
    k, n = q.shape
    return _pack8(q.reshape(k, n // 8, 8)[:, :, AWQ_ORDER])


def gptq_pack_rows(q: np.ndarray) -> torch.Tensor:
    """codes [K, N] -> GPTQ int32 [K / 8, N] (input row 8 r + i in nibble i of row r)."""
    k, n = q.shape
    return _pack8(q.reshape(k // 8, 8, n).transpose(0, 2, 1))


def gptq_pack_cols(z: np.ndarray) -> torch.Tensor:
    k, n = z.shape
    return _pack8(z.reshape(k, n // 8, 8))


LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _linears(spec, state: dict, i: int) -> list[str]:
    """Layer i's matrices by their names on disk; a fused MoE layer (transformers' in-memory
    mlp.experts.gate_up_proj / down_proj) split into the per-expert names a checkpoint has."""
    p = f"model.layers.{i}."
    if p + "mlp.experts.down_proj" not in state:
        return [p + lin for lin in LINEARS]
    gate_up, down = state.pop(p + "mlp.experts.gate_up_proj"), state.pop(p + "mlp.experts.down_proj")
    f = spec.ffn_inner
    for e in range(spec.experts):
        state[p + f"mlp.experts.{e}.gate_proj.weight"] = gate_up[e][:f]
        state[p + f"mlp.experts.{e}.up_proj.weight"] = gate_up[e][f:]
        state[p + f"mlp.experts.{e}.down_proj.weight"] = down[e]
    return [p + lin for lin in LINEARS[:4]] + [p + f"mlp.experts.{e}.{w}" for e in range(spec.experts)
                                               for w in ("gate_proj", "up_proj", "down_proj")]


def _fuse_experts(spec, state: dict) -> dict:
    """The reference's state back in transformers' in-memory layout."""
    for i in range(spec.layers):
        p = f"model.layers.{i}.mlp.experts."
        if p + "0.down_proj.weight" in state:
            state[p + "gate_up_proj"] = torch.stack([torch.cat([state.pop(p + f"{e}.gate_proj.weight"),
                                                                state.pop(p + f"{e}.up_proj.weight")]) for e in range(spec.experts)])
            state[p + "down_proj"] = torch.stack([state.pop(p + f"{e}.down_proj.weight") for e in range(spec.experts)])
    return state


def write_checkpoint(folder, method: str, variant: str = "", g: int = 32, preset: str = "tiny-llama"):
    """`preset` with its layer matrices quantized by `method`; returns the reference model."""
    hf, spec = hf_from_preset(preset, seed=3)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    rng = np.random.default_rng(0)
    stems = [stem for i in range(spec.layers) for stem in _linears(spec, state, i)]
    tensors = {k: v for k, v in state.items() if k[:-len(".weight")] not in stems}
    for stem in stems:
        n, k = state[stem + ".weight"].shape
        if method in ("awq", "gptq"):
            q = rng.integers(0, 16, (k, n))
            low = 1 if method == "gptq" and variant != "v2" else 0  # z - 1 must fit the original format's nibble
            z = rng.integers(low, 16, (k // g, n)) if variant != "sym" else np.full((k // g, n), 8)
            s = (rng.random((k // g, n)) * 0.02 + 0.002).astype(np.float16)
            w = (q - np.repeat(z, g, axis=0)) * np.repeat(s.astype(np.float32), g, axis=0)  # [K, N]
            tensors[stem + ".scales"] = torch.from_numpy(s)
            if method == "awq":
                tensors[stem + ".qweight"], tensors[stem + ".qzeros"] = awq_pack(q), awq_pack(z)
            else:
                stored = z if variant == "v2" else z - 1  # the original format stores z - 1
                tensors[stem + ".qweight"] = gptq_pack_rows(q)
                tensors[stem + ".qzeros"] = gptq_pack_cols(stored & 0xF)
                tensors[stem + ".g_idx"] = torch.arange(k, dtype=torch.int32) // g
            state[stem + ".weight"] = torch.from_numpy(w.T.astype(np.float32).copy())
        else:
            codes = (torch.randn(n, k) * 2).to(torch.float8_e4m3fn)
            if variant == "block":
                scale = torch.rand(-(-n // 128), -(-k // 128)) * 0.05 + 0.01
                full = scale.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
            elif variant == "channel":
                scale = torch.rand(n, 1) * 0.05 + 0.01
                full = scale.expand(n, k)
            else:
                scale = torch.tensor(0.03)
                full = scale.expand(n, k)
            tensors[stem + ".weight"] = codes
            tensors[stem + (".weight_scale_inv" if method == "fp8" else ".weight_scale")] = scale
            state[stem + ".weight"] = codes.float() * full
    cfg = dict(spec.hf_config)
    cfg["quantization_config"] = {
        "awq": {"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": True, "version": "gemm"},
        "gptq": {"quant_method": "gptq", "bits": 4, "group_size": g, "desc_act": False, "sym": variant == "sym",
                 "checkpoint_format": "gptq_v2" if variant == "v2" else "gptq"},
        "compressed-tensors": {"quant_method": "compressed-tensors", "format": "float-quantized",
                               "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                                   "num_bits": 8, "type": "float", "strategy": variant or "tensor",
                                   **({"block_structure": [128, 128]} if variant == "block" else {})}}},
                               "ignore": ["lm_head"]},
        "fp8": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"},
    }[method]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    ref = type(hf)(hf.config).eval()
    ref.load_state_dict(_fuse_experts(spec, state))
    return ref


CASES = [("awq", "", 32), ("awq", "", 64), ("gptq", "", 32), ("gptq", "sym", 64), ("gptq", "v2", 32),
         ("compressed-tensors", "tensor", 0), ("compressed-tensors", "channel", 0), ("compressed-tensors", "block", 0),
         ("fp8", "block", 0)]


@pytest.mark.parametrize("method,variant,g", CASES, ids=[f"{m}-{v or 'asym'}-{g}" for m, v, g in CASES])
def test_each_quantized_checkpoint_runs_as_transformers_on_its_dequantized_weights(tmp_path, method, variant, g):
    ref = write_checkpoint(tmp_path / "ck", method, variant, g or 32)
    spec = ModelSpec.resolve(str(tmp_path / "ck"))
    expected_fmt = {"awq": f"int4zp{g}", "gptq": f"int4zp{g}", "fp8": "fp8b128"}.get(
        method, "fp8b128" if variant == "block" else "fp8s")
    assert spec.fmt("attention").name == expected_fmt and spec.fmt("experts").name == expected_fmt
    assert spec.weights_file and spec.fmt("lm_head").name == "fp32"
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, spec.vocab, (n,), generator=gen).tolist() for n in (3, 7, 1, 5)]
    expected = reference_greedy(ref, prompts, GEN)
    for placement in (STREAMED, RESIDENT):
        assert run_engine(tmp_path / "ck", prompts, placement) == expected, placement


@pytest.mark.parametrize("method", ["awq", "compressed-tensors"])
def test_a_quantized_qwen3_moe_reads_its_experts_by_their_own_names(tmp_path, method):
    ref = write_checkpoint(tmp_path / "ck", method, "channel" if method != "awq" else "", 32, preset="tiny-qwen3-moe")
    spec = ModelSpec.resolve(str(tmp_path / "ck"))
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, spec.vocab, (n,), generator=gen).tolist() for n in (3, 7, 1, 5)]
    assert run_engine(tmp_path / "ck", prompts, STREAMED) == reference_greedy(ref, prompts, GEN)


def test_streamed_bytes_are_the_checkpoints_own(tmp_path):
    write_checkpoint(tmp_path / "ck", "awq", "", 32)
    assert_streams_the_plans_bytes(ModelSpec.resolve(str(tmp_path / "ck")), tmp_path / "ck")


@pytest.mark.parametrize("change,field", [
    ({"version": "gemv"}, "quantization_config.version"),
    ({"desc_act": True}, "quantization_config.desc_act"),
    ({"bits": 3}, "quantization_config.bits"),
    ({"quant_method": "bitsandbytes"}, "quantization_config.quant_method"),
])
def test_an_awq_variant_specplan_cannot_read_is_one_line(tmp_path, change, field):
    write_checkpoint(tmp_path / "ck", "awq", "", 32)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=field.replace(".", r"\.")):
        ModelSpec.resolve(str(tmp_path / "ck"))


def test_act_order_gptq_is_refused(tmp_path):
    from safetensors.torch import load_file

    write_checkpoint(tmp_path / "ck", "gptq", "", 32)
    tensors = load_file(str(tmp_path / "ck" / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.g_idx"
    tensors[name] = torch.flip(tensors[name], [0]).contiguous()
    save_file(tensors, str(tmp_path / "ck" / "model.safetensors"))
    spec = ModelSpec.resolve(str(tmp_path / "ck"))
    with pytest.raises(InputError, match="g_idx: reorders the input features"):
        open_checkpoint(spec, tmp_path / "ck", False).layer(0)


def test_fp8_block_scales_land_on_their_blocks_across_several_blocks():
    """A [300, 260] matrix: 3 x 3 blocks, the last ones partial; numpy applies each block's scale."""
    from pathlib import Path

    from specplan.formats import WeightFormat
    from specplan.runtime.readers import fp8

    class Files(dict):
        path = Path("mem")

    codes = (torch.randn(300, 260) * 3).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 3) + 0.5
    q = fp8.read(Files({"x.weight": codes, "x.weight_scale_inv": scale}), "x", 300, 260, WeightFormat("fp8b128"), {})
    ref = codes.float().numpy().copy()
    for i in range(3):
        for j in range(3):
            ref[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] *= scale[i, j].item()
    assert np.array_equal(q.dequantize(torch.float32).numpy(), ref)
    band = torch.empty(128 * 260, dtype=torch.float32)  # the banded path of a 16-bit scratch, too
    out = q.dequantize(torch.bfloat16, torch.empty(300, 260, dtype=torch.bfloat16), band)
    assert torch.equal(out, torch.from_numpy(ref).to(torch.bfloat16))

"""Compressed weights (specplan.formats, runtime/quant.py) against an independent reference.

The reference for a format is the model whose weights are the quantized codes dequantized by
this file's own numpy arithmetic (from the layout formats.py documents), saved as a HF
directory and run by transformers' greedy decoding. The engine, which streams the codes and
dequantizes them with torch on the device, must produce the same tokens, under each policy,
streamed and resident. A misplaced scale, zero point or group boundary changes the numpy
dequantization's error bound or the engine's tokens; both are checked."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import transformers

from specplan.errors import InputError
from specplan.formats import WeightFormat, parse_weights
from specplan.models import ModelSpec
from specplan.plan import Placement, Schedule
from specplan.runtime.checkpoint import CompressedCheckpoint, matrix_group, state_dict_checkpoint
from specplan.runtime.engine import Engine
from specplan.runtime.quant import quantize
from specplan.runtime.sampling import SamplingParams
from specplan.runtime.stats import Stats
from specplan.runtime.weights import RESIDENT
from test_runtime_engine import reference_greedy  # transformers' greedy decoding, one row at a time

CPU = torch.device("cpu")
GEN = 8
STREAMED = Placement(attention="cpu_pinned", ffn="disk", ffn_gpu_layers=1, embed="cpu_pinned", lm_head="cpu_pageable",
                     draft_kv="cpu")


# ---- the independent dequantization ------------------------------------------------------------


def numpy_dequant(q) -> np.ndarray:
    """codes, scales and zero points -> float32, written from formats.py's description alone."""
    rows, cols = q.shape
    scale = None if q.scale is None else q.scale.numpy().astype(np.float32)
    if q.fmt.name == "int8":
        return q.codes.numpy().astype(np.float32) * scale[:, None]
    if q.fmt.name == "fp8":
        return q.codes.to(torch.float32).numpy() * scale[:, None]
    g = q.fmt.group_size
    packed = q.codes.numpy()
    codes = np.empty((rows, cols), dtype=np.float32)
    codes[:, 0::2] = packed & 0x0F  # the even column in the low nibble
    codes[:, 1::2] = packed >> 4
    zero = q.zero.numpy().astype(np.float32)
    out = np.empty((rows, cols), dtype=np.float32)
    for j in range(cols // g):
        block = slice(j * g, (j + 1) * g)
        out[:, block] = codes[:, block] * scale[:, j:j + 1] + zero[:, j:j + 1]
    return out


def error_bound_holds(w: torch.Tensor, q) -> bool:
    """Round to nearest: each weight within half its own group's step of the original."""
    deq = numpy_dequant(q)
    err = np.abs(deq - w.numpy())
    if q.fmt.name == "fp8":  # 3 mantissa bits: half an ulp of the scaled value
        return bool((err <= np.abs(w.numpy()) * 2 ** -4 + q.scale.float().numpy()[:, None] * 2 ** -9 + 1e-7).all())
    step = q.scale.float().numpy()
    step = step[:, None] if step.ndim == 1 else np.repeat(step, q.fmt.group_size, axis=1)
    slack = 1e-3 * np.abs(w.numpy()) + 1e-6  # float16 rounding of the scale and zero point
    return bool((err <= 0.5 * step + slack).all())


@pytest.mark.parametrize("fmt", ["int8", "int4g32", "int4g64", "int4g128", "fp8"])
def test_dequantization_is_within_half_a_step_of_each_weight(fmt):
    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    w[3, 70] = 0.9  # an outlier widens only its own row / group
    q = quantize(w, WeightFormat(fmt))
    assert error_bound_holds(w, q)
    assert q.nbytes == WeightFormat(fmt).matrix_bytes(24, 256)


@pytest.mark.parametrize("fmt", ["int4g32", "int4g128", "int8"])
def test_a_misplaced_scale_or_group_boundary_is_caught(fmt):
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(2)) * 0.05
    w[:, :32] *= 20  # groups of very different ranges
    q = quantize(w, WeightFormat(fmt))
    assert error_bound_holds(w, q)
    if q.scale.ndim == 2:
        q.scale = torch.roll(q.scale, 1, dims=1)  # each group given its neighbour's scale
    else:
        q.scale = torch.roll(q.scale, 1, dims=0)  # each row given another row's scale
    assert not error_bound_holds(w, q)
    if q.zero is not None:
        q = quantize(w, WeightFormat(fmt))
        q.zero = torch.roll(q.zero, 1, dims=1)
        assert not error_bound_holds(w, q)


# ---- the engine against transformers on the dequantized model -------------------------------------


def tiny(name: str, **changes) -> tuple[ModelSpec, dict]:
    spec = ModelSpec.from_preset(name)
    cfg = dict(spec.hf_config, **changes)
    spec = ModelSpec.from_hf_config(cfg, name=name)
    hf_cfg = transformers.CONFIG_MAPPING[cfg["model_type"]].from_dict(cfg)
    torch.manual_seed(3)
    return spec, transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()


def reference_model(spec: ModelSpec, hf, weights: str, folder):
    """The HF model whose matrices are the quantized codes, dequantized by numpy_dequant."""
    spec = spec.with_weights(parse_weights(weights).fixed)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    def dequantized(t: torch.Tensor, group: str) -> torch.Tensor:
        q = quantize(t, spec.fmt(group))
        assert error_bound_holds(t, q)
        return torch.from_numpy(numpy_dequant(q))

    for name, t in state.items():
        short = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
        if short.startswith("mlp.experts."):  # transformers keeps Mixtral's experts stacked [E, rows, cols]
            state[name] = torch.stack([dequantized(m, "experts") for m in t])
            continue
        group = None if short == "mlp.gate.weight" else matrix_group(short)  # the router stays
        if group is not None and spec.fmt(group).compressed:
            state[name] = dequantized(t, group)
    ref = type(hf)(hf.config).eval()
    ref.load_state_dict(state)
    ref.save_pretrained(folder)
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval(), spec


def run(policy, spec, weights, placement, prompts, draft=None):
    speculative = policy in ("specoffload", "spec-serial")
    schedule = Schedule(policy=policy, target_batch=2, num_batches=2, prefill_chunk=4, draft_batch=2,
                        gamma=3 if speculative else 0, attention_device="cpu",
                        prefetch_depth=0 if policy == "sequential" else 1).validate()
    target = CompressedCheckpoint(state_dict_checkpoint(spec, weights, torch.float32))
    stats = Stats(CPU)
    engine = Engine(schedule, placement, target, draft if speculative else None, CPU, rows=schedule.rows,
                    max_prompt_len=max(map(len, prompts)), gen_len=GEN, sampling=SamplingParams(temperature=0.0),
                    stats=stats)
    try:
        return engine.generate(prompts), stats.counts
    finally:
        engine.close()


def prompts_for(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (3, 7, 1, 5)]


CASES = [("tiny-llama", {}, "int8"), ("tiny-llama", {}, "int4g32"), ("tiny-llama", {}, "fp8"),
         ("tiny-llama", {"hidden_size": 128, "intermediate_size": 256}, "int4g128,lm_head=int8,embed=int4g64"),
         ("tiny-mixtral", {}, "int4g32"), ("tiny-mixtral", {}, "attention=fp8,experts=int8"),
         # torch's weight-only kernels, multiplying from the codes (no dequantization first)
         ("tiny-llama", {}, "int8+fused"), ("tiny-llama", {}, "attention=int4g32+fused,experts=int4g64+fused"),
         ("tiny-mixtral", {}, "attention=int8+fused,experts=int4g32+fused")]


@pytest.mark.parametrize("name,changes,weights", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_engine_equals_transformers_on_the_dequantized_model(tmp_path, name, changes, weights):
    spec, hf = tiny(name, **changes)
    ref, qspec = reference_model(spec, hf, weights, tmp_path / "ref")
    prompts = prompts_for(spec.vocab)
    expected = reference_greedy(ref, prompts, GEN)
    assert expected != reference_greedy(hf, prompts, GEN) or "int8" in weights  # the formats change the model
    state = hf.state_dict()
    draft = state_dict_checkpoint(spec, state, torch.float32)  # full precision: drafts the compressed target
    policies = ["specoffload", "spec-serial", "flexgen", "sequential"] if name == "tiny-llama" else ["spec-serial", "flexgen"]
    for policy in policies:
        for placement in (STREAMED, RESIDENT):
            out, counts = run(policy, qspec, state, placement, prompts, draft)
            assert out == expected, (policy, placement)
            if placement is STREAMED:  # the bytes copied per pass are the plan's, to the byte
                assert counts["h2d_bytes"] > 0


@pytest.mark.parametrize("weights", ["int8", "int4g32,lm_head=int8", "fp8,attention=int4g64", "", "int8+fused",
                                     "int4g32+fused,attention=int8"])
@pytest.mark.parametrize("name,dtype", [("tiny-llama", "float32"), ("tiny-mixtral", "float32"), ("tiny-llama", "bfloat16")])
def test_bytes_copied_per_pass_are_the_plans_to_the_byte(name, dtype, weights):
    from specplan.memory import streamed_bytes_per_pass, weights_memory
    from specplan.runtime.checkpoint import random_checkpoint
    from specplan.runtime.weights import WeightStore

    spec = ModelSpec.from_preset(name).with_dtype(dtype).with_weights(parse_weights(weights).fixed)
    stats = Stats(CPU)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    store = WeightStore(CompressedCheckpoint(random_checkpoint(spec, torch_dtype)), STREAMED, CPU, 0, stats)

    def one_pass():
        for u in range(spec.layers + 1):
            store.acquire(u)
            store.release(u)
    one_pass()
    before = stats.counts["h2d_bytes"]
    one_pass()
    assert stats.counts["h2d_bytes"] - before == streamed_bytes_per_pass(spec, STREAMED)
    # the scratch buffer is the plan's: the largest dequantized matrix in the compute dtype (and
    # below float32 the float32 band buffer beside it)
    scratch = dict((n, b) for n, _, b in weights_memory(spec, STREAMED, 0)).get("dequantization scratch", 0)
    assert sum(t.nbytes for t in (store.scratch, store.block) if t is not None) == scratch
    store.close()


def test_a_cached_file_of_another_checkpoint_is_refused(tmp_path):
    """The cache is keyed by the checkpoint: a file copied from another's folder is refused,
    one line naming it, and a second load of the same checkpoint reads the codes back."""
    from specplan.runtime.checkpoint import QuantCache, checkpoint_key, compress, load_checkpoint

    spec, hf = tiny("tiny-llama")
    qspec = spec.with_weights(parse_weights("int4g32").fixed)
    a, b = tmp_path / "a", tmp_path / "b"
    hf.save_pretrained(a)
    torch.manual_seed(4)
    type(hf)(hf.config).save_pretrained(b)
    cache_a = QuantCache(tmp_path / "cache", checkpoint_key(a), qspec)
    first = compress(load_checkpoint(a, qspec, torch.float32), cache_a).layer(1)
    again = compress(load_checkpoint(a, qspec, torch.float32), cache_a).layer(1)  # read back from the file
    assert torch.equal(first["mlp.down_proj.weight"].codes, again["mlp.down_proj.weight"].codes)
    assert (cache_a.folder / "layer1.safetensors").is_file()
    cache_b = QuantCache(tmp_path / "cache", checkpoint_key(b), qspec)
    assert cache_b.folder != cache_a.folder
    cache_b.folder.mkdir(parents=True)
    (cache_b.folder / "layer1.safetensors").write_bytes((cache_a.folder / "layer1.safetensors").read_bytes())
    with pytest.raises(InputError, match="layer1.safetensors: metadata.checkpoint: was written for checkpoint"):
        compress(load_checkpoint(b, qspec, torch.float32), cache_b).layer(1)


def test_fp8_is_refused_where_the_device_cannot_convert_it(monkeypatch):
    from specplan.runtime import quant
    from specplan.runtime.run import check_device_formats

    spec = ModelSpec.from_preset("tiny-llama").with_weights(parse_weights("fp8").fixed)
    check_device_formats([spec], CPU)  # this torch has float8 on the CPU
    monkeypatch.setattr(quant, "fp8_dtype", lambda: None)
    with pytest.raises(InputError, match="weights.attention: fp8 cannot run on cpu"):
        check_device_formats([spec], CPU)


# ---- the target as its own draft, compressed ------------------------------------------------------


def test_a_compressed_self_draft_keeps_the_targets_greedy_tokens(tmp_path):
    """`--draft self:int8` drafts with the target's own weights in int8 (self:int4g32:2, its
    first two layers in int4): greedy output is the target's alone, and the int8 copy of a
    model agrees with it on most tokens."""
    import subprocess
    import sys

    from specplan.plan import Plan
    from specplan.runtime.run import run_plan

    common = ["--target", "tiny-llama", "--prompt-len", "6", "--gen-len", "10", "--num-prompts", "4",
              "--gpu", "rtx4090", "--acceptance", "0.9"]
    outputs = {}
    for draft, policy in (("none", "flexgen"), ("self:int8", "spec-serial"), ("self:int4g32:2", "specoffload")):
        path = tmp_path / f"{policy}.json"
        res = subprocess.run([sys.executable, "-m", "specplan", "optimize", *common, "--draft", draft, "--policy", policy,
                              "--out", str(path)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        plan = Plan.load(str(path))
        assert plan.draft == (None if draft == "none" else draft)
        rep = run_plan(plan, "tiny-llama", plan.draft, random_weights=True, device="cpu", force=True)
        outputs[draft] = rep["outputs"]
        if draft == "self:int8":
            assert plan.weights == {"draft": "int8"}
            assert rep["measured"]["acceptance_rate"] > 0.5
    assert outputs["self:int8"] == outputs["none"] == outputs["self:int4g32:2"]


@pytest.mark.parametrize("name", ["self:int3", "self:int4:0", "self:int4:99", "self:", "self:int8:2:1"])
def test_a_bad_self_draft_is_one_line(name):
    from specplan.models import resolve_draft

    with pytest.raises(InputError, match="--draft"):
        resolve_draft(name, ModelSpec.from_preset("tiny-llama"))


@pytest.mark.parametrize("fmt", ["int8", "int4g32", "fp8"])
def test_a_16_bit_scratch_is_filled_band_by_band_with_the_same_bits(fmt):
    """Into a bfloat16 scratch the float32 arithmetic runs through a small float32 buffer a
    band of rows at a time (no temporary the size of the matrix): the bits are those of
    dequantizing whole and casting."""
    q = quantize(torch.randn(37, 64, generator=torch.Generator().manual_seed(3)) * 0.05, WeightFormat(fmt))
    whole = q.dequantize(torch.bfloat16)
    out = torch.empty(37, 64, dtype=torch.bfloat16)
    q.dequantize(torch.bfloat16, out, torch.empty(5 * 64))  # bands of 5 rows
    assert torch.equal(out, whole)


def test_a_tied_head_in_the_embeddings_format_is_cached_once(tmp_path):
    from specplan.runtime.checkpoint import QuantCache, checkpoint_key, compress, load_checkpoint

    spec, hf = tiny("tiny-llama", tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "m")
    qspec = spec.with_weights(parse_weights("int8,lm_head=int8,embed=int8").fixed)
    cache = QuantCache(tmp_path / "cache", checkpoint_key(tmp_path / "m"), qspec)
    for _ in range(2):  # written, then read back
        g = compress(load_checkpoint(tmp_path / "m", qspec, torch.float32), cache).globals()
        assert g["lm_head.weight"] is g["model.embed_tokens.weight"]


def test_a_sliced_prefill_pays_a_dequantization_per_slice():
    """A pass of more tokens than one activation slice is run slice by slice, and each slice
    dequantizes the layer again: the cost model charges each (and nothing when uncompressed)."""
    from specplan import cost
    from specplan.hardware import load_profile

    prof = load_profile("rtx4090")
    m = ModelSpec.from_preset("mixtral-8x7b")
    q = m.with_weights(parse_weights("int4").fixed)
    rows, q_len = 64, 512  # 32768 tokens: slices of 8 rows
    slices = -(-rows // cost.rows_per_slice(q_len))
    assert slices == 8
    assert cost.sliced_dequant_s(prof, m, rows, q_len) == (0.0, 0.0)
    proj, ffn = cost.sliced_dequant_s(prof, q, rows, q_len)
    assert proj == pytest.approx(7 * cost.dequant_time_s(prof, q, "attention"))
    assert ffn == pytest.approx((8 * 8 - 8) * cost.dequant_time_s(prof, q, "experts"), rel=1e-3)  # every expert hit
    one = cost.target_layer_costs(prof, q, 8, q_len, 0, "cpu", prefill=True)
    assert cost.sliced_dequant_s(prof, q, 8, q_len) == (0.0, 0.0) and one.proj > 0


@pytest.mark.parametrize("fused_s,picked", [(1e-7, True), (1.0, False)])
def test_the_profiles_measurement_decides_between_the_fused_kernel_and_dequantization(fused_s, picked):
    """A profile whose fused int8 kernel is far faster than dequantizing gets a fused plan; one
    whose kernel is far slower keeps the dequantization. The tables are made up: this checks the
    choice, not a speed."""
    from specplan.cost import dequant_op_name, fused_op_name
    from specplan.hardware import HardwareProfile, load_profile
    from specplan.workload import Workload
    from planner.optimize import optimize_formats, weight_candidates

    base = load_profile("rtx4090")
    tgt = ModelSpec.resolve("mixtral-8x7b")
    fmts = parse_weights("int8")
    q = tgt.with_weights(replace(fmts.fixed, draft=None))
    shapes = sorted({r * c for g in ("attention", "experts") for r, c in q.call_shapes(g)})
    tables = dict(base.kernels)
    tables[dequant_op_name(q, "attention", "gpu")] = {"axes": ["params"], "grid": [shapes], "seconds": [1e-3] * len(shapes)}
    tables[fused_op_name(replace(q, weights=parse_weights("int8+fused").fixed), "attention", "gpu")] = {
        "axes": ["tokens", "params"], "grid": [[1.0, 4096.0], shapes], "seconds": [[fused_s] * len(shapes)] * 2}
    prof = HardwareProfile.from_dict(base.to_dict() | {"kernels": {k: (v if isinstance(v, dict) else v.to_dict())
                                                                     for k, v in tables.items()}}, "test")
    assert isinstance(prof, HardwareProfile)
    pairs = weight_candidates(fmts, tgt, None, prof)
    assert len(pairs) == 4  # attention and experts, each dequantized or fused
    _, t, _ = optimize_formats(pairs, prof, Workload(prompt_lens=(128,), gen_len=32, num_prompts=64), ["flexgen"], ["waves"])
    assert (t.fmt("experts").fused and t.fmt("attention").fused) == picked
    assert t.fmt("experts").fused or t.fmt("attention").fused or not picked


def test_a_fused_plan_is_refused_where_torch_has_no_kernel(monkeypatch):
    from specplan.runtime import quant
    from specplan.runtime.run import check_device_formats

    spec = ModelSpec.from_preset("tiny-llama").with_weights(parse_weights("int8+fused").fixed)
    check_device_formats([spec], CPU)  # this torch has it on the CPU
    monkeypatch.delattr(torch, "_weight_int8pack_mm")
    with pytest.raises(InputError, match="weights.attention.*no int8\\+fused kernel"):
        check_device_formats([spec], CPU)


def test_a_self_draft_without_a_depth_keeps_the_deepest_half_that_fits():
    """`self:int4` on a 24 GB card: the whole Mixtral copy does not fit beside the target; the
    planner keeps the deepest of L/2, L/4, ... that does, and says so in the name it plans with."""
    from planner.optimize import minimal_placement, self_draft_depth
    from planner.shapes import enumerate_shapes
    from specplan.hardware import load_profile
    from specplan.models import resolve_draft
    from specplan.workload import Workload

    tgt, prof = ModelSpec.resolve("mixtral-8x7b"), load_profile("rtx4090")
    wl = Workload(prompt_lens=(512,), gen_len=128, num_prompts=512)
    name, drf = self_draft_depth("self:int4", tgt, resolve_draft("self:int4", tgt), prof, wl)
    depth = drf.layers
    assert name == f"self:int4:{depth}" and 1 <= depth < tgt.layers and drf.self_draft
    small = min((sh for p in ("spec-serial", "specoffload") for sh in enumerate_shapes(p, wl)),
                key=lambda sh: (sh.num_batches * sh.target_batch, sh.draft_batch, sh.gamma))
    fits = lambda n: minimal_placement(tgt, resolve_draft(f"self:int4:{n}", tgt), small, wl, prof, explain=False)[0]  # noqa: E731
    assert fits(depth) is not None and fits(min(2 * depth, tgt.layers)) is None
    # a depth given outright, or a card where the whole copy fits, is left as it is
    assert self_draft_depth("self:int4:3", tgt, resolve_draft("self:int4:3", tgt), prof, wl)[0] == "self:int4:3"
    big = load_profile("h100-pcie")
    assert self_draft_depth("self:int4", tgt, resolve_draft("self:int4", tgt), big, wl)[0] == "self:int4"

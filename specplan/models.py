"""ModelSpec: the shapes of a decoder-only transformer and the bytes and FLOPs they imply.

Built from a Hugging Face ``config.json`` (read as plain JSON, so it works offline) or
from a preset name; presets ship as config files in ``specplan/presets/models/``.
Covers the Llama / Mistral / Qwen2 dense family and the Mixtral MoE family.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import InputError, UnknownNameError, require
from .fileio import read_json
from .formats import DEQUANT_BLOCK_ELEMS, DTYPE_FORMAT, WeightFormat, WeightFormats

# the compute dtype: activations, the KV cache, norms; weight matrices have a format (formats.py)
DTYPE_BYTES: dict[str, float] = {
    "float32": 4, "fp32": 4,
    "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2,
}
SUPPORTED_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                   "Qwen3MoeForCausalLM", "GptOssForCausalLM")
ATTENTION_BIAS_ARCHS = ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "GptOssForCausalLM")
MOE_ARCHS = {"MixtralForCausalLM": "num_local_experts", "Qwen3MoeForCausalLM": "num_experts",
             "GptOssForCausalLM": "num_local_experts"}  # -> its experts key


@dataclass(frozen=True)
class LayerBytes:
    """Bytes of one transformer layer's tensor groups at the spec's dtype."""

    attention: float  # q, k, v, o projections (and their biases)
    router: float  # MoE gate; 0 for dense layers
    expert: float  # one expert, or the dense MLP
    experts: int  # experts per layer (1 for dense)
    norms: float

    @property
    def ffn(self) -> float:
        return self.expert * self.experts

    @property
    def total(self) -> float:
        return self.attention + self.router + self.ffn + self.norms


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn_inner: int
    vocab: int
    experts: int = 1  # 1 = dense MLP
    top_k: int = 1
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # an RMSNorm over each head's q and k before RoPE (Qwen3)
    norm_topk_prob: bool = True  # the chosen experts' weights renormalised to sum to 1 (Mixtral; Qwen3-MoE's flag)
    attn_sinks: bool = False  # a learned logit per head that takes a share of each softmax (gpt-oss)
    swiglu_limit: float = 0.0  # gpt-oss's clamped GLU (gate <= limit, |up| <= limit), 0: SiLU(gate) * up
    router_bias: bool = False  # the router's linear has a bias (gpt-oss: top-k of the logits, softmax over them)
    dtype: str = "bfloat16"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_positions: int = 4096
    weights: WeightFormats = WeightFormats()  # each tensor group's format (formats.py)
    self_draft: bool = False  # the target's own weights, compressed (resolve_draft): its formats are its own
    weights_file: str = ""  # a file whose own formats the weights keep (a GGUF): --weights cannot change them
    hf_config: dict = field(default_factory=dict, compare=False, repr=False)

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], name: str = "", source: str = "config.json") -> "ModelSpec":
        arch = (cfg.get("architectures") or [None])[0] or _arch_from_model_type(cfg.get("model_type"), source)
        require(arch in SUPPORTED_ARCHS, source, "architectures", f"'{arch}' is not supported", " or ".join(SUPPORTED_ARCHS))
        get = lambda key, default=None: cfg.get(key, default)  # noqa: E731
        for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"):
            v = get(key)
            require(_positive_int(v), source, key, f"got {v!r}", "a positive integer")
        for key in ("num_key_value_heads", "head_dim", "num_local_experts", "num_experts", "num_experts_per_tok"):
            v = get(key)
            require(v is None or _positive_int(v), source, key, f"got {v!r}", "a positive integer")
        heads = get("num_attention_heads")
        head_dim = get("head_dim") or get("hidden_size") // heads
        experts = get(MOE_ARCHS[arch], 8) if arch in MOE_ARCHS else 1
        top_k = get("num_experts_per_tok", 2) if arch in MOE_ARCHS else 1
        qwen3 = arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
        if arch == "Qwen3MoeForCausalLM":
            require(not get("mlp_only_layers") and get("decoder_sparse_step", 1) == 1, source, "mlp_only_layers",
                    "dense layers among the sparse ones are not supported", "every layer sparse (decoder_sparse_step 1)")
            require(_positive_int(get("moe_intermediate_size")), source, "moe_intermediate_size",
                    f"got {get('moe_intermediate_size')!r}", "a positive integer")
        if qwen3:
            require(not get("use_sliding_window", False), source, "use_sliding_window", "sliding-window layers are "
                    "not supported", "false")
        dtype = str(get("torch_dtype") or get("dtype") or "bfloat16").replace("torch.", "")
        spec = cls(
            name=name or cfg.get("_name_or_path", "") or arch,
            arch=arch,
            layers=get("num_hidden_layers"),
            hidden=get("hidden_size"),
            heads=heads,
            kv_heads=get("num_key_value_heads") or heads,
            head_dim=head_dim,
            ffn_inner=get("moe_intermediate_size") if arch == "Qwen3MoeForCausalLM" else get("intermediate_size"),
            vocab=get("vocab_size"),
            experts=experts,
            top_k=top_k,
            tie_embeddings=bool(get("tie_word_embeddings", False)),
            # transformers: Qwen2 always biases q/k/v; Llama's attention_bias biases q/k/v and o,
            # and its mlp_bias the MLP; Mistral and Mixtral have neither.
            # attention_bias biases q/k/v and o where the family has the flag (Qwen2 always q/k/v only)
            qkv_bias=arch == "Qwen2ForCausalLM" or (arch in ATTENTION_BIAS_ARCHS and bool(get("attention_bias", False))),
            o_bias=arch in ATTENTION_BIAS_ARCHS and bool(get("attention_bias", False)),
            qk_norm=qwen3,
            norm_topk_prob=bool(get("norm_topk_prob", False)) if arch == "Qwen3MoeForCausalLM" else True,  # transformers' default
            mlp_bias=(arch == "LlamaForCausalLM" and bool(get("mlp_bias", False))) or arch == "GptOssForCausalLM",
            attn_sinks=arch == "GptOssForCausalLM",
            swiglu_limit=float(get("swiglu_limit", 7.0)) if arch == "GptOssForCausalLM" else 0.0,
            router_bias=arch == "GptOssForCausalLM",
            dtype=dtype if dtype in DTYPE_BYTES else "bfloat16",
            rms_norm_eps=float(get("rms_norm_eps", 1e-5)),
            rope_theta=float(get("rope_theta") or (get("rope_parameters") or {}).get("rope_theta") or 10000.0),
            max_positions=int(get("max_position_embeddings", 4096)),
            hf_config=dict(cfg),
        )
        spec.validate(source)
        return spec

    @classmethod
    def from_file(cls, path: str | Path, name: str = "") -> "ModelSpec":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        cfg = read_json(path)
        if not isinstance(cfg, dict):
            raise InputError(str(path), "top level", "is not a JSON object", "a HF config.json")
        spec = cls.from_hf_config(cfg, name=name or path.parent.name, source=str(path))
        if cfg.get("quantization_config"):  # AWQ / GPTQ / FP8: the groups keep the checkpoint's formats
            from specplan.runtime.readers import quantized_formats

            weights, _ = quantized_formats(cfg, str(path))
            spec = replace(spec.with_weights(weights, str(path)), weights_file=str(path.parent))
        return spec

    @classmethod
    def from_preset(cls, name: str) -> "ModelSpec":
        key = name.lower()
        presets = preset_names()
        if key not in presets:
            raise UnknownNameError("model", name, presets)
        text = resources.files("specplan").joinpath(f"presets/models/{key}.json").read_text()
        return cls.from_hf_config(json.loads(text), name=key, source=f"preset {key}")

    @classmethod
    def resolve(cls, name_or_path: str) -> "ModelSpec":
        """A preset name, a directory with config.json, a config.json path, or a GGUF file."""
        p = Path(name_or_path)
        if p.suffix.lower() == ".gguf":
            return cls.from_gguf(p)
        if p.exists():
            return cls.from_file(p)
        return cls.from_preset(name_or_path)

    @classmethod
    def from_gguf(cls, path: str | Path) -> "ModelSpec":
        """A GGUF file's model: its shapes from the metadata, each group in the file's format."""
        from specplan.runtime.readers.gguf import gguf_config

        cfg, weights = gguf_config(path)
        spec = cls.from_hf_config(cfg, name=Path(path).stem, source=str(path))
        return replace(spec.with_weights(weights, str(path)), weights_file=str(path))

    @staticmethod
    def files_of(name_or_path: str | None) -> Path | None:
        """What a model name reads (an output may not be it): a directory (its config, weights
        and tokenizer), a config.json's folder, or a preset's file."""
        p = Path(name_or_path) if name_or_path else None
        if p is None:
            return None
        if p.exists():
            return p if p.is_dir() or p.suffix.lower() == ".gguf" else p.parent
        key = str(name_or_path).lower()
        preset = Path(str(resources.files("specplan").joinpath(f"presets/models/{key}.json")))
        return preset if key in preset_names() and preset.is_file() else None

    def with_dtype(self, dtype: str) -> "ModelSpec":
        require(dtype in DTYPE_BYTES, "argument", "dtype", f"'{dtype}' is unknown", ", ".join(DTYPE_BYTES))
        return replace(self, dtype=dtype)

    def with_weights(self, weights: WeightFormats, source: str = "argument") -> "ModelSpec":
        """This model with its tensor groups in `weights` (refused if a matrix cannot hold them)."""
        spec = replace(self, weights=replace(weights, draft=None))  # a separate draft's format is the draft's own
        for group, shapes in spec._matrices().items():
            fmt = spec.fmt(group)
            for rows, cols in shapes:
                fmt.check_shape(rows, cols, source, f"--weights {group}={fmt.name} for {self.name}")
        return spec

    @property
    def natural_draft(self) -> str | None:
        """The preset a preset names as its draft (a smaller model sharing its tokenizer), if any."""
        return self.hf_config.get("_draft")

    def fmt(self, group: str) -> WeightFormat:
        """The format of a tensor group: attention, experts, lm_head or embed."""
        return self.weights.of(group, self.dtype)

    def converted(self, group: str) -> bool:
        """The group's weights are stored in another format than the dtype: turned into the
        dtype (dequantized, or cast) before each use."""
        return self.fmt(group).name != DTYPE_FORMAT.get(self.dtype)

    def _matrices(self) -> dict[str, list[tuple[int, int]]]:
        """Each group's weight matrices as [rows, cols] (one expert for `experts`)."""
        h, f, q, kv = self.hidden, self.ffn_inner, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"attention": [(q, h), (kv, h), (kv, h), (h, q)], "experts": [(f, h), (f, h), (h, f)],
                "lm_head": [(self.vocab, h)], "embed": [(self.vocab, h)]}

    def group_bytes(self, group: str) -> float:
        """Bytes of a group's matrices in its format (one expert for `experts`), biases apart."""
        fmt = self.fmt(group)
        return float(sum(fmt.matrix_bytes(r, c) for r, c in self._matrices()[group]))

    def call_shapes(self, group: str) -> list[tuple[int, int]]:
        """The matrices one use of a group multiplies, one call each, as [rows, cols]: fused
        q|k|v and o; one expert's fused gate|up and down; the LM head."""
        h, f, q, kv = self.hidden, self.ffn_inner, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"attention": [(q + 2 * kv, h), (h, q)], "experts": [(2 * f, h), (h, f)],
                "lm_head": [(self.vocab, h)]}.get(group, [])

    def dequant_shapes(self, group: str) -> list[tuple[int, int]]:
        """The matrices one use of a group dequantizes (call_shapes; none where the group is in
        the dtype, or multiplied by a fused kernel from its codes)."""
        return self.call_shapes(group) if self.converted(group) and not self.fmt(group).fused else []

    def fused_shapes(self, group: str) -> list[tuple[int, int]]:
        """The matrices one use of a group hands to a fused kernel (none unless its format is fused)."""
        return self.call_shapes(group) if self.fmt(group).fused else []

    @cached_property
    def dequant_scratch_params(self) -> int:
        """The largest matrix one dequantization writes at once (the runtime's scratch buffer);
        0 if nothing is compressed."""
        return max((r * c for g in ("attention", "experts", "lm_head") for r, c in self.dequant_shapes(g)), default=0)

    @cached_property
    def dequant_scratch_bytes(self) -> float:
        """The scratch buffer, and below a float32 dtype the float32 block buffer beside it."""
        n = self.dequant_scratch_params
        block = min(n, DEQUANT_BLOCK_ELEMS) * 4 if self.dtype_bytes != 4 else 0
        return n * self.dtype_bytes + block

    def validate(self, source: str) -> None:
        require(self.heads % self.kv_heads == 0, source, "num_key_value_heads",
                f"{self.kv_heads} does not divide num_attention_heads={self.heads}", "a divisor of the head count")
        require(1 <= self.top_k <= self.experts, source, "num_experts_per_tok",
                f"{self.top_k} with {self.experts} experts", "1 <= top_k <= num_local_experts")

    # ---- derived sizes ----------------------------------------------------------------
    @cached_property
    def is_moe(self) -> bool:
        return self.experts > 1

    @cached_property
    def dtype_bytes(self) -> float:
        return DTYPE_BYTES[self.dtype]

    @cached_property
    def attention_params_per_layer(self) -> int:
        q = self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        o = self.heads * self.head_dim * self.hidden
        return q + kv + o + self._attention_bias_params

    @cached_property
    def router_params_per_layer(self) -> int:
        return (self.hidden + self.router_bias) * self.experts if self.is_moe else 0

    @cached_property
    def expert_params(self) -> int:
        """One expert (gate, up, down projections), or the dense MLP."""
        bias = 2 * self.ffn_inner + self.hidden if self.mlp_bias else 0
        return 3 * self.hidden * self.ffn_inner + bias

    @cached_property
    def norm_params_per_layer(self) -> int:
        return 2 * self.hidden

    @cached_property
    def params_per_layer(self) -> int:
        return (self.attention_params_per_layer + self.router_params_per_layer
                + self.expert_params * self.experts + self.norm_params_per_layer)

    @cached_property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @cached_property
    def lm_head_params(self) -> int:
        return 0 if self.tie_embeddings else self.vocab * self.hidden

    @cached_property
    def total_params(self) -> int:
        return self.layers * self.params_per_layer + self.embed_params + self.lm_head_params + self.hidden

    @cached_property
    def active_params_per_token(self) -> int:
        """Parameters one token multiplies through (top_k experts, not all), excluding the embedding lookup."""
        per_layer = (self.attention_params_per_layer + self.router_params_per_layer
                     + self.expert_params * self.top_k + self.norm_params_per_layer)
        return self.layers * per_layer + self.vocab * self.hidden

    @cached_property
    def layer_bytes(self) -> LayerBytes:
        """Each group in its format (formats.py); biases, norms and the router in the dtype."""
        b = self.dtype_bytes
        expert_bias = self.expert_params - 3 * self.hidden * self.ffn_inner
        return LayerBytes(
            attention=self.group_bytes("attention") + self._attention_bias_params * b,
            router=self.router_params_per_layer * b,
            expert=self.group_bytes("experts") + expert_bias * b,
            experts=self.experts,
            norms=self.norm_params_per_layer * b,
        )

    @cached_property
    def _attention_bias_params(self) -> int:
        """The attention's vectors, kept in the dtype: q/k/v and o biases, and the q and k norms."""
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return (bias + (self.hidden if self.o_bias else 0) + (2 * self.head_dim if self.qk_norm else 0)
                + (self.heads if self.attn_sinks else 0))

    @cached_property
    def embed_bytes(self) -> float:
        return self.group_bytes("embed")

    @cached_property
    def lm_head_bytes(self) -> float:
        return 0.0 if self.head_is_embedding else self.group_bytes("lm_head")

    @cached_property
    def head_is_embedding(self) -> bool:
        """Tied embeddings kept in one format: one matrix serves both (in different formats the
        head is a matrix of its own)."""
        return self.tie_embeddings and self.fmt("lm_head") == self.fmt("embed")

    @cached_property
    def head_bytes(self) -> float:
        """The LM head's weights; with tied embeddings the runtime keeps its own copy of the
        embedding matrix for the head (the host copy serves token lookups)."""
        return self.group_bytes("lm_head")

    @cached_property
    def total_bytes(self) -> float:
        lb = self.layer_bytes
        return self.layers * lb.total + self.embed_bytes + self.lm_head_bytes + self.hidden * self.dtype_bytes

    @cached_property
    def kv_bytes_per_token(self) -> float:
        """K and V of one token across all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @cached_property
    def kv_bytes_per_token_per_layer(self) -> float:
        return self.kv_bytes_per_token / self.layers

    def flops_per_token(self, context: int = 0) -> float:
        """Forward FLOPs for one token attending to `context` earlier tokens (2 FLOPs per multiply-add)."""
        matmul = 2 * self.active_params_per_token
        attention = 4 * self.layers * self.heads * self.head_dim * context
        return matmul + attention

    def byte_breakdown(self) -> dict[str, float]:
        lb = self.layer_bytes
        return {
            "attention_per_layer_bytes": lb.attention,
            "router_per_layer_bytes": lb.router,
            "expert_bytes": lb.expert,
            "ffn_per_layer_bytes": lb.ffn,
            "norms_per_layer_bytes": lb.norms,
            "layer_bytes": lb.total,
            "embed_bytes": self.embed_bytes,
            "lm_head_bytes": self.lm_head_bytes,
            "total_bytes": self.total_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("hf_config")
        d["weights"] = self.weights.to_dict()
        d.pop("self_draft")
        d["total_params"] = self.total_params
        d["active_params_per_token"] = self.active_params_per_token
        d["flops_per_token"] = self.flops_per_token(0)
        d["bytes"] = self.byte_breakdown()
        return d


def apply_weights(target: ModelSpec, draft: ModelSpec | None, weights: WeightFormats,
                  source: str = "argument") -> tuple[ModelSpec, ModelSpec | None]:
    """The pair with their groups in `weights`: the target's groups, and `draft` on the draft's
    layers (refused, one line, where a matrix cannot hold its format); a self-draft keeps the
    format its name gives."""
    for m, asked in ((target, replace(weights, draft=None)), (draft, weights.for_draft())):
        mine = {g: f for g, f in (m.weights.to_dict() if m is not None else {}).items() if g in asked.to_dict()}
        if m is not None and m.weights_file and asked.to_dict() and asked.to_dict() != mine:
            raise InputError(source, "--weights", f"{m.name} keeps the formats of {m.weights_file} "
                             f"({m.weights.describe()}); {asked.describe()} cannot be applied to it",
                             "no --weights for a GGUF, AWQ, GPTQ or FP8 checkpoint")
    if draft is not None and not draft.self_draft and not draft.weights_file:
        draft = draft.with_weights(weights.for_draft(), source)
    return (target if target.weights_file else target.with_weights(weights, source)), draft


SELF_PREFIX = "self:"


def is_self_draft(name: str | None) -> bool:
    return bool(name) and str(name).lower().startswith(SELF_PREFIX)


def resolve_draft(name: str | None, target: ModelSpec, source: str = "--draft") -> ModelSpec | None:
    """A draft by name: `none`, a model (ModelSpec.resolve), or `self:FORMAT[:LAYERS]`, the
    target's own weights in FORMAT (int8, int4, ...), its first LAYERS layers (default all)
    with its LM head and embedding, all in that format, resident on the GPU."""
    if name is None or str(name).lower() == "none":
        return None
    if not is_self_draft(name):
        return ModelSpec.resolve(name)
    if target.weights_file:
        raise InputError("argument", source, f"'{name}': a self-draft quantizes the target's full-precision weights, and "
                         f"{target.name} keeps the formats of {target.weights_file}",
                         "a separate draft model, or none")
    from .formats import parse_format

    parts = str(name)[len(SELF_PREFIX):].split(":")
    expected = "self:FORMAT or self:FORMAT:LAYERS, e.g. self:int4 or self:int4:8"
    if len(parts) > 2 or not parts[0]:
        raise InputError("argument", source, f"'{name}' is not a self-draft", expected)
    fmt = parse_format(parts[0], "argument", source)
    layers = target.layers
    if len(parts) == 2:
        if not parts[1].isdigit() or not 1 <= int(parts[1]) <= target.layers:
            raise InputError("argument", source, f"'{name}': {parts[1]!r} layers of {target.name}'s {target.layers}",
                             f"1 to {target.layers} layers ({expected})")
        layers = int(parts[1])
    cfg = dict(target.hf_config, num_hidden_layers=layers)
    spec = replace(target, name=f"{target.name}-self-{fmt.label}" + (f"-{layers}l" if layers < target.layers else ""),
                   layers=layers, hf_config=cfg, self_draft=True)
    plain = replace(fmt, fused=False)  # the LM head and the embedding's lookups are dequantized
    return spec.with_weights(WeightFormats(attention=fmt, experts=fmt, lm_head=plain, embed=plain), source)


def pair_weights(target: ModelSpec, draft: ModelSpec | None) -> WeightFormats:
    """What a plan records: the target's formats, and the draft's (its layers' format)."""
    return replace(target.weights, draft=draft.weights.attention if draft is not None else None)


SHAPE_FIELDS = ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn_inner", "vocab", "experts", "top_k")


def model_shape(spec: ModelSpec) -> dict[str, int]:
    """The fields a plan must match: recorded in plan.inputs, checked by specrun."""
    return {k: getattr(spec, k) for k in SHAPE_FIELDS}


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _arch_from_model_type(model_type: str | None, source: str) -> str:
    table = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
             "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
             "gpt_oss": "GptOssForCausalLM"}
    if model_type not in table:
        raise InputError(source, "model_type", f"'{model_type}' is not supported", ", ".join(table))
    return table[model_type]


def preset_names() -> list[str]:
    folder = resources.files("specplan").joinpath("presets/models")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))

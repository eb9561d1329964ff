"""Forward pass of the Llama / Mistral / Qwen2 / Qwen3 (dense) and Mixtral / Qwen3-MoE (MoE) families, one
layer at a time so that layers can be streamed.

The arithmetic follows transformers operation for operation (RMSNorm in fp32, RoPE with
cos/sin cast to the activation dtype, softmax routing in fp32 renormalised over the top-k
experts), so logits agree with it to rounding. A pass walks the layers once and computes
every micro-batch ("Step") at each layer before moving on: the weight store hands out a
layer, the pass uses it for all steps, then releases it so its buffer can be refilled.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specplan.cost import ACTIVATION_SLICE_TOKENS, LOGITS_CHUNK_TOKENS, MASK_HOLD_BYTES, rows_per_slice
from specplan.errors import InputError
from specplan.models import ModelSpec

from .attention import attend, group_mask
from .kvcache import KVCache
from .quant import QWeight, dense
from .quant import linear as matmul

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


# ---- what we run -----------------------------------------------------------------------------


def rope_parameters(spec: ModelSpec) -> dict:
    """rope_theta and scaling, from a transformers 5 ("rope_parameters") or 4 ("rope_scaling") config."""
    cfg = spec.hf_config
    params = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    params.setdefault("rope_theta", cfg.get("rope_theta", spec.rope_theta))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def sliding_window(spec: ModelSpec) -> int | None:
    if spec.arch == "MistralForCausalLM":
        return spec.hf_config.get("sliding_window")
    return None


def layer_windows(spec: ModelSpec) -> list[int | None]:
    """Each layer's sliding window (None: full attention): gpt-oss alternates them (layer_types)."""
    types = spec.hf_config.get("layer_types") if spec.arch == "GptOssForCausalLM" else None
    if types:
        return [spec.hf_config.get("sliding_window") if t == "sliding_attention" else None for t in types]
    return [sliding_window(spec)] * spec.layers


def check_supported(spec: ModelSpec, source: str = "model") -> None:
    """Refuse, before any weight is read, a config whose arithmetic this runtime does not implement."""
    cfg = spec.hf_config
    rope = rope_parameters(spec)
    if rope["rope_type"] not in ROPE_TYPES:
        raise InputError(source, "rope_scaling.rope_type", f"'{rope['rope_type']}' is not implemented by specrun",
                         " | ".join(ROPE_TYPES))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise InputError(source, "partial_rotary_factor", f"got {rope['partial_rotary_factor']}", "1.0")
    if cfg.get("hidden_act", "silu") != "silu":
        raise InputError(source, "hidden_act", f"got {cfg.get('hidden_act')!r}", "silu")
    if cfg.get("mlp_bias"):
        raise InputError(source, "mlp_bias", "MLP biases are not implemented by specrun", "false")
    if spec.arch == "Qwen2ForCausalLM" and cfg.get("use_sliding_window"):
        raise InputError(source, "use_sliding_window", "Qwen2 per-layer sliding windows are not implemented", "false")


def rope_inv_freq(spec: ModelSpec) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], fp32, with linear, llama3 or YaRN scaling (as
    transformers computes them; YaRN's by transformers' own function)."""
    p = rope_parameters(spec)
    dim = spec.head_dim
    if p["rope_type"] == "yarn":
        return _yarn(spec)[0]
    inv_freq = 1.0 / (float(p["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if p["rope_type"] == "linear":
        return inv_freq / p["factor"]
    if p["rope_type"] == "llama3":
        factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old_len = p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_scale(spec: ModelSpec) -> float:
    """What cos and sin are multiplied by: YaRN's attention factor, else 1."""
    return _yarn(spec)[1] if rope_parameters(spec)["rope_type"] == "yarn" else 1.0


def _yarn(spec: ModelSpec) -> tuple[torch.Tensor, float]:
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.CONFIG_MAPPING[spec.hf_config["model_type"]].from_dict(spec.hf_config)
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, torch.device("cpu"))
    return inv_freq.float(), float(factor)


# ---- layer arithmetic --------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype,
                 scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, q_len, 1, head_dim] for absolute positions [B, q_len] (times `scale`: YaRN)."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    if scale != 1.0:
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, written into x (each product rounded as out of place);
    the one temporary is the rotated copy."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1).mul_(sin)
    return x.mul_(cos).add_(rotated)


def linear(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if f"{name}.weight" not in w and _fused_parts(name):  # left unfused: each piece, outputs side by side
        return torch.cat([linear(x, w, p) for p in _fused_parts(name)], dim=-1)
    return matmul(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


# Projections that read the same input are fused when the weights are loaded (fuse_layer):
# one GEMM where there were three (q, k, v) or two (gate, up), each of the pieces a slice of
# the fused output. Fewer, larger kernels: less issue time per layer (docs/validation.md, 11).
FETCH_EXPERTS = "#fetch_experts"  # runtime.weights.FETCH_EXPERTS (a routed unit's views hold it)

FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def _expert_fusions(tensors: dict) -> dict[str, tuple[str, ...]]:
    experts = {n[:-len("w1.weight")] for n in tensors if n.startswith("block_sparse_moe.experts.") and n.endswith(".w1.weight")}
    return {p + "w13": (p + "w1", p + "w3") for p in sorted(experts)}


def fuse_layer(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One layer's checkpoint tensors with q|k|v, gate|up and each expert's w1|w3 concatenated
    along the output dimension (weights, and biases where there are any); the rest as given."""
    from .quant import cat

    out = dict(tensors)
    for fused, parts in (FUSED | _expert_fusions(tensors)).items():
        weights = [out.get(f"{p}.weight") for p in parts]
        if len({w.fmt for w in weights if isinstance(w, QWeight)}) > 1:
            continue  # pieces in different formats (a GGUF's Q4_K q, k and Q6_K v): multiplied one by one
        for kind in ("weight", "bias"):
            names = [f"{p}.{kind}" for p in parts]
            if all(n in out for n in names):
                pieces = [out.pop(n) for n in names]
                out[f"{fused}.{kind}"] = cat(pieces) if isinstance(pieces[0], QWeight) else torch.cat(pieces)
    return out


def fused_weight(w: dict, fused: str):
    """A fused projection's weight, or its pieces (a tuple) where they could not be fused."""
    name = f"{fused}.weight"
    if name in w:
        return w[name]
    return tuple(w[f"{p}.weight"] for p in _fused_parts(fused))


def _fused_parts(fused: str) -> tuple[str, ...]:
    """The pieces a fused projection is made of (FUSED, or an expert's w1 | w3), () if none."""
    if fused in FUSED:
        return FUSED[fused]
    return (fused[:-len("w13")] + "w1", fused[:-len("w13")] + "w3") if fused.endswith(".w13") else ()


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate x) * up x) with gate|up fused [2F, H]: the 2F-wide product is the one
    FFN-wide intermediate, worked on in place (cost.activation_bytes)."""
    flat = x.reshape(-1, x.shape[-1])
    if isinstance(gate_up, tuple):  # gate and up in different formats, not fused
        gate, up = matmul(flat, gate_up[0]), matmul(flat, gate_up[1])
        return matmul(F.silu(gate, inplace=True).mul_(up), down).view(*x.shape[:-1], -1)
    f = gate_up.shape[0] // 2
    if isinstance(gate_up, QWeight) and gate_up.fmt.fused:  # the kernel gives [tokens, 2F]
        both = matmul(flat, gate_up)
        gate, up = both[:, :f], both[:, f:]
    else:
        # one batched GEMM [2, tokens, F]: gate and up each come out contiguous, so the product
        # is formed in gate's half and goes into down_proj without a copy. A compressed weight is
        # dequantized right before its GEMM, gate|up's scratch reused for down.
        gate, up = torch.matmul(flat, dense(gate_up).view(2, f, -1).transpose(1, 2))
    return matmul(F.silu(gate, inplace=True).mul_(up), down).view(*x.shape[:-1], -1)


GLU_ALPHA = 1.702  # gpt-oss's gate sharpness: gate * sigmoid(alpha * gate)


def clamped_glu(x: torch.Tensor, w: dict, p: str, limit: float) -> torch.Tensor:
    """gpt-oss's expert: gate|up with biases, gate clamped above at `limit`, up to +-limit,
    (up + 1) * gate * sigmoid(alpha * gate), then down with its bias."""
    both = linear(x, w, p + "w13")
    f = both.shape[-1] // 2
    gate, up = both[..., :f].clamp(max=limit), both[..., f:].clamp(min=-limit, max=limit)
    return linear((up + 1) * (gate * torch.sigmoid(gate * GLU_ALPHA)), w, p + "w2")


def ffn(x: torch.Tensor, w: dict[str, torch.Tensor], spec: ModelSpec) -> torch.Tensor:
    if not spec.is_moe:
        return swiglu(x, fused_weight(w, "mlp.gate_up_proj"), w["mlp.down_proj.weight"])
    return moe(x, w, spec)


def qkv_proj(x: torch.Tensor, w: dict[str, torch.Tensor], spec: ModelSpec, rope) -> torch.Tensor:
    """Input norm, the fused q|k|v projection and RoPE on the q and k heads, in place: one
    packed tensor [B, T, heads + 2 * kv_heads, head_dim] (split_qkv gives the three views)."""
    B, T, _ = x.shape
    h = rms_norm(x, w["input_layernorm.weight"], spec.rms_norm_eps)
    packed = linear(h, w, "self_attn.qkv_proj").view(B, T, spec.heads + 2 * spec.kv_heads, spec.head_dim)
    if spec.qk_norm:  # Qwen3: each head's q and k normalised before RoPE
        for part, weight in ((slice(0, spec.heads), "self_attn.q_norm.weight"),
                             (slice(spec.heads, spec.heads + spec.kv_heads), "self_attn.k_norm.weight")):
            packed[:, :, part] = rms_norm(packed[:, :, part], w[weight], spec.rms_norm_eps)
    apply_rope_(packed[:, :, :spec.heads + spec.kv_heads], *rope)
    return packed


def split_qkv(packed: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return packed.split((spec.heads, spec.kv_heads, spec.kv_heads), dim=2)


def moe(x: torch.Tensor, w: dict[str, torch.Tensor], spec: ModelSpec) -> torch.Tensor:
    """Top-k softmax routing, weights renormalised over the chosen experts (Mixtral; Qwen3-MoE
    where norm_topk_prob says so)."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    if spec.router_bias:  # gpt-oss: the top-k logits, softmax over those
        logits = F.linear(x, w["block_sparse_moe.gate.weight"], w["block_sparse_moe.gate.bias"])
        top_v, top_i = torch.topk(logits, spec.top_k, dim=-1)
        top_w = F.softmax(top_v, dim=1, dtype=top_v.dtype)
    else:
        probs = F.softmax(F.linear(x, w["block_sparse_moe.gate.weight"]).float(), dim=-1)
        top_w, top_i = torch.topk(probs, spec.top_k, dim=-1)
        if spec.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(x)
    # One expert at a time over the tokens routed to it, in token order. Which experts are hit,
    # and by how many tokens, is known only after routing: one host sync per layer (the counts).
    flat = top_i.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=spec.experts).tolist()
    fetch = w.get(FETCH_EXPERTS)
    if fetch is not None:  # routed streaming: only the experts picked are copied in, now
        fetch([e for e, n in enumerate(counts) if n])
    tokens, slots = order // spec.top_k, order % spec.top_k
    end = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        token, slot = tokens[end:end + n], slots[end:end + n]
        end += n
        p = f"block_sparse_moe.experts.{e}."
        if spec.swiglu_limit:
            y = clamped_glu(x[token], w, p, spec.swiglu_limit)
        else:
            y = swiglu(x[token], fused_weight(w, p + "w13"), w[p + "w2.weight"])
        out.index_add_(0, token, (y * top_w[token, slot, None]).to(out.dtype))
    return out.view(shape)


# ---- a pass over the layers -----------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """What every layer of a pass needs of one row group and nothing changes within the pass:
    the rows' cache lengths, where their new K/V go, and the attention mask. Built once per
    pass and group (Model._forward), not once per layer."""

    start: torch.Tensor  # [B] cache lengths before this pass (CPU)
    past: int  # the longest of them
    write_index: tuple[torch.Tensor, torch.Tensor]  # KVCache.write_index
    mask: torch.Tensor | None  # attention.group_mask on the device attention runs on; None: too large to hold


@dataclass
class Step:
    """One micro-batch of a pass: `tokens` [B, q_len] for cache rows `rows`, written at the
    rows' current cache lengths (which the pass leaves unchanged: the caller decides what to keep)."""

    rows: slice
    tokens: torch.Tensor  # int64, on the CPU
    pick: torch.Tensor | None = None  # [B] the one position per row to return logits for; None = every position


def cut_rows(step: Step, max_tokens: int) -> list[Step]:
    """`step` as consecutive row slices of at most `max_tokens` tokens each (one row at least)."""
    B, T = step.tokens.shape
    per = rows_per_slice(T, max_tokens)
    if B <= per:
        return [step]
    r0 = step.rows.start or 0
    return [Step(slice(r0 + a, r0 + min(a + per, B)), step.tokens[a:a + per],
                 None if step.pick is None else step.pick[a:a + per]) for a in range(0, B, per)]


class Model:
    """A model bound to its weight store and KV cache. `name` prefixes the stages it times."""

    def __init__(self, spec: ModelSpec, store, cache: KVCache, device: torch.device, stats=None, name: str = "target"):
        self.spec, self.store, self.cache, self.device = spec, store, cache, device
        self.stats, self.name = stats, name
        self.inv_freq = rope_inv_freq(spec).to(device)
        self.rope_scale = rope_scale(spec)
        self.windows = layer_windows(spec)
        # one window for every layer: a pass's mask is built once; else per layer (gpt-oss)
        self.window = self.windows[0] if len(set(self.windows)) == 1 else None
        self.mixed_windows = len(set(self.windows)) > 1

    def _timed(self, stage: str):
        if self.stats is None or not self.stats.per_layer:
            return nullcontext()
        return self.stats.region(f"{self.name}_{stage}")

    @torch.inference_mode()
    def forward(self, steps: list[Step], logits: bool = True) -> list[torch.Tensor]:
        """Logits (fp32) per step: [B, V] where `pick` is set, else [B, q_len, V].

        A step of more than ACTIVATION_SLICE_TOKENS tokens (a prefill chunk) goes through each
        layer in slices of whole rows, so a layer's working set stays that of a slice while
        the layer's weights are still fetched once for all of them."""
        pieces = [cut_rows(s, ACTIVATION_SLICE_TOKENS) for s in steps]
        out = self._forward([p for ps in pieces for p in ps], logits)
        if not logits:
            return []
        joined, k = [], 0
        for ps in pieces:
            joined.append(out[k] if len(ps) == 1 else torch.cat(out[k:k + len(ps)]))
            k += len(ps)
        return joined

    def _forward(self, steps: list[Step], logits: bool) -> list[torch.Tensor]:
        store, L = self.store, self.spec.layers
        with self._timed("head"):
            xs = [store.embed(s.tokens).to(self.device, non_blocking=True) for s in steps]
            ropes = []
            for s in steps:
                pos = self.cache.lengths[s.rows][:, None] + torch.arange(s.tokens.shape[1])
                ropes.append(rope_cos_sin(self.inv_freq, pos.to(self.device, non_blocking=True), xs[0].dtype,
                                          self.rope_scale))
            geos = [self.geometry(s) for s in steps]
        for i in range(L):
            w = store.acquire(i)
            for j, s in enumerate(steps):
                xs[j] = self.layer(i, w, xs[j], s, ropes[j], geos[j])
            store.release(i)
        w = store.acquire(L)
        with self._timed("head"):
            out = [self.head(x, s, w) for x, s in zip(xs, steps)] if logits else []
        store.release(L)
        return out

    def geometry(self, step: Step) -> Geometry:
        q_len = step.tokens.shape[1]
        start = self.cache.lengths[step.rows]  # a view: lengths change between passes, not within one
        past = int(start.max())
        groups = self.spec.heads // self.spec.kv_heads
        # prefill (nothing cached) attends to its fresh keys where they were computed
        kv_len, where = (q_len, self.device) if past == 0 else (past + q_len, self.cache.device)
        # a small mask (decode, verify) is kept for the pass; a prefill chunk's would hold
        # rows x groups x q_len x kv_len bytes beside every slice's, so it is built per layer
        small = len(start) * groups * q_len * kv_len <= MASK_HOLD_BYTES and not self.mixed_windows
        return Geometry(start, past, self.cache.write_index(step.rows, q_len),
                        group_mask(start, q_len, kv_len, self.window, groups, where) if small else None)

    def layer(self, i: int, w: dict, x: torch.Tensor, step: Step, rope, geo: Geometry | None = None) -> torch.Tensor:
        spec = self.spec
        B, T, _ = x.shape
        # Intermediates are dropped as soon as they are used: what is alive at once is what
        # cost.activation_bytes counts (and what the plan reserves GPU memory for).
        with self._timed("proj"):
            packed = qkv_proj(x, w, spec, rope)
        with self._timed("attention"):
            o = self.attention(i, step, packed, geo or self.geometry(step), w.get("self_attn.sinks"))
            del packed
        # The residual adds go into x, the pass's own hidden state: one hidden-wide tensor fewer
        # while the FFN runs.
        with self._timed("proj"):
            x.add_(linear(o.reshape(B, T, -1), w, "self_attn.o_proj"))
            del o
        with self._timed("ffn"):
            x.add_(ffn(rms_norm(x, w["post_attention_layernorm.weight"], spec.rms_norm_eps), w, spec))
        return x

    def attention(self, i: int, step: Step, packed: torch.Tensor, geo: Geometry,
                  sinks: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of one layer from the packed q|k|v (qkv_proj); the output on the compute device."""
        window = self.windows[i]
        if geo.past == 0:
            # Prefill: nothing cached before these tokens, so attend to the fresh keys where
            # they were computed instead of reading them back from a (CPU) cache.
            q, k, v = split_qkv(packed, self.spec)
            self.cache.write(i, step.rows, k, v, geo.write_index)
            return attend(q, k, v, geo.start, window, geo.mask, sinks)
        # Decode / verify: q, k and v go to the cache's device in one copy, not three.
        cache_device = self.cache.device
        q, k, v = split_qkv(packed.to(cache_device, non_blocking=cache_device.type == "cuda"), self.spec)
        self.cache.write(i, step.rows, k, v, geo.write_index)
        kc, vc = self.cache.view(i, step.rows, geo.past + q.shape[1])
        return attend(q, kc, vc, geo.start, window, geo.mask, sinks).to(packed.device, packed.dtype, non_blocking=True)

    def head(self, x: torch.Tensor, step: Step, w: dict) -> torch.Tensor:
        if step.pick is not None:
            x = x[torch.arange(x.shape[0], device=x.device), step.pick.to(x.device)]
        x = rms_norm(x, w["model.norm.weight"], self.spec.rms_norm_eps)
        flat = x.reshape(-1, x.shape[-1])
        lm_head = dense(w["lm_head.weight"])
        chunks = [F.linear(c, lm_head).float() for c in flat.split(LOGITS_CHUNK_TOKENS)]
        return torch.cat(chunks).view(*x.shape[:-1], -1)

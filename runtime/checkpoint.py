"""Model weights by Hugging Face checkpoint name, read one layer at a time.

A Checkpoint hands out the tensors of one layer as a plain dict keyed by the name the
tensor has inside the layer in a HF checkpoint ("self_attn.q_proj.weight",
"block_sparse_moe.experts.3.w1.weight"; the full name is "model.layers.{i}." + key),
so a 90 GB model is never held twice: the weight store packs each layer as it is read.

Sources: a local HF directory (config.json + *.safetensors, memory-mapped), random
weights drawn from a ModelSpec (seeded per tensor name, so any read order gives the same
model), or an in-memory state dict (tests). transformers >= 5 keeps Mixtral experts fused
in memory (mlp.experts.gate_up_proj [E, 2F, H], mlp.experts.down_proj [E, H, F],
mlp.gate.weight) and writes the per-expert names to disk; both spellings are read.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from specplan.errors import InputError
from specplan.models import ModelSpec

GLOBAL_NAMES = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # Mixtral's expert names -> Qwen3-MoE's


def layer_tensor_names(spec: ModelSpec) -> list[str]:
    """Names of one layer's tensors, relative to "model.layers.{i}."."""
    names = ["input_layernorm.weight", "post_attention_layernorm.weight"]
    names += [f"self_attn.{p}_proj.weight" for p in "qkvo"]
    if spec.qkv_bias:
        names += [f"self_attn.{p}_proj.bias" for p in "qkv"]
    if _o_bias(spec):
        names.append("self_attn.o_proj.bias")
    if spec.qk_norm:
        names += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    if spec.attn_sinks:
        names.append("self_attn.sinks")
    if spec.is_moe:
        names.append("block_sparse_moe.gate.weight")
        if spec.router_bias:
            names.append("block_sparse_moe.gate.bias")
        names += [f"block_sparse_moe.experts.{e}.w{j}.weight" for e in range(spec.experts) for j in (1, 2, 3)]
        if spec.mlp_bias:
            names += [f"block_sparse_moe.experts.{e}.w{j}.bias" for e in range(spec.experts) for j in (1, 2, 3)]
    else:
        names += [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    return names


def tensor_group(name: str) -> str:
    """The Placement group a layer tensor belongs to: attention, ffn, router or norm."""
    if name.startswith("self_attn."):
        return "attention"
    if name.endswith("layernorm.weight"):
        return "norm"
    if name.startswith("block_sparse_moe.gate."):
        return "router"
    return "ffn"


def _o_bias(spec: ModelSpec) -> bool:
    # Llama's attention_bias covers o_proj too; Qwen2 has q/k/v biases only.
    return spec.arch != "Qwen2ForCausalLM" and bool(spec.hf_config.get("attention_bias", False))


def _shape(spec: ModelSpec, name: str) -> tuple[int, ...]:
    h, f = spec.hidden, spec.ffn_inner
    q, kv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        return (spec.head_dim,)
    if name.endswith("sinks"):
        return (spec.heads,)
    if name == "block_sparse_moe.gate.bias":
        return (spec.experts,)
    if name.endswith("norm.weight"):
        return (h,)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (spec.vocab, h)
    proj = name.split(".")[-2]
    return {
        "q_proj": (q, h) if name.endswith("weight") else (q,),
        "k_proj": (kv, h) if name.endswith("weight") else (kv,),
        "v_proj": (kv, h) if name.endswith("weight") else (kv,),
        "o_proj": (h, q) if name.endswith("weight") else (h,),
        "gate": (spec.experts, h),
        "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f),
        "w1": (f, h) if name.endswith("weight") else (f,), "w3": (f, h) if name.endswith("weight") else (f,),
        "w2": (h, f) if name.endswith("weight") else (h,),
    }[proj]


class Checkpoint:
    """Tensors by full HF name through `get(name)`, converted to `dtype` on read."""

    def __init__(self, spec: ModelSpec, get: Callable[[str], torch.Tensor], dtype: torch.dtype, source: str):
        self.spec, self._get, self.dtype, self.source = spec, get, dtype, source

    def tensor(self, name: str) -> torch.Tensor:
        return self._get(name).to(self.dtype)

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        return {n: self.tensor(f"model.layers.{i}.{n}") for n in layer_tensor_names(self.spec)}

    def globals(self) -> dict[str, torch.Tensor]:
        """Embedding, final norm and LM head (the embedding itself when they are tied)."""
        out = {n: self.tensor(n) for n in GLOBAL_NAMES[:2]}
        out["lm_head.weight"] = out["model.embed_tokens.weight"] if self.spec.tie_embeddings else self.tensor("lm_head.weight")
        return out


class RandomCheckpoint(Checkpoint):
    """Normal(0, initializer_range) weights, unit norms. Each tensor is drawn from its own
    generator seeded by (seed, name), so the model does not depend on the order of reads.

    A layer's draws run on a thread pool: each draw is one serial kernel (a seeded CPU
    generator cannot be split), so a Mixtral-sized layer (24 expert matrices) is drawn about
    as many times faster as there are cores. Scaling and the dtype conversion then run on the
    calling thread, where they use torch's own intra-op threads; the result is bit for bit
    what drawing the tensors one by one gives."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, seed: int = 0):
        super().__init__(spec, self._get_one, dtype, f"random weights (seed {seed})")
        self.seed = seed
        self.std = float(spec.hf_config.get("initializer_range", 0.02))

    def _draw(self, name: str) -> torch.Tensor | None:
        """The unscaled normal draw of a tensor, or None for a norm (ones)."""
        if name.endswith("norm.weight"):
            return None
        short = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.randn(_shape(self.spec, short), generator=g)

    def _finish(self, name: str, z: torch.Tensor | None) -> torch.Tensor:
        if z is None:
            short = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
            return torch.ones(_shape(self.spec, short))
        return z * self.std

    def _get_one(self, name: str) -> torch.Tensor:
        return self._finish(name, self._draw(name))

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        names = layer_tensor_names(self.spec)
        full = [f"model.layers.{i}.{n}" for n in names]
        workers = min(len(full), os.cpu_count() or 1)
        if workers <= 1:
            return super().layer(i)
        with ThreadPoolExecutor(workers, thread_name_prefix="random-weights") as pool:
            draws = list(pool.map(self._draw, full))
        return {n: self._finish(f, z).to(self.dtype) for n, f, z in zip(names, full, draws)}


def random_checkpoint(spec: ModelSpec, dtype: torch.dtype, seed: int = 0) -> Checkpoint:
    """Seeded random weights (see RandomCheckpoint)."""
    return RandomCheckpoint(spec, dtype, seed)


def state_dict_checkpoint(spec: ModelSpec, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> Checkpoint:
    """An in-memory state dict, e.g. a transformers model's (fused expert names included)."""
    return Checkpoint(spec, _resolver(spec, tensors.__contains__, tensors.__getitem__, "state dict"), dtype, "state dict")


class SafetensorsDir:
    """Every tensor of a directory's *.safetensors files by name, memory-mapped."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = Path(path)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise InputError(str(path), "weights", "no *.safetensors files", "a HF model directory (or pass --random-weights)")
        self.where = {}
        for f in files:
            handle = safe_open(str(f), framework="pt")
            for name in handle.keys():
                self.where[name] = handle

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.where[name].get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape from the file's header, without reading it."""
        return tuple(self.where[name].get_slice(name).get_shape())


def load_checkpoint(path: str | Path, spec: ModelSpec, dtype: torch.dtype) -> Checkpoint:
    """A HF model directory: every *.safetensors file in it, memory-mapped."""
    files = SafetensorsDir(Path(path))
    return Checkpoint(spec, _resolver(spec, files.__contains__, files.__getitem__, str(path)), dtype, str(path))


def _resolver(spec: ModelSpec, has: Callable[[str], bool], read: Callable[[str], torch.Tensor],
              source: str) -> Callable[[str], torch.Tensor]:
    """Reads a name in checkpoint spelling, falling back to transformers' fused expert tensors."""
    fused_cache: dict[str, torch.Tensor] = {}

    def fused(name: str) -> torch.Tensor:
        if name not in fused_cache:
            fused_cache.clear()  # keep one fused tensor alive at a time: layers are read in order
            fused_cache[name] = read(name)
        return fused_cache[name]

    def get(name: str) -> torch.Tensor:
        if has(name):
            return read(name)
        if name == "lm_head.weight" and spec.tie_embeddings:
            return read("model.embed_tokens.weight")
        parts = name.split(".")
        if "block_sparse_moe" in parts and spec.arch == "GptOssForCausalLM":
            return _gpt_oss(name, parts, fused)
        if "block_sparse_moe" in parts:
            prefix = ".".join(parts[:3])  # model.layers.{i}
            if parts[4] == "gate" and has(f"{prefix}.mlp.gate.weight"):
                return read(f"{prefix}.mlp.gate.weight")
            if parts[4] == "experts" and has(f"{prefix}.mlp.experts.{parts[5]}.down_proj.weight"):  # Qwen3-MoE on disk
                return read(f"{prefix}.mlp.experts.{parts[5]}.{EXPERT_NAMES[parts[6]]}.weight")
            if parts[4] == "experts" and has(f"{prefix}.mlp.experts.down_proj"):
                e, w = int(parts[5]), parts[6]
                if w == "w2":
                    return fused(f"{prefix}.mlp.experts.down_proj")[e]
                gate_up = fused(f"{prefix}.mlp.experts.gate_up_proj")[e]
                f = gate_up.shape[0] // 2
                return gate_up[:f] if w == "w1" else gate_up[f:]
        raise InputError(source, name, "is missing from the checkpoint", f"a {spec.arch} checkpoint matching config.json")

    def _gpt_oss(name: str, parts: list[str], fused) -> torch.Tensor:
        """transformers' gpt-oss layout: mlp.router; experts stacked as x @ W, [E, H, 2F] with gate
        and up interleaved (even columns gate, odd up), and [E, F, H] down, each with a bias."""
        prefix = ".".join(parts[:3]) + ".mlp."
        if parts[4] == "gate":
            return read(prefix + "router." + parts[5])
        e, w, kind = int(parts[5]), parts[6], parts[7]
        if w == "w2":
            return fused(prefix + "experts.down_proj")[e].t() if kind == "weight" else read(prefix + "experts.down_proj_bias")[e]
        half = 0 if w == "w1" else 1
        if kind == "weight":
            return fused(prefix + "experts.gate_up_proj")[e][:, half::2].t()
        return read(prefix + "experts.gate_up_proj_bias")[e][half::2]

    return get


# ---- compressed weights -----------------------------------------------------------------------------

MATRIX_GROUPS = {"attention": "attention", "ffn": "experts"}  # tensor_group -> formats group


def matrix_group(name: str) -> str | None:
    """The formats group of a matrix (formats.py), None for what stays in the dtype: norms,
    the router, biases. `name`: relative to its layer, or a global name."""
    if name == "lm_head.weight":
        return "lm_head"
    if name == "model.embed_tokens.weight":
        return "embed"
    if not name.endswith(".weight") or name.startswith("model.") or name.endswith("norm.weight"):
        return None
    return MATRIX_GROUPS.get(tensor_group(name))


class CompressedCheckpoint(Checkpoint):
    """A checkpoint's tensors with each matrix in its group's format (spec.weights): QWeights
    quantized from the full-precision tensors at load (round to nearest), or read back from
    a cache file written by an earlier load of the same checkpoint in the same formats."""

    def __init__(self, base: Checkpoint, cache: "QuantCache | None" = None):
        super().__init__(base.spec, base._get, base.dtype, base.source)
        self.base, self.cache = base, cache

    def _convert(self, name: str, t: torch.Tensor):
        from .quant import quantize

        return quantize(t, self.spec.fmt(matrix_group(name))) if self._converted(name) else t

    def layer(self, i: int) -> dict:
        prefix = f"model.layers.{i}."
        names = layer_tensor_names(self.spec)
        cached = self.cache.load(f"layer{i}") if self.cache is not None else None
        if cached is not None and all(n in cached for n in names if self._converted(n)):
            return {n: self._cached(n, cached) if self._converted(n) else self.base.tensor(prefix + n) for n in names}
        out = {n: self._convert(n, t) for n, t in self.base.layer(i).items()}
        self._save(f"layer{i}", out)
        return out

    def _cached(self, name: str, cached: dict):
        """A matrix read back from the cache (stored without its kernel), with its group's format."""
        from dataclasses import replace

        return replace(cached[name], fmt=self.spec.fmt(matrix_group(name)))

    def _converted(self, name: str) -> bool:
        group = matrix_group(name)
        return group is not None and self.spec.converted(group)

    def _save(self, unit: str, tensors: dict) -> None:
        from .quant import QWeight

        if self.cache is not None:  # a tied LM head that is the embedding is saved once (loads re-tie it)
            seen: set[int] = set()
            kept = {}
            for n, t in tensors.items():
                if isinstance(t, QWeight) and id(t) not in seen:
                    seen.add(id(t))
                    kept[n] = t
            self.cache.save(unit, kept)

    def globals(self) -> dict:
        g = self.base.globals()
        cached = self.cache.load("globals") if self.cache is not None else None
        out = {n: self._cached(n, cached) if self._converted(n) and n in (cached or {}) else self._convert(n, t)
               for n, t in g.items() if n != "lm_head.weight"}
        head = g["lm_head.weight"]
        if self.spec.head_is_embedding:
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
        elif cached and "lm_head.weight" in cached:
            out["lm_head.weight"] = cached["lm_head.weight"]
        else:
            out["lm_head.weight"] = self._convert("lm_head.weight", head)
        if not cached:
            self._save("globals", out)
        return out


class QuantCache:
    """Compressed weights on disk, so that a second load reads codes instead of quantizing:
    one safetensors file per layer (and one for the globals) in a folder named by the
    checkpoint's key and the formats. Each file records both in its metadata; a file whose
    record differs (copied from another checkpoint's folder) is refused, not used."""

    def __init__(self, root: Path, checkpoint_key: str, spec: ModelSpec):
        self.key = checkpoint_key
        stored = spec.weights.stored()  # the codes on disk are the same whichever kernel reads them
        self.formats = stored.describe()
        tag = "_".join(f"{g}-{f}" for g, f in stored.to_dict().items()) or "dtype"
        self.folder = Path(root) / f"{checkpoint_key[:16]}-{spec.dtype}-{tag}"

    def load(self, unit: str) -> dict | None:
        from safetensors import safe_open

        from specplan.formats import parse_format

        from .quant import PARTS, assemble

        path = self.folder / f"{unit}.safetensors"
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - a cut or foreign file
            raise InputError(str(path), "file", f"is not a readable safetensors file ({type(e).__name__})",
                             "delete it: the weights are quantized again") from None
        if meta.get("checkpoint") != self.key or meta.get("formats") != self.formats:
            raise InputError(str(path), "metadata.checkpoint",
                             f"was written for checkpoint {str(meta.get('checkpoint'))[:16]} ({meta.get('formats')}), "
                             f"not this one ({self.key[:16]}, {self.formats})", "delete the file or its folder")
        out = {}
        for name in {k.rsplit(".", 1)[0] for k in tensors}:
            parts = {p: tensors[f"{name}.{p}"] for p in PARTS if f"{name}.{p}" in tensors}
            shape = tuple(int(x) for x in meta[f"shape:{name}"].split(","))
            out[name] = assemble(parse_format(meta[f"format:{name}"]), shape, parts, None)
        return out

    def save(self, unit: str, qweights: dict) -> None:
        from safetensors.torch import save

        from specplan.fileio import write_atomic

        if not qweights:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = {"checkpoint": self.key, "formats": self.formats}
        tensors = {}
        for name, q in qweights.items():
            meta[f"format:{name}"] = q.fmt.name
            meta[f"shape:{name}"] = ",".join(map(str, q.shape))
            tensors.update({f"{name}.{p}": t.contiguous() for p, t in q.parts().items()})
        write_atomic(self.folder / f"{unit}.safetensors", save(tensors, metadata=meta))


CACHE_SAMPLES = 64  # pieces of each weights file read into its key
CACHE_SAMPLE_BYTES = 1 << 16


def checkpoint_key(path: Path) -> str:
    """A HF directory's identity for the cache, without reading all its weights: its config,
    and per safetensors file its name, size, modification time, header (tensor names, dtypes,
    shapes, offsets) and 64 pieces of 64 KiB spread over the file, hashed. Two checkpoints of
    one shape (a base model and its fine-tune) differ in those pieces."""
    import hashlib
    import struct

    h = hashlib.sha256()
    config = path / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            h.update(fh.read(min(n, 1 << 26)))
            for k in range(CACHE_SAMPLES):
                fh.seek(8 + n + (st.st_size - 8 - n) * k // CACHE_SAMPLES)
                h.update(fh.read(CACHE_SAMPLE_BYTES))
    return h.hexdigest()


def default_cache_root() -> Path:
    """$SPECPLAN_CACHE, else $XDG_CACHE_HOME/specplan, else ~/.cache/specplan; + quantized/."""
    root = os.environ.get("SPECPLAN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "specplan"
    return Path(root) / "quantized"


def compress(ck: Checkpoint, cache: "QuantCache | None" = None) -> Checkpoint:
    """`ck` in its spec's weight formats (itself when every group is in the model's dtype)."""
    if not any(ck.spec.converted(g) for g in ("attention", "experts", "lm_head", "embed")):
        return ck
    return CompressedCheckpoint(ck, cache)


TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(spec: ModelSpec, source: str = "model") -> torch.dtype:
    if spec.dtype not in TORCH_DTYPES:
        raise InputError(source, "dtype", f"'{spec.dtype}' weights are not implemented by specrun", " | ".join(TORCH_DTYPES))
    return TORCH_DTYPES[spec.dtype]


def open_checkpoint(spec: ModelSpec, weights_dir: Path | None, random_weights: bool, seed: int = 0) -> Checkpoint:
    """The weights `specrun` runs: a model directory's safetensors, or random ones when asked for."""
    dtype = torch_dtype(spec, spec.name)
    if random_weights:  # quantized at each load: no file to key a cache by
        return compress(random_checkpoint(spec, dtype, seed))
    if weights_dir is None:
        raise InputError(spec.name, "weights", "none to load (a preset, or a directory without *.safetensors)",
                         "a HF model directory with *.safetensors, or --random-weights")
    if spec.weights_file:  # GGUF, AWQ, GPTQ, FP8: the file's own formats, nothing to quantize or cache
        from .readers import QuantizedDirCheckpoint
        from .readers.gguf import GGUFCheckpoint, is_gguf

        if is_gguf(spec.weights_file):
            return GGUFCheckpoint(spec, spec.weights_file, dtype)
        method = str(spec.hf_config["quantization_config"]["quant_method"]).lower()
        return QuantizedDirCheckpoint(spec, Path(spec.weights_file), dtype, method)
    ck = load_checkpoint(weights_dir, spec, dtype)
    return compress(ck, QuantCache(default_cache_root(), checkpoint_key(Path(weights_dir)), spec))

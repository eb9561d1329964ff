"""Hooks the profiler uses to time the runtime's own code paths."""

from __future__ import annotations

from collections.abc import Callable

import torch

from specplan.models import ModelSpec

from .checkpoint import compress, random_checkpoint, torch_dtype
from .kvcache import KVCache
from .model import Model, Step
from .weights import RESIDENT, WeightStore


def decode_step_timer(spec: ModelSpec, device: torch.device, rows: int, context: int, seed: int = 0) -> Callable[[], object]:
    """A closure running one single-token decode step of `spec`, resident on `device`, for
    `rows` rows whose KV cache already holds `context` tokens: what a draft step costs."""
    dtype = torch_dtype(spec, spec.name)
    store = WeightStore(compress(random_checkpoint(spec, dtype, seed)), RESIDENT, device)
    cache = KVCache(spec.layers, rows, context + 1, spec.kv_heads, spec.head_dim, dtype, device)
    cache.lengths[:] = context
    model = Model(spec, store, cache, device)
    tokens = torch.randint(0, spec.vocab, (rows, 1), generator=torch.Generator().manual_seed(seed))
    step = Step(rows=slice(0, rows), tokens=tokens, pick=torch.zeros(rows, dtype=torch.long))
    return lambda: model.forward([step])


def tiny_twin(spec: ModelSpec, layers: int) -> ModelSpec:
    """`spec`'s structure (family, biases, experts and top-k, dtype) at shapes too small to
    compute anything: what running it costs is the host's issuing of the runtime's work."""
    cfg = dict(spec.hf_config) | {"num_hidden_layers": layers, "hidden_size": 64, "num_attention_heads": 2,
                                  "num_key_value_heads": 1, "head_dim": 32, "intermediate_size": 128,
                                  "vocab_size": 256}
    cfg.pop("sliding_window", None)
    return ModelSpec.from_hf_config(cfg, f"{spec.name}-tiny{layers}").with_dtype(spec.dtype)


def forward_timer(spec: ModelSpec, device: torch.device, rows: int = 1) -> Callable[[], object]:
    """A closure running one single-token pass of `spec` (resident on `device`) over one
    group of `rows` rows at context 8: the runtime's per-layer and per-pass issuing."""
    dtype = torch_dtype(spec, spec.name)
    store = WeightStore(compress(random_checkpoint(spec, dtype, 0)), RESIDENT, device)
    cache = KVCache(spec.layers, rows, 9, spec.kv_heads, spec.head_dim, dtype, device)
    cache.lengths[:] = 8
    model = Model(spec, store, cache, device)
    tokens = torch.randint(0, spec.vocab, (rows, 1), generator=torch.Generator().manual_seed(0))
    step = Step(rows=slice(0, rows), tokens=tokens, pick=torch.zeros(rows, dtype=torch.long))
    return lambda: model.forward([step])

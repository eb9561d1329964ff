"""Hooks the profiler uses to time the runtime's own code paths."""

from __future__ import annotations

from collections.abc import Callable

import torch

from specplan.models import ModelSpec

from .checkpoint import random_checkpoint, torch_dtype
from .kvcache import KVCache
from .model import Model, Step
from .weights import RESIDENT, WeightStore


def decode_step_timer(spec: ModelSpec, device: torch.device, rows: int, context: int, seed: int = 0) -> Callable[[], object]:
    """A closure running one single-token decode step of `spec`, resident on `device`, for
    `rows` rows whose KV cache already holds `context` tokens: what a draft step costs."""
    dtype = torch_dtype(spec, spec.name)
    store = WeightStore(random_checkpoint(spec, dtype, seed), RESIDENT, device)
    cache = KVCache(spec.layers, rows, context + 1, spec.kv_heads, spec.head_dim, dtype, device)
    cache.lengths[:] = context
    model = Model(spec, store, cache, device)
    tokens = torch.randint(0, spec.vocab, (rows, 1), generator=torch.Generator().manual_seed(seed))
    step = Step(rows=slice(0, rows), tokens=tokens, pick=torch.zeros(rows, dtype=torch.long))
    return lambda: model.forward([step])

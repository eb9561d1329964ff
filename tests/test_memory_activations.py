"""The activation term of the memory model against what the runtime's forward really keeps
alive: every tensor an operator allocates is tracked (through a TorchDispatchMode) until it
is freed, and the peak of the live bytes must stay within cost.activation_bytes."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from specplan import cost
from specplan.models import ModelSpec
from specplan.runtime import model as model_mod
from specplan.runtime.checkpoint import random_checkpoint
from specplan.runtime.kvcache import KVCache
from specplan.runtime.model import Model, Step, cut_rows
from specplan.runtime.weights import RESIDENT, WeightStore

CPU = torch.device("cpu")


class PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of the storages that operators allocate inside the mode and that are still
    referenced (views of inputs, such as cache slices, are not new allocations)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._alive: set[int] = set()

    def _freed(self, key: int, n: int) -> None:
        if key in self._alive:
            self._alive.discard(key)
            self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key, n = st.data_ptr(), st.nbytes()
            if n == 0 or key in inputs or key in self._alive:
                continue
            self._alive.add(key)
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(st, self._freed, key, n)
        return out


def mini(preset: str) -> ModelSpec:
    """`preset`'s architecture at a width whose ratios are the real ones (GQA 4, FFN 3.5x)."""
    cfg = dict(ModelSpec.from_preset(preset).hf_config)
    cfg.update(hidden_size=512, intermediate_size=1792, num_attention_heads=8, num_key_value_heads=2,
               num_hidden_layers=2, vocab_size=1000, torch_dtype="bfloat16")
    return ModelSpec.from_hf_config(cfg, f"mini-{preset}")


def forward_peak(spec: ModelSpec, rows: int, q_len: int, past: int) -> int:
    store = WeightStore(random_checkpoint(spec, torch.bfloat16), RESIDENT, CPU)
    cache = KVCache(spec.layers, rows, past + q_len, spec.kv_heads, spec.head_dim, torch.bfloat16, CPU)
    cache.lengths[:] = past
    model = Model(spec, store, cache, CPU)
    tokens = torch.randint(0, spec.vocab, (rows, q_len), generator=torch.Generator().manual_seed(0))
    with PeakLiveBytes() as m:
        model.forward([Step(slice(0, rows), tokens, torch.full((rows,), q_len - 1))], logits=False)
    return m.peak


@pytest.mark.parametrize("preset", ["mixtral-8x7b", "mistral-7b-v0.2"])
@pytest.mark.parametrize("rows,q_len,past", [(16, 256, 0), (64, 256, 0), (2, 2048, 0), (64, 9, 300)],
                         ids=["prefill-one-slice", "prefill-4-slices", "long-prompt", "verify"])
def test_forward_stays_within_activation_bytes(preset, rows, q_len, past):
    spec = mini(preset)
    measured = forward_peak(spec, rows, q_len, past)
    modelled = cost.activation_bytes(spec, rows, q_len, past + q_len)
    assert measured <= modelled
    # and not far above, once the two extra copies of the mask that GPU kernels make (an
    # additive mask of the query's dtype) and the CPU's kernel does not are set aside
    g = spec.heads // spec.kv_heads
    gpu_mask_copies = cost.activation_slice_tokens(rows, q_len) * 2 * g * (past + q_len)
    assert modelled - gpu_mask_copies <= 1.2 * measured


def test_slices_are_whole_rows_within_the_cap():
    step = Step(slice(4, 14), torch.zeros(10, 300, dtype=torch.long), torch.arange(10))
    parts = cut_rows(step, 1000)
    assert [p.rows for p in parts] == [slice(4, 7), slice(7, 10), slice(10, 13), slice(13, 14)]
    assert torch.equal(torch.cat([p.pick for p in parts]), step.pick)
    assert [p.rows for p in cut_rows(step, 100)] == [slice(4 + i, 5 + i) for i in range(10)]  # one row exceeds the cap
    assert cut_rows(step, 3000) == [step]
    assert cost.activation_slice_tokens(10, 300) == 3000 and cost.activation_slice_tokens(2, 5000) == 5000


def test_sliced_forward_gives_the_unsliced_logits(monkeypatch):
    spec = ModelSpec.from_preset("tiny-mixtral")
    out = {}
    for cap in (10**9, 20):  # one slice, then slices of two rows (q_len 9)
        monkeypatch.setattr(model_mod, "ACTIVATION_SLICE_TOKENS", cap)
        store = WeightStore(random_checkpoint(spec, torch.float32), RESIDENT, CPU)
        cache = KVCache(spec.layers, 7, 9, spec.kv_heads, spec.head_dim, torch.float32, CPU)
        tokens = torch.randint(0, spec.vocab, (7, 9), generator=torch.Generator().manual_seed(1))
        out[cap] = Model(spec, store, cache, CPU).forward([Step(slice(0, 7), tokens)])[0]
    torch.testing.assert_close(out[20], out[10**9], rtol=1e-5, atol=1e-5)

"""The CUDA paths: copy stream, pinned and disk staging, draft thread on its own stream, CPU
attention next to a CPU KV cache. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from specplan.models import ModelSpec
from specplan.plan import Placement, Plan, Schedule
from specplan.runtime.checkpoint import random_checkpoint
from specplan.runtime.kvcache import KVCache
from specplan.runtime.model import Model, Step
from specplan.runtime.run import run_plan
from specplan.runtime.weights import RESIDENT, WeightStore
from specplan.workload import Workload

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STREAMED = Placement(attention="cpu_pinned", ffn="disk", ffn_gpu_layers=1, embed="cpu_pinned", lm_head="cpu_pageable",
                     draft_kv="cpu")


def plan(policy: str, attention: str) -> Plan:
    spec = policy in ("specoffload", "spec-serial")
    schedule = Schedule(policy=policy, target_batch=3, num_batches=2, prefill_chunk=2, draft_batch=2,
                        gamma=3 if spec else 0, attention_device=attention,
                        prefetch_depth=0 if policy == "sequential" else 2).validate()
    return Plan(target="tiny-mixtral", draft="tiny-draft" if spec else None, hardware="h100-pcie", schedule=schedule,
                placement=STREAMED, workload=Workload.make(prompt_len=[5, 11, 3], gen_len=10, num_prompts=6).to_dict())


@pytest.mark.parametrize("policy,attention", [("specoffload", "cpu"), ("spec-serial", "gpu"), ("flexgen", "cpu"),
                                              ("sequential", "gpu")])
def test_cuda_run_matches_cpu_run(policy, attention):
    p = plan(policy, attention)
    kw = dict(random_weights=True, ignore_eos=True)
    gpu = run_plan(p, "tiny-mixtral", "tiny-draft", device="cuda", timing=True, **kw)
    cpu = run_plan(p, "tiny-mixtral", "tiny-draft", device="cpu", **kw)
    assert gpu["outputs"] == cpu["outputs"]
    m = gpu["measured"]
    assert m["h2d_bytes"] > 0 and m["h2d_bytes_per_s"] > 0 and m["peak_gpu_bytes"] > 0
    assert m["stage_s"]["h2d"] > 0 and m["stage_s"]["target_ffn"] > 0


def test_cuda_streamed_layers_equal_resident():
    spec = ModelSpec.from_preset("tiny-mixtral")
    ck = random_checkpoint(spec, torch.float32, seed=3)
    dev = torch.device("cuda")
    tokens = torch.randint(0, spec.vocab, (3, 9), generator=torch.Generator().manual_seed(0))

    def logits(placement: Placement, depth: int) -> torch.Tensor:
        store = WeightStore(ck, placement, dev, depth)
        cache = KVCache(spec.layers, 3, 32, spec.kv_heads, spec.head_dim, torch.float32, dev)
        out = Model(spec, store, cache, dev).forward([Step(slice(0, 3), tokens)])[0].cpu()
        store.close()
        return out

    resident = logits(RESIDENT, 0)
    for placement, depth in [(STREAMED, 1), (Placement(attention="disk", ffn="cpu_pageable", lm_head="disk"), 2)]:
        torch.testing.assert_close(logits(placement, depth), resident, rtol=0, atol=1e-5)


def test_cuda_draft_kv_swaps_are_ordered_by_events_alone():
    """Loads, the 'draft' writes on another stream, and stores race unless the events order them:
    large rows, two rounds over the same host rows, and no synchronisation until the end."""
    from specplan.runtime.draftkv import DraftKVSwap

    dev = torch.device("cuda")
    layers, rows, max_len, kv_heads, head_dim, new = 4, 5, 2048, 8, 128, 4
    swap = DraftKVSwap(layers, rows, 2, max_len, kv_heads, head_dim, torch.float32, dev)
    g = torch.Generator().manual_seed(0)
    swap.host.kv.copy_(torch.randn(swap.host.kv.shape, generator=g))
    expected = swap.host.kv.clone()
    draft = torch.cuda.Stream(dev)
    seen = []  # (host row, end, what the buffer held right after its load)
    mbs = [[0, 1], [2, 3], [4]]
    for rnd in range(2):
        ends = {r: 1000 + 97 * r + 300 * rnd for r in range(rows)}
        with torch.cuda.stream(draft):
            swap.begin()
            swap.load(0, mbs[0], [ends[r] for r in mbs[0]])
            for i, mb in enumerate(mbs):
                if i + 1 < len(mbs):
                    swap.load((i + 1) % 2, mbs[i + 1], [ends[r] for r in mbs[i + 1]])
                buf = swap.acquire(i % 2)
                for j, r in enumerate(mb):
                    seen.append((r, ends[r], buf.kv[j, :ends[r]].clone()))
                    buf.kv[j, ends[r]:ends[r] + new].fill_(100.0 * rnd + r)  # a kernel on the draft stream
                    expected[r, ends[r]:ends[r] + new] = 100.0 * rnd + r
                swap.store(i % 2, mb, [(ends[r], ends[r] + new) for r in mb])
    torch.cuda.synchronize()
    assert len(seen) == 2 * rows
    for r, end, got in seen:  # a load saw the host row as the stores before it left it (round 2: round 1's writes)
        torch.testing.assert_close(got.cpu(), expected[r, :end], rtol=0, atol=0)
    torch.testing.assert_close(swap.host.kv, expected, rtol=0, atol=0)

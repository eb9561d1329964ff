"""Continuous admission on the engine: more prompts than rows, prompts of different lengths
chunked into decode passes, rows stopping at EOS; and the simulator and the engine running
the identical sequence of passes when fed the same outcomes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from specplan.hardware import load_profile
from specplan.models import ModelSpec
from specplan.plan import SPECULATIVE, Placement, Schedule
from specplan.runtime.checkpoint import state_dict_checkpoint
from specplan.runtime.engine import Engine
from specplan.simulator.run import SimConfig, simulate
from specplan.workload import Workload

from test_runtime_engine import CPU, hf_from_preset, reference_greedy

GEN = 10
LENS = (3, 8, 5, 11, 1, 2, 9, 6, 4, 7, 10, 3, 2, 12, 5, 1)  # 16 prompts through 4 rows
PLACEMENT = Placement(attention="cpu_pinned", ffn="cpu_pinned", embed="cpu_pinned", lm_head="gpu", draft_kv="gpu")


@pytest.fixture(scope="module")
def pair():
    hf, spec = hf_from_preset("tiny-llama")
    weights = hf.state_dict()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, spec.vocab, (n,), generator=g).tolist() for n in LENS]
    target = state_dict_checkpoint(spec, weights, torch.float32)
    g = torch.Generator().manual_seed(9)
    draft = state_dict_checkpoint(spec, {k: v + 0.002 * torch.randn(v.shape, generator=g) for k, v in weights.items()},
                                  torch.float32)
    expected = reference_greedy(hf, prompts, GEN)
    # an EOS some rows meet early (not all: most run to gen_len)
    eos = expected[0][2]
    cut = [row[:row.index(eos) + 1] if eos in row else row for row in expected]
    assert 0 < sum(len(c) < GEN for c in cut) < len(cut) // 2
    return target, draft, prompts, cut, eos


def schedule(policy: str, admission: str, prefill_tokens: int = 7) -> Schedule:
    two = policy in ("specoffload", "flexgen")
    return Schedule(policy=policy, target_batch=2 if two else 4, num_batches=2 if two else 1, prefill_chunk=3,
                    draft_batch=3, gamma=3 if policy in SPECULATIVE else 0, attention_device="cpu",
                    prefetch_depth=0 if policy == "sequential" else 1, admission=admission,
                    prefill_tokens=prefill_tokens).validate()


def run(pair, sch: Schedule, draft_kv: str = "gpu"):
    target, draft, prompts, _, eos = pair
    engine = Engine(sch, replace(PLACEMENT, draft_kv=draft_kv), target, draft if sch.speculative else None, CPU,
                    rows=sch.rows, max_prompt_len=max(LENS), gen_len=GEN, eos=[eos])
    try:
        return engine.generate(prompts), engine
    finally:
        engine.close()


CASES = [(p, kv) for p in ("specoffload", "spec-serial") for kv in ("gpu", "cpu", "recompute")] + \
        [("flexgen", "gpu"), ("sequential", "gpu")]


@pytest.mark.parametrize("policy,draft_kv", CASES)
def test_refilled_rows_equal_target_only_greedy(pair, policy, draft_kv):
    out, engine = run(pair, schedule(policy, "continuous"), draft_kv)
    assert out == pair[3]
    c = engine.pass_counts
    assert c["admitted"] == len(LENS) and c["mixed_passes"] > 0
    assert c["prefill_tokens_in_decode_passes"] > 0
    # passes that carry only prompt tokens: at the start, and where every row of a batch
    # finished in the same pass; waves take ceil(16 / 3) = 6 such passes at least
    assert c["prefill_passes"] <= 4
    # a prompt of 11 tokens with 7 a pass is prefilled in two chunks
    assert any(not w.last for p in engine.passes for w in p.of_kind("prefill"))


@pytest.mark.parametrize("policy", ["specoffload", "spec-serial"])
def test_waves_with_a_recomputing_draft_equal_target_only_greedy(pair, policy):
    out, _ = run(pair, schedule(policy, "waves"), "recompute")
    assert out == pair[3]


@pytest.mark.parametrize("admission", ["continuous", "waves"])
@pytest.mark.parametrize("policy", ["specoffload", "spec-serial", "flexgen", "sequential"])
def test_simulator_and_engine_run_the_same_passes(pair, policy, admission):
    """Fed the engine's outcomes (tokens kept, EOS), the simulator's scheduler emits the same
    passes: row sets, kinds and token counts, draft rows, admissions and moves."""
    sch = schedule(policy, admission)
    _, engine = run(pair, sch, "cpu")
    wl = Workload.make(list(LENS), GEN, len(LENS), 0.6)
    t, d = ModelSpec.from_preset("tiny-llama"), ModelSpec.from_preset("tiny-llama")
    cfg = SimConfig(t, d if sch.speculative else None, load_profile("rtx4090"), wl, sch,
                    replace(PLACEMENT, draft_kv="cpu"), check_memory=False, all_prompts=True)
    replay = {p.index: o for p, o in zip(engine.passes, engine.outcomes)}
    sim = simulate(cfg, record_spans=True, outcomes=lambda p: replay[p.index])
    assert [p.signature() for p in sim.passes] == [p.signature() for p in engine.passes]
    assert sim.pass_counts == engine.pass_counts
    assert len(engine.passes) > 10

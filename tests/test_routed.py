"""Routed expert streaming (Placement.experts = "routed"): a streamed MoE layer's experts are
copied once its router has picked them, only those. The tokens are transformers' either way;
the experts copied follow the planner's expected-distinct-experts formula; the planner keeps
routed streaming where the simulator finds it faster (few rows a pass) and whole layers where
not (many)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from specplan.cost import expected_experts_touched
from specplan.models import ModelSpec
from specplan.plan import Placement, Schedule
from specplan.runtime.checkpoint import random_checkpoint, state_dict_checkpoint
from specplan.runtime.engine import Engine
from specplan.runtime.sampling import SamplingParams
from specplan.runtime.stats import Stats
from test_runtime_engine import STREAMED, hf_from_preset, make_prompts, reference_greedy, run_engine

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def qwen3_moe():
    return hf_from_preset("tiny-qwen3-moe", seed=4)


@pytest.mark.parametrize("policy", ["specoffload", "spec-serial", "flexgen", "sequential"])
def test_routed_experts_keep_transformers_tokens_and_copy_less(qwen3_moe, policy):
    hf, spec = qwen3_moe
    prompts = make_prompts(spec.vocab, seed=7)[:5]
    target = state_dict_checkpoint(spec, hf.state_dict(), torch.float32)
    draft = random_checkpoint(ModelSpec.from_preset("tiny-draft"), torch.float32, seed=1)
    whole, wc = run_engine(policy, target, draft, placement=STREAMED, prompts=prompts)
    routed, rc = run_engine(policy, target, draft, placement=replace(STREAMED, experts="routed"), prompts=prompts)
    assert routed == whole == reference_greedy(hf, prompts, 12)
    assert 0 < rc["h2d_bytes"] < wc["h2d_bytes"] and rc["experts_streamed"] > 0


def test_experts_copied_follow_the_expected_distinct_experts_formula(qwen3_moe):
    """50 decode passes (and the prefill) at 1, 2, 4 and 8 rows: the experts copied against
    layers x n (1 - (1 - k/n)^tokens) per pass. The formula assumes uniform, independent
    routing; a real router is neither, so it holds on average, not pass by pass."""
    hf, spec = qwen3_moe
    errors = []
    for rows in (1, 2, 4, 8):
        pl = Placement(attention="gpu", ffn="cpu_pinned", ffn_gpu_layers=0, embed="gpu", lm_head="gpu", experts="routed")
        sch = Schedule(policy="sequential", target_batch=rows, num_batches=1, prefill_chunk=rows, draft_batch=1, gamma=0,
                       attention_device="cpu", prefetch_depth=0).validate()
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, spec.vocab, (6,), generator=g).tolist() for _ in range(rows)]
        stats = Stats(CPU)
        engine = Engine(sch, pl, state_dict_checkpoint(spec, hf.state_dict(), torch.float32), None, CPU, rows=rows,
                        max_prompt_len=6, gen_len=51, sampling=SamplingParams(temperature=0.0), stats=stats)
        engine.generate(prompts)
        engine.close()
        touched = lambda t: expected_experts_touched(t, spec.experts, spec.top_k)  # noqa: E731
        expected = spec.layers * (touched(6 * rows) + 50 * touched(rows))
        errors.append(stats.counts["experts_streamed"] / expected - 1)
        per_expert = spec.layer_bytes.expert
        assert stats.counts["h2d_bytes"] == pytest.approx(stats.counts["experts_streamed"] * per_expert)
    assert abs(sum(errors) / len(errors)) < 0.05, errors


def test_the_planner_routes_experts_where_few_rows_make_it_faster():
    from specplan.hardware import load_profile
    from specplan.workload import Workload
    from planner.optimize import optimize

    tgt, prof = ModelSpec.resolve("qwen3-30b-a3b"), load_profile("rtx4090")
    few = optimize(tgt, None, prof, Workload.make(512, 128, 16, 0.7), ("flexgen",))
    many = optimize(tgt, None, prof, Workload.make(512, 128, 512, 0.7), ("flexgen",))
    assert few.best.candidate.placement.experts == "routed"
    # the same shape streaming whole layers was simulated too, and lost
    other = [r for r in few.ranked if r.candidate.shape == few.best.candidate.shape
             and r.candidate.placement.experts == "layer"]
    assert other and other[0].tok_s < few.best.tok_s
    # 2 x 256 rows touch nearly every expert: routing is not even simulated
    assert many.best.candidate.placement.experts == "layer"
    assert all(r.candidate.placement.experts == "layer" for r in many.ranked)

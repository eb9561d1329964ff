"""The engine's output against target-only greedy decoding by transformers (full recompute,
one row at a time), token for token, under every schedule; rows have different prompt
lengths and accept different numbers of drafted tokens."""

from __future__ import annotations

import pytest
import torch
import transformers

from specplan.models import ModelSpec
from specplan.plan import SPECULATIVE, Placement, Schedule
from specplan.runtime.checkpoint import random_checkpoint, state_dict_checkpoint
from specplan.runtime.engine import Engine
from specplan.runtime.stats import Stats
from specplan.runtime.weights import RESIDENT

CPU = torch.device("cpu")
GEN = 12
PROMPT_LENS = (3, 8, 5, 11, 1, 2, 9)  # 7 rows: with 6 rows in flight, two waves
STREAMED = Placement(attention="cpu_pinned", ffn="disk", ffn_gpu_layers=1, embed="cpu_pinned", lm_head="cpu_pageable",
                     draft_kv="cpu")


def hf_from_preset(name: str, seed: int = 0):
    spec = ModelSpec.from_preset(name)
    cfg = transformers.CONFIG_MAPPING[spec.hf_config["model_type"]].from_dict(spec.hf_config)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval(), spec


@torch.no_grad()
def reference_greedy(hf, prompts: list[list[int]], gen_len: int) -> list[list[int]]:
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        for _ in range(gen_len):
            ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
        out.append(ids[0, len(p):].tolist())
    return out


def make_prompts(vocab: int, seed: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def run_engine(policy: str, target, draft=None, placement: Placement = STREAMED, prompts=None, *,
               attention: str = "cpu", sampling: str = "greedy", eos=None, seed: int = 0):
    spec = policy in SPECULATIVE
    schedule = Schedule(policy=policy, target_batch=3, num_batches=2, prefill_chunk=4, draft_batch=2,
                        gamma=3 if spec else 0, attention_device=attention,
                        prefetch_depth=0 if policy == "sequential" else 1).validate()
    stats = Stats(CPU)
    engine = Engine(schedule, placement, target, draft if spec else None, CPU, rows=schedule.rows,
                    max_prompt_len=max(len(p) for p in prompts), gen_len=GEN, sampling=sampling, seed=seed,
                    eos=eos, stats=stats)
    try:
        return engine.generate(prompts), stats.counts
    finally:
        engine.close()


@pytest.fixture(scope="module")
def llama():
    hf, spec = hf_from_preset("tiny-llama")
    weights = hf.state_dict()
    prompts = make_prompts(spec.vocab)
    target = state_dict_checkpoint(spec, weights, torch.float32)
    g = torch.Generator().manual_seed(9)
    near = {k: v + 0.002 * torch.randn(v.shape, generator=g) for k, v in weights.items()}
    drafts = {
        "same model": target,  # every drafted token accepted
        "perturbed copy": state_dict_checkpoint(spec, near, torch.float32),  # some accepted
        "unrelated tiny-draft": random_checkpoint(ModelSpec.from_preset("tiny-draft"), torch.float32, seed=1),  # ~none
    }
    return target, drafts, prompts, reference_greedy(hf, prompts, GEN)


ACCEPTANCE = {"same model": (1.0, 1.0), "perturbed copy": (0.2, 0.9), "unrelated tiny-draft": (0.0, 0.1)}


@pytest.mark.parametrize("draft_kind", list(ACCEPTANCE))
@pytest.mark.parametrize("policy", ["specoffload", "spec-serial"])
def test_greedy_speculative_equals_target_only_greedy(llama, policy, draft_kind):
    target, drafts, prompts, expected = llama
    out, counts = run_engine(policy, target, drafts[draft_kind], prompts=prompts)
    assert out == expected
    lo, hi = ACCEPTANCE[draft_kind]
    assert lo <= counts["accepted"] / counts["drafted"] <= hi


@pytest.mark.parametrize("policy", ["flexgen", "sequential"])
def test_non_speculative_policies_equal_target_only_greedy(llama, policy):
    target, _, prompts, expected = llama
    out, counts = run_engine(policy, target, prompts=prompts)
    assert out == expected
    assert "drafted" not in counts


def test_resident_weights_and_device_attention_give_the_same_tokens(llama):
    target, drafts, prompts, expected = llama
    out, _ = run_engine("specoffload", target, drafts["perturbed copy"], RESIDENT, prompts, attention="gpu")
    assert out == expected


def test_rows_stop_after_eos_independently(llama):
    target, drafts, prompts, expected = llama
    eos = expected[0][3]
    cut = [row[:row.index(eos) + 1] if eos in row else row for row in expected]
    assert len({len(r) for r in cut}) > 1
    for policy in ("specoffload", "flexgen"):
        out, _ = run_engine(policy, target, drafts["perturbed copy"], prompts=prompts, eos=[eos])
        assert out == cut


def test_sampling_runs_are_reproducible_and_fill_gen_len(llama):
    target, drafts, prompts, _ = llama
    a, counts = run_engine("specoffload", target, drafts["perturbed copy"], prompts=prompts, sampling="sampling", seed=3)
    b, _ = run_engine("specoffload", target, drafts["perturbed copy"], prompts=prompts, sampling="sampling", seed=3)
    c, _ = run_engine("specoffload", target, drafts["perturbed copy"], prompts=prompts, sampling="sampling", seed=4)
    assert a == b != c
    assert all(len(row) == GEN and all(0 <= t < 256 for t in row) for row in a)
    assert 0 < counts["accepted"] < counts["drafted"]


def test_mixtral_target_greedy_speculative_equals_target_only_greedy():
    hf, spec = hf_from_preset("tiny-mixtral", seed=2)
    prompts = make_prompts(spec.vocab, seed=6)[:4]
    target = state_dict_checkpoint(spec, hf.state_dict(), torch.float32)
    draft = random_checkpoint(ModelSpec.from_preset("tiny-draft"), torch.float32, seed=1)
    out, _ = run_engine("spec-serial", target, draft, prompts=prompts)
    assert out == reference_greedy(hf, prompts, GEN)

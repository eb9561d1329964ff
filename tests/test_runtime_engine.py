"""The engine's output against target-only greedy decoding by transformers (full recompute,
one row at a time), token for token, under every schedule; rows have different prompt
lengths and accept different numbers of drafted tokens."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import transformers

from specplan.models import ModelSpec
from specplan.plan import SPECULATIVE, Placement, Schedule
from specplan.runtime.checkpoint import random_checkpoint, state_dict_checkpoint
from specplan.runtime.engine import Engine
from specplan.runtime.sampling import SamplingParams
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
                    max_prompt_len=max(len(p) for p in prompts), gen_len=GEN,
                    sampling=SamplingParams(temperature=0.0 if sampling == "greedy" else 1.0, seed=seed),
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


# ---- the draft's KV on the host: two swap buffers -----------------------------------------------------


def _schedule(policy: str = "specoffload", draft_batch: int = 2) -> Schedule:
    return Schedule(policy=policy, target_batch=3, num_batches=2, prefill_chunk=4, draft_batch=draft_batch, gamma=3,
                    attention_device="cpu", prefetch_depth=1).validate()


def test_draft_kv_on_the_host_drafts_what_a_gpu_resident_draft_kv_drafts(llama, monkeypatch):
    """Same proposals, round after round, whether the draft's KV stays on the device or is
    swapped through two buffers (rows of ragged length, micro-batches of 2 and 1 rows)."""
    target, drafts, prompts, expected = llama
    proposals: dict[str, list] = {"cpu": [], "gpu": []}
    real = Engine.propose
    for where in ("cpu", "gpu"):
        def spy(self, slots, work, where=where):
            real(self, slots, work)
            proposals[where].append([(d.slot, self.proposal[d.slot].tolist()) for d in work if d.propose])
        monkeypatch.setattr(Engine, "propose", spy)
        out, _ = run_engine("spec-serial", target, drafts["unrelated tiny-draft"], replace(STREAMED, draft_kv=where),
                            prompts)
        assert out == expected
    assert len(proposals["cpu"]) > 10 and proposals["cpu"] == proposals["gpu"]


def test_draft_kv_swaps_are_double_buffered_and_write_back_only_new_entries(llama, monkeypatch):
    """Micro-batch i + 1 is loaded before micro-batch i drafts, into the other buffer; a store
    copies the gamma + 1 positions a round wrote, a load the L - 2 positions the row has cached."""
    from specplan.runtime import draftkv

    target, drafts, prompts, _ = llama
    log = []
    for name in ("load", "acquire", "store"):
        real = getattr(draftkv.DraftKVSwap, name)

        def spy(self, slot, *a, real=real, name=name, **k):
            log.append((name, slot))
            return real(self, slot, *a, **k)
        monkeypatch.setattr(draftkv.DraftKVSwap, name, spy)
    out, counts = run_engine("spec-serial", target, drafts["perturbed copy"], STREAMED, prompts)
    # a batch of 3 rows is two micro-batches (2 + 1 rows): load both, then draft each in its own buffer
    rounds = [log[i:i + 6] for i, e in enumerate(log) if e == ("load", 0) and log[i + 1] == ("load", 1)]
    assert rounds and all(r == [("load", 0), ("load", 1), ("acquire", 0), ("store", 0), ("acquire", 1), ("store", 1)]
                          for r in rounds)
    spec = ModelSpec.from_preset("tiny-llama")
    per_position = spec.kv_bytes_per_token  # every layer, keys and values, float32 like the preset
    assert counts["draft_kv_d2h_bytes"] == counts["rounds"] * (3 + 1) * per_position  # gamma + 1 per row-round
    # every prompt once (two waves), less its last token, which the first round re-reads
    assert counts["prefill.draft_kv_d2h_bytes"] == sum(n - 1 for n in PROMPT_LENS) * per_position
    assert "prefill.draft_kv_h2d_bytes" not in counts  # a prefill writes its buffer from scratch
    assert 0 < counts["draft_kv_h2d_bytes"] < counts["rounds"] * (max(PROMPT_LENS) + GEN) * per_position


@pytest.mark.parametrize("tied", [False, True])
def test_swap_buffers_are_what_plan_memory_counts(tied):
    from specplan.memory import plan_memory
    from specplan.workload import Workload

    t, d = ModelSpec.from_preset("tiny-llama"), ModelSpec.from_preset("tiny-draft")
    if tied:  # a tied draft holds one embedding matrix on the device, not two (SmolLM2's drafts are tied)
        t, d = replace(t, tie_embeddings=True), replace(d, tie_embeddings=True)
    schedule = _schedule(draft_batch=2)
    wl = Workload.make(prompt_len=9, gen_len=GEN, num_prompts=6)
    need = plan_memory(t, d, schedule, STREAMED, wl)
    engine = Engine(schedule, STREAMED, random_checkpoint(t, torch.float32), random_checkpoint(d, torch.float32), CPU,
                    rows=schedule.rows, max_prompt_len=9, gen_len=GEN)
    try:
        parts = engine.device_parts()
        assert parts["draft KV swap buffers"] == need.gpu["draft KV swap buffers"]
        assert parts["draft weights"] == need.gpu["draft weights"]
        assert "draft KV cache" not in parts
        assert engine.host_bytes()["draft_kv_cache"] == need.host["draft KV cache"]
    finally:
        engine.close()


def test_engine_counts_each_rows_verifications_and_acceptance(llama):
    """Per-row counts add up to the run's, and rows of the perturbed draft differ: what the
    report's acceptance_spread is made of."""
    from specplan.cost import row_acceptance_stats

    target, drafts, prompts, _ = llama
    schedule = Schedule(policy="spec-serial", target_batch=3, num_batches=1, prefill_chunk=4, draft_batch=2, gamma=3)
    stats = Stats(CPU)
    engine = Engine(schedule, STREAMED, target, drafts["perturbed copy"], CPU, rows=3,
                    max_prompt_len=max(len(p) for p in prompts), gen_len=GEN, stats=stats)
    try:
        engine.generate(prompts)
    finally:
        engine.close()
    assert len(engine.row_rounds) == len(prompts)
    assert sum(engine.row_rounds) == stats.counts["rounds"]
    assert sum(engine.row_accepted) == stats.counts["accepted"]
    assert len(set(engine.row_rounds)) > 1
    mean, spread = row_acceptance_stats(engine.row_rounds, engine.row_accepted, 3)
    assert 0.2 < mean < 0.9 and 0.0 < spread < 0.5


def test_passes_skip_rows_finished_at_either_end_of_a_batch(llama, monkeypatch):
    """A verification (or decode) pass computes the rows the scheduler lists and nothing else:
    once row 0 has hit EOS, passes over batch 0..2 start at row 1, and the tokens are still the
    reference's."""
    from specplan.runtime.model import Model

    target, drafts, prompts, expected = llama
    eos = expected[0][3]
    cut = [row[:row.index(eos) + 1] if eos in row else row for row in expected]
    for policy in ("spec-serial", "flexgen"):
        seen: list[tuple[int, int]] = []
        real = Model.forward

        def spy(self, steps, *a, **kw):
            if self.name == "target":
                seen.extend((s.rows.start, s.rows.stop) for s in steps)
            return real(self, steps, *a, **kw)

        monkeypatch.setattr(Model, "forward", spy)
        out, _ = run_engine(policy, target, drafts["perturbed copy"], prompts=prompts, eos=[eos])
        monkeypatch.setattr(Model, "forward", real)
        assert out == cut
        assert any(a == 1 and b >= 3 for a, b in seen), seen  # batch 0..2 without its finished row 0


@pytest.mark.parametrize("draft_kv", ["cpu", "gpu"])
def test_specoffload_merges_its_tails_and_keeps_the_reference_tokens(llama, draft_kv):
    """Once batch b's live rows fit in batch a's finished slots they move there (rows, target
    KV, draft KV on the host or the device) and one pass verifies both: fewer passes, the
    same tokens, outputs in prompt order."""
    target, drafts, prompts, expected = llama
    out, counts = run_engine("specoffload", target, drafts["perturbed copy"], replace(STREAMED, draft_kv=draft_kv),
                             prompts)
    assert out == expected
    assert counts.get("merged_rows", 0) > 0
    # spec-serial verifies the two batches one after the other, each to its slowest row
    serial_passes = run_engine("spec-serial", target, drafts["perturbed copy"], prompts=prompts)[1]["passes"]
    assert counts["passes"] < serial_passes

"""The step scheduler on its own: invariants of the passes it emits, for every policy and
admission mode, with random outcomes."""

from __future__ import annotations

import random

import pytest

from specplan.scheduler import ADMISSIONS, POLICIES, Outcome, Pass, Request, RowWork, SchedulerConfig, StepScheduler


def config(policy, admission, **kw):
    spec = policy in ("specoffload", "spec-serial")
    groups = 2 if policy in ("specoffload", "flexgen") else 1
    base = dict(policy=policy, groups=groups, group_rows=4, gen_len=6, gamma=3 if spec else 0, admission=admission,
                prefill_rows=3, prefill_tokens=12)
    base.update(kw)
    return SchedulerConfig(**base)


def drive(cfg, prompt_lens, seed=0, eos_p=0.0):
    """Run the scheduler to the end with random accepted lengths and EOS; returns passes and it."""
    rng = random.Random(seed)
    sched = StepScheduler(cfg, [Request(i, n) for i, n in enumerate(prompt_lens)])
    passes = []
    sched.freed = []  # per pass, the slots whose rows finished in it
    while (p := sched.next_pass()) is not None:
        passes.append(p)
        gained, eos = {}, set()
        for w in p.rows:
            if w.kind == "prefill" and not w.last:
                continue
            gained[w.slot] = rng.randint(1, cfg.gamma + 1) if w.kind == "verify" else 1
            if rng.random() < eos_p:
                eos.add(w.slot)
        before = [r is not None for r in sched.slots]
        sched.complete(p, Outcome(gained, frozenset(eos)))
        sched.freed.append([s for s, (b, r) in enumerate(zip(before, sched.slots)) if b and r is None])
        assert len(passes) < 10_000
    return passes, sched


@pytest.mark.parametrize("admission", ADMISSIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_every_prompt_runs_once_and_passes_keep_their_limits(policy, admission):
    lens = [3 + (7 * i) % 11 for i in range(23)]
    cfg = config(policy, admission)
    passes, sched = drive(cfg, lens, eos_p=0.1)
    assert sorted(r.request.id for r in sched.finished) == list(range(len(lens)))
    assert all(r.generated <= cfg.gen_len for r in sched.finished)
    occupied: dict[int, int] = {}
    prompt_done: dict[int, int] = {}
    for p, freed in zip(passes, sched.freed):
        for src, dst, _ in p.moves:
            assert occupied.get(dst) is None
            occupied[dst], occupied[src] = occupied[src], None
        for slot, req in p.admitted:
            assert occupied.get(slot) is None, "a slot is refilled only once free"
            occupied[slot] = req
        slots = [w.slot for w in p.rows]
        assert len(slots) == len(set(slots)), "a row computes once per pass"
        for w in p.rows:
            if w.kind == "prefill":
                assert w.start == prompt_done.get(occupied[w.slot], 0)  # chunks follow each other
                prompt_done[occupied[w.slot]] = w.start + w.tokens
        if admission == "continuous":  # at start-up (no row finished yet) prefill_rows prompts may come at once
            startup = not any(sched.freed[:p.index])
            assert p.prefill_tokens <= (max(cfg.prefill_tokens, cfg.prefill_rows * max(lens)) if startup
                                        else cfg.prefill_tokens)
        else:  # waves: a pass carries whole prompts or decode rows, never both
            assert not (p.prefill_tokens and p.decode_rows)
            assert len(p.of_kind("prefill")) <= cfg.prefill_rows
        q = cfg.gamma + 1 if cfg.speculative else 1
        assert all(w.tokens == q for w in p.rows if w.kind != "prefill")
        assert all(occupied.get(w.slot) is not None for w in p.rows)
        for s in freed:
            occupied[s] = None
    assert prompt_done == {i: n for i, n in enumerate(lens)}


def test_runs_are_what_goes_through_a_layer_as_one_batch():
    """Consecutive slots doing the same thing form one run; prompt chunks only when alike."""
    rows = (RowWork(5, "decode", 9, 1), RowWork(4, "decode", 7, 1), RowWork(0, "prefill", 0, 8),
            RowWork(1, "prefill", 0, 8), RowWork(2, "prefill", 0, 5), RowWork(3, "prefill", 8, 4, False),
            RowWork(7, "decode", 3, 1))
    got = [(r.kind, r.slots.start, r.slots.stop, r.work.tokens) for r in Pass.of_rows(0, (0, 1), rows).runs()]
    assert got == [("prefill", 0, 2, 8), ("prefill", 2, 3, 5), ("prefill", 3, 4, 4), ("decode", 4, 6, 1),
                   ("decode", 7, 8, 1)]
    # a flexgen pass serves every group: once all rows decode, the pass is one run of them all
    passes, _ = drive(config("flexgen", "waves"), [5] * 8)
    decoding = [p for p in passes if all(w.kind == "decode" for w in p.rows) and len(p.rows) == 8]
    assert decoding and all(len(p.runs()) == 1 for p in decoding)


def test_waves_are_static_batches():
    """Waves: no prompt is admitted until the whole wave is done."""
    passes, _ = drive(config("spec-serial", "waves"), [5] * 10, seed=3)
    admits = [p for p in passes if p.admitted]
    assert [len(p.admitted) for p in admits] == [4, 4, 2]
    assert all(len(p.rows) <= 4 for p in passes)


def test_continuous_refills_in_decode_passes_and_needs_fewer_passes():
    lens = [8] * 40
    cont, sc = drive(config("spec-serial", "continuous", prefill_tokens=16), lens, seed=1)
    waves, sw = drive(config("spec-serial", "waves"), lens, seed=1)
    assert sc.counts.mixed_passes > 0 and sc.counts.prefill_tokens_in_decode_passes > 0
    assert sw.counts.mixed_passes == 0
    assert len(cont) < len(waves)
    assert sc.counts.prefill_passes <= 1 < sw.counts.prefill_passes


def test_specoffload_drafts_one_batch_beside_the_others_pass():
    passes, _ = drive(config("specoffload", "waves"), [4] * 8, seed=2)
    decode = [p for p in passes if p.decode_rows]
    first = decode[0]
    assert first.groups == (0,) and {d.slot for d in first.draft_first} == {0, 1, 2, 3}
    assert {d.slot for d in first.draft_beside} == {4, 5, 6, 7}
    # then the batches alternate, each verified with the proposals made beside the other's pass
    assert [p.groups for p in decode[1:4]] == [(1,), (0,), (1,)]
    assert not decode[1].draft_first


def test_specoffload_merges_the_tail():
    cfg = config("specoffload", "waves", gen_len=12)
    passes, sched = drive(cfg, [4] * 8, seed=5)
    assert sched.counts.moved_rows > 0
    merged = next(p for p in passes if p.moves)
    assert all(d.slot in {dst for _, dst, _ in merged.moves} for d in merged.draft_first)


def test_recompute_rereads_the_context_every_round():
    passes, sched = drive(config("spec-serial", "continuous", draft_kv="recompute"), [6] * 6)
    drafts = [d for p in passes for d in p.draft_first]
    assert drafts and all(d.cached == 0 and d.context > 0 for d in drafts)
    assert not any(p.draft_beside for p in passes)
    _, kept = drive(config("spec-serial", "continuous"), [6] * 6)
    assert sched.counts.draft_prefill_tokens > kept.counts.draft_prefill_tokens


def test_a_prompt_past_a_rows_capacity_is_refused():
    with pytest.raises(ValueError, match="capacity"):
        StepScheduler(config("flexgen", "continuous", max_row_tokens=10), [Request(0, 5)])

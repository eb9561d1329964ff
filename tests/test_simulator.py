"""Simulator: closed forms, monotonicity, determinism and a golden timeline."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from specplan.cost import expected_accepted_tokens, expected_experts_touched, expected_rounds_slowest_row
from specplan.errors import InfeasibleError
from specplan.hardware import HardwareProfile, load_profile
from specplan.models import ModelSpec
from specplan.plan import Placement, Schedule
from specplan.simulator.run import SimConfig, simulate
from specplan.workload import Workload

GOLDEN = Path(__file__).parent / "golden" / "timeline_tiny_specoffload.json"
TINY_T = ModelSpec.from_preset("tiny-mixtral")
TINY_D = ModelSpec.from_preset("tiny-draft")


def schedule_for(policy: str, **kw) -> Schedule:
    base = dict(policy=policy, target_batch=4, num_batches=2 if policy in ("specoffload", "flexgen") else 1,
                prefill_chunk=2, draft_batch=2, gamma=2 if policy in ("specoffload", "spec-serial") else 0,
                attention_device="cpu", prefetch_depth=0 if policy == "sequential" else 1)
    base.update(kw)
    return Schedule(**base)


def tiny_cfg(profile, policy="specoffload", mode="expected", **kw):
    wl = Workload.make(prompt_len=[8, 5, 7], gen_len=6, num_prompts=8, acceptance=0.6)
    return SimConfig(TINY_T, TINY_D, profile, wl, schedule_for(policy, **kw), Placement(), mode=mode)


def big_cfg(policy, profile=None, mode="expected", **kw):
    profile = profile or load_profile("rtx4090")
    wl = Workload.make(prompt_len=512, gen_len=32, num_prompts=128, acceptance=0.7)
    sched = dict(policy=policy, target_batch=64, num_batches=2 if policy in ("specoffload", "flexgen") else 1,
                 prefill_chunk=16, draft_batch=16, gamma=4 if policy in ("specoffload", "spec-serial") else 0,
                 prefetch_depth=0 if policy == "sequential" else 1)
    sched.update(kw)
    return SimConfig(ModelSpec.from_preset("mixtral-8x7b"), ModelSpec.from_preset("mistral-7b-v0.2"), profile, wl,
                     Schedule(**sched), Placement(draft_kv="cpu"), mode=mode)


@pytest.mark.parametrize("attention", ["cpu", "gpu"])
def test_sequential_is_sum_of_stage_times(toy_profile, attention):
    r = simulate(tiny_cfg(toy_profile, "sequential", attention_device=attention))
    assert r.total_s == pytest.approx(sum(r.stage_s.values()), rel=1e-9)


def test_flexgen_groups_cost_as_the_one_batch_the_engine_runs(toy_profile):
    """A flexgen pass's groups decode side by side, so 2 x 4 rows cost what 1 x 8 rows do."""
    two = simulate(tiny_cfg(toy_profile, "flexgen", target_batch=4, num_batches=2))
    one = simulate(tiny_cfg(toy_profile, "flexgen", target_batch=8, num_batches=1))
    assert two.throughput_tok_s == pytest.approx(one.throughput_tok_s, rel=1e-9)


def test_a_prefetch_overlaps_nothing_on_a_device_that_is_the_hosts_cores(toy_profile):
    """The runtime copies on the computing thread there (runtime/weights.py): prefetch 1
    costs what prefetch 0 does; on a GPU the copy overlaps the previous layer's compute."""
    shared = replace(toy_profile, gpu=replace(toy_profile.gpu, shares_host_cores=True))
    for prof, overlaps in ((toy_profile, True), (shared, False)):
        ahead = simulate(tiny_cfg(prof, "flexgen", prefetch_depth=1)).total_s
        none = simulate(tiny_cfg(prof, "flexgen", prefetch_depth=0)).total_s
        assert (ahead < none) if overlaps else ahead == pytest.approx(none, rel=1e-12)


def test_link_bound_policy_approaches_link_time(toy_profile):
    slow = replace(toy_profile, link=replace(toy_profile.link, h2d_pinned=replace(toy_profile.link.h2d_pinned, bytes_per_s=1e5)))
    r = simulate(tiny_cfg(slow, "flexgen"))
    h2d = r.utilisation["h2d"] * r.total_s
    assert h2d <= r.total_s
    assert h2d == pytest.approx(r.total_s, rel=0.01)


def test_overlap_beats_sequential(toy_profile):
    seq = simulate(tiny_cfg(toy_profile, "sequential", target_batch=8))
    flex = simulate(tiny_cfg(toy_profile, "flexgen", target_batch=4))
    assert flex.total_s < seq.total_s


def _scale_link(profile: HardwareProfile, k: float) -> HardwareProfile:
    lk = profile.link
    paths = {n: replace(getattr(lk, n), bytes_per_s=getattr(lk, n).bytes_per_s * k)
             for n in ("h2d_pinned", "h2d_pageable", "d2h_pinned", "d2h_pageable")}
    return replace(profile, link=replace(lk, **paths))


@pytest.mark.parametrize("policy", ["specoffload", "spec-serial", "flexgen", "sequential"])
@pytest.mark.parametrize("mode", ["expected", "sampled"])
def test_doubling_link_bandwidth_never_slows(policy, mode):
    base = load_profile("rtx4090")
    slow = simulate(big_cfg(policy, base, mode))
    fast = simulate(big_cfg(policy, _scale_link(base, 2.0), mode))
    assert fast.throughput_tok_s >= slow.throughput_tok_s * (1 - 1e-9)


def test_expected_mode_tokens_per_round_is_closed_form(toy_profile):
    cfg = tiny_cfg(toy_profile, "spec-serial", gamma=3)
    cfg = replace(cfg, workload=Workload.make(prompt_len=8, gen_len=200, num_prompts=4, acceptance=0.6))
    r = simulate(cfg)
    e = expected_accepted_tokens(0.6, 3)
    # every round but the last gains exactly E per row
    assert r.rounds == math.ceil((200 - 1) / e)
    assert r.generated_tokens == pytest.approx(4 * 200)


def test_sampled_mode_is_seeded(toy_profile):
    a = simulate(tiny_cfg(toy_profile, mode="sampled"), seed=3)
    b = simulate(tiny_cfg(toy_profile, mode="sampled"), seed=3)
    assert a.to_dict() | {"wall_s": 0} == b.to_dict() | {"wall_s": 0}
    runs = {simulate(tiny_cfg(toy_profile, mode="sampled"), seed=s).total_s for s in range(6)}
    assert len(runs) > 1  # ragged acceptance changes the timeline


def test_sampled_tail_is_slower_than_expected():
    """Static batches wait for their slowest row, so drawing per-row acceptance costs rounds."""
    s = simulate(big_cfg("specoffload", mode="sampled"))
    e = simulate(big_cfg("specoffload", mode="expected"))
    assert s.rounds > e.rounds
    assert s.accepted_per_round == pytest.approx(expected_accepted_tokens(0.7, 4), rel=0.03)
    assert s.tokens_per_round < s.accepted_per_round  # the last rounds are capped at gen_len


def test_rows_that_differ_in_acceptance_lengthen_the_tail():
    """An acceptance spread between rows: the same mean, a slower slowest row, so more
    verification passes; seeded like the rest; matched by the planner's expectation."""
    base = big_cfg("spec-serial", mode="sampled")
    spread = replace(base, workload=replace(base.workload, acceptance_spread=0.2))
    alike, differ = simulate(base), simulate(spread)
    assert differ.rounds > alike.rounds * 1.1
    assert simulate(spread).to_dict() | {"wall_s": 0} == differ.to_dict() | {"wall_s": 0}
    wl, sch = spread.workload, spread.schedule
    rows = min(sch.target_batch, wl.num_prompts)
    runs = [simulate(spread, seed=k).rounds for k in range(8)]
    planned = expected_rounds_slowest_row(wl.acceptance_rates(sch.gamma), wl.gen_len - 1, rows, 0.2)
    assert min(runs) <= planned * 1.05 and planned <= max(runs) * 1.05


def test_speculative_rows_generate_exactly_gen_len(toy_profile):
    r = simulate(tiny_cfg(toy_profile, mode="sampled"))
    assert r.generated_tokens == 8 * 6


def test_moe_streams_whole_layers_as_the_runtime_does(toy_profile):
    # one row, one token touches top_k of the experts, but the runtime copies a streamed layer
    # whole (prefetched before its router has run): the simulator charges every expert
    assert expected_experts_touched(1, TINY_T.experts, TINY_T.top_k) == TINY_T.top_k < TINY_T.experts
    one = simulate(replace(tiny_cfg(toy_profile, "sequential", target_batch=1),
                           workload=Workload.make(prompt_len=4, gen_len=3, num_prompts=1)), record_spans=True)
    decode_copies = [s for s in one.spans if s.stage == "h2d"]
    b = TINY_T.layer_bytes
    want = (b.attention + TINY_T.experts * b.expert) / 1e9
    assert decode_copies[0].end_s - decode_copies[0].start_s == pytest.approx(want)


def test_infeasible_plan_names_the_memory(toy_profile):
    small = replace(toy_profile, gpu=replace(toy_profile.gpu, memory_bytes=1e5))
    with pytest.raises(InfeasibleError, match="GPU memory: needs"):
        simulate(tiny_cfg(small))


def test_peak_memory_within_capacity(toy_profile):
    r = simulate(tiny_cfg(toy_profile))
    assert 0 < r.peak_gpu_bytes <= toy_profile.gpu.memory_bytes
    need = r.memory["gpu"]
    static = sum(v for k, v in need.items() if not k.startswith("activations"))
    assert static < r.peak_gpu_bytes <= sum(need.values())  # the planner's formula is an upper bound


def _timeline(spans):
    return [[s.resource, s.stage, s.who, round(s.start_s, 12), round(s.end_s, 12)] for s in spans]


def test_golden_timeline(toy_profile):
    r = simulate(tiny_cfg(toy_profile, "specoffload", mode="expected"), record_spans=True)
    got = _timeline(r.spans)
    # hand check of the first event: prefill chunk 0 (2 rows: 8 + 5 tokens) streams layer 0
    # whole, its attention block and all 4 experts, at 1 GB/s
    b = TINY_T.layer_bytes
    first = (b.attention + 4 * b.expert) / 1e9
    copy = next(s for s in got if s[0] == "h2d")
    assert copy[:4] == ["h2d", "prefill.h2d", "pass0.A", 0.0]
    assert copy[4] == pytest.approx(first)
    if not GOLDEN.exists():  # regenerate with: rm the file and run this test
        GOLDEN.write_text("[\n" + ",\n".join(json.dumps(row) for row in got) + "\n]\n")
    assert got == json.loads(GOLDEN.read_text())


def test_chrome_trace_and_gantt(tmp_path, toy_profile):
    from specplan.simulator.trace import write_chrome_trace, write_gantt

    r = simulate(tiny_cfg(toy_profile), record_spans=True)
    trace = json.loads(write_chrome_trace(r.spans, tmp_path / "t.json").read_text())
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == len(r.spans) and all(e["dur"] >= 0 for e in xs)
    png = write_gantt(r.spans, tmp_path / "g.png", "tiny")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_specoffload_merges_its_tails_as_the_planner_expects():
    """Once batch B's live rows fit in A's finished slots they move there (a copy charged to
    host memory), and one pass verifies all that is left: passes = E[one row's rounds] +
    E[slowest of all rows' rounds], not two batches' tails."""
    from specplan.cost import expected_verify_passes

    base = big_cfg("specoffload", mode="sampled")
    cfg = replace(base, workload=replace(base.workload, acceptance_spread=0.2))
    runs = [simulate(cfg, seed=k) for k in range(8)]
    assert all(r.stage_s.get("merge_rows", 0.0) > 0 for r in runs)
    wl, sch = cfg.workload, cfg.schedule
    planned, _ = expected_verify_passes("specoffload", wl.acceptance_rates(sch.gamma), wl.gen_len - 1,
                                        sch.target_batch, 2, 0.2, wl.mean_acceptance)
    rounds = [r.rounds for r in runs]
    assert min(rounds) <= planned * 1.05 and planned <= max(rounds) * 1.05
    tail_twice = 2 * expected_rounds_slowest_row(wl.acceptance_rates(sch.gamma), wl.gen_len - 1, sch.target_batch, 0.2)
    assert max(rounds) < tail_twice


@pytest.mark.parametrize("gpu", [{}, {"shares_host_cores": True, "lanes": 2, "lane_factor": 0.7}])
@pytest.mark.parametrize("policy", ["specoffload", "spec-serial", "flexgen", "sequential"])
@pytest.mark.parametrize("admission", ["waves", "continuous"])
def test_a_layer_nobody_contends_for_costs_what_its_steps_do(monkeypatch, gpu, policy, admission):
    """The simulator runs a layer as one timeout once nothing else can take the GPU or CPU
    (Machine.chain); with every step on its own the job, every stage and every resource's
    busy time come out the same (rows differ in acceptance, prompts in length)."""
    from conftest import toy_profile_dict
    from specplan.simulator import scenario

    profile = HardwareProfile.from_dict(toy_profile_dict(**gpu), "toy")
    wl = Workload.make(prompt_len=[8, 5, 7], gen_len=9, num_prompts=12, acceptance=0.7, acceptance_spread=0.1)
    cfg = SimConfig(TINY_T, TINY_D, profile, wl, schedule_for(policy, admission=admission, prefill_tokens=16),
                    Placement(attention="cpu_pinned", ffn="cpu_pinned", ffn_gpu_layers=1, draft_kv="cpu"), mode="sampled")
    runs = {}
    for chained in (False, True):
        monkeypatch.setattr(scenario, "CHAIN_UNCONTENDED", chained)
        runs[chained] = simulate(cfg)
    step, chain = runs[False], runs[True]
    assert chain.events < step.events  # the chains did run
    assert_same_costs(chain, step, rel=1e-9)


def assert_same_costs(got, want, rel: float) -> None:
    """Two simulations of one plan cost the same: the job's throughput, every stage's time,
    every resource's busy share, and the scheduler's counts."""
    assert got.throughput_tok_s == pytest.approx(want.throughput_tok_s, rel=rel)
    assert got.stage_s.keys() == want.stage_s.keys()
    for k, v in want.stage_s.items():
        assert got.stage_s[k] == pytest.approx(v, rel=rel, abs=1e-15), k
    for k, v in want.utilisation.items():
        assert got.utilisation[k] == pytest.approx(v, rel=rel, abs=1e-12), k
    assert got.pass_counts == want.pass_counts


@pytest.mark.parametrize("placement", [
    Placement(attention="cpu_pinned", ffn="cpu_pinned", ffn_gpu_layers=1, draft_kv="gpu"),
    Placement(attention="gpu", ffn="disk", ffn_gpu_layers=0, lm_head="cpu_pinned", draft_kv="gpu"),
    Placement(attention="cpu_pinned", ffn="cpu_pageable", ffn_gpu_layers=0, draft_kv="recompute")],
    ids=["pinned", "disk", "pageable"])  # with the draft KV on the host its write-backs run into the pass: never alone
@pytest.mark.parametrize("policy", ["spec-serial", "flexgen", "sequential"])
@pytest.mark.parametrize("admission", ["waves", "continuous"])
def test_a_pass_that_runs_alone_costs_what_its_events_do(monkeypatch, policy, admission, placement):
    """A pass nothing else runs beside (Machine.alone) is timed by one recurrence over its
    layers (Scenario._layers_alone); with every pass run as the loader's and the layers'
    events the job, every stage and every resource's busy time come out the same, and the
    recurrence did time some passes."""
    from conftest import toy_profile_dict
    from specplan.simulator import machine, scenario

    profile = HardwareProfile.from_dict(toy_profile_dict(), "toy")
    wl = Workload.make(prompt_len=[8, 5, 7], gen_len=9, num_prompts=12, acceptance=0.7, acceptance_spread=0.1)
    cfg = SimConfig(TINY_T, TINY_D, profile, wl, schedule_for(policy, admission=admission, prefill_tokens=16),
                    placement, mode="sampled")
    alone_passes = []
    layers_alone = scenario.Scenario._layers_alone

    def counted(self, *a, **k):
        alone_passes.append(1)
        return layers_alone(self, *a, **k)

    monkeypatch.setattr(scenario.Scenario, "_layers_alone", counted)
    fast = simulate(cfg)
    assert alone_passes, "no pass ran alone"
    monkeypatch.setattr(machine.Machine, "alone", lambda self: False)
    slow = simulate(cfg)
    assert_same_costs(fast, slow, rel=1e-12)
    assert fast.total_s == pytest.approx(slow.total_s, rel=1e-12) and fast.peak_gpu_bytes == slow.peak_gpu_bytes

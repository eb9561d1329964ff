"""Planner: memory safety, brute-force agreement, infeasibility messages, plan files."""

import itertools
import json
import subprocess
import sys

import pytest

from specplan.errors import InfeasibleError
from specplan.hardware import HardwareProfile, load_profile
from specplan.memory import plan_memory
from specplan.models import ModelSpec
from specplan.plan import POLICIES, Placement, Plan, Schedule
from specplan.planner import shapes as shapes_mod
from specplan.planner.milp import MEMORY_UNIT_BYTES as GB, ShapeProgram
from specplan.planner.optimize import make_plan, optimize
from specplan.simulator.run import SimConfig, simulate
from specplan.workload import Workload

from conftest import toy_profile_dict

TINY_T = ModelSpec.from_preset("tiny-mixtral")
TINY_D = ModelSpec.from_preset("tiny-draft")


@pytest.fixture
def small_space(monkeypatch):
    """Shrink the candidate sets so brute force can enumerate them."""
    monkeypatch.setattr(shapes_mod, "BATCHES", (2, 4))
    monkeypatch.setattr(shapes_mod, "GAMMAS", (1, 3))
    monkeypatch.setattr(shapes_mod, "DRAFT_BATCHES", (2, 4))
    monkeypatch.setattr(shapes_mod, "PREFILL_CHUNKS", (8,))


def tight_profile(gpu_bytes: float) -> HardwareProfile:
    """A toy machine whose GPU holds only part of the tiny target, so placement matters."""
    return HardwareProfile.from_dict(toy_profile_dict(memory_bytes=gpu_bytes), "toy-tight")


def _tok_s(cfg: SimConfig, seed: int) -> float:
    return simulate(cfg, seed=seed).throughput_tok_s


def brute_force(target, draft, profile, workload, seed=0):
    """Every shape x placement x prefetch depth in the small space, scored by the simulator
    (in processes, one per core: the simulations are independent and seeded)."""
    from specplan.planner.optimize import map_in_processes, parallel_workers

    configs = {}
    policies = ("specoffload", "spec-serial", "flexgen", "sequential")
    for policy in policies:
        for shape in shapes_mod.enumerate_shapes(policy, workload):
            for att, ffn, n_gpu, dkv, k in itertools.product(("gpu", "cpu_pinned"), ("cpu_pinned", "cpu_pageable"),
                                                             range(target.layers + 1), ("gpu", "cpu"), (0, 1)):
                if not shape.schedule(k).speculative and dkv == "cpu":
                    continue
                if shape.recompute:  # the draft keeps no KV: one home, not two
                    if dkv == "cpu":
                        continue
                    dkv = "recompute"
                pl = Placement(attention=att, ffn=ffn, ffn_gpu_layers=n_gpu, embed="cpu_pageable", lm_head="gpu", draft_kv=dkv)
                sch = shape.schedule(k)
                if plan_memory(target, draft, sch, pl, workload).violations(profile):
                    continue
                configs[(sch, pl)] = SimConfig(target, draft if sch.speculative else None, profile, workload, sch, pl)
    keys = list(configs)
    jobs = [(configs[key], seed) for key in keys]
    scores = map_in_processes(_tok_s, jobs, parallel_workers(len(jobs)))
    best = max(zip(scores, keys), key=lambda sk: sk[0], default=(0.0, None))
    return best


def _slow_link_small_host(gpu_bytes: float) -> HardwareProfile:
    """A toy machine with a slow link and a host that holds the weights with little to spare."""
    d = toy_profile_dict(memory_bytes=gpu_bytes)
    d["link"]["h2d_pinned"]["bytes_per_s"] = 2e8
    d["host"]["memory_bytes"] = 4e6
    return HardwareProfile.from_dict(d, "toy-slow-link")


BRUTE_FORCE_CASES = [
    # the first two since the planner's beginning; the last two with issue 17's faster search:
    # more prompts than rows (continuous admission competes, waves leave a partial wave), a
    # low acceptance with rows that differ, a slow link and a host that binds
    ("gpu 2.2 MB", lambda: tight_profile(2.2e6), dict(prompt_len=[8, 6], gen_len=12, num_prompts=8, acceptance=0.7)),
    ("gpu 3.5 MB", lambda: tight_profile(3.5e6), dict(prompt_len=[8, 6], gen_len=12, num_prompts=8, acceptance=0.7)),
    ("20 prompts, spread", lambda: tight_profile(3.0e6),
     dict(prompt_len=[8, 5], gen_len=10, num_prompts=20, acceptance=0.5, acceptance_spread=0.1)),
    ("slow link, small host", lambda: _slow_link_small_host(2.6e6),
     dict(prompt_len=8, gen_len=12, num_prompts=12, acceptance=0.8)),
]


@pytest.mark.parametrize("name,profile_of,workload", BRUTE_FORCE_CASES, ids=[c[0] for c in BRUTE_FORCE_CASES])
def test_planner_matches_brute_force(small_space, name, profile_of, workload):
    profile = profile_of()
    wl = Workload.make(**workload)
    bf_tok_s, bf_plan = brute_force(TINY_T, TINY_D, profile, wl)
    assert bf_plan is not None
    res = optimize(TINY_T, TINY_D, profile, wl)
    assert res.best.tok_s >= 0.98 * bf_tok_s, (res.best.candidate, bf_plan)


def test_no_plan_violates_memory():
    profile = load_profile("rtx4090")
    t, d = ModelSpec.from_preset("mixtral-8x7b"), ModelSpec.from_preset("mistral-7b-v0.2")
    wl = Workload.make(prompt_len=512, gen_len=64, num_prompts=256, acceptance=0.7)
    res = optimize(t, d, profile, wl)
    # every policy's best is simulated, or left out only where it cannot win (SIM_OVER_ESTIMATE)
    assert {r.candidate.shape.policy for r in res.ranked} | set(res.unsimulated) == set(POLICIES)
    assert len({(r.candidate.shape, r.candidate.placement) for r in res.ranked}) >= 3
    for r in res.ranked:
        sch = r.candidate.shape.schedule(r.candidate.prefetch_depth)
        need = plan_memory(t, d, sch, r.candidate.placement, wl)
        assert need.violations(profile) == []
        # and by hand: what the GPU holds never exceeds what it has
        assert need.gpu_bytes <= profile.gpu.memory_bytes - profile.gpu.reserved_bytes
        assert r.sim.peak_gpu_bytes <= profile.gpu.memory_bytes
        assert need.host_bytes <= profile.host.memory_bytes


@pytest.mark.parametrize("target,draft", [("mixtral-8x7b", "mistral-7b-v0.2"), ("smollm2-135m", "smollm2-135m-4l"),
                                          ("llama-3.2-1b", "smollm2-135m-4l"), ("llama-3.3-70b", "llama-3.2-1b")])
def test_program_memory_terms_equal_plan_memory(target, draft):
    """The program's linear memory rows and plan_memory are one formula, checked on many points
    and model shapes (a head larger than a layer, as in small models, included)."""
    import pulp

    profile = load_profile("rtx4090")
    t, d = ModelSpec.from_preset(target), ModelSpec.from_preset(draft)
    wl = Workload.make(prompt_len=256, gen_len=64, num_prompts=128)
    shapes = shapes_mod.enumerate_shapes("specoffload", wl)[::97][:6]
    assert {s.recompute for s in shapes} == {False, True} and {s.admission for s in shapes} == {"waves", "continuous"}
    prog = ShapeProgram(shapes, t, d, profile, wl)
    for c, shape in enumerate(shapes):
        for att, n_gpu, dk, k, head in itertools.product(("gpu", "cpu_pinned", "cpu_pageable"), (0, 3), (0, 1), (0, 1),
                                                         ("gpu", "cpu_pinned")):
            fixed = {prog.x[i]: int(i == c) for i in range(len(shapes))}
            values = {"n_gpu": n_gpu, "draft_kv_host": dk, "prefetch": k}
            pl = Placement(attention=att, ffn="cpu_pinned", ffn_gpu_layers=n_gpu, embed="cpu_pageable",
                           lm_head=head, draft_kv="recompute" if shape.recompute else "cpu" if dk else "gpu")
            need = plan_memory(t, d, shape.schedule(k), pl, wl)
            for var in prog.prob.variables():
                name = var.name
                if var in fixed:
                    var.varValue = fixed[var]
                elif name in values:
                    var.varValue = values[name]
                elif name.startswith("v_"):
                    var.varValue = fixed[prog.x[int(name[2:])]] * dk
                elif name.startswith("attn_"):
                    var.varValue = int(name[5:] == att)
                elif name.startswith("head_"):
                    var.varValue = int(name[5:] == head)
                elif name.startswith("ffn_"):
                    var.varValue = int(name[4:] == "cpu_pinned")
                elif name.startswith("y_"):
                    var.varValue = (t.layers - n_gpu) if name[2:] == "cpu_pinned" else 0
                elif name == "any_ffn_streamed":
                    var.varValue = int(n_gpu < t.layers)
                elif name == "any_staged":
                    var.varValue = int(att == "cpu_pageable")
                elif name in ("slot_gb", "prefetch_x_slot_gb", "staging_gb"):
                    b = t.layer_bytes
                    layer = b.ffn * int(n_gpu < t.layers) + b.attention * int(att != "gpu")
                    slot = max(layer, (t.head_bytes + t.hidden * t.dtype_bytes) * int(head != "gpu")) / GB
                    var.varValue = {"slot_gb": slot, "prefetch_x_slot_gb": slot * k,
                                    "staging_gb": (1 + k) * slot * int(att == "cpu_pageable")}[name]
            cons = prog.prob.constraints  # memory rows are in GB: lhs - capacity, back in bytes
            row = lambda name: pulp.value(cons[name]) * GB  # noqa: E731
            assert row("gpu_memory") == pytest.approx(
                need.gpu_bytes - (profile.gpu.memory_bytes - profile.gpu.reserved_bytes), rel=1e-9, abs=1.0)
            assert row("host_memory") == pytest.approx(need.host_bytes - profile.host.memory_bytes, abs=1.0)
            assert row("pinned_memory") == pytest.approx(
                need.pinned_bytes - profile.host.memory_bytes * profile.host.pinned_fraction, abs=1.0)


def test_infeasible_names_binding_constraint():
    # 2 GB of GPU (0.5 GB after the reserve) cannot hold even one streamed Mixtral layer
    profile = load_profile("rtx4090", gpu_memory_bytes=2e9)
    t, d = ModelSpec.from_preset("mixtral-8x7b"), ModelSpec.from_preset("mistral-7b-v0.2")
    with pytest.raises(InfeasibleError, match=r"flexgen: GPU memory: needs [0-9.]+ GB, has 500.00 MB"):
        optimize(t, d, profile, Workload.make())


def test_host_memory_binds_when_disk_is_no_help():
    """Even with every weight on disk, the KV cache must live in host memory."""
    profile = load_profile("rtx4090", host_memory_bytes=1e9)
    t = ModelSpec.from_preset("mixtral-8x7b")
    with pytest.raises(InfeasibleError, match=r"host memory: needs [0-9.]+ GB, has 1.00 GB"):
        optimize(t, None, profile, Workload.make(prompt_len=4096, num_prompts=64))


def test_beats_published_hand_set_parameters():
    """Quality: the chosen plan is no worse than SpecOffload's published parameters
    (2 x 256 rows, prefill chunk 80, draft batch 10, gamma 6) under the same simulator."""
    profile = load_profile("rtx4090")
    t, d = ModelSpec.from_preset("mixtral-8x7b"), ModelSpec.from_preset("mistral-7b-v0.2")
    wl = Workload.make()
    hand = Schedule("specoffload", 256, 2, 80, 10, 6, "cpu", 1)
    hand_res = simulate(SimConfig(t, d, profile, wl, hand, Placement(draft_kv="cpu"), check_memory=False))
    best = optimize(t, d, profile, wl).best
    assert best.tok_s >= hand_res.throughput_tok_s


def test_plan_file_round_trip(tmp_path, small_space):
    profile = tight_profile(3.5e6)
    wl = Workload.make(prompt_len=8, gen_len=8, num_prompts=8)
    res = optimize(TINY_T, TINY_D, profile, wl)
    plan = make_plan(res.best, "tiny-mixtral", "tiny-draft", TINY_T, TINY_D, profile, wl)
    path = tmp_path / "plan.json"
    plan.save(str(path))
    again = Plan.load(str(path))
    assert again == plan
    assert again.inputs["target"] and again.versions["specplan"]
    assert again.prediction["throughput_tok_s"] == pytest.approx(res.best.tok_s)


def test_bad_plan_file_is_rejected(tmp_path):
    from specplan.errors import InputError

    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"format": 1, "target": "x", "hardware": "rtx4090", "workload": {},
                                "schedule": {"policy": "warp"}, "placement": {}}))
    with pytest.raises(InputError, match="schedule.policy"):
        Plan.load(str(path))


def test_optimize_cli_writes_plan(tmp_path):
    out = tmp_path / "p.json"
    r = subprocess.run([sys.executable, "-m", "specplan.cli", "optimize", "--gpu", "rtx4090", "--target", "tiny-mixtral",
                        "--draft", "tiny-draft", "--prompt-len", "16", "--gen-len", "8", "--num-prompts", "16",
                        "--out", str(out), "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    payload = json.loads(r.stdout)
    assert out.exists() and payload["plan"]["schedule"]["policy"]
    simulated = {c["shape"]["policy"] for c in payload["candidates"]}
    assert simulated | set(payload["unsimulated_program_tok_s"]) == set(POLICIES)  # each policy's best


def test_optimize_cli_infeasible_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "specplan.cli", "optimize", "--gpu-mem", "2GB", "--out", str(tmp_path / "p.json")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 3
    assert "GPU memory: needs" in r.stderr
    assert not (tmp_path / "p.json").exists()


def test_more_gpu_memory_never_slows_the_best_plan(small_space):
    wl = Workload.make(prompt_len=[8, 6], gen_len=12, num_prompts=8, acceptance=0.7)
    speeds = [optimize(TINY_T, TINY_D, tight_profile(b), wl).best.tok_s for b in (2.2e6, 3.0e6, 4.5e6, 9e6)]
    assert all(b >= a * (1 - 1e-9) for a, b in zip(speeds, speeds[1:])), speeds


def test_planning_in_processes_equals_planning_in_one(small_space, monkeypatch):
    from specplan.planner import optimize as optimize_mod

    profile = tight_profile(3.5e6)
    wl = Workload.make(prompt_len=[8, 6], gen_len=12, num_prompts=8, acceptance=0.7)
    ranked = {}
    for workers in (1, 2):
        monkeypatch.setattr(optimize_mod, "parallel_workers", lambda n, w=workers: min(n, w))
        res = optimize(TINY_T, TINY_D, profile, wl)
        ranked[workers] = [(r.candidate.shape, r.candidate.placement, r.candidate.estimate_tok_s, r.tok_s) for r in res.ranked]
    assert len(ranked[1]) >= 3 and ranked[1] == ranked[2]


def _raise(kind):
    from specplan.errors import InputError, UnknownNameError

    if kind == "input":
        raise InputError("plan.json", "schedule.gamma", "is -1", "an integer >= 0")
    raise UnknownNameError("profile", "rtx409", ["rtx4090", "a100"])


def test_an_error_in_a_worker_reaches_the_caller_as_itself():
    from specplan.errors import InputError, UnknownNameError
    from specplan.planner import optimize as optimize_mod

    for kind, cls in (("input", InputError), ("name", UnknownNameError)):
        with pytest.raises(cls) as e:
            optimize_mod.map_in_processes(_raise, [(kind,), (kind,)], workers=2)
        assert "rtx4090" in str(e.value) if kind == "name" else "schedule.gamma: is -1" in str(e.value)


_RAN: list = []


def _note(x):
    _RAN.append(x)
    return x * 2


def test_jobs_wanted_ahead_run_only_when_a_process_is_free_and_fail_only_when_asked_for():
    from specplan.planner.optimize import Jobs

    _RAN.clear()
    with Jobs(1) as jobs:  # one worker: nothing runs unless asked for
        jobs.want("a", _note, 1)
        jobs.want("b", _note, 2, ahead=(0,))
        jobs.want("c", _note, 3, ahead=(1,), then=lambda got: jobs.want("d", _note, got, ahead=(2,)))
        assert jobs.result("a") == 2 and _RAN == [1]
        jobs.drop("b")
        assert jobs.result("c") == 6 and _RAN == [1, 3]
        assert jobs.result("b") == 4 and jobs.result("d") == 12  # dropped, then asked for after all
    with Jobs(2) as jobs:  # a failing job wanted ahead and never asked for raises nothing
        jobs.want("bad", _raise, "input", ahead=(0,))
        jobs.want("ok", _note, 5)
        assert jobs.result("ok") == 10
        with pytest.raises(Exception, match="schedule.gamma"):
            jobs.result("bad")


@pytest.mark.parametrize("gpu", ["a100-80gb", "rtx4090"])
def test_program_finds_a_plan_whenever_a_shape_fits(gpu):
    """Regression: with its memory rows in bytes, HiGHS called the A100-80GB spec-serial
    program infeasible at the Dinkelbach start, although every shortlisted shape fits; the
    policy then vanished from the ranking without a word."""
    from specplan.planner.optimize import _policy_candidates

    profile = load_profile(gpu)
    t, d = ModelSpec.from_preset("mixtral-8x7b"), ModelSpec.from_preset("mistral-7b-v0.2")
    found, why, _ = _policy_candidates("spec-serial", t, d, profile, Workload.make(), 1)
    assert why is None and len(found) == 1
    assert found[0].estimate_tok_s > 0


def test_program_values_prefetch_when_draft_kv_swaps_share_the_link():
    """Regression: the no-prefetch bound left out the draft KV swaps, so with a fast host
    (short compute chain) the program was indifferent to prefetch and chose a prefetch-0
    specoffload plan the simulator put 8% below the same shape with prefetch."""
    from specplan.planner.optimize import _policy_candidates

    profile = load_profile("rtx4090").compose(host="server")
    t, d = ModelSpec.from_preset("mixtral-8x7b"), ModelSpec.from_preset("mistral-7b-v0.2")
    found, why, _ = _policy_candidates("specoffload", t, d, profile, Workload.make(), 1)
    assert why is None and found[0].placement.draft_kv == "cpu"
    assert found[0].prefetch_depth == 1


def test_explain_shows_what_a_spread_between_rows_costs(small_space):
    """--explain's rows for the acceptance spread: the same plan, slower when rows differ
    more, one row per value, and no crash where a spread is set and the acceptance varies
    (0.3 is too much spread for 0.9)."""
    from specplan.planner.cli import sensitivity

    profile = tight_profile(8e9)
    wl = Workload.make(prompt_len=16, gen_len=24, num_prompts=8, acceptance=0.7, acceptance_spread=0.3)
    res = optimize(TINY_T, TINY_D, profile, wl, ("spec-serial",))
    rows = sensitivity(res.best, TINY_T, TINY_D, profile, wl)
    spread = [(v, t) for what, v, t in rows if what == "acceptance spread"]
    assert [v for v, _ in spread] == ["0.05", "0.1", "0.2"]
    tok = [t for _, t in spread]
    assert all(t == t for t in tok) and tok[0] > tok[2]  # 4 rows, one seed: ordered only at the ends
    assert {v for what, v, _ in rows if what == "acceptance"} == {"0.5", "0.6", "0.8", "0.9"}

"""End to end on this CPU: profile the machine (a tiny sweep), plan with the measured profile
(`specplan optimize`), execute the plan (`specrun`), and check the report puts measurements
next to the plan's predictions. The commands run as a user runs them, in subprocesses;
one run per policy goes through the same Python entry points in-process (cheaper).

Every process runs torch on one thread: on a small shared machine, torch's spinning OpenMP
workers make a run up to 100x slower when another process holds a core, and one thread
keeps the timings of the profile and of the run comparable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from specplan.hwprofiles import profiler
from specplan.hwprofiles.profiler import Grid, profile_machine
from specplan.models import ModelSpec

TARGET, DRAFT = "tiny-mixtral", "tiny-draft"
PROMPT_LEN, GEN_LEN, NUM_PROMPTS = 16, 8, 8
# Room for the draft and the activations but not for every target weight: the plan streams.
GPU_MEMORY_BYTES = 1.0e6
TINY_GRID = Grid(link_bytes=(64 * 1024, 1 << 20, 4 << 20), ffn_tokens=(1, 8, 32, 128), attn_rows=(1, 4, 16),
                 attn_q=(1, 4, 16), attn_ctx=(16, 64), step_rows=(1, 4, 16), step_ctx=(16, 64), repeat=2, gemm_n=256)


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def measured_profile(tmp_path_factory, one_thread):
    old = profiler.QUICK
    profiler.QUICK = TINY_GRID
    try:
        prof = profile_machine([ModelSpec.from_preset(TARGET), ModelSpec.from_preset(DRAFT)], quick=True, device="cpu",
                               gpu_memory_bytes=GPU_MEMORY_BYTES, name="e2e-cpu")
    finally:
        profiler.QUICK = old
    path = tmp_path_factory.mktemp("e2e") / "e2e-cpu.json"
    prof.save(path)
    return path


def run(module: str, *args, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", NO_COLOR="1")
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def check_report(report: dict, plan: dict) -> None:
    m, pred = report["measured"], plan["prediction"]
    assert m["generated_tokens"] == m["rows"] * GEN_LEN == NUM_PROMPTS * GEN_LEN  # random weights: EOS ignored
    assert m["throughput_tok_s"] > 0 and m["wall_s"] > 0
    assert report["plan"]["schedule"] == plan["schedule"] and report["plan"]["placement"] == plan["placement"]
    rows = {r["metric"]: r for r in report["comparison"]}
    t = rows["throughput_tok_s"]
    assert t["predicted"] == pred["throughput_tok_s"] > 0 and t["measured"] == m["throughput_tok_s"]
    assert t["error_pct"] == pytest.approx(100 * (t["predicted"] - t["measured"]) / t["measured"])
    # stage times: measured ones, and every predicted stage compared (with --timing), or the
    # per-pass ones only (without)
    per_layer = m["stage_timing"] == "per-layer"
    assert m["stage_s"]["prefill"] > 0 and (m["stage_s"].get("target_ffn", 0) > 0) == per_layer
    assert per_layer or not any(k.startswith(("target_", "h2d", "prefill.target_")) for k in m["stage_s"])
    # (a speculative plan's stages are compared with the plan simulated at the measured acceptance)
    again = report["predicted_at_measured_acceptance"]
    stage_pred = again["stage_s"] if again else pred["stage_s"]
    compared = {k for k in stage_pred if per_layer or k in m["stage_s"]}
    assert (compared or not per_layer) and {k.split(".", 1)[1] for k in rows if k.startswith("stage_s.")} == compared
    for k in compared:
        assert rows[f"stage_s.{k}"]["predicted"] == stage_pred[k]
    assert (again is not None) == (plan["schedule"]["policy"] in ("specoffload", "spec-serial"))
    if plan["schedule"]["policy"] in ("specoffload", "spec-serial"):
        # tokens per round = 1 + accepted / rounds, and drafted = gamma x rounds: two counts agree
        g = plan["schedule"]["gamma"]
        assert m["tokens_per_round"] == pytest.approx(1.0 + g * m["acceptance_rate"]) and m["stage_s"]["draft"] > 0
    if any(plan["placement"][k] != "gpu" for k in ("attention", "ffn", "lm_head")):
        assert m["h2d_bytes"] > 0 and (m["h2d_bytes_per_s"] > 0 if per_layer else m["h2d_bytes_per_s"] is None)
    # what the runtime allocates up front is what the plan's memory model counts for it
    planned = report["planned_memory"]["gpu"]
    for part, nbytes in m["gpu_bytes_by_part"].items():
        if part in planned:
            assert nbytes == pytest.approx(planned[part]), part


def test_profile_optimize_specrun_on_this_cpu(measured_profile, tmp_path):
    res = run("specplan.cli", "optimize", "--gpu", measured_profile, "--target", TARGET, "--draft", DRAFT,
              "--prompt-len", PROMPT_LEN, "--gen-len", GEN_LEN, "--num-prompts", NUM_PROMPTS, "--out", "plan.json",
              "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert json.loads(res.stdout)["plan"] == plan
    assert plan["hardware"] == "e2e-cpu" and plan["prediction"]["throughput_tok_s"] > 0

    res = run("specplan.runtime.cli", "--plan", "plan.json", "--target", TARGET, "--draft", DRAFT, "--random-weights",
              "--device", "cpu", "--report", "report.json", "--json", "--timing", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert json.loads(res.stdout)["measured"] == {k: v for k, v in report["measured"].items()}
    assert len(report["outputs"]) == NUM_PROMPTS and all(len(o) == GEN_LEN for o in report["outputs"])
    check_report(report, plan)

    # the run folds back into the profile of the device it ran on (another device's is refused)
    res = run("specplan.cli", "calibrate", "report.json", "--plan", "plan.json", "--out", "calibrated.json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "calibrated.json").read_text())["provenance"]["kind"] == "calibrated"


@pytest.mark.parametrize("policy", ["specoffload", "specoffload/draft_kv=cpu", "spec-serial", "flexgen", "sequential"])
def test_each_policy_plans_and_runs(measured_profile, tmp_path, policy, one_thread):
    from dataclasses import replace

    from specplan.hardware import load_profile
    from specplan.planner.optimize import make_plan, optimize
    from specplan.runtime.run import run_plan
    from specplan.workload import Workload

    prof = load_profile(measured_profile)
    t, d = ModelSpec.from_preset(TARGET), ModelSpec.from_preset(DRAFT)
    wl = Workload.make(PROMPT_LEN, GEN_LEN, NUM_PROMPTS, source="test")
    policy, _, draft_kv = policy.partition("/draft_kv=")
    res = optimize(t, d, prof, wl, (policy,))
    plan = make_plan(res.best, TARGET, DRAFT, t, d, prof, wl)
    assert plan.schedule.policy == policy
    if draft_kv:  # the tiny draft's KV always fits on the device; swap it anyway
        plan = replace(plan, placement=replace(plan.placement, draft_kv=draft_kv))
    plan.save(str(tmp_path / "plan.json"))
    report = run_plan(str(tmp_path / "plan.json"), TARGET, DRAFT, device="cpu", random_weights=True)
    check_report(json.loads(json.dumps(report)), plan.to_dict())
    if draft_kv == "cpu":
        m = report["measured"]
        assert m["gpu_bytes_by_part"]["draft KV swap buffers"] == report["planned_memory"]["gpu"]["draft KV swap buffers"]
        assert m["draft_kv_h2d_bytes"] > 0 and m["draft_kv_d2h_bytes"] > 0
        assert m["stage_s"]["draft_kv_h2d"] > 0 and m["stage_s"]["draft_kv_d2h"] > 0


def test_a_routed_plan_reports_the_experts_it_streamed_against_the_prediction(measured_profile, tmp_path):
    """The best plan for the tiny MoE, made to route its experts (only those its routers pick
    are copied, once they have): specrun's report puts the experts a pass copied next to the
    simulator's expectation."""
    from dataclasses import replace

    from specplan.hardware import load_profile
    from specplan.planner.optimize import Ranked, make_plan, optimize, to_sim_config
    from specplan.simulator.run import simulate
    from specplan.workload import Workload

    prof, tgt = load_profile(measured_profile), ModelSpec.from_preset(TARGET)
    wl = Workload.make(PROMPT_LEN, GEN_LEN, NUM_PROMPTS, 0.7)
    best = optimize(tgt, None, prof, wl, ("flexgen",)).best.candidate
    c = replace(best, placement=replace(best.placement, experts="routed", ffn_gpu_layers=0))
    plan = make_plan(Ranked(c, simulate(to_sim_config(c, tgt, None, prof, wl))), TARGET, None, tgt, None, prof, wl)
    plan.save(tmp_path / "plan.json")
    predicted = plan.prediction["experts_streamed_per_pass"]
    assert 0 < predicted <= tgt.layers * tgt.experts
    res = run("specplan.runtime.cli", "--plan", "plan.json", "--target", TARGET, "--random-weights", "--device", "cpu",
              "--report", "report.json", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    row = {r["metric"]: r for r in report["comparison"]}["experts_streamed_per_pass"]
    assert row["predicted"] == predicted and row["measured"] == report["measured"]["experts_streamed_per_pass"] > 0
    assert abs(row["error_pct"]) < 15  # random weights route unevenly; the formula assumes even routing

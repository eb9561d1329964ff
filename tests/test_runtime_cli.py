"""specrun: refusals happen before any weight is read; a tiny plan runs end to end on the CPU
(random weights, or a real HF directory) and the report puts measurements next to the plan's
prediction."""

from __future__ import annotations

import json
from dataclasses import replace
import sys

import pytest
import torch
import transformers

from specplan.cost import expected_accepted_tokens
from specplan.errors import InfeasibleError, InputError
from specplan.models import ModelSpec
from specplan.plan import Placement, Plan, Schedule
from specplan.runtime import cli, run
from specplan.runtime.run import model_shape, run_plan
from specplan.workload import Workload

ALL_GPU = Placement(attention="gpu", ffn="gpu", embed="gpu", lm_head="gpu", draft_kv="gpu")
STREAMED = Placement(attention="cpu_pinned", ffn="cpu_pageable", ffn_gpu_layers=1, draft_kv="cpu")




def make_plan(target="tiny-llama", draft="tiny-draft", policy="specoffload", placement=STREAMED,
              hardware="rtx4090", **kw) -> Plan:
    spec = policy in ("specoffload", "spec-serial")
    schedule = Schedule(policy=policy, target_batch=2, num_batches=2, prefill_chunk=2, draft_batch=2,
                        gamma=3 if spec else 0, prefetch_depth=0 if policy == "sequential" else 1).validate()
    return Plan(target=target, draft=draft if spec else None, hardware=hardware, schedule=schedule, placement=placement,
                workload=Workload.make(prompt_len=[4, 7], gen_len=6, num_prompts=4).to_dict(),
                prediction={"throughput_tok_s": 50.0, "tokens_per_round": 2.0, "peak_gpu_bytes": 1e6,
                            "stage_s": {"h2d": 0.01, "target_ffn": 0.02}}, **kw)


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if anything tries to read weights."""
    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the plan was refused")
    monkeypatch.setattr(run, "open_checkpoint", refuse)


def specrun(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["specrun", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_refuses_a_plan_made_for_another_target(no_weights):
    with pytest.raises(InputError, match="tiny-mixtral.*does not match.*experts 4 vs 1"):
        run_plan(make_plan(target="tiny-mixtral"), "tiny-llama", "tiny-draft", random_weights=True, device="cpu")


def test_recorded_shapes_are_checked_when_the_plan_model_is_not_here(no_weights):
    plan = make_plan(target="/elsewhere/Mixtral", inputs={"target_shape": model_shape(ModelSpec.from_preset("tiny-mixtral"))})
    with pytest.raises(InputError, match="does not match"):
        run_plan(plan, "tiny-llama", "tiny-draft", random_weights=True, device="cpu")


def test_refuses_a_plan_that_does_not_fit_the_profile(no_weights):
    plan = make_plan(target="mixtral-8x7b", draft="mistral-7b-v0.2", placement=ALL_GPU)
    with pytest.raises(InfeasibleError, match="does not fit rtx4090.*GPU memory"):
        run_plan(plan, "mixtral-8x7b", "mistral-7b-v0.2", random_weights=True, device="cpu")


def test_refuses_a_speculative_plan_without_a_draft(no_weights):
    with pytest.raises(InputError, match="no draft model"):
        run_plan(make_plan(), "tiny-llama", None, random_weights=True, device="cpu")


def test_cli_refusals_are_one_line_and_exit_non_zero(monkeypatch, capsys, tmp_path, no_weights):
    bad_model = tmp_path / "bad_model.json"
    make_plan(target="tiny-mixtral").save(str(bad_model))
    code, out, err = specrun(monkeypatch, capsys, "--plan", str(bad_model), "--target", "tiny-llama",
                             "--draft", "tiny-draft", "--random-weights", "--device", "cpu",
                             "--report", str(tmp_path / "r.json"))
    assert code == 2 and "does not match" in err and len(err.strip().splitlines()) == 1
    too_big = tmp_path / "too_big.json"
    make_plan(target="mixtral-8x7b", draft="mistral-7b-v0.2", placement=ALL_GPU).save(str(too_big))
    code, _, err = specrun(monkeypatch, capsys, "--plan", str(too_big), "--target", "mixtral-8x7b",
                           "--draft", "mistral-7b-v0.2", "--random-weights", "--device", "cpu",
                           "--report", str(tmp_path / "r.json"))
    assert code == 3 and "GPU memory" in err
    assert not (tmp_path / "r.json").exists()


def test_specrun_reports_measured_next_to_predicted(monkeypatch, capsys, tmp_path):
    plan = tmp_path / "plan.json"
    make_plan().save(str(plan))
    report = tmp_path / "out" / "report.json"
    code, out, _ = specrun(monkeypatch, capsys, "--plan", str(plan), "--target", "tiny-llama", "--draft", "tiny-draft",
                           "--random-weights", "--device", "cpu", "--report", str(report), "--json", "--force", "--timing")
    assert code == 0
    shown = json.loads(out)
    saved = json.loads(report.read_text())
    assert "outputs" not in shown and [len(o) for o in saved["outputs"]] == [6, 6, 6, 6]
    m = saved["measured"]
    assert m["generated_tokens"] == 24 and m["throughput_tok_s"] > 0 and m["h2d_bytes_per_s"] > 0
    assert m["tokens_per_round"] == pytest.approx(1.0 + 3 * m["acceptance_rate"]) and m["peak_gpu_bytes"] > 0
    # the per-token alpha the report gives back is the one whose E(alpha, gamma = 3) is that rate
    assert expected_accepted_tokens(m["acceptance_per_token"], 3) == pytest.approx(m["tokens_per_round"], rel=1e-9)
    assert {"h2d", "draft", "target_attention", "target_ffn", "verify", "prefill"} <= set(m["stage_s"])
    rows = {r["metric"]: r for r in saved["comparison"]}
    assert {"throughput_tok_s", "tokens_per_round", "peak_gpu_bytes"} <= set(rows)
    t = rows["throughput_tok_s"]
    assert t["error_pct"] == pytest.approx(100 * (50.0 - t["measured"]) / t["measured"])
    # the plan simulated again at the acceptance the run measured; stage rows compare with that
    again = saved["predicted_at_measured_acceptance"]
    assert again["acceptance"] == m["acceptance_per_token"]
    assert rows[run.AT_MEASURED_ACCEPTANCE]["predicted"] == again["throughput_tok_s"] != 50.0
    assert {k for k in rows if k.startswith("stage_s.")} == {f"stage_s.{k}" for k in again["stage_s"]}
    assert rows["stage_s.h2d"]["predicted"] == again["stage_s"]["h2d"] != 0.01
    code, out, _ = specrun(monkeypatch, capsys, "--plan", str(plan), "--target", "tiny-llama", "--draft", "tiny-draft",
                           "--random-weights", "--device", "cpu", "--report", str(report), "--max-rows", "3", "--force")
    assert code == 0 and "throughput_tok_s" in out and len(json.loads(report.read_text())["outputs"]) == 3


def test_specrun_reads_a_hf_directory_and_prompt_file(monkeypatch, capsys, tmp_path):
    spec = ModelSpec.from_preset("tiny-llama")
    cfg = transformers.CONFIG_MAPPING["llama"].from_dict(spec.hf_config)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    hf.save_pretrained(tmp_path / "model")
    (tmp_path / "prompts.txt").write_text("5 17 42 9\n\n3 3 200\n")
    plan = tmp_path / "plan.json"
    make_plan(policy="flexgen").save(str(plan))
    report = tmp_path / "report.json"
    code, _, err = specrun(monkeypatch, capsys, "--plan", str(plan), "--target", str(tmp_path / "model"),
                           "--prompts", str(tmp_path / "prompts.txt"), "--device", "cpu", "--report", str(report),
                           "--ignore-eos", "--force")
    assert code == 0, err
    outputs = json.loads(report.read_text())["outputs"]
    with torch.no_grad():
        for prompt, got in zip(([5, 17, 42, 9], [3, 3, 200]), outputs):
            ids = torch.tensor([prompt])
            for _ in range(6):
                ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
            assert got == ids[0, len(prompt):].tolist()


def test_prompt_lines_are_ids_or_need_a_tokenizer(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("1 2 3\n\n4 5\n")
    assert cli.read_prompts(f, None, vocab=256) == [[1, 2, 3], [4, 5]]
    f.write_text("1 2 3\nthe quick brown fox\n")
    with pytest.raises(InputError, match="line 2: is text, and the target has no tokenizer"):
        cli.read_prompts(f, None, vocab=256)
    f.write_text("1 2 999\n")
    with pytest.raises(InputError, match="outside the vocabulary"):
        cli.read_prompts(f, None, vocab=256)
    f.write_bytes(b"1 2 \xff\xfe\n")
    with pytest.raises(InputError, match="not UTF-8"):
        cli.read_prompts(f, None, vocab=256)


@pytest.mark.parametrize("sampling", ["greedy", "sampling"])
def test_warmup_leaves_outputs_and_counts_unchanged(sampling):
    plan = make_plan()
    if sampling != "greedy":  # the warm-up must not advance the seeded generators either
        plan = replace(plan, workload={**plan.workload, "sampling": sampling, "temperature": 1.0})
    kw = dict(random_weights=True, device="cpu", force=True)
    cold = run_plan(plan, "tiny-llama", "tiny-draft", warmup=False, **kw)
    warm = run_plan(plan, "tiny-llama", "tiny-draft", warmup=True, **kw)
    assert warm["outputs"] == cold["outputs"]
    for key in ("generated_tokens", "rounds", "passes", "h2d_bytes", "tokens_per_round", "draft_kv_h2d_bytes"):
        assert warm["measured"][key] == cold["measured"][key], key
    assert set(warm["measured"]["stage_s"]) == set(cold["measured"]["stage_s"])


def test_torch_profile_writes_operator_tables(tmp_path):
    path = tmp_path / "ops.txt"
    run_plan(make_plan(policy="flexgen"), "tiny-llama", None, random_weights=True, device="cpu", torch_profile=path,
             force=True)
    text = path.read_text()
    assert "# by device time" in text and "# by host time" in text and "aten::" in text


def test_per_layer_stages_are_timed_only_with_timing(monkeypatch, capsys, tmp_path):
    plan = tmp_path / "plan.json"
    make_plan(policy="flexgen").save(str(plan))
    report = tmp_path / "report.json"
    code, out, _ = specrun(monkeypatch, capsys, "--plan", str(plan), "--target", "tiny-llama", "--random-weights",
                           "--device", "cpu", "--report", str(report), "--force")
    assert code == 0 and "run with --timing" in out
    saved = json.loads(report.read_text())
    m = saved["measured"]
    assert m["stage_timing"].startswith("per-pass") and "prefill" in m["stage_s"] and m["h2d_bytes"] > 0
    assert not any(k.startswith(("target_", "h2d", "prefill.target_", "prefill.h2d")) for k in m["stage_s"])
    assert m["h2d_bytes_per_s"] is None
    # only stages the run timed are compared
    assert {r["metric"] for r in saved["comparison"] if r["metric"].startswith("stage_s.")} <= {
        f"stage_s.{k}" for k in m["stage_s"]}


def test_calibration_scales_each_stage_to_the_run_as_it_ran():
    from specplan.cost import stage_total
    from specplan.hwprofiles.calibrate import CALIBRATED_STAGES, calibrate
    from specplan.models import ModelSpec
    from specplan.simulator.run import simulate_plan

    plan = make_plan(policy="spec-serial")
    report = run_plan(plan, "tiny-llama", "tiny-draft", random_weights=True, device="cpu", force=True, timing=True)
    m, profile = report["measured"], plan.hardware_profile()
    c = calibrate(report, plan, profile)
    assert c.measured_acceptance == m["acceptance_per_token"]
    as_ran = simulate_plan(plan, ModelSpec.from_preset("tiny-llama"), ModelSpec.from_preset("tiny-draft"), profile,
                           m["acceptance_per_token"], m["rows"])
    assert c.before_tok_s == as_ran.throughput_tok_s
    assert set(c.factors) == set(CALIBRATED_STAGES)
    for stage, factor in c.factors.items():
        assert factor == pytest.approx(stage_total(m["stage_s"], stage) / stage_total(as_ran.stage_s, stage))
    # a CPU run against the rtx4090 profile: off by orders of magnitude before, far closer after
    assert abs(c.error_after_pct) < abs(c.error_before_pct) / 10


def test_report_gives_the_passes_run_beside_the_simulators():
    """specrun's report: the scheduler's pass composition as run (continuous: prompts carried
    by decode passes) and as the simulator ran the same plan."""
    plan = make_plan(policy="spec-serial")
    plan = replace(plan, schedule=replace(plan.schedule, num_batches=1, admission="continuous", prefill_tokens=8),
                   workload={**plan.workload, "num_prompts": 8})
    report = run_plan(plan, "tiny-llama", "tiny-draft", random_weights=True, device="cpu", force=True)
    ran = report["pass_composition"]["measured"]
    assert ran == report["measured"]["pass_composition"]
    assert ran["admitted"] == 8 and ran["mixed_passes"] > 0 and ran["prefill_tokens_in_decode_passes"] > 0
    sim = report["pass_composition"]["simulated"]
    assert sim is not None and sim["admitted"] == report["pass_composition"]["simulated_prompts"]


def test_a_prompt_past_the_models_positions_is_refused_before_any_weight(no_weights):
    spec = ModelSpec.from_preset("tiny-llama")
    limit = spec.hf_config["max_position_embeddings"]
    with pytest.raises(InputError, match="max_position_embeddings"):
        run_plan(make_plan(), "tiny-llama", "tiny-draft", random_weights=True, device="cpu",
                 prompts=[[1] * (limit - 2), [1, 2, 3]])


def test_a_plan_for_another_device_is_refused_or_forced_with_a_warning(no_weights, monkeypatch):
    with pytest.raises(InfeasibleError, match=r"made for rtx4090 \(NVIDIA GeForce RTX 4090\) and this device is "
                                              r"CPU as device.*--force runs it anyway"):
        run_plan(make_plan(), "tiny-llama", "tiny-draft", random_weights=True, device="cpu")
    # forced, the reason becomes a warning and the run goes on (to the weights, refused here)
    said = []
    with pytest.raises(AssertionError, match="weights were loaded"):
        run_plan(make_plan(), "tiny-llama", "tiny-draft", random_weights=True, device="cpu", force=True, warn=said.append)
    assert len(said) >= 1 and "made for rtx4090" in said[0]


def test_a_plan_this_machines_memory_cannot_hold_is_refused(no_weights, monkeypatch):
    from specplan import host
    from specplan.host import cpu_device_name
    from specplan.plan import Plan as P

    plan = make_plan()
    prof = plan.hardware_profile()
    here = replace(prof, gpu=replace(prof.gpu, name=cpu_device_name()))
    monkeypatch.setattr(P, "hardware_profile", lambda self: here)  # a profile of this very device
    monkeypatch.setattr(host, "meminfo_bytes", lambda key: 1e3)  # and a machine with 1 kB free
    with pytest.raises(InfeasibleError, match=r"host memory \(on the CPU.*1.00 KB is available here"):
        run_plan(plan, "tiny-llama", "tiny-draft", random_weights=True, device="cpu")


def test_the_plans_dtype_is_the_runs_and_another_is_refused(no_weights, monkeypatch):
    """optimize --dtype records the compute dtype in the plan; specrun takes it from there, and
    refuses a --dtype the plan was not made for, before any weight is read."""
    plan = make_plan(policy="flexgen", placement=ALL_GPU, hardware="cpu", inputs={"dtype": "bfloat16"})
    assert ModelSpec.from_preset("tiny-llama").dtype == "float32"
    with pytest.raises(InputError, match="--dtype: float16, and the plan was made for bfloat16"):
        run.PlanRunner(plan, "tiny-llama", None, [4, 7], device="cpu", random_weights=True, dtype="float16")
    seen = []

    def check(plan, target, *a, **k):
        seen.append(target.dtype)
        raise InputError("test", "stop", "here")
    monkeypatch.setattr(run, "check_plan", check)
    with pytest.raises(InputError, match="stop"):
        run.PlanRunner(plan, "tiny-llama", None, [4, 7], device="cpu", random_weights=True)
    assert seen == ["bfloat16"]


def test_optimize_records_the_dtype_it_planned_in(tmp_path):
    from test_cli import run as specplan

    out = tmp_path / "plan.json"
    res = specplan("optimize", "--target", "tiny-llama", "--draft", "none", "--dtype", "bfloat16", "--num-prompts", "8",
                   "--out", out, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(out.read_text())["inputs"]["dtype"] == "bfloat16"

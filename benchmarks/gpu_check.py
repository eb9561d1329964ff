"""The steps and the table of benchmarks/gpu_check.sh (read its header first).

    python benchmarks/gpu_check.py --mode gpu|cpu --out DIR [--layers N] [--gpu-mem 24GiB] ...

Runs, each as the user would, in a subprocess of this interpreter:
    0. pytest tests/test_runtime_gpu.py (the runtime's CUDA paths; they skip without a GPU)
    1. specplan profile --quick         -> DIR/profile.json
    2. specplan optimize (any policy)   -> DIR/plan.json
       specplan optimize --policy specoffload -> DIR/plan_specoffload.json
    3. specrun on each plan             -> DIR/report.json, DIR/report_specoffload.json
    4. the table                        -> DIR/table.txt (and stdout), DIR/summary.json
A step that fails is recorded and the others still run; the exit status is 1 if any step
failed, else 0 (a goal missed is a FAIL row in the table, not an error).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
H2D_GOAL = 0.85  # achieved weight-streaming H2D rate / profiled pinned H2D rate, at least
OVERLAP_GOAL = 1.10  # specoffload round time / busiest resource per round, at most, when the plan expects overlap

# What each mode runs. gpu: Mixtral-8x7B's shapes (hidden 4096, FFN 14336, 32 heads / 8 KV
# heads, 8 experts top-2, vocab 32000, bf16) with fewer layers, and a Mistral-7B-shaped
# draft with fewer layers, on an emulated 24 GiB card: 10 target layers (about 30 GB) do not
# fit, so every plan streams experts over PCIe (with 8, a non-speculative plan keeps them all).
MODES = {
    "gpu": dict(target_preset="mixtral-8x7b", draft_preset="mistral-7b-v0.2", layers=10, draft_layers=4,
                dtype="bfloat16", gpu_mem="24GiB", device="cuda", prompt_len=256, gen_len=32, num_prompts=64,
                formats=("int8", "int4g64", "fp8")),
    "cpu": dict(target_preset="tiny-mixtral", draft_preset="tiny-draft", layers=None, draft_layers=None,
                dtype=None, gpu_mem="1MB", device="cpu", prompt_len=16, gen_len=8, num_prompts=8,
                formats=("int8", "int4g32", "fp8")),  # tiny-mixtral's 96-wide FFN: groups of 32
}
STEP_TIMEOUT_S = {"pytest": 240, "profile": 300, "optimize": 180, "specrun": 300}


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_model(preset: str, layers: int | None, dtype: str | None, where: Path, name: str) -> Path:
    """A HF config.json of `preset`'s shapes with `layers` layers, in its own directory (no
    weights: specrun draws random ones)."""
    from importlib import resources

    cfg = json.loads(resources.files("specplan").joinpath(f"presets/models/{preset}.json").read_text())
    cfg["_source"] = f"{preset} shapes, {layers or cfg['num_hidden_layers']} layers (benchmarks/gpu_check.py)"
    if layers:
        cfg["num_hidden_layers"] = layers
    if dtype:
        cfg["torch_dtype"] = dtype
    d = where / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return d


class Steps:
    """Each step a subprocess with its own timeout, all within one deadline, so the table is
    written before the device tool's limit ends the whole command."""

    def __init__(self, budget_s: float):
        self.done: list[dict] = []
        self.deadline = time.monotonic() + budget_s

    def run(self, name: str, args: list[str], timeout: int) -> bool:
        cmd = [sys.executable, "-m", *args]
        left = self.deadline - time.monotonic()
        if left < 10:
            log(f"{name}: skipped, the time budget is spent")
            self.done.append({"step": name, "command": " ".join(args), "rc": "no time left", "seconds": 0.0})
            return False
        log(f"{name}: {' '.join(cmd[1:])}")
        t0 = time.perf_counter()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, timeout=min(timeout, left)).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        took = time.perf_counter() - t0
        self.done.append({"step": name, "command": " ".join(args), "rc": rc, "seconds": round(took, 1)})
        log(f"{name}: {'ok' if rc == 0 else f'FAILED ({rc})'} in {took:.1f} s")
        return rc == 0

    @property
    def failed(self) -> list[str]:
        return [s["step"] for s in self.done if s["rc"] != 0]


def read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---- the analysis -------------------------------------------------------------------------------------


def per_round(stage_s: dict, rounds: float, decode_s: float, attention_device: str) -> dict:
    """Round time and each resource's busy time per round, from decode stage times (no
    'prefill.' prefix). Stages that share a resource add up: the target's kernels and the
    draft's on the GPU; weight copies and draft KV swap-ins on the H2D link."""
    if not rounds:
        return {}
    s = lambda k: float(stage_s.get(k) or 0.0)  # noqa: E731
    gpu = s("target_proj") + s("target_ffn") + s("target_head") + s("draft")
    cpu = 0.0
    if attention_device == "gpu":
        gpu += s("target_attention")
    else:
        cpu = s("target_attention")
    busy = {"h2d link": s("h2d") + s("draft_kv_h2d"), "gpu": gpu, "cpu attention": cpu, "d2h link": s("draft_kv_d2h")}
    busiest = max(busy, key=busy.get)
    return {"round_s": decode_s / rounds, "busy_per_round_s": {k: v / rounds for k, v in busy.items()},
            "busiest": busiest, "busiest_per_round_s": busy[busiest] / rounds,
            "ratio": (decode_s / busy[busiest]) if busy[busiest] > 0 else None}


def analyse(label: str, plan: dict | None, report: dict | None, profile: dict | None) -> dict:
    out: dict = {"label": label}
    if plan is None or report is None:
        out["missing"] = "plan" if plan is None else "report"
        return out
    m, pred, sch = report["measured"], plan["prediction"], plan["schedule"]
    out["policy"] = sch["policy"]
    out["placement"] = plan["placement"]
    out["schedule"] = sch
    # the plan's prediction assumed an acceptance; the report also simulates the plan again at the
    # measured one (random weights accept almost nothing), which isolates the timing model's error
    again = report.get("predicted_at_measured_acceptance") or {}
    err_of = {r["metric"]: r["error_pct"] for r in report["comparison"]}
    out["throughput"] = {"predicted_tok_s": pred.get("throughput_tok_s"), "measured_tok_s": m["throughput_tok_s"],
                         "error_pct": err_of.get("throughput_tok_s"),
                         "measured_acceptance": m.get("acceptance_per_token"),
                         "predicted_at_measured_acceptance_tok_s": again.get("throughput_tok_s"),
                         "error_at_measured_acceptance_pct": err_of.get("throughput_tok_s at measured acceptance")}
    # weights stream from pinned memory (disk reads land in pinned staging too) unless the plan
    # put some in pageable memory: compare with the profiled rate of that path
    homes = sorted({plan["placement"][k] for k in ("attention", "ffn", "lm_head")} - {"gpu"})
    path = "h2d_pageable" if "cpu_pageable" in homes else "h2d_pinned"
    ref = profile["link"][path]["bytes_per_s"] if profile else None
    out["h2d"] = {"profiled_path": path, "profiled_bytes_per_s": ref, "achieved_bytes_per_s": m.get("h2d_bytes_per_s"),
                  "bytes": m.get("h2d_bytes"),
                  "ratio": (m["h2d_bytes_per_s"] / ref) if m.get("h2d_bytes_per_s") and ref else None, "homes": homes}
    stage = m["stage_s"]
    decode_s = m["wall_s"] - float(stage.get("prefill") or 0.0)
    out["measured_round"] = per_round(stage, m.get("passes") or 0, decode_s, sch["attention_device"])
    out["predicted_round"] = per_round(pred.get("stage_s") or {}, pred.get("rounds") or 0, pred.get("decode_s") or 0.0,
                                       sch["attention_device"])
    out["stage_s"] = {"measured": stage, "predicted": again.get("stage_s") or pred.get("stage_s"),
                      "predicted_at": "measured acceptance" if again else "plan acceptance"}
    out["memory"] = {"peak_gpu_bytes": m.get("peak_gpu_bytes"), "planned_gpu_bytes": report["planned_memory"]["gpu_bytes"],
                     "by_part": m.get("gpu_bytes_by_part")}
    return out


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def compressed_rows(profile: dict | None, target: Path, plans: dict[str, dict | None]) -> list[dict]:
    """Per weight format, from the measured profile: one target layer's dequantization on the
    device (attention, and every expert, one call per matrix as the runtime makes them)
    against the copy of that layer's compressed bytes over the profiled pinned link; and the
    compressed plan's predicted throughput against the dtype's."""
    if not profile:
        return []
    from specplan.cost import (attn_proj_time_s, dequant_op_name, dequant_time_s, ffn_time_s, fused_op_name,
                               h2d_time_s)
    from specplan.formats import parse_weights
    from specplan.hardware import HardwareProfile
    from specplan.models import ModelSpec

    prof = HardwareProfile.from_dict(profile, "profile.json")
    base = ModelSpec.from_file(target)
    rows = []
    for fmt in plans:
        try:
            m = base.with_weights(parse_weights(fmt).fixed)
        except Exception as e:  # noqa: BLE001 - a group that does not divide this model's rows
            rows.append({"format": fmt, "error": str(e)})
            continue
        measured = prof.kernel(dequant_op_name(m, "experts", "gpu")) is not None
        dq = dequant_time_s(prof, m, "attention") + m.experts * dequant_time_s(prof, m, "experts")
        copy = h2d_time_s(prof, m.layer_bytes.total)
        plan = plans.get(fmt)
        # the fused kernel, where the profile measured one: a layer's matmuls at one decode token a
        # row for 64 rows, against dequantizing the layer and multiplying in the dtype
        fused = m.with_weights(parse_weights(f"{fmt}+fused").fixed) if "+" not in fmt and m.fmt("experts").can_fuse else None
        if fused is not None and prof.kernel(fused_op_name(fused, "experts", "gpu")) is not None:
            fused_s = attn_proj_time_s(prof, fused, 64) + ffn_time_s(prof, fused, 64)
            dense_s = attn_proj_time_s(prof, m, 64) + ffn_time_s(prof, m, 64)  # dequantization included
        else:
            fused_s = dense_s = None
        rows.append({"format": fmt, "measured": measured, "dequant_layer_s": dq, "stream_layer_s": copy,
                     "fused_layer_64_s": fused_s, "dequant_matmul_layer_64_s": dense_s,
                     "ratio": dq / copy if copy else None,
                     "planned_tok_s": (plan or {}).get("prediction", {}).get("throughput_tok_s"),
                     "policy": (plan or {}).get("schedule", {}).get("policy")})
    return rows


def table(results: list[dict], profile: dict | None, mode: str, steps_done: list[dict],
          compressed: list[dict] = ()) -> tuple[str, list[dict]]:
    rows: list[tuple[str, str, str, str]] = []
    checks: list[dict] = []

    def row(what: str, value: str, goal: str = "", result: str = "") -> None:
        rows.append((what, value, goal, result))

    for step in steps_done:
        if step["step"] == "runtime CUDA tests":
            ok = step["rc"] == 0
            value = ("passed" if mode == "gpu" else "skipped (no GPU)") if ok else f"failed ({step['rc']})"
            row("tests/test_runtime_gpu.py", value, "", verdict(ok) if mode == "gpu" or not ok else "n/a")
            checks.append({"check": "runtime CUDA tests", "ok": ok if mode == "gpu" else None})
    if profile:
        g, link = profile["gpu"], profile["link"]
        row("device", g["name"])
        row("profiled pinned H2D", f"{link['h2d_pinned']['bytes_per_s'] / 1e9:.2f} GB/s")
        row("profiled pageable H2D", f"{link['h2d_pageable']['bytes_per_s'] / 1e9:.2f} GB/s")
        row("profile's reserved GPU memory", f"{g['reserved_bytes'] / 2**30:.2f} GiB",
            "", "check" if g["reserved_bytes"] > 2 * 2**30 else "")
    for r in results:
        tag = f"[{r['label']}: {r.get('policy', '?')}]"
        if "missing" in r:
            row(tag, f"no {r['missing']} (a step failed)", "", "FAIL")
            checks.append({"check": f"{r['label']} ran", "ok": False})
            continue
        h = r["h2d"]
        if h["achieved_bytes_per_s"]:
            ok = h["ratio"] >= H2D_GOAL if h["ratio"] is not None else None
            row(f"{tag} achieved H2D while streaming ({'/'.join(h['homes'])})",
                f"{h['achieved_bytes_per_s'] / 1e9:.2f} GB/s")
            row(f"{tag}   achieved / profiled {h['profiled_path'].split('_')[1]}",
                f"{h['ratio']:.2f}" if h["ratio"] is not None else "-",
                f">= {H2D_GOAL}", verdict(ok))
            checks.append({"check": f"{r['label']} H2D ratio", "value": h["ratio"], "goal": f">= {H2D_GOAL}", "ok": ok})
        else:
            row(f"{tag} achieved H2D while streaming", "nothing streamed", f">= {H2D_GOAL}", "n/a")
        mr, pr = r["measured_round"], r["predicted_round"]
        if r.get("policy") == "specoffload" and mr:
            row(f"{tag} round time (measured)", f"{mr['round_s'] * 1e3:.1f} ms")
            row(f"{tag} busiest resource per round (measured)",
                f"{mr['busiest_per_round_s'] * 1e3:.1f} ms ({mr['busiest']})")
            expects = pr.get("ratio") is not None and pr["ratio"] <= OVERLAP_GOAL
            ok = (mr["ratio"] <= OVERLAP_GOAL) if expects and mr["ratio"] is not None else None
            why = "" if expects else f" (plan expects {pr['ratio']:.2f}: no full overlap)" if pr.get("ratio") else ""
            row(f"{tag}   round / busiest{why}", f"{mr['ratio']:.2f}" if mr["ratio"] is not None else "-",
                f"<= {OVERLAP_GOAL}", verdict(ok))
            checks.append({"check": f"{r['label']} overlap", "value": mr["ratio"], "predicted": pr.get("ratio"),
                           "goal": f"<= {OVERLAP_GOAL} if predicted <= {OVERLAP_GOAL}", "ok": ok})
        t = r["throughput"]
        err = f"{t['error_pct']:+.1f}%" if t["error_pct"] is not None else "-"
        row(f"{tag} throughput predicted / measured",
            f"{t['predicted_tok_s']:.2f} / {t['measured_tok_s']:.2f} tok/s", "", f"error {err}")
        if t.get("predicted_at_measured_acceptance_tok_s") is not None:
            e2 = t["error_at_measured_acceptance_pct"]
            row(f"{tag}   predicted at the measured acceptance ({t['measured_acceptance']:.3f})",
                f"{t['predicted_at_measured_acceptance_tok_s']:.2f} tok/s", "",
                f"error {e2:+.1f}%" if e2 is not None else "-")
    dtype_tok_s = next((r["throughput"]["predicted_tok_s"] for r in results if r.get("label") == "auto"
                        and "throughput" in r), None)
    for c in compressed:
        if "error" in c:
            row(f"[{c['format']}] weights", c["error"][:80], "", "n/a")
            continue
        src = "profiled" if c["measured"] else "roofline: not profiled"
        row(f"[{c['format']}] dequantize one layer / stream it ({src})",
            f"{c['dequant_layer_s'] * 1e3:.2f} / {c['stream_layer_s'] * 1e3:.2f} ms",
            "", f"{c['ratio']:.2f}" if c["ratio"] is not None else "-")
        if c.get("fused_layer_64_s") is not None:
            row(f"[{c['format']}]   one layer at 64 tokens: fused kernel / dequantize + matmul (profiled)",
                f"{c['fused_layer_64_s'] * 1e3:.2f} / {c['dequant_matmul_layer_64_s'] * 1e3:.2f} ms", "",
                f"{c['fused_layer_64_s'] / c['dequant_matmul_layer_64_s']:.2f}")
        if c["planned_tok_s"] and dtype_tok_s:
            row(f"[{c['format']}]   planned tok/s ({c['policy']}) vs the dtype's plan",
                f"{c['planned_tok_s']:.2f} vs {dtype_tok_s:.2f}", "", f"{c['planned_tok_s'] / dtype_tok_s:.2f}x")
        checks.append({"check": f"{c['format']} dequantization vs stream", "value": c["ratio"], "ok": None})
    for step in steps_done:
        if step["step"] != "runtime CUDA tests" and step["rc"] != 0:
            row(f"step {step['step']}", f"failed ({step['rc']})", "", "FAIL")
    width = [max(len(x[i]) for x in rows + [("check", "value", "goal", "result")]) for i in range(4)]
    lines = [f"gpu_check ({mode}{': dry run on the CPU, goals are not meaningful' if mode == 'cpu' else ''})"]
    for x in [("check", "value", "goal", "result")] + rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(x, width)).rstrip())
        if x[0] == "check":
            lines.append("  ".join("-" * w for w in width))
    return "\n".join(lines) + "\n", checks


# ---- main ------------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=tuple(MODES), default="gpu")
    ap.add_argument("--out", required=True, help="Folder for the results (the device tool's $OUT).")
    ap.add_argument("--layers", type=int, help="Target layers (gpu mode default 10).")
    ap.add_argument("--draft-layers", type=int, help="Draft layers (gpu mode default 4).")
    ap.add_argument("--gpu-mem", help="Emulated card for the planner (gpu mode default 24GiB).")
    ap.add_argument("--prompt-len", type=int)
    ap.add_argument("--gen-len", type=int)
    ap.add_argument("--num-prompts", type=int)
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="Seconds for all steps together (default 480: the table is written inside a 540 s device call).")
    a = ap.parse_args()
    cfg = dict(MODES[a.mode])
    for key in ("layers", "draft_layers", "gpu_mem", "prompt_len", "gen_len", "num_prompts"):
        if getattr(a, key) is not None:
            cfg[key] = getattr(a, key)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("profile.json", "plan.json", "plan_specoffload.json", "report.json", "report_specoffload.json",
                 "table.txt", "summary.json", "ops.txt", "results.tar.gz"):  # a failed step must not leave an earlier run's file to be read
        (out / name).unlink(missing_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    t0 = time.perf_counter()

    import torch

    log(f"mode {a.mode}; torch {torch.__version__}; cuda available {torch.cuda.is_available()}"
        + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "") + f"; work dir {work}")
    named = lambda preset, layers: f"{preset}-{layers}l" if layers else preset  # noqa: E731
    target = write_model(cfg["target_preset"], cfg["layers"], cfg["dtype"], work, named(cfg["target_preset"], cfg["layers"]))
    draft = write_model(cfg["draft_preset"], cfg["draft_layers"], cfg["dtype"], work,
                        named(cfg["draft_preset"], cfg["draft_layers"]))
    dev = cfg["device"]
    steps = Steps(a.budget_s)
    # the runtime's CUDA paths (copy streams, draft thread, draft KV swaps) against the CPU; they skip on a CPU
    steps.run("runtime CUDA tests", ["pytest", "tests/test_runtime_gpu.py", "-q", "-p", "no:cacheprovider"],
              STEP_TIMEOUT_S["pytest"])
    profile_path = out / "profile.json"
    steps.run("profile", ["specplan.cli", "profile", "--quick", "--device", dev, "--target", str(target),
                          "--draft", str(draft), "--out", str(profile_path)], STEP_TIMEOUT_S["profile"])
    plans = {"auto": (out / "plan.json", out / "report.json", []),
             "specoffload": (out / "plan_specoffload.json", out / "report_specoffload.json", ["--policy", "specoffload"])}
    if profile_path.exists():
        for label, (plan, report, extra) in plans.items():
            ok = steps.run(f"optimize {label}", ["specplan.cli", "optimize", "--gpu", str(profile_path),
                                                 "--gpu-mem", cfg["gpu_mem"], "--target", str(target), "--draft", str(draft),
                                                 "--prompt-len", str(cfg["prompt_len"]), "--gen-len", str(cfg["gen_len"]),
                                                 "--num-prompts", str(cfg["num_prompts"]), "--out", str(plan), *extra],
                           STEP_TIMEOUT_S["optimize"])
            if ok:
                steps.run(f"specrun {label}", ["specplan.runtime.cli", "--plan", str(plan), "--target", str(target),
                                               "--draft", str(draft), "--random-weights", "--device", dev,
                                               "--report", str(report), "--timing"], STEP_TIMEOUT_S["specrun"])
        # compressed layers: each format's plan (the planner only: no run), for the table's rows
        for fmt in cfg["formats"]:
            steps.run(f"optimize {fmt}", ["specplan.cli", "optimize", "--gpu", str(profile_path), "--gpu-mem", cfg["gpu_mem"],
                                          "--target", str(target), "--draft", str(draft), "--weights", fmt,
                                          "--prompt-len", str(cfg["prompt_len"]), "--gen-len", str(cfg["gen_len"]),
                                          "--num-prompts", str(cfg["num_prompts"]), "--out", str(work / f"plan_{fmt}.json")],
                      STEP_TIMEOUT_S["optimize"])
        # where the time goes: the chosen plan once more, a quarter of its prompts, under torch.profiler
        if (out / "plan.json").exists():
            steps.run("specrun under torch.profiler", [
                "specplan.runtime.cli", "--plan", str(out / "plan.json"), "--target", str(target), "--draft", str(draft),
                "--random-weights", "--device", dev, "--max-rows", str(max(1, cfg["num_prompts"] // 4)),
                "--report", str(work / "report_profiled.json"), "--torch-profile", str(out / "ops.txt"), "--timing"],
                STEP_TIMEOUT_S["specrun"])

    profile = read(profile_path)
    results = [analyse(label, read(plan), read(report), profile) for label, (plan, report, _) in plans.items()]
    compressed = compressed_rows(profile, target, {f: read(work / f"plan_{f}.json") for f in cfg["formats"]})
    text, checks = table(results, profile, a.mode, steps.done, compressed)
    (out / "table.txt").write_text(text)
    summary = {"mode": a.mode, "config": cfg, "goals": {"h2d_ratio_at_least": H2D_GOAL, "overlap_ratio_at_most": OVERLAP_GOAL},
               "steps": steps.done, "checks": checks, "results": results, "compressed": compressed,
               "models": {"target": json.loads((target / "config.json").read_text()),
                          "draft": json.loads((draft / "config.json").read_text())},
               "torch": torch.__version__, "seconds": round(time.perf_counter() - t0, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    print("\n" + text, flush=True)
    log(f"done in {time.perf_counter() - t0:.1f} s; results in {out}")
    return 1 if steps.failed else 0


if __name__ == "__main__":
    sys.exit(main())

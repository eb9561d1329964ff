"""Every mistake a user can make gets one line: the exit code documented in
specplan.cli.EXIT_CODES, no traceback, a message that names the option, file or field, and
nothing left behind (no output, no temporary file). The table below is also the source of
docs/errors.md (python scripts/error_table.py writes it; a test here keeps it current)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from specplan.hardware import load_profile
from specplan.plan import Placement, Plan, Schedule
from specplan.workload import Workload

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"

# (command line, exit code, what the message must name); run in a folder holding FILES
SPEC = ["--target", "tiny-llama", "--draft", "tiny-draft", "--random-weights"]
JOB = ["--plan", "plan.json", *SPEC, "--prompts", "data.jsonl"]
CASES: list[tuple[str, list[str], int, str]] = [
    # usage: unknown commands, options and malformed values
    ("specplan", ["frobnicate"], 2, "frobnicate"),
    ("specplan", ["optimize", "--frobnicate"], 2, "--frobnicate"),
    ("specplan", ["optimize", "--gen-len", "abc"], 2, "--gen-len"),
    ("specplan", ["optimize", "--prompt-len", "1e7"], 2, "--prompt-len"),
    ("specplan", ["optimize", "--acceptance", "high"], 2, "--acceptance"),
    ("specplan", ["simulate", "--batch", "many"], 2, "--batch"),
    ("specrun", [], 2, "--plan"),
    ("specrun", ["--plan", "plan.json", "--target", "tiny-llama", "--max-rows", "0"], 2, "--max-rows"),
    ("specrun", ["--plan", "plan.json", "--target", "tiny-llama", "--threads", "0"], 2, "--threads"),
    ("specplan", ["validate", "--repeat", "0"], 2, "--repeat"),
    ("specplan", ["validate", "--threads", "0"], 2, "--threads"),
    # values out of range
    ("specplan", ["optimize", "--gen-len", "0"], 2, "gen_len"),
    ("specplan", ["optimize", "--num-prompts", "-3"], 2, "num_prompts"),
    ("specplan", ["optimize", "--acceptance", "1.5"], 2, "acceptance"),
    ("specplan", ["optimize", "--gen-len", "1000000"], 2, "gen_len"),
    ("specplan", ["optimize", "--target", "smollm2-135m", "--draft", "none", "--prompt-len", "9000"], 2, "prompt_len"),
    ("specplan", ["optimize", "--gpu-mem", "200GB"], 2, "--gpu-mem"),
    ("specplan", ["optimize", "--gpu-mem", "lots"], 2, "--gpu-mem"),
    ("specplan", ["optimize", "--host-mem", "0"], 2, "--host-mem"),
    ("specplan", ["optimize", "--policy", "fast"], 2, "--policy"),
    ("specplan", ["optimize", "--admission", "eager"], 2, "--admission"),
    ("specplan", ["optimize", "--draft", "none", "--policy", "specoffload"], 2, "--policy"),
    ("specplan", ["simulate", "--gamma", "-1"], 2, "gamma"),
    ("specplan", ["simulate", "--batch", "0"], 2, "target_batch"),
    ("specplan", ["simulate", "--mode", "exact"], 2, "--mode"),
    ("specplan", ["simulate", "--policy", "fast"], 2, "policy"),
    ("specplan", ["simulate", "--gantt", "g.png", "--window", "100:50"], 2, "--window"),
    ("specplan", ["simulate", "--window", "1:2"], 2, "--window"),
    ("specplan", ["models", "mixtral-8x7b", "--dtype", "int3"], 2, "dtype"),
    ("specrun", ["--plan", "plan.json", *SPEC, "--device", "tpu"], 2, "--device"),
    ("specrun", ["--plan", "plan.json", *SPEC, "--top-p", "0.9"], 2, "--top-p"),
    ("specrun", ["--plan", "plan.json", *SPEC, "--temperature", "0.8", "--top-p", "0"], 2, "--top-p"),
    # unknown names
    ("specplan", ["optimize", "--gpu", "rtx409"], 2, "rtx409"),
    ("specplan", ["optimize", "--target", "nosuchmodel"], 2, "nosuchmodel"),
    ("specplan", ["optimize", "--pcie", "7"], 2, "PCIe link '7'"),
    ("specplan", ["hardware", "nosuch"], 2, "nosuch"),
    ("specplan", ["models", "nosuch"], 2, "nosuch"),
    # outputs that cannot be written: refused before any work
    ("specplan", ["optimize", "--out", "/proc/x/plan.json"], 2, "--out"),
    ("specplan", ["optimize", "--out", "."], 2, "--out"),
    ("specplan", ["optimize", "--out", "ids.txt/plan.json"], 2, "ids.txt"),
    ("specplan", ["simulate", "--gantt", "/proc/g.png"], 2, "--gantt"),
    ("specplan", ["simulate", "--trace", "."], 2, "--trace"),
    ("specplan", ["profile", "--quick", "--out", "/proc/x/profile.json"], 2, "--out"),
    ("specplan", ["validate", "--quick", "--out-dir", "ids.txt"], 2, "--out-dir"),
    ("specplan", ["calibrate", "report.json", "--plan", "plan.json", "--out", "/proc/x.json"], 2, "--out"),
    ("specrun", ["--plan", "plan.json", *SPEC, "--report", "/proc/x/r.json"], 2, "--report"),
    ("specrun", ["--plan", "plan.json", *SPEC, "--torch-profile", "."], 2, "--torch-profile"),
    # bad files: missing, not UTF-8, not JSON, wrong fields, non-finite or implausible numbers
    ("specplan", ["optimize", "--workload", "missing.json"], 2, "missing.json"),
    ("specplan", ["optimize", "--workload", "bad.json"], 2, "bad.json"),
    ("specplan", ["optimize", "--workload", "binary.json"], 2, "binary.json"),
    ("specplan", ["optimize", "--workload", "workload-unknown.json"], 2, "gen_length"),
    ("specplan", ["optimize", "--workload", "workload-negative.json"], 2, "gen_len"),
    ("specplan", ["optimize", "--gpu", "nan-link.json"], 2, "NaN"),
    ("specplan", ["optimize", "--gpu", "slow-link.json"], 2, "link.h2d_pinned.bytes_per_s"),
    ("specplan", ["optimize", "--gpu", "inf-memory.json"], 2, "Infinity"),
    ("specplan", ["optimize", "--gpu", "huge-memory.json"], 2, "gpu.memory_bytes"),
    ("specplan", ["hardware", "binary.json"], 2, "binary.json"),
    ("specplan", ["simulate", "--plan", "binary.json"], 2, "binary.json"),
    ("specplan", ["simulate", "--plan", "bad.json"], 2, "bad.json"),
    ("specplan", ["profile", "--show", "binary.json"], 2, "binary.json"),
    ("specplan", ["calibrate", "binary.json", "--plan", "plan.json"], 2, "binary.json"),
    ("specplan", ["calibrate", "missing.json", "--plan", "plan.json"], 2, "missing.json"),
    ("specplan", ["calibrate", "report.json", "--plan", "plan.json"], 2, "plan.hardware"),
    ("specplan", ["calibrate", "report-per-pass.json", "--plan", "plan.json"], 2, "measured.stage_timing"),
    ("specrun", ["--plan", "binary.json", *SPEC], 2, "binary.json"),
    ("specrun", ["--plan", "missing.json", *SPEC], 2, "missing.json"),
    ("specrun", ["--plan", "plan.json", *SPEC, "--prompts", "latin1.txt"], 2, "latin1.txt"),
    ("specrun", ["--plan", "plan.json", *SPEC, "--prompts", "text.txt"], 2, "line 1"),
    ("specrun", ["--plan", "plan.json", *SPEC, "--prompts", "long.txt"], 2, "max_position_embeddings"),
    # the dataset job: its input and output are checked before any weight is read
    ("specrun", ["--plan", "plan.json", *SPEC, "--prompts", "data-bad.jsonl", "--output", "o.jsonl"], 2, "line 2"),
    ("specrun", ["--plan", "plan.json", *SPEC, "--prompts", "data-dup.jsonl", "--output", "o.jsonl"], 2, "id 'a'"),
    ("specrun", ["--plan", "plan.json", *SPEC, "--prompts", "data-long.jsonl", "--output", "o.jsonl"], 2, "id 'long'"),
    ("specrun", ["--plan", "plan.json", *SPEC, "--prompts", "data.jsonl", "--output", "o.jsonl", "--column", "text"],
     2, "line 1: text"),
    ("specrun", ["--plan", "plan.json", *SPEC, "--prompts", "data-chat.jsonl", "--output", "o.jsonl"], 2, "line 1"),
    ("specrun", ["--plan", "plan.json", *SPEC, "--prompts", "data.jsonl", "--output", "o.jsonl", "--report", "o.jsonl"],
     2, "--report"),
    ("specrun", ["--plan", "plan.json", *SPEC, "--prompts", "data-temp.jsonl", "--output", "o.jsonl"], 2,
     "line 2: temperature"),
    ("specrun", ["--plan", "plan.json", *SPEC, "--prompts", "data-greedy-top-p.jsonl", "--output", "o.jsonl"], 2,
     "id 'b': top_p"),
    ("specrun", ["--plan", "plan.json", *SPEC, "--prompts", "data.jsonl", "--output", "o.jsonl", "--top-k", "5"], 2,
     "--top-k"),
    ("specrun", ["--plan", "plan.json", *SPEC, "--prompts", "data.jsonl", "--output", "other.jsonl", "--resume"],
     2, "other.jsonl.job.json"),
    ("specrun", ["--plan", "plan.json", *SPEC, "--prompts", "data.jsonl", "--output", "other.jsonl"], 2, "--output"),
    ("specrun", ["--plan", "plan.json", *SPEC, "--resume"], 2, "--resume"),
    ("specrun", ["--plan", "plan.json", *SPEC, "--prompts", "data.jsonl", "--output", "o.jsonl", "--device", "cpu"],
     3, "made for rtx4090"),
    # resume checks what it keeps, and knows its input by content
    ("specrun", [*JOB, "--output", "dup.jsonl", "--resume"], 2, "dup.jsonl: id 'a': has two result lines"),
    ("specrun", [*JOB, "--output", "stray.jsonl", "--resume"], 2, "stray.jsonl: id 'zz': is not in the input"),
    ("specrun", [*JOB, "--output", "o.jsonl", "--repair"], 2, "--repair"),
    ("specrun", [*JOB, "--output", "o.jsonl", "--stop", "x"], 2, "argument: --stop"),
    # data files a reader cannot read: the file named, exit 2
    ("specrun", ["--plan", "plan.json", *SPEC, "--prompts", "cut.parquet", "--output", "o.jsonl"], 2,
     "cut.parquet: file"),
    ("specrun", ["--plan", "plan.json", *SPEC, "--prompts", "broken-ds", "--output", "o.jsonl"], 2,
     "broken-ds/data-00000-of-00001.arrow"),
    ("specrun", ["--plan", "plan.json", *SPEC, "--prompts", "cut.jsonl.gz", "--output", "o.jsonl"], 2,
     "cut.jsonl.gz: file"),
    # no output may be an input, or another output (by path or by inode)
    ("specrun", [*JOB, "--output", "o.jsonl", "--report", "data.jsonl"], 2, "--report: data.jsonl is what --prompts"),
    ("specrun", [*JOB, "--output", "o.jsonl", "--report", "plan.json"], 2, "--report: plan.json is what --plan"),
    ("specrun", [*JOB, "--output", "o.jsonl", "--report", "link-to-plan.json"], 2, "is what --plan reads"),
    ("specrun", ["--plan", "plan.json", *SPEC, "--prompts", "ds", "--output", "o.jsonl", "--report", "ds/r.json"], 2,
     "is inside what --prompts reads"),
    ("specrun", [*JOB, "--output", "o.jsonl", "--report", "r.json", "--torch-profile", "r.json"], 2,
     "--torch-profile: r.json is also written as --report"),
    ("specplan", ["batch", *JOB[2:], "--output", "o.jsonl", "--report", "data.jsonl"], 2, "is what --prompts reads"),
    ("specplan", ["batch", *JOB[2:], "--output", "data.jsonl", "--resume"], 2, "--output: data.jsonl is what --prompts"),
    ("specplan", ["sweep", "--grid", "grid.yaml", "--csv", "grid.yaml"], 2, "--csv: grid.yaml is what --grid reads"),
    ("specplan", ["sweep", "--gpu", "rtx4090", "--csv", "s.csv", "--plan-out", "s.csv"], 2, "--plan-out"),
    ("specplan", ["optimize", "--gpu", "profile.json", "--out", "profile.json"], 2, "--out: profile.json is what --gpu"),
    ("specplan", ["simulate", "--plan", "plan.json", "--trace", "plan.json"], 2, "--trace: plan.json is what --plan"),
    ("specplan", ["calibrate", "report-cpu.json", "--plan", "plan.json", "--out", "plan.json"], 2, "--out: plan.json"),
    # sizes: finite, positive, plausible
    ("specplan", ["optimize", "--host-mem", "1e400"], 2, "--host-mem"),
    ("specplan", ["optimize", "--gpu-mem", "1e400"], 2, "--gpu-mem"),
    ("specplan", ["optimize", "--host-mem", "1e30"], 2, "--host-mem"),
    ("specplan", ["simulate", "--host-mem", "1e400"], 2, "--host-mem"),
    ("specplan", ["sweep", "--gpu", "rtx4090", "--host-mem", "1e30"], 2, "--host-mem"),
    ("specplan", ["batch", *JOB[2:], "--output", "o.jsonl", "--gpu-mem", "1e400"], 2, "--gpu-mem"),
    ("specplan", ["sweep", "--grid", "grid-host-256.yaml"], 2, "host_mem[0]"),
    ("specplan", ["optimize", "--host-mem", "0.5"], 2, "--host-mem: 0.5 B"),
    ("specplan", ["optimize", "--host-mem", ""], 2, "--host-mem"),
    ("specplan", ["optimize", "--workload", "workload-seed.json"], 2, "seed"),
    ("specplan", ["simulate", "--plan", "/dev/zero"], 2, "/dev/zero"),
    ("specplan", ["simulate", "--gantt", "g.svg"], 2, "--gantt"),
    ("specplan", ["sweep", "--gpu", "rtx4090", "--prices", "prices-true.json"], 2, "prices.rtx4090"),
    ("specplan", ["sweep", "--gpu", "rtx4090", "--price", "rtx4090=0.3", "--price", "rtx4090=0.5"], 2,
     "--price.rtx4090: is priced twice"),
    ("specplan", ["sweep", "--gpu", "rtx4090", "--cache", "c", "--no-cache"], 2, "--cache"),
    ("specplan", ["optimize", "--workload", "workload-two-lens.json"], 2, "prompt_lens"),
    # accepted no more: a report of another device, an impossible date, flags the policy ignores
    ("specplan", ["calibrate", "report-cpu.json", "--plan", "plan.json"], 2, "device.name"),
    ("specplan", ["sweep", "--gpu", "rtx4090", "--prices", "prices-bad-date.json"], 2, "date"),
    ("specplan", ["sweep", "--gpu", "rtx4090", "--prices", "prices-bad-date.yaml"], 2, "date: '2024-13-45' is not a day"),
    ("specplan", ["profile", "--quick", "--gpu-mem", "900TB", "--out", "p.json"], 2, "this device's"),
    ("specplan", ["simulate", "--policy", "flexgen", "--gamma", "4"], 2, "--gamma"),
    ("specplan", ["simulate", "--policy", "specoffload", "--num-batches", "3"], 2, "--num-batches"),
    ("specplan", ["simulate", "--policy", "sequential", "--draft-batch", "8"], 2, "--draft-batch"),
    ("specplan", ["simulate", "--plan", "plan.json", "--batch", "4"], 2, "--batch"),
    ("specplan", ["simulate", "--draft", "none"], 2, "--policy"),
    # messages that say what is wrong, and why nothing fits
    ("specplan", ["sweep", "--gpu", "rtx4090", "--gen-len", "999999"], 2, "gen_len"),
    ("specplan", ["optimize", "--admission", "continuous", "--num-prompts", "2"], 3, "more prompts than rows"),
    ("specplan", ["sweep", "--gpu", "rtx4090", "--host-mem", "2MB", "--no-cache"], 3, "no point of the grid has a plan: "),
    # the sweep: its grid, prices and outputs are checked before any point is planned
    ("specplan", ["sweep", "--grid", "grid-unknown.yaml"], 2, "gpus"),
    ("specplan", ["sweep", "--grid", "grid-bad.yaml"], 2, "grid-bad.yaml"),
    ("specplan", ["sweep", "--grid", "grid-acceptance.json"], 2, "acceptance[1]"),
    ("specplan", ["sweep", "--gpu", "rtx409"], 2, "rtx409"),
    ("specplan", ["sweep", "--gpu", "rtx4090", "--target", "mixtral-8x7b"], 2, "--draft"),
    ("specplan", ["sweep", "--gpu", "rtx4090", "--price", "rtx409=0.3"], 2, "rtx409"),
    ("specplan", ["sweep", "--gpu", "rtx4090", "--price", "rtx4090=cheap"], 2, "--price.rtx4090"),
    ("specplan", ["sweep", "--gpu", "rtx4090", "--prices", "prices-undated.json"], 2, "date"),
    ("specplan", ["sweep", "--gpu", "rtx4090", "--sort", "cost"], 2, "--sort"),
    ("specplan", ["sweep", "--gpu", "rtx4090", "--csv", "/proc/x/s.csv"], 2, "--csv"),
    # weight formats
    ("specplan", ["optimize", "--weights", "int3"], 2, "--weights"),
    ("specplan", ["optimize", "--weights", "experts=int4,experts=int8"], 2, "given twice"),
    ("specplan", ["optimize", "--weights", "layers=int4"], 2, "GROUP=FORMAT"),
    ("specplan", ["optimize", "--target", "tiny-mixtral", "--draft", "none", "--weights", "int4g64"], 2,
     "--weights experts=int4g64"),
    ("specplan", ["optimize", "--gpu", "no-fp8.json", "--target", "tiny-llama", "--draft", "none", "--weights", "fp8"], 2,
     "measured no fp8"),
    ("specplan", ["optimize", "--target", "tiny-llama", "--draft", "none", "--weights", "int8+fused"], 2,
     "measured no fused int8"),
    ("specplan", ["optimize", "--weights", "fp8+fused"], 2, "no weight-only fused kernel"),
    ("specplan", ["optimize", "--weights", "int8,lm_head=int8+fused"], 2, "lm_head=int8+fused"),
    ("specplan", ["simulate", "--weights", "auto"], 2, "--weights"),
    ("specplan", ["sweep", "--gpu", "rtx4090", "--weights", "auto"], 2, "--weights"),
    ("specplan", ["models", "tiny-llama", "--weights", "int4g128"], 2, "int4g128"),
    ("specrun", ["--plan", "plan.json", *SPEC, "--weights", "int8"], 2, "the plan's formats"),
    ("specrun", ["--plan", "plan-int3.json", *SPEC], 2, "weights.experts"),
    # plans that do not fit: exit 3
    ("specplan", ["optimize", "--gpu-mem", "1GB"], 2, "--gpu-mem"),
    ("specplan", ["optimize", "--gpu-mem", "2GB"], 3, "no plan fits: specoffload: GPU memory"),
    ("specrun", ["--plan", "plan.json", *SPEC, "--device", "cpu"], 3, "made for rtx4090"),
    ("specrun", ["--plan", "mixtral-plan.json", "--target", "mixtral-8x7b", "--draft", "mistral-7b-v0.2",
                 "--random-weights"], 3, "host memory"),
]
# messages that name this machine (its CPU, its free memory): checked, but not compared with docs/errors.md
# (nor those that quote the OS's reason an output under /proc cannot be written)
MACHINE_SPECIFIC = {"made for rtx4090", "host memory", "this device's"}

ENTRY = {"specplan": "specplan", "specrun": "specplan.runtime"}  # the console entry points (specplan.entry)


def case_id(case) -> str:
    return " ".join([case[0], *case[1]])


def _plan(**kw) -> Plan:
    schedule = Schedule(policy="specoffload", target_batch=2, num_batches=2, prefill_chunk=2, draft_batch=2,
                        gamma=3, prefetch_depth=1).validate()
    placement = Placement(attention="cpu_pinned", ffn="cpu_pageable", ffn_gpu_layers=1, draft_kv="cpu")
    base = dict(target="tiny-llama", draft="tiny-draft", hardware="rtx4090", schedule=schedule, placement=placement,
                workload=Workload.make(prompt_len=[4, 7], gen_len=6, num_prompts=4).to_dict(),
                prediction={"throughput_tok_s": 50.0})
    return Plan(**{**base, **kw})


def write_files(d: Path) -> None:
    """The inputs the cases read, in the folder they run in."""
    _plan().save(str(d / "plan.json"))
    mixtral = Placement(attention="cpu_pinned", ffn="cpu_pinned", ffn_gpu_layers=0, draft_kv="cpu")
    _plan(target="mixtral-8x7b", draft="mistral-7b-v0.2", placement=mixtral).save(str(d / "mixtral-plan.json"))
    (d / "binary.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    (d / "bad.json").write_text("{not json")
    (d / "ids.txt").write_text("1 2 3\n")
    (d / "text.txt").write_text("hello world\n")
    (d / "long.txt").write_text(" ".join(["1"] * 5000) + "\n")
    (d / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (d / "workload-unknown.json").write_text(json.dumps({"gen_length": 5}))
    (d / "data.jsonl").write_text('{"id": "a", "prompt": [1, 2, 3]}\n{"id": "b", "prompt": [4, 5]}\n')
    (d / "data-bad.jsonl").write_text('{"id": "a", "prompt": [1, 2, 3]}\n{"id": "b", "prompt": [4, 5]\n')
    (d / "data-dup.jsonl").write_text('{"id": "a", "prompt": [1, 2, 3]}\n{"id": "a", "prompt": [4, 5]}\n')
    (d / "data-long.jsonl").write_text(json.dumps({"id": "long", "prompt": [7] * 2000}) + "\n")
    (d / "data-temp.jsonl").write_text('{"id": "a", "prompt": [1, 2, 3]}\n{"id": "b", "prompt": [4], "temperature": -1}\n')
    (d / "data-greedy-top-p.jsonl").write_text('{"id": "a", "prompt": [1, 2, 3], "temperature": 0.7, "top_p": 0.9}\n'
                                               '{"id": "b", "prompt": [4, 5], "top_p": 0.9}\n')
    (d / "data-chat.jsonl").write_text(json.dumps({"id": "c", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    (d / "other.jsonl").write_text('{"id": "a", "token_ids": [1]}\n')
    (d / "other.jsonl.job.json").write_text(json.dumps({"plan": "another", "input_sha256": "another"}))
    (d / "workload-negative.json").write_text(json.dumps({"gen_len": -1}))
    (d / "grid-unknown.yaml").write_text("gpus: [rtx4090, l4]\npcie: [3, 4]\n")
    (d / "grid-bad.yaml").write_text("gpu: [rtx4090\npcie: 4\n")
    (d / "grid-acceptance.json").write_text(json.dumps({"gpu": "rtx4090", "acceptance": [0.7, 1.5]}))
    (d / "prices-undated.json").write_text(json.dumps({"source": "a quote", "prices": {"rtx4090": 0.35}}))
    prof = load_profile("rtx4090").to_dict()

    def variant(name: str, text: str) -> None:
        (d / name).write_text(text)

    p = json.loads(json.dumps(prof))
    p["link"]["h2d_pinned"]["bytes_per_s"] = 1e-3
    variant("slow-link.json", json.dumps(p))
    # a measured profile whose device ran int8 dequantization and not fp8
    p = json.loads(json.dumps(prof))
    p["kernels"]["gpu_dequant:int8:float32"] = {"axes": ["params"], "grid": [[1000.0]], "seconds": [1e-6]}
    variant("no-fp8.json", json.dumps(p))
    variant("plan-int3.json", json.dumps(_plan(weights={"experts": "int3"}).to_dict()))
    p = json.loads(json.dumps(prof))
    p["link"]["h2d_pinned"]["bytes_per_s"] = math.nan
    variant("nan-link.json", json.dumps(p))  # json writes NaN, which is not JSON
    p = json.loads(json.dumps(prof))
    p["gpu"]["memory_bytes"] = math.inf
    variant("inf-memory.json", json.dumps(p))
    p["gpu"]["memory_bytes"] = 1234.5
    variant("huge-memory.json", json.dumps(p).replace("1234.5", "1e400"))  # parses to inf
    report = {"measured": {"throughput_tok_s": 10.0, "stage_s": {}},
              "plan": {**_plan(hardware="a100-80gb").to_dict()}}
    (d / "report.json").write_text(json.dumps(report))
    report["measured"]["stage_timing"] = "per-pass"
    (d / "report-per-pass.json").write_text(json.dumps(report))
    cpu_run = {"measured": {"throughput_tok_s": 10.0, "stage_s": {}}, "plan": _plan().to_dict(),
               "device": {"type": "cpu", "name": "CPU as device (a test CPU)"}}
    (d / "report-cpu.json").write_text(json.dumps(cpu_run))
    (d / "profile.json").write_text(json.dumps(prof))
    (d / "grid.yaml").write_text("gpu: [rtx4090]\n")
    (d / "grid-host-256.yaml").write_text("gpu: [rtx4090]\nhost_mem: [256]\n")
    (d / "workload-seed.json").write_text(json.dumps({"seed": -1}))
    (d / "workload-two-lens.json").write_text(json.dumps({"prompt_len": 64, "prompt_lens": [32, 128]}))
    (d / "prices-true.json").write_text(json.dumps({"date": "2024-05-01", "source": "a quote", "prices": {"rtx4090": True}}))
    (d / "prices-bad-date.yaml").write_text("date: 2024-13-45\nsource: a quote\nprices: {rtx4090: 0.35}\n")
    (d / "prices-bad-date.json").write_text(json.dumps({"date": "2024-13-45", "source": "a quote", "prices": {"rtx4090": 0.35}}))
    os.link(d / "plan.json", d / "link-to-plan.json")
    _data_files(d)
    _resumable_outputs(d)


def _data_files(d: Path) -> None:
    """A datasets directory, one with a broken .arrow file, a parquet file and a gzip cut short."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": ["a", "b"], "prompt": [[1, 2, 3], [4, 5]]})
    (d / "ds").mkdir()
    with pa.OSFile(str(d / "ds" / "data-00000-of-00001.arrow"), "wb") as f:
        with pa.ipc.new_stream(f, table.schema) as w:
            w.write_table(table)
    (d / "broken-ds").mkdir()
    (d / "broken-ds" / "data-00000-of-00001.arrow").write_bytes(b"12345")
    pq.write_table(table, str(d / "whole.parquet"))
    (d / "cut.parquet").write_bytes((d / "whole.parquet").read_bytes()[:200])
    (d / "whole.parquet").unlink()
    (d / "cut.jsonl.gz").write_bytes(gzip.compress((d / "data.jsonl").read_bytes())[:30])


def _resumable_outputs(d: Path) -> None:
    """Outputs of JOB's job (their .job.json is its identity), one holding an id twice and one
    an id the input lacks."""
    from specplan.runtime.cli import job_settings, sampling_flags
    from specplan.runtime.job import identity_of
    from specplan.runtime.jobio import read_dataset

    settings = job_settings(sampling_flags(None, 1.0, 0, None), [], None, 0, None, True, None, None)
    ident = identity_of(d / "plan.json", "tiny-llama", "tiny-draft", read_dataset(d / "data.jsonl", None, 256), settings)
    line = lambda rid: json.dumps({"id": rid, "token_ids": [1], "finish_reason": "length"}) + "\n"  # noqa: E731
    for name, ids in (("dup.jsonl", ["a", "a"]), ("stray.jsonl", ["a", "zz"])):
        (d / name).write_text("".join(line(i) for i in ids))
        (d / f"{name}.job.json").write_text(json.dumps(ident))


def listing(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def contents(d: Path) -> dict[str, bytes | None]:
    """Every path under `d` with its bytes (None for a folder): the inputs, byte for byte."""
    return {str(p.relative_to(d)): None if p.is_dir() else p.read_bytes() for p in d.rglob("*")}


def run_cli(entry: str, args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "SPECPLAN_DEBUG")}
    env.update(COLUMNS="80", NO_COLOR="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", ENTRY[entry], *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def first_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    return lines[0] if lines else ""


def test_the_table_is_large_and_covers_every_command():
    assert len(CASES) >= 40
    commands = {c[1][0] if c[0] == "specplan" and c[1] else "specrun" for c in CASES}
    assert {"optimize", "sweep", "simulate", "profile", "calibrate", "validate", "hardware", "models",
            "specrun"} <= commands
    assert {c[2] for c in CASES} == {2, 3}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bad_input_is_one_line_and_leaves_nothing(case, tmp_path):
    entry, args, code, names = case
    d = tmp_path / "run"
    d.mkdir()
    write_files(d)
    before = contents(d)
    t0 = time.perf_counter()
    res = run_cli(entry, args, d)
    wall = time.perf_counter() - t0
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr
    assert names in errors[0], errors[0]
    after = contents(d)
    assert set(after) == set(before), "files were left behind"
    assert after == before, f"an input changed: {[k for k in after if after[k] != before[k]]}"
    assert wall < 30, f"took {wall:.1f} s to refuse"  # refusals come before the work (README commands: under 5 s)
    # /proc refusals carry the OS's words (which differ as root and as a user): not compared
    if not any(m in names for m in MACHINE_SPECIFIC) and not any(a.startswith("/proc") for a in args):
        assert doc_row(case, code, errors[0]) in doc_rows(), "docs/errors.md is out of date: python scripts/error_table.py"


def doc_row(case, code: int, message: str) -> str:
    """The case's row in docs/errors.md (| escaped: messages list alternatives with it)."""
    return f"| `{case_id(case)}` | {code} | {message.replace('|', chr(92) + '|')} |"


def doc_rows() -> str:
    return DOC.read_text() if DOC.exists() else ""


# ---- Ctrl-C --------------------------------------------------------------------------------------------


def _has_children(pid: int) -> bool:
    ps = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return bool(ps.split())


def _interrupt_after(entry: str, args: list[str], cwd: Path, seconds: float,
                     ready: Path | str | None = None, again_s: float | None = None) -> subprocess.CompletedProcess:
    """Start a command, send SIGINT to its process group `seconds` after it started (or after
    the file `ready` appeared, or with ready="workers" after its first worker process did):
    what a terminal's Ctrl-C does, the workers get it too. `again_s`: a second SIGINT that
    long after the first (a wrapper and a terminal both sending one). The process ran in a
    session of its own, whose id is its pid (see _left_in_session)."""
    env = {k: v for k, v in os.environ.items() if k != "SPECPLAN_DEBUG"}
    env.update(NO_COLOR="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", ENTRY[entry], *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    def is_ready() -> bool:
        return _has_children(p.pid) if ready == "workers" else ready.exists()

    while ready is not None and not is_ready() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(seconds)
    assert p.poll() is None, "the command ended before it could be interrupted"
    os.killpg(p.pid, signal.SIGINT)
    if again_s is not None:
        time.sleep(again_s)
        try:
            os.killpg(p.pid, signal.SIGINT)
        except ProcessLookupError:  # it had already ended
            pass
    out, err = p.communicate(timeout=60)
    res = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    res.pid = p.pid
    return res


def _left_in_session(sid: int, wait_s: float = 5.0) -> list[str]:
    """The processes still in session `sid` after up to `wait_s` seconds: what a command
    started in a session of its own left running (Ray's servers and agents stay in it)."""
    deadline = time.monotonic() + wait_s
    while True:
        left = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
                cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            fields = text[text.rfind(")") + 2:].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                left.append(f"{stat.parent.name}: {cmd[:100]}")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _clean_interrupt(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 130, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr, res.stderr[-2000:]
    assert "interrupted" in res.stderr.splitlines()[-1], res.stderr[-2000:]
    left = _left_in_session(res.pid)
    assert not left, f"processes outlived the interrupt by 5 s: {left}"


def _entry_import_s() -> float:
    """How long this machine takes to start Python and reach specplan.entry (the least of 3)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import specplan.entry"], env=env, check=True)
        times.append(time.perf_counter() - t0)
    return min(times)


@pytest.mark.parametrize("step", range(4))
def test_ctrl_c_during_the_imports_exits_130_and_writes_nothing(tmp_path, step):
    # from just after the handler is in place, through the imports of typer, numpy, the planner
    # (a sweep of every shipped GPU runs for seconds after them)
    delay = 1.5 * _entry_import_s() + 0.05 * step
    res = _interrupt_after("specplan", ["sweep", "--no-cache", "--csv", "s.csv", "--plan-out", "p.json"], tmp_path,
                           delay)
    _clean_interrupt(res)
    assert listing(tmp_path) == set()


@pytest.mark.parametrize("at_s", [0.8, 1.6, 2.4, 3.2])
def test_ctrl_c_during_ray_start_up_exits_130_and_leaves_no_ray_process(tmp_path, at_s):
    pytest.importorskip("ray")
    write_files(tmp_path)
    profile = ROOT / "hwprofiles" / "measured" / "cpu-2core-xeon.json"
    res = _interrupt_after("specplan", ["batch", *SPEC, "--prompts", "data.jsonl", "--output", "o.jsonl", "--gen-len", "4",
                                        "--profile", str(profile), "--force", "--local-cpus", "2"], tmp_path, at_s)
    _clean_interrupt(res)


def _no_process_left(pattern: str) -> bool:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return not any(pattern in line for line in ps.splitlines())


def test_ctrl_c_during_optimize_exits_130_and_writes_nothing(tmp_path):
    out = tmp_path / f"plan-{os.getpid()}.json"
    # while its worker processes plan (the whole command takes under 2 s on 2 cores)
    res = _interrupt_after("specplan", ["optimize", "--gpu", "rtx4090", "--out", str(out)], tmp_path, 0.1,
                           ready="workers")
    assert res.returncode == 130, res.stderr
    assert "Traceback" not in res.stderr and "interrupted" in res.stderr
    assert listing(tmp_path) == set()
    time.sleep(0.5)
    assert _no_process_left(str(out)), "a planner worker outlived the interrupt"


@pytest.mark.parametrize("job, twice", [(False, False), (True, False), (True, True)],
                         ids=["prompts", "dataset job", "dataset job, Ctrl-C twice"])
def test_ctrl_c_during_specrun_exits_130_and_keeps_only_the_report_of_what_ran(tmp_path, job, twice):
    write_files(tmp_path)
    # a plan long enough to be interrupted mid-run on any machine: 64 prompts of 48 tokens, 240 generated
    plan = _plan(workload=Workload.make(prompt_len=48, gen_len=240, num_prompts=64).to_dict())
    plan.save(str(tmp_path / "plan.json"))
    (tmp_path / "big.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "prompt": [5] * 48}) + "\n"
                                                for i in range(64)))
    before = listing(tmp_path)
    extra = ["--prompts", "big.jsonl", "--output", "out.jsonl"] if job else []
    # the dataset job opens its output once the engine is built: interrupt a second into the run
    res = _interrupt_after("specrun", ["--plan", "plan.json", *SPEC, "--device", "cpu", "--force",
                                       "--report", "r.json", *extra], tmp_path, 1.5 if job else 7.0,
                           ready=tmp_path / "out.jsonl" if job else None, again_s=0.005 if twice else None)
    _clean_interrupt(res)
    # the report of what ran is written whole (atomically); nothing else, no temporary file
    new = listing(tmp_path) - before
    assert new == ({"r.json", "out.jsonl", "out.jsonl.job.json"} if job else {"r.json"}), new
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["interrupted"]["rows"] == 64 and rep["interrupted"]["rows_finished"] < 64
    if job:  # every finished row is in the output, whole
        lines = (tmp_path / "out.jsonl").read_text().splitlines()
        assert len(lines) == rep["interrupted"]["rows_finished"] and all(json.loads(x)["id"] for x in lines)


# ---- the busy-machine check -----------------------------------------------------------------------------


def test_busy_cores_are_warned_about_and_a_quiet_machine_is_not(monkeypatch):
    from specplan import host

    quiet = {"cores": 2, "loadavg_1m": 0.1, "others_busy_cores": 0.05}
    busy = {"cores": 2, "loadavg_1m": 1.9, "others_busy_cores": 1.0}
    assert host.busy_warning(quiet, "timings") is None
    assert host.busy_warning({**quiet, "others_busy_cores": None}, "timings") is None  # no /proc: nothing to say
    assert "other processes are using 1.0 of 2 cores" in host.busy_warning(busy, "timings")
    # the sample subtracts this process's own CPU time from the machine's
    ticks = iter([(100.0, 1000.0), (100.0 + 0.3 * os.sysconf("SC_CLK_TCK"), 1100.0)])
    monkeypatch.setattr(host, "_busy_jiffies", lambda: next(ticks))
    monkeypatch.setattr(host.time, "sleep", lambda s: None)
    clock = iter([0.0, 0.3])
    monkeypatch.setattr(host.time, "monotonic", lambda: next(clock))
    times = iter([os.times_result((0, 0, 0, 0, 0)), os.times_result((0.1, 0, 0, 0, 0))])
    monkeypatch.setattr(host.os, "times", lambda: next(times))
    load = host.machine_load(0.3)
    assert load["others_busy_cores"] == pytest.approx(1.0 - 0.1 / 0.3, abs=1e-3)


def test_more_threads_than_cores_is_warned_about(monkeypatch):
    from specplan import host

    monkeypatch.setattr(host, "usable_cores", lambda: 2)
    assert host.threads_warning(None) is None and host.threads_warning(2) is None
    assert "--threads 10000 is more than the 2 cores" in host.threads_warning(10000)


def test_ctrl_c_raises_once_ignores_the_second_and_the_third_ends_the_process_and_its_children(monkeypatch, capfd):
    """specplan.entry's handler, called as the signal would call it (the interrupt paths of the
    commands here end in milliseconds, too soon for a third key)."""
    from specplan import entry, procs

    monkeypatch.setattr(entry, "_interrupts", 0)
    ended: list = []
    monkeypatch.setattr(procs, "descendants", lambda pid: [(pid + 1, 7)])
    monkeypatch.setattr(procs, "end", lambda found, grace_s: ended.append((found, grace_s)))

    def exit_now(code):
        raise SystemExit(code)

    monkeypatch.setattr(entry.os, "_exit", exit_now)
    with pytest.raises(KeyboardInterrupt):
        entry._on_sigint(signal.SIGINT, None)
    assert entry.interrupted()
    with pytest.raises(KeyboardInterrupt):
        entry.check()  # raised again wherever the first was swallowed
    entry._on_sigint(signal.SIGINT, None)  # the second: ignored, said
    assert "Ctrl-C again to stop at once" in capfd.readouterr().err and not ended
    with pytest.raises(SystemExit) as stop:
        entry._on_sigint(signal.SIGINT, None)
    assert stop.value.code == 130 and ended == [([(os.getpid() + 1, 7)], 0.0)]


def test_the_processes_a_command_started_are_found_and_ended_and_a_reused_pid_is_spared():
    from specplan import procs

    sh = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"])
    try:
        deadline = time.monotonic() + 10
        while len(procs.descendants(os.getpid())) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        found = procs.descendants(os.getpid())
        assert {pid for pid, _ in found} >= {sh.pid} and len(found) >= 3
        assert all(procs.alive(p) for p in found)
        assert not procs.alive((sh.pid, dict(found)[sh.pid] + 1))  # the same pid, started at another time: not ours
        procs.end(found, grace_s=2.0)
        sh.wait(timeout=10)
        assert not any(procs.alive(p) for p in found)
    finally:
        sh.kill()


def test_a_shipped_profile_or_preset_is_an_input_too(tmp_path):
    """A shipped profile and a model preset are files the command reads: writing over them
    would break every later command that names them."""
    shipped = ROOT / "hwprofiles" / "shipped" / "rtx4090.json"
    preset = ROOT / "specplan" / "presets" / "models" / "tiny-llama.json"
    before = shipped.read_bytes(), preset.read_bytes()
    for args, names in ((["--out", str(shipped)], "--out: "), (["--target", "tiny-llama", "--draft", "none", "--out",
                                                                str(preset)], "what --target reads")):
        res = run_cli("specplan", ["optimize", *args], tmp_path)
        assert res.returncode == 2 and names in first_error_line(res.stderr), res.stderr
    assert (shipped.read_bytes(), preset.read_bytes()) == before


def test_no_output_goes_where_an_input_is(tmp_path):
    """check_not_inputs' folder rules (the file rules are in the table above): a folder read
    whole holds no output, and a folder written whole (a batch's shards, removed at the
    merge) holds no input."""
    from specplan.errors import InputError
    from specplan.fileio import check_not_inputs

    shards = tmp_path / "o.jsonl.shards"
    shards.mkdir()
    (shards / "data.jsonl").write_text("{}\n")
    with pytest.raises(InputError, match="--output's shards: .* holds what --prompts reads"):
        check_not_inputs([("--output's shards", shards, True)], [("--prompts", shards / "data.jsonl")])
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    check_not_inputs([("--report", model / "report.json")], [("--target", model)])  # a new file beside a model's
    with pytest.raises(InputError, match="--report: .*config.json is what --target reads"):
        check_not_inputs([("--report", model / "config.json")], [("--target", model)])
    check_not_inputs([("--report", None), ("--out", tmp_path / "a")], [("--plan", None), ("--gpu", "rtx4090")])


# ---- internal errors and warnings ------------------------------------------------------------------------


def _main_in_process(monkeypatch, capsys, argv: list[str]) -> tuple[int, str]:
    from specplan import cli

    monkeypatch.setattr(sys, "argv", ["specplan", *argv])
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_a_bug_is_one_line_and_exit_1_and_its_traceback_needs_debug(monkeypatch, capsys):
    from specplan import models

    def broken(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(models.ModelSpec, "from_preset", classmethod(lambda cls, name: broken()))
    monkeypatch.delenv("SPECPLAN_DEBUG", raising=False)
    code, err = _main_in_process(monkeypatch, capsys, ["models", "tiny-llama"])
    assert code == 1 and err.strip() == ("error: internal error: ZeroDivisionError: a bug "
                                         "(set SPECPLAN_DEBUG=1 for the traceback)")
    monkeypatch.setenv("SPECPLAN_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        _main_in_process(monkeypatch, capsys, ["models", "tiny-llama"])


def test_a_python_warning_is_one_clean_line_once(monkeypatch, capsys):
    import warnings

    from specplan import models

    real = models.ModelSpec.from_preset.__func__

    def noisy(cls, name):
        for ctx in (1, 2, 3):
            warnings.warn(f"context={ctx} is outside the profiled range", UserWarning)
        return real(cls, name)

    monkeypatch.setattr(models.ModelSpec, "from_preset", classmethod(noisy))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        code, err = _main_in_process(monkeypatch, capsys, ["models", "tiny-llama", "--json"])
    assert code == 0
    assert err.strip().splitlines() == ["warning: context=1 is outside the profiled range"]

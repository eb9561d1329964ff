#!/usr/bin/env bash
# benchmarks/gpu_check.sh: profile -> optimize -> specrun on a CUDA GPU, and a table of how
# close the runtime gets to what the profile and the plan promise.
#
# WHAT IT CHECKS (one row each in table.txt):
#   1. Weight streaming reaches the link: the H2D rate specrun achieves while streaming
#      weights (report measured.h2d_bytes_per_s: weight bytes / copy-stream time) is at least
#      0.85 x the pinned H2D rate `specplan profile` measured (the pageable rate, where the
#      plan streams from pageable memory).
#   2. specoffload overlaps: with --policy specoffload forced, the measured time per round
#      (decode wall time / target passes) is within 10% of the busiest resource's busy time
#      per round (H2D link: weights + draft KV swap-ins; GPU: target kernels + draft; CPU
#      attention), whenever the plan's own prediction expects that overlap (its simulated
#      round within 10% of its busiest resource); otherwise the row says n/a and why.
#   3. Predicted vs measured throughput of both plans (the optimizer's choice and
#      specoffload), with the error in percent (reported, no goal).
#   4. Compressed layers (int8, int4g64, fp8): one layer's dequantization on the device, as
#      the profile measured it, against streaming that layer's compressed bytes; and each
#      format's planned throughput against the dtype's plan (optimize --weights; no run).
#   0. Before those, `pytest tests/test_runtime_gpu.py`: the runtime's CUDA paths (copy
#      stream, draft thread, draft KV swap streams and events) give what the CPU gives.
# Models (gpu mode): Mixtral-8x7B's shapes (hidden 4096, FFN 14336, 32/8 heads, 8 experts
# top-2, vocab 32000, bf16) with 10 layers (about 30 GB), and a Mistral-7B-shaped draft with
# 4 layers (2.3 GB), random weights; the planner gets the measured profile with --gpu-mem
# 24GiB, an emulated 24 GB card that cannot hold the target, so experts stream (the shipped
# h100-pcie profile plans 4 of the 10 layers' experts streamed, for either plan). Workload:
# 64 prompts of 256 tokens, 32 generated. On an H200 (2026-11-26): CUDA tests 13 s, profile
# 63 s, each optimize 3-6 s, each specrun about 70 s (of which about 40 s draw the random
# weights), the profiled specrun about 100 s: about 5.5 minutes, plus a minute or two for the
# machine to start (each step has its own timeout in gpu_check.py). The streamed experts
# (about 11 GB) sit in pinned memory.
#
# USAGE
#   benchmarks/gpu_check.sh [ARGS]        on a CUDA machine; results in $OUT, else out/gpu_check
#   benchmarks/gpu_check.sh --cpu [ARGS]  dry run on this CPU with tiny-mixtral / tiny-draft
#                                         (the same steps and table; results in out/gpu_check_cpu)
#   benchmarks/gpu_check.sh --fetch-wheels
#                                         here, before a device run: download the wheels the device
#                                         image lacks (simpy, pulp, highspy; Python 3.12, x86-64)
#                                         into .whl/ (git-ignored)
#   ARGS go to benchmarks/gpu_check.py: --layers N, --draft-layers N, --gpu-mem 24GiB,
#   --prompt-len N, --gen-len N, --num-prompts N.
#
# ON THE DEVICE TOOL (see /work/.library/device/README.md): first `benchmarks/gpu_check.sh
# --fetch-wheels` here, then one call:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# It installs .whl/*.whl into /tmp/site (no index, no deps), runs from the repository root with
# PYTHONPATH=/tmp/site:$PWD (specplan is not installed there; `python3 -m specplan.cli` works
# from the root), and writes at most 8 files to $OUT: profile.json, plan.json,
# plan_specoffload.json, report.json, report_specoffload.json (these five packed into
# results.tar.gz when $OUT is set), ops.txt (torch.profiler's operator tables of a third,
# profiled specrun of the chosen plan on a quarter of the prompts), table.txt, summary.json, log.txt.
# Exit status: 0 when every step ran (a missed goal is a FAIL row), 1 when a step failed,
# 2 when the machine lacks what it needs.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

MODE=gpu
ARGS=()
for a in "$@"; do
  case "$a" in
    --cpu) MODE=cpu ;;
    --fetch-wheels) MODE=fetch ;;
    *) ARGS+=("$a") ;;
  esac
done

if [ "$MODE" = fetch ]; then
  PIP_PY=python3
  [ -x .venv/bin/python ] && PIP_PY=.venv/bin/python
  mkdir -p .whl
  exec "$PIP_PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    simpy==4.1.2 pulp==3.3.2 highspy==1.16.0
fi

if [ -n "${OUT:-}" ]; then
  OUT_DIR="$OUT"
elif [ "$MODE" = cpu ]; then
  OUT_DIR=out/gpu_check_cpu
else
  OUT_DIR=out/gpu_check
fi
mkdir -p "$OUT_DIR" || exit 2

# Python: $PYTHON, else this checkout's .venv in the dry run (it holds specplan's needs), else python3.
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ "$MODE" = cpu ] && [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
fi

export PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NO_COLOR=1 COLUMNS=160
if [ "$MODE" = cpu ]; then
  # one torch thread: on a small shared machine spinning OpenMP workers make tiny runs 100x slower
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi

NEEDS="import torch, numpy, scipy, simpy, pulp, typer, rich, safetensors"
# Carried wheels are installed only where something is missing (the device image lacks simpy
# and pulp); they are built for the device's Python 3.12 and would not install elsewhere.
if ! "$PY" -c "$NEEDS" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  echo "[gpu_check] installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "[gpu_check] installing .whl/*.whl failed"; exit 2; }
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
if ! "$PY" -c "$NEEDS" 2>/dev/null; then
  "$PY" -c "$NEEDS" 2>&1 | tail -1
  echo "[gpu_check] a package is missing: run 'benchmarks/gpu_check.sh --fetch-wheels' where pip works and carry .whl"
  exit 2
fi
if [ "$MODE" = gpu ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "[gpu_check] torch sees no CUDA device; use --cpu for the dry run"
  exit 2
fi

"$PY" benchmarks/gpu_check.py --mode "$MODE" --out "$OUT_DIR" "${ARGS[@]+"${ARGS[@]}"}" 2>&1 | tee "$OUT_DIR/log.txt"
rc=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then
  # the device tool brings back at most 8 files: the profile, plans and reports travel as one archive
  (cd "$OUT_DIR" && tar czf results.tar.gz --remove-files $(ls profile.json plan*.json report*.json 2>/dev/null))
fi
exit "$rc"

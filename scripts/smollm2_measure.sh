#!/usr/bin/env bash
# Profile this machine, plan speculative and non-speculative runs of SmolLM2-135M, and run
# each plan RUNS times (interleaved) with specrun on scripts/prompts.txt; then a median table.
#
#   scripts/smollm2_measure.sh [DRAFT_DIR] [OUT_DIR]
#
# Defaults: DRAFT_DIR=out/smollm2-135m-draft4-distilled, OUT_DIR=out/smollm2-run/<draft name>.
# Env: RUNS (3), TARGET (out/smollm2-135m), PROMPT_LENS=64 (the planned prompt length; "real"
# plans for the real prompts' token counts instead), GEN_LEN (64), THREADS (torch's default),
# SPEC (spec-serial: the speculative policy), GPU_MEM (unset: the profile's, half the RAM; e.g.
# 400MB makes the plans stream the target's weights through memory-to-memory "H2D" copies).
# Needs `python scripts/smollm2.py convert --draft-layers 4` (and `distill`) first.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${TARGET:-out/smollm2-135m}
D=${1:-out/smollm2-135m-draft4-distilled}
O=${2:-out/smollm2-run/$(basename "$D")}
P=scripts/prompts.txt
N=${RUNS:-3}
G=${GEN_LEN:-64}
PL=${PROMPT_LENS:-64}
THR=${THREADS:+--threads $THREADS}
SP=${SPEC:-spec-serial}
MEM=${GPU_MEM:+--gpu-mem $GPU_MEM}
mkdir -p "$O"
S="python scripts/smollm2.py"
# Other work on this machine skews every number: before each run wait (up to QUIET_WAIT s, default
# 600) until the CPUs were at least 90% idle over the last 2 s, and log what the run saw.
idle_pct() { read -r _ a b c d _ < /proc/stat; t1=$((a+b+c+d)); i1=$d; sleep 2
             read -r _ a b c d _ < /proc/stat; echo $(( 100 * (d - i1) / ((a+b+c+d) - t1 + 1) )); }
wait_quiet() { local waited=0; while [ "$(idle_pct)" -lt 90 ] && [ $waited -lt "${QUIET_WAIT:-600}" ]; do
               sleep 5; waited=$((waited + 7)); done; }
run() { wait_quiet; echo "$(date +%T) $2 idle-before=$(idle_pct)%" >> "$O/runs.log"
        specrun --plan "$1" --target "$T" --draft "$D" --prompts "$P" --device cpu --ignore-eos $THR --report "$2" --json > /dev/null
        echo "$(date +%T) $2 done, load $(cut -d' ' -f1 /proc/loadavg)" >> "$O/runs.log"; }
workload() {  # optimize flags for a given acceptance
  if [ "$PL" = real ]; then
    $S workload --target "$T" --prompts "$P" --gen-len "$G" --acceptance "$1" --out "$O/workload-$1.json"
    echo "--workload $O/workload-$1.json"
  else
    echo "--prompt-len $PL --gen-len $G --num-prompts 16 --acceptance $1"
  fi
}
opt() { specplan optimize --gpu "$O/cpu.json" --target "$T" --draft "$D" $(workload "$1") --policy "$2" $MEM --out "$3" --json > "$3.stdout"; }

echo "== machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), load $(cut -d' ' -f1-3 /proc/loadavg)"
wait_quiet
specplan profile --quick --device cpu --target "$T" --draft "$D" --out "$O/cpu.json" > "$O/profile.txt"
# Pilot: the planner's default acceptance (0.7); its run measures the real one.
opt 0.7 "$SP" "$O/plan-spec-a0.7.json"
run "$O/plan-spec-a0.7.json" "$O/pilot.json"
A=$($S alpha "$O/pilot.json")
echo "== measured per-token acceptance (pilot): $A"
opt "$A" "$SP" "$O/plan-spec.json"
opt "$A" flexgen "$O/plan-flexgen.json"
opt "$A" sequential "$O/plan-sequential.json"
for i in $(seq 1 "$N"); do
  for p in sequential flexgen spec spec-a0.7; do
    run "$O/plan-$p.json" "$O/rep-$p-$i.json"
  done
  echo "== round $i done (load $(cut -d' ' -f1-3 /proc/loadavg))"
done
$S table --run "sequential=$O/rep-sequential-*.json" --run "flexgen=$O/rep-flexgen-*.json" \
  --run "$SP=$O/rep-spec-[0-9]*.json" --run "$SP, planned for acceptance 0.7=$O/rep-spec-a0.7-*.json" \
  --tokenizer "$T" --json "$O/table.json" | tee "$O/table.md"

#!/usr/bin/env bash
# Calibrates a hardware profile of this machine for rmoe_plan and checks its predictions
# against measured training steps (docs/scaling.md, "Validation").
#
#   tools/plan_validate.sh [OUT_DIR]        (default runs/plan_validate)
#
# 1. Calibration: rmoe_bench matmul (one thread), rmoe_bench alltoall (2 ranks, two sizes)
#    and rmoe_bench step of small models (configs/tiny_test.pbtxt resized): five of one rank
#    on one thread (products, element-wise work and the optimizer's traffic, operator
#    overhead, runtime memory), two on
#    both cores (thread speed-up) and four of 2 and 4 ranks (their computation on cores of
#    their own and shared, the waiting in collectives); each
#    step run's peak RSS per rank recorded by /usr/bin/time (and as "peak_rss_bytes", the
#    largest over ranks, where rmoe_bench does not report it itself); `rmoe_plan --calibrate` fits OUT_DIR/this_cpu.pbtxt.
# 2. Validation on another model, configs/quickstart.pbtxt at 8 x 128 tokens per rank: 1, 2
#    and 4 ranks (4 share the 2 cores of this machine: mpirun --oversubscribe) in every
#    EP x DP layout, with ZeRO-1 when this build's rmoe_bench knows
#    parallel.shard_optimizer_state and with runtime.recompute MOE and FULL when the
#    model implements it; each compared with `rmoe_plan --spec-only` on the calibrated
#    profile: step time (measured: the median step), communication, peak memory per rank.
#    The table goes to stdout and OUT_DIR/validation.md.
#
# Environment: RMOE_BUILD_DIR (default build/), PLAN_VALIDATE_STEPS (timed steps per run,
# default 10). Runs as root need OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# (set here). Takes about 6 minutes on 2 cores; timings on a machine doing other work
# are noisy (the load average is recorded; the script first waits for a quiet machine). On a
# shared build machine run it under the build lock so no build overlaps it:
#   flock /tmp/rmoe-build.lock tools/plan_validate.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${RMOE_BUILD_DIR:-$ROOT/build}
OUT=$(mkdir -p "${1:-$ROOT/runs/plan_validate}" && cd "${1:-$ROOT/runs/plan_validate}" && pwd)
BENCH=$BUILD/tools/rmoe_bench
PLAN=$BUILD/tools/rmoe_plan
STEPS=${PLAN_VALIDATE_STEPS:-10}
WARMUP=3
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
for program in "$BENCH" "$PLAN"; do
  [[ -x $program ]] || { echo "plan_validate: $program is missing: build it first" >&2; exit 2; }
done

# [THREADS=T] run_step NAME RANKS JOB [FIELD=VALUE]...: rmoe_bench step (T intra-op threads
# per rank, default the cores shared out), its JSON with peak_rss_bytes.
run_step() {
  local name=$1 ranks=$2 job=$3
  shift 3
  local sets=()
  for s in "$@"; do sets+=(--set "$s"); done
  rm -f "$OUT/$name".rss.*
  local cmd=("$BENCH" step --job "$job" "${sets[@]}" --steps "$STEPS" --warmup "$WARMUP" --json "$OUT/$name.json")
  [[ -n ${THREADS:-} ]] && cmd+=(--threads "$THREADS")
  echo "== $name: $ranks rank(s) ${*}" >&2
  if [[ $ranks == 1 ]]; then
    /usr/bin/time -f %M -o "$OUT/$name.rss.0" "${cmd[@]}" >"$OUT/$name.txt" 2>&1
  else
    mpirun --oversubscribe -np "$ranks" sh -c \
      'exec /usr/bin/time -f %M -o "$0.rss.$OMPI_COMM_WORLD_RANK" "$@"' "$OUT/$name" "${cmd[@]}" \
      >"$OUT/$name.txt" 2>&1
  fi
  python3 - "$OUT/$name" <<'EOF'
import glob, json, sys
base = sys.argv[1]
rss = [int(open(f).read().split()[-1]) * 1024 for f in glob.glob(base + ".rss.*")]
record = json.load(open(base + ".json"))
# rmoe_bench reports the same high-water mark (ru_maxrss, the largest rank) itself; older
# builds do not.
record["result"].setdefault("peak_rss_bytes", max(rss))
record["result"]["peak_rss_bytes_per_rank"] = rss
json.dump(record, open(base + ".json", "w"))
EOF
}

# Timings on 2 cores are only worth having on an otherwise idle machine: wait (up to
# PLAN_VALIDATE_QUIET_WAIT seconds, default 600) for the 1-minute load average to fall below 0.5.
waited=0
while (( waited < ${PLAN_VALIDATE_QUIET_WAIT:-600} )) &&
      awk '{ exit !($1 >= 0.5) }' /proc/loadavg; do
  sleep 10
  waited=$((waited + 10))
done
echo "plan_validate: load average at start: $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$OUT/load.txt" >&2

# ---- 1. calibration
"$BENCH" matmul --sizes 128,256,512 --dtypes fp32 --threads 1 --json "$OUT/cal_matmul.json" >"$OUT/cal_matmul.txt" 2>&1
for tokens in 256 4096; do
  mpirun --oversubscribe -np 2 "$BENCH" alltoall --tokens "$tokens" --d-model 128 \
    --json "$OUT/cal_alltoall_$tokens.json" >"$OUT/cal_alltoall_$tokens.txt" 2>&1
done
TINY=$ROOT/configs/tiny_test.pbtxt
CAL_A=(model.vocab_size=256 model.d_model=64 model.num_heads=4 model.moe.expert_hidden_dim=128)
CAL_B=(model.vocab_size=256 model.d_model=192 model.num_heads=4 model.moe.expert_hidden_dim=512
       schedule.micro_batch_size=8 schedule.seq_len=128 model.max_seq_len=128)
CAL_C=(model.vocab_size=256 model.d_model=96 model.num_heads=4 model.num_layers=4 model.moe.num_experts=8
       model.moe.expert_hidden_dim=192 schedule.micro_batch_size=8)
CAL_D=(model.vocab_size=2048 model.d_model=128 model.num_heads=4 model.moe.expert_hidden_dim=512)
# One rank, one thread: products, element-wise work, operator overhead.
THREADS=1 run_step calstep_a 1 "$TINY" "${CAL_A[@]}"
THREADS=1 run_step calstep_b 1 "$TINY" "${CAL_B[@]}"
THREADS=1 run_step calstep_c 1 "$TINY" "${CAL_C[@]}"
THREADS=1 run_step calstep_d 1 "$TINY" "${CAL_D[@]}"
# Many parameters, few tokens: the optimizer's memory traffic.
THREADS=1 run_step calstep_o 1 "$TINY" model.vocab_size=256 model.d_model=128 model.num_heads=4 \
  model.moe.num_experts=16 model.moe.expert_hidden_dim=2048 schedule.micro_batch_size=2
# One rank on both cores: the threads' speed-up.
run_step calstep_a2 1 "$TINY" "${CAL_A[@]}"
run_step calstep_d2 1 "$TINY" "${CAL_D[@]}"
# Several ranks: the waiting in collectives beyond alpha-beta, on cores of their own (2)
# and sharing them (4).
run_step calstep_e 2 "$TINY" "${CAL_C[@]}" parallel.expert_parallel_size=2
run_step calstep_g 2 "$TINY" "${CAL_C[@]}"
run_step calstep_f 4 "$TINY" "${CAL_C[@]}" parallel.expert_parallel_size=4
run_step calstep_h 4 "$TINY" "${CAL_C[@]}"
"$PLAN" --calibrate "$OUT"/cal_matmul.json "$OUT"/cal_alltoall_*.json "$OUT"/calstep_*.json \
  --out "$OUT/this_cpu.pbtxt" >"$OUT/calibrate.txt"

# ---- 2. validation
QS=$ROOT/configs/quickstart.pbtxt
QS_SETS=(model.vocab_size=2048 schedule.micro_batch_size=8 schedule.seq_len=128)
RUNS=()  # name ranks ep [FIELD=VALUE]...
RUNS+=("v1 1 1" "v2_ep1 2 1" "v2_ep2 2 2" "v4_ep1 4 1" "v4_ep2 4 2" "v4_ep4 4 4")
# Memory where the tensors, not the process, dominate: 4x the activations (micro-batch 32),
# and 51M parameters (16 experts of 2048: 0.8 GB of weights, gradients and moments per rank).
RUNS+=("m1_mb32 1 1 schedule.micro_batch_size=32")
BIG="model.moe.num_experts=16 model.moe.expert_hidden_dim=2048 schedule.micro_batch_size=2"
RUNS+=("m2_big 2 1 $BIG" "m2_big_ep2 2 2 $BIG")
if grep -aq shard_optimizer_state "$BENCH"; then
  RUNS+=("v2_ep1_zero1 2 1 parallel.shard_optimizer_state=true" "v4_ep2_zero1 4 2 parallel.shard_optimizer_state=true"
         "m2_big_zero1 2 1 $BIG parallel.shard_optimizer_state=true"
         "m2_big_ep2_zero1 2 2 $BIG parallel.shard_optimizer_state=true")
else
  echo "plan_validate: this rmoe_bench does not know parallel.shard_optimizer_state: no ZeRO-1 runs" | tee -a "$OUT/load.txt" >&2
fi
if grep -qi recompute "$ROOT"/rmoe/model/*.cc "$ROOT"/rmoe/train/*.cc 2>/dev/null &&
   grep -aq recompute "$BENCH"; then
  RUNS+=("v1_moe 1 1 runtime.recompute=MOE" "v1_full 1 1 runtime.recompute=FULL" "v2_ep2_moe 2 2 runtime.recompute=MOE"
         "m1_mb32_moe 1 1 schedule.micro_batch_size=32 runtime.recompute=MOE"
         "m1_mb32_full 1 1 schedule.micro_batch_size=32 runtime.recompute=FULL")
else
  echo "plan_validate: runtime.recompute is not implemented in this build: no recompute runs" | tee -a "$OUT/load.txt" >&2
fi
for run in "${RUNS[@]}"; do
  read -r name ranks ep extra <<<"$run"
  sets=("${QS_SETS[@]}" "parallel.expert_parallel_size=$ep")
  if [[ -n ${extra:-} ]]; then
    read -r -a extras <<<"$extra"
    sets+=("${extras[@]}")
  fi
  run_step "$name" "$ranks" "$QS" "${sets[@]}"
  plan_sets=()
  for s in "${sets[@]}"; do plan_sets+=(--set "$s"); done
  "$PLAN" --job "$QS" "${plan_sets[@]}" --gpus "$ranks" --ranks-per-node "$ranks" \
    --hardware "$OUT/this_cpu.pbtxt" --spec-only --json "$OUT/$name.plan.json" >"$OUT/$name.plan.txt"
done
echo "plan_validate: load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/load.txt" >&2

python3 - "$OUT" "${RUNS[@]}" <<'EOF' | tee "$OUT/validation.md"
import json, sys
out, runs = sys.argv[1], sys.argv[2:]
def pct(p, m): return f"{100 * (p - m) / m:+.0f}%"
ctx = json.load(open(f"{out}/v1.json"))["context"]
print(f"Setup: {ctx['cpu_model']}, {ctx['cores']} cores, torch {ctx['torch_version']}, BLAS {ctx['blas_core']} "
      f"({ctx['blas_config']}); threads per rank = 2 / ranks (1 rank: 2 threads; 4 ranks: 2 per core).")
print()
overhead = None
for line in open(f"{out}/this_cpu.pbtxt"):
    if line.startswith("runtime_overhead_bytes:"): overhead = float(line.split()[1])
print(f"Memory: peak RSS per rank (the largest over ranks) against the prediction, which includes the "
      f"calibrated runtime overhead of {overhead / 2**20:.0f} MiB (the process and libraries); "
      f"'above overhead' compares RSS minus that overhead with the predicted tensors alone.")
print()
print("| run | ranks | EP x DP | options | measured step ms (median) | predicted | error | measured comm ms | predicted comm + wait | peak RSS MiB | predicted | error | above overhead: measured / predicted MiB |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for run in runs:
    name, ranks, ep, *extra = run.split()
    m = json.load(open(f"{out}/{name}.json"))["result"]
    p = json.load(open(f"{out}/{name}.plan.json"))
    row = next(r for r in p["rows"] if r["expert_parallel_size"] == int(ep))
    comm = row["alltoall_s"] + row["allreduce_s"] + row["broadcast_s"] + row["wait_s"]
    step, rss = m["median_step_s"], m["peak_rss_bytes"]
    print(f"| {name} | {ranks} | {ep} x {int(ranks) // int(ep)} | {' '.join(extra) or '-'} | "
          f"{step * 1e3:.1f} | {row['step_s'] * 1e3:.1f} | {pct(row['step_s'], step)} | "
          f"{m['comm_s'] * 1e3:.1f} | {comm * 1e3:.1f} | {rss / 2**20:.0f} | "
          f"{row['memory_per_rank_bytes'] / 2**20:.0f} | {pct(row['memory_per_rank_bytes'], rss)} | "
          f"{(rss - overhead) / 2**20:.0f} / {(row['memory_per_rank_bytes'] - overhead) / 2**20:.0f} |")
EOF

#!/usr/bin/env bash
# Usage: tools/checkpoint_kill_trials.sh TRIALS [BUILD_DIR] [DATASET_DIR]
#
# Crash-consistency trials of checkpointing: each trial starts a run that saves a checkpoint
# every step (1 or 2 ranks, synchronous or background saves, alternating), kills every rank
# with SIGKILL at a random moment, then checks what is on disk:
#   - the checkpoint `latest` names (if any was committed) verifies (rmoe_ckpt verify), and
#   - rmoe_train --resume continues from it to the end, or, when nothing was committed yet,
#     a fresh run with --overwrite replaces the remains and completes.
# Prints one line per trial and the counts; exits non-zero if any trial failed.
# The dataset is the byte-level tiny one (built here with rmoe_prepare_data when absent).
set -u
trials=${1:?usage: checkpoint_kill_trials.sh TRIALS [BUILD_DIR] [DATASET_DIR]}
build=${2:-build}
root=$(cd "$(dirname "$0")/.." && pwd)
job="$root/configs/tiny_test.pbtxt"
work=$(mktemp -d /tmp/rmoe_kill_trials.XXXXXX)
dataset=${3:-$work/dataset}
train="$build/launcher/rmoe_train" ckpt="$build/tools/rmoe_ckpt"
trap 'pkill -9 -f "output_dir=$work/" 2>/dev/null; rm -rf "$work"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1

if [ ! -f "$dataset/meta.pbtxt" ]; then
  "$build/tools/rmoe_prepare_data" --job "$job" --set data.dataset_dir="$dataset" \
    --set data.raw_text="$root/data/raw/sotu" > "$work/prepare.log" 2>&1 ||
    { echo "cannot prepare the dataset: $(tail -3 "$work/prepare.log")"; exit 1; }
fi

# train OUT RANKS ASYNC LOG [ARG]...: rmoe_train in the background; $pid is its process.
train() {
  local out=$1 ranks=$2 async=$3 log=$4
  shift 4
  local cmd=("$train" --job "$job" --set data.dataset_dir="$dataset" --set output_dir="$out"
             --set checkpoint.interval=1 --set checkpoint.keep_last=2
             --set checkpoint.async_save="$async" --set schedule.eval_interval=0
             --set schedule.warmup_steps=1
             --set runtime.num_threads=1 --quiet "$@")
  if [ "$ranks" -gt 1 ]; then
    mpirun -np "$ranks" --oversubscribe "${cmd[@]}" > "$log" 2>&1 &
  else
    "${cmd[@]}" > "$log" 2>&1 &
  fi
  pid=$!
}

resumable=0 fresh=0 failed=0
for trial in $(seq 1 "$trials"); do
  ranks=$(( (trial - 1) % 2 + 1 ))
  async=$([ $(( (trial - 1) / 2 % 2 )) -eq 1 ] && echo true || echo false)
  out="$work/t$trial"
  train "$out" "$ranks" "$async" "$work/t$trial.log" --set schedule.steps=100000
  # 1 to 6 s: start-up takes about 1 s, then a step and a save every few tens of ms.
  delay=$(awk -v r=$RANDOM 'BEGIN { printf "%.2f", 1 + 5 * r / 32768 }')
  sleep "$delay"
  pkill -9 -f "output_dir=$out" 2>/dev/null
  wait "$pid" 2>/dev/null
  verdict=""
  if [ -f "$out/checkpoints/latest" ]; then
    step=$(sed 's/step_0*//' "$out/checkpoints/latest")
    if ! "$ckpt" verify "$out/checkpoints" > "$work/verify$trial.log" 2>&1; then
      verdict="FAIL: latest (step $step) does not verify: $(tail -1 "$work/verify$trial.log")"
    else
      train "$out" "$ranks" "$async" "$work/resume$trial.log" --set schedule.steps=$((step + 2)) --resume
      if wait "$pid"; then
        verdict="resumed from step $step"
        resumable=$((resumable + 1))
      else
        verdict="FAIL: resume from step $step failed: $(tail -2 "$work/resume$trial.log" | tr '\n' ' ')"
      fi
    fi
  else
    train "$out" "$ranks" "$async" "$work/fresh$trial.log" --set schedule.steps=2 --overwrite
    if wait "$pid"; then
      verdict="killed before the first commit; a fresh run replaced the remains"
      fresh=$((fresh + 1))
    else
      verdict="FAIL: fresh run failed: $(tail -2 "$work/fresh$trial.log" | tr '\n' ' ')"
    fi
  fi
  case "$verdict" in FAIL*) failed=$((failed + 1)) ;; esac
  printf 'trial %2d: %d rank(s), async_save=%-5s killed after %s s: %s\n' \
    "$trial" "$ranks" "$async" "$delay" "$verdict"
  rm -rf "$out"
done
echo "checkpoint kill trials: $trials trials, $resumable resumed from their latest checkpoint," \
     "$fresh killed before any commit (fresh run fine), $failed failed"
[ "$failed" -eq 0 ]

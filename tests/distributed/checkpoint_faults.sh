#!/bin/sh
# Usage: checkpoint_faults.sh CASE MPIEXEC RMOE_TRAIN RMOE_CKPT JOB DATASET
# End-to-end fault tests of checkpointing with 2 ranks (expert_parallel_size 2):
#   sigterm   SIGTERM to the job: it finishes the step in hand, saves, exits 0; --resume
#             continues from that step.
#   kill9     a rank killed with SIGKILL while a save waits to commit: the previous committed
#             checkpoint stays intact and is what --resume picks; the partial one is reported.
#   flipbyte  one flipped byte in a shard: verify and --resume refuse it, naming the file and
#             the tensor.
set -u
case_name=$1 mpiexec=$2 train=$3 ckpt=$4 job=$5 dataset=$6
out=$(mktemp -d)
trap 'pkill -9 -f "output_dir=$out/" 2>/dev/null; rm -rf "$out"' EXIT
fail() { echo "checkpoint_faults $case_name: FAIL: $*"; echo "--- log:"; cat "$out"/*.log 2>/dev/null | tail -20; exit 1; }
run() {  # run LOG [ARG]...: the 2-rank job in the background; $job_pid is mpiexec's pid
  log=$1; shift
  "$mpiexec" -n 2 --oversubscribe "$train" --job "$job" --set data.dataset_dir="$dataset" \
    --set output_dir="$out/run" --set parallel.expert_parallel_size=2 \
    --set logging.interval=1 --set schedule.eval_interval=0 --set schedule.warmup_steps=1 \
    --quiet "$@" > "$out/$log" 2>&1 &
  job_pid=$!
}
wait_for() {  # wait_for SECONDS TEST-EXPRESSION...
  limit=$1; shift; waited=0
  until "$@"; do
    sleep 0.2; waited=$((waited + 1))
    [ $waited -gt $((limit * 5)) ] && return 1
  done
  return 0
}
last_step() { grep -o '"type":"train","step":[0-9]*' "$out/run/metrics.jsonl" | tail -1 | grep -o '[0-9]*$'; }

case "$case_name" in
sigterm)
  run first.log --set schedule.steps=100000
  # The first record describes the host; a train record means steps are running.
  wait_for 60 grep -qs '"type":"train"' "$out/run/metrics.jsonl" || fail "training never started"
  # As a scheduler preempting the job does (SLURM signals every task): SIGTERM to the ranks.
  kill -TERM $(pgrep -P $job_pid)
  wait $job_pid; rc=$?
  [ $rc -eq 0 ] || fail "exit status $rc after SIGTERM, expected 0"
  grep -q "stopped by a signal after step" "$out/first.log" || fail "no stop message"
  [ -f "$out/run/checkpoints/latest" ] || fail "no checkpoint written"
  stopped=$(last_step)
  "$ckpt" verify "$out/run/checkpoints" > "$out/verify.log" 2>&1 || fail "the checkpoint does not verify"
  run resume.log --set schedule.steps=$((stopped + 3)) --resume
  wait $job_pid || fail "resume failed"
  [ "$(last_step)" -eq $((stopped + 3)) ] || fail "resume did not continue from step $stopped"
  echo "checkpoint_faults sigterm: PASS: stopped at step $stopped, saved, resumed to $((stopped + 3))"
  ;;
kill9)
  # Checkpoint every 2 steps; the save of step 4 pauses before committing and a rank dies.
  run first.log --set schedule.steps=100000 --set checkpoint.interval=2 \
    --test-pause-before-commit 30
  wait_for 90 test -f "$out/run/checkpoints/step_00000004/manifest.pb" || fail "no second save"
  [ -f "$out/run/checkpoints/step_00000004/COMMITTED" ] && fail "the paused save committed"
  victim=$(pgrep -P $job_pid | tail -1)
  kill -9 "$victim"
  wait $job_pid; rc=$?
  [ $rc -ne 0 ] || fail "the job exited 0 after a rank was killed"
  [ "$(cat "$out/run/checkpoints/latest")" = "step_00000002" ] || fail "latest moved: $(cat "$out/run/checkpoints/latest")"
  "$ckpt" verify "$out/run/checkpoints/step_00000002" > "$out/verify.log" 2>&1 || fail "step 2 is damaged"
  run resume.log --set schedule.steps=5 --set checkpoint.interval=0 --resume
  wait $job_pid || fail "resume failed"
  grep -q "ignoring .*step_00000004: not committed" "$out/resume.log" || fail "the partial save was not reported"
  grep -q "resuming from .*step_00000002" "$out/resume.log" || fail "did not resume from step 2"
  echo "checkpoint_faults kill9: PASS: rank killed during the step-4 save; resumed from step 2"
  ;;
flipbyte)
  run first.log --set schedule.steps=2 --set checkpoint.interval=2
  wait $job_pid || fail "training failed"
  shard="$out/run/checkpoints/step_00000002/shard_00001.bin"
  [ -s "$shard" ] || fail "no shard file $shard"
  size=$(stat -c %s "$shard")
  byte=$(od -An -tu1 -j $((size / 2)) -N1 "$shard" | tr -d ' ')
  printf "$(printf '\\%03o' $(( (byte + 1) % 256 )))" | dd of="$shard" bs=1 seek=$((size / 2)) conv=notrunc 2>/dev/null
  "$ckpt" verify "$out/run/checkpoints" > "$out/verify.log" 2>&1 && fail "verify accepted a flipped byte"
  grep -q "shard_00001.bin" "$out/verify.log" || fail "verify did not name the file"
  run resume.log --set schedule.steps=4 --resume
  wait $job_pid && fail "resume accepted a flipped byte"
  grep -q "shard_00001.bin" "$out/resume.log" || fail "resume did not name the file"
  grep -q "model/\|optimizer/" "$out/resume.log" || fail "resume did not name the tensor"
  echo "checkpoint_faults flipbyte: PASS: $(grep -o 'shard_00001.bin[^"]*' "$out/verify.log" | head -1)"
  ;;
*) echo "unknown case $case_name"; exit 2 ;;
esac

#!/bin/sh
# Usage: kill_rank_during_training.sh SECONDS MPIEXEC NP RMOE_TRAIN JOB [ARG]...
# Starts a multi-rank training job, waits until it is training (its metrics file has a
# train record), kills one non-zero rank with SIGKILL, and passes only if the whole job then ends
# with a non-zero status within SECONDS (no rank left hanging in a collective).
set -u
limit=$1 mpiexec=$2 np=$3 train=$4
shift 4
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$mpiexec" -n "$np" --oversubscribe "$train" "$@" --set output_dir="$out/run" \
  --set schedule.steps=100000 --set logging.interval=1 --quiet > "$out/log" 2>&1 &
job=$!
waited=0
until grep -q '"type":"train"' "$out/run/metrics.jsonl" 2>/dev/null; do
  sleep 0.2
  waited=$((waited + 1))
  if [ $waited -gt 300 ] || ! kill -0 $job 2>/dev/null; then
    echo "kill_rank: FAIL: the job never started training"; cat "$out/log"; exit 1
  fi
done
# The ranks are the rmoe_train processes writing under our private output_dir; rank 0 is
# the one that created the metrics file first, so kill the most recently started one.
victim=$(pgrep -n -f "output_dir=$out/run")
kill -9 "$victim"
start=$(date +%s)
while kill -0 $job 2>/dev/null; do
  if [ $(( $(date +%s) - start )) -ge "$limit" ]; then
    echo "kill_rank: FAIL: job still running ${limit} s after rank pid $victim was killed"
    pkill -9 -f "output_dir=$out/run"; kill -9 $job; exit 1
  fi
  sleep 0.2
done
wait $job
rc=$?
elapsed=$(( $(date +%s) - start ))
cat "$out/log" | grep -v '^ *$' | tail -5
if [ $rc -eq 0 ]; then echo "kill_rank: FAIL: the job exited 0 after a rank was killed"; exit 1; fi
echo "kill_rank: PASS: exit status $rc ${elapsed} s after pid $victim was killed"

#!/usr/bin/env bash
# Usage: multinode_test.sh CASE BUILD_DIR JOB DATASET
# End-to-end tests across the nodes of the test cluster (tools/testcluster.sh, brought up by
# the multinode.cluster_up fixture with 2 nodes): every byte between nodes crosses TCP over
# veth links and a bridge. Exits 77 (skipped) when no cluster could be made here.
#   equivalence_2x2   EP 2 x DP 2 on 2 nodes x 2 ranks trains the losses of one rank
#   equivalence_2x1   EP 2 on 2 nodes x 1 rank, the same
#   layout            ranks numbered round-robin over the nodes: the header names the hosts,
#                     each expert-parallel group is placed inside one node
#   shared_checkpoint save on 2 nodes x 2 ranks into the shared directory, resume on 2 nodes
#                     x 1 rank (resharded; the expert-parallel group then spans the nodes,
#                     which is warned about)
#   local_checkpoint  a checkpoint directory each node sees on its own disk: the first save,
#                     and a resume from a checkpoint one node has, stop with an error naming
#                     the directory and the hosts
#   node_lost_link    node2's link goes down mid-run: the job ends non-zero within the
#                     deadline plus seconds (mpirun included), naming the lost rank and host;
#                     the last checkpoint resumes on node1 alone
#   node_lost_kill    every process on node2 is killed mid-run: the same
#   bad_network       20 ms latency and 1% loss on node2's link: the same losses as on a clean
#                     link, and no false deadline
set -uo pipefail
case_name=$1 build=$2 job=$3 dataset=$4
source_dir=$(cd "$(dirname "$0")/../.." && pwd)
cluster=$source_dir/tools/testcluster.sh
train=$build/launcher/rmoe_train
ep_tests=$build/tests/distributed/rmoe_ep_tests

if ! "$cluster" status > /dev/null 2>&1; then
  echo "multinode $case_name: SKIP: no test cluster is up (network namespaces are not permitted here?)"
  exit 77
fi
out=$(mktemp -d /tmp/rmoe-multinode.XXXXXX)
cleanup() {
  "$cluster" shape 2 > /dev/null 2>&1
  "$cluster" link 2 up > /dev/null 2>&1
  pkill -9 -f "output_dir=$out/" 2> /dev/null
  rm -rf "$out"
}
trap cleanup EXIT
fail() {
  echo "multinode $case_name: FAIL: $*"
  for log in "$out"/*.log; do [[ -f $log ]] && { echo "--- $log"; tail -25 "$log"; }; done
  exit 1
}
pass() { echo "multinode $case_name: PASS: $*"; exit 0; }

export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# rmoe_train on the cluster: train LOG PER_NODE NP [mpirun args --] [rmoe_train args]
train() {
  local log=$1 per_node=$2 np=$3
  shift 3
  local mpirun_args=()
  if [[ ${1:-} == --map-by ]]; then mpirun_args=("$1" "$2"); shift 2; fi
  "$cluster" mpirun --per-node "$per_node" -np "$np" "${mpirun_args[@]}" "$train" --job "$job" \
    --set data.dataset_dir="$dataset" --set logging.interval=1 --set schedule.eval_interval=0 \
    --set schedule.warmup_steps=1 "$@" > "$out/$log" 2>&1
}
train_losses() { grep -o '"type":"train","step":[0-9]*,[^}]*"loss":[0-9.e+-]*' "$1" | sed 's/.*"step":\([0-9]*\),.*"loss":/\1 /'; }
last_step() { grep -o '"type":"train","step":[0-9]*' "$1" | tail -1 | grep -o '[0-9]*$'; }
wait_for() {  # wait_for SECONDS COMMAND...
  local limit=$1 waited=0
  shift
  until "$@"; do
    sleep 0.2
    waited=$((waited + 1))
    ((waited > limit * 5)) && return 1
  done
  return 0
}

# A node lost mid-run: start 2 nodes x 1 rank, wait for a committed checkpoint, then $1.
node_lost() {
  local how=$1 deadline=5
  "$cluster" mpirun --per-node 1 -np 2 "$train" --job "$job" --set data.dataset_dir="$dataset" \
    --set output_dir="$out/run" --set parallel.expert_parallel_size=2 \
    --set schedule.steps=100000 --set checkpoint.interval=5 --set logging.interval=1 \
    --set schedule.eval_interval=0 --set schedule.warmup_steps=1 \
    --set runtime.collective_timeout_seconds=$deadline \
    --quiet > "$out/lost.log" 2>&1 &
  local job_pid=$!
  wait_for 120 test -f "$out/run/checkpoints/step_00000005/COMMITTED" || fail "no checkpoint was committed"
  local start=$SECONDS
  if [[ $how == link ]]; then "$cluster" link 2 down; else "$cluster" kill 2 KILL; fi
  # The deadline and the watchdog's inquiry grace (deadline / 2), then mpirun's keepalive
  # (about 11 s) or tools/rmoe_mpirun.sh's end of an aborted job (10 s) bound the time.
  local limit=$((deadline + 20))
  while kill -0 $job_pid 2> /dev/null; do
    if ((SECONDS - start > limit)); then
      kill -9 $job_pid
      fail "the job was still running $limit s after node2 was lost (mpirun hung)"
    fi
    sleep 0.2
  done
  wait $job_pid
  local rc=$? elapsed=$((SECONDS - start))
  ((rc != 0)) || fail "the job exited 0 after node2 was lost"
  "$cluster" link 2 up
  if [[ $how == link ]]; then
    grep -q "world rank 1 on node2) did not answer" "$out/lost.log" ||
      fail "no report naming rank 1 on node2"
  fi
  # Resume on the surviving node alone: one rank, the experts resharded from EP 2.
  local saved
  saved=$(cat "$out/run/checkpoints/latest")
  "$cluster" exec 1 "$train" --job "$job" --set data.dataset_dir="$dataset" \
    --set output_dir="$out/run" --set schedule.steps=$((10#${saved#step_} + 3)) \
    --set logging.interval=1 --set schedule.eval_interval=0 --set schedule.warmup_steps=1 \
    --resume --quiet > "$out/resume.log" 2>&1 ||
    fail "resuming on node1 alone failed"
  grep -q "resuming from .*$saved" "$out/resume.log" || fail "did not resume from $saved"
  pass "exit status $rc ${elapsed} s after node2 was lost ($how); resumed $saved on node1 alone to step $(last_step "$out/run/metrics.jsonl")"
}

# The expert-parallel equivalence tests (EP 2 against one rank) on 2 nodes x $1 ranks.
equivalence() {
  local per_node=$1 np=$((2 * $1)) noun=rank
  ((per_node > 1)) && noun=ranks
  "$cluster" mpirun --per-node "$per_node" -np "$np" "$ep_tests" \
    --gtest_filter='*EP2*:ExpertParallelDispatcher.*:RoutingStatistics.*' > "$out/ep.log" 2>&1 ||
    fail "the equivalence tests failed over TCP"
  grep -q "all $np rank(s) passed" "$out/ep.log" || fail "not every rank passed"
  pass "$(grep -c '\[       OK \]' "$out/ep.log") tests passed on 2 nodes x $per_node $noun"
}

case "$case_name" in
equivalence_2x2) equivalence 2 ;;
equivalence_2x1) equivalence 1 ;;
layout)
  train layout.log 2 4 --map-by node --set output_dir="$out/run" \
    --set parallel.expert_parallel_size=2 --set schedule.steps=3 || fail "training failed"
  grep -q "layout: 4 ranks on 2 nodes: node1 ranks 0, 2, node2 ranks 1, 3" "$out/layout.log" ||
    fail "the header does not show ranks 0, 2 on node1 and 1, 3 on node2"
  grep -q "group 0 ranks 0, 2 on node1, group 1 ranks 1, 3 on node2" "$out/layout.log" ||
    fail "the expert-parallel groups are not placed inside the nodes"
  grep -q "span.* nodes" "$out/layout.log" && fail "a spanning warning for groups inside nodes"
  pass "$(grep '^layout:' "$out/layout.log" | tr '\n' ';')"
  ;;
shared_checkpoint)
  train save.log 2 4 --set output_dir="$out/run" --set parallel.expert_parallel_size=2 \
    --set schedule.steps=6 --set checkpoint.interval=6 || fail "training on 2 x 2 failed"
  test -f "$out/run/checkpoints/step_00000006/COMMITTED" || fail "no committed checkpoint"
  "$build/tools/rmoe_ckpt" verify "$out/run/checkpoints" > "$out/verify.log" 2>&1 ||
    fail "the checkpoint written from two nodes does not verify"
  train resume.log 1 2 --set output_dir="$out/run" --set parallel.expert_parallel_size=2 \
    --set schedule.steps=9 --resume || fail "resuming on 2 x 1 failed"
  grep -q "resuming from .*step_00000006" "$out/resume.log" || fail "did not resume from step 6"
  [[ $(last_step "$out/run/metrics.jsonl") == 9 ]] || fail "did not train to step 9"
  grep -q "warning: expert-parallel group 0 (node1+node2) spans nodes" "$out/resume.log" ||
    fail "no warning that the expert-parallel group spans the nodes"
  pass "saved by 2 nodes x 2 ranks, verified, resumed on 2 nodes x 1 rank to step 9"
  ;;
local_checkpoint)
  private=$(cat "${RMOE_TESTCLUSTER_STATE:-/run/rmoe-testcluster}/private_dir")
  [[ -n $private ]] || fail "the cluster has no node-local directory (up --private-dir)"
  run_dir=$private/run-$$
  train local.log 1 2 --set output_dir="$run_dir" --set parallel.expert_parallel_size=2 \
    --set schedule.steps=4 --set checkpoint.interval=2 && fail "training with node-local checkpoints succeeded"
  grep -q "the checkpoint directory $run_dir/checkpoints is not shared between nodes: rank 1 on node2 does not see the file rank 0 on node1 wrote" \
    "$out/local.log" || fail "no error naming the directory and the hosts"
  "$cluster" exec 1 test -e "$run_dir/checkpoints/step_00000002" &&
    fail "a checkpoint was written on node1 before the error"
  # A checkpoint that only node1 has (saved by one rank there): resuming it on both nodes
  # stops with the same error before anything is read, on every rank alike.
  "$cluster" exec 1 "$train" --job "$job" --set data.dataset_dir="$dataset" --set output_dir="$run_dir" \
    --set schedule.steps=2 --set checkpoint.interval=2 --set schedule.warmup_steps=1 \
    --set schedule.eval_interval=0 --overwrite --quiet > "$out/node1.log" 2>&1 || fail "training on node1 alone failed"
  train resume.log 1 2 --set output_dir="$run_dir" --set parallel.expert_parallel_size=2 \
    --set schedule.steps=4 --resume && fail "resuming a checkpoint only node1 has succeeded"
  grep -q "the checkpoint directory $run_dir/checkpoints is not shared between nodes: rank 1 on node2 does not see" \
    "$out/resume.log" || fail "resuming did not name the directory and the hosts"
  "$cluster" exec 1 rm -rf "$run_dir"
  "$cluster" exec 2 rm -rf "$run_dir"
  pass "$(grep -o 'is not shared between nodes: [^.]*' "$out/local.log" | head -1)"
  ;;
node_lost_link) node_lost link ;;
node_lost_kill) node_lost kill ;;
bad_network)
  start=$SECONDS
  train clean.log 1 2 --set output_dir="$out/clean" --set parallel.expert_parallel_size=2 \
    --set schedule.steps=30 || fail "training on a clean link failed"
  clean_seconds=$((SECONDS - start))
  "$cluster" shape 2 --delay 20ms --loss 1% || fail "cannot shape node2's link"
  start=$SECONDS
  # The default deadline (runtime.collective_timeout_seconds: 300 s).
  train shaped.log 1 2 --set output_dir="$out/shaped" --set parallel.expert_parallel_size=2 \
    --set schedule.steps=30 || fail "training over 20 ms + 1% loss failed"
  shaped_seconds=$((SECONDS - start))
  "$cluster" shape 2
  grep -q "did not complete within" "$out/shaped.log" && fail "the watchdog fired"
  # Every collective waits at least 2 x 20 ms: the impairment was there.
  ((shaped_seconds >= clean_seconds + 5)) ||
    fail "the shaped run took ${shaped_seconds} s, the clean one ${clean_seconds} s: was the link shaped?"
  clean=$(train_losses "$out/clean/metrics.jsonl")
  shaped=$(train_losses "$out/shaped/metrics.jsonl")
  [[ -n $clean && $clean == "$shaped" ]] || fail "the losses differ: clean [$clean] shaped [$shaped]"
  pass "30 steps in ${shaped_seconds} s over 20 ms + 1% loss (${clean_seconds} s clean), the same losses"
  ;;
*) echo "unknown case $case_name"; exit 2 ;;
esac

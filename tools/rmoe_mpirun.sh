#!/usr/bin/env bash
# mpirun as a multi-node RMoE job needs it; arguments go to mpirun unchanged:
#
#   tools/rmoe_mpirun.sh --hostfile HOSTS -np 16 build/launcher/rmoe_train --job JOB.pbtxt
#
# It makes sure that a job which lost a node ends, mpirun included, with a non-zero status,
# instead of hanging. Two things do that (docs/multinode.md):
#
# 1. TCP keepalives between mpirun and its daemons on the other nodes (each added only when
#    the command line or the environment does not set it):
#      --mca oob_tcp_keepalive_time 5 --mca oob_tcp_keepalive_intvl 2
#      --mca oob_tcp_keepalive_probes 3
#    Open MPI's defaults (300 s idle, then 9 probes 20 s apart) notice a node whose network
#    is gone after 8 minutes; these after about 11 s, when mpirun reports "ORTE has lost
#    communication with a remote daemon ... on node NAME" and ends the job. The kernel
#    answers keepalives, not the processes, so a busy or slow rank never trips them.
# 2. An end to an aborted job: once a rank calls MPI_Abort (rmoe's collective watchdog does,
#    naming the ranks and hosts that did not answer), mpirun kills the job's processes on
#    every node and waits until each node's daemon confirms. A daemon that cannot be reached
#    never confirms, and keepalives do not help while that message is unacknowledged, so
#    mpirun waited for ever. Here, if mpirun is still running RMOE_MPIRUN_ABORT_GRACE
#    seconds (default 10) after its standard error said the job is ending (an abort, a
#    failed or lost process, the watchdog's report), it is killed and this script exits 1;
#    the daemons and ranks on the nodes that can be reached end when mpirun is gone.
#
# Signals (SIGTERM, SIGINT, SIGUSR1, SIGUSR2) are passed on to mpirun, which passes them to
# the ranks. The exit status is mpirun's (1 when this script had to end it).
# Environment: RMOE_MPIRUN (default: mpirun) is the mpirun to run.
set -uo pipefail

readonly MPIRUN=${RMOE_MPIRUN:-mpirun}
readonly ABORT_GRACE=${RMOE_MPIRUN_ABORT_GRACE:-10}
[[ $ABORT_GRACE =~ ^[0-9]+$ ]] ||
  { echo "rmoe_mpirun: RMOE_MPIRUN_ABORT_GRACE must be a number of seconds, got '$ABORT_GRACE'" >&2; exit 2; }

user_args=("$@")
defaults=()
# --mca NAME VALUE unless the command line or the environment (OMPI_MCA_NAME) sets NAME.
add_default() {
  local name=$1 value=$2 env_name=OMPI_MCA_$1 arg
  for arg in "${user_args[@]}"; do
    [[ $arg == "$name" ]] && return 0
  done
  [[ -n ${!env_name:-} ]] && return 0
  defaults+=(--mca "$name" "$value")
}
add_default oob_tcp_keepalive_time 5
add_default oob_tcp_keepalive_intvl 2
add_default oob_tcp_keepalive_probes 3

# mpirun's standard error passes through a watcher, which looks for the abort. The watcher
# stops with mpirun, not at the end of the stream: a launch agent (ssh) that mpirun started
# may keep the stream open after mpirun has gone.
ended_by_us=$(mktemp "${TMPDIR:-/tmp}/rmoe_mpirun.XXXXXX")
errors=$ended_by_us.stderr
trap 'rm -f "$ended_by_us" "$errors"' EXIT
mkfifo -m 600 "$errors" || { echo "rmoe_mpirun: cannot make a FIFO in ${TMPDIR:-/tmp}" >&2; exit 2; }
"$MPIRUN" "${defaults[@]}" "$@" 2> "$errors" &
mpirun_pid=$!

end_after_grace() {
  local waited
  for ((waited = 0; waited < ABORT_GRACE * 5; waited++)); do
    kill -0 "$mpirun_pid" 2> /dev/null || return 0
    sleep 0.2
  done
  echo "rmoe_mpirun: mpirun was still running ${ABORT_GRACE} s after the job was aborted" \
    "(a node cannot be reached); ending it" >&2
  echo yes > "$ended_by_us"
  kill -KILL "$mpirun_pid" 2> /dev/null
}
# Whether a line of mpirun's standard error says the job is ending abnormally: Open MPI's
# abort and failure reports, or rmoe's collective watchdog (a report of Open MPI's can
# arrive garbled: "Data unpack would read past end of buffer" instead of its text).
ending() {
  case $1 in
    *"MPI_ABORT was invoked"* | *"Aborting the job"* | *"ORTE has lost communication"* | \
      *"mpirun noticed that process"* | *"ORTE_ERROR_LOG"* | *"terminated normally, but"*) return 0 ;;
  esac
  return 1
}
watch_errors() {
  local line guard_started="" timeout=0.5
  while true; do
    if IFS= read -r -t "$timeout" line; then
      printf '%s\n' "$line" >&2
      if [[ -z $guard_started ]] && ending "$line"; then
        guard_started=yes
        end_after_grace &
      fi
    elif (($? <= 128)); then
      [[ -n $line ]] && printf '%s' "$line" >&2  # the end of the stream
      return 0
    else
      [[ -n $line ]] && printf '%s' "$line" >&2  # a line in the making (read gives it up)
      kill -0 "$mpirun_pid" 2> /dev/null && continue
      # mpirun has gone: take what is left, without waiting for the stream to close.
      [[ $timeout == 0.1 ]] && return 0
      timeout=0.1
    fi
  done
}
watch_errors < "$errors" &
watcher_pid=$!
for signal in TERM INT USR1 USR2; do
  trap "kill -$signal $mpirun_pid 2> /dev/null" "$signal"
done

# A signal interrupts `wait`; wait again until mpirun has really ended.
while true; do
  wait "$mpirun_pid"
  status=$?
  kill -0 "$mpirun_pid" 2> /dev/null || break
done
# What mpirun wrote last reaches the terminal before this script ends.
wait "$watcher_pid" 2> /dev/null
if [[ -s $ended_by_us ]]; then exit 1; fi
exit "$status"

#!/bin/sh
# Usage: expect_failure.sh SECONDS COMMAND [ARG]...
# Runs COMMAND and passes (exit 0, printing "expect_failure: PASS") only if it exits with a
# non-zero status within SECONDS. A command still running after SECONDS (a hang) is killed
# and fails the check, as does a zero exit status.
limit=$1
shift
start=$(date +%s%N)
timeout --kill-after=5 "$limit" "$@"
rc=$?
elapsed_ms=$(( ($(date +%s%N) - start) / 1000000 ))
seconds="$((elapsed_ms / 1000)).$(printf '%03d' $((elapsed_ms % 1000)))"
# timeout(1) exits 124 (137 after SIGKILL) when it had to stop the command; the command's own
# status could be 124 too, so the elapsed time decides.
if { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && [ "$elapsed_ms" -ge $((limit * 1000)) ]; then
  echo "expect_failure: FAIL: still running after ${limit} s (hang), killed"
  exit 1
fi
if [ "$rc" -eq 0 ]; then
  echo "expect_failure: FAIL: exit status 0 after ${seconds} s, expected a failure"
  exit 1
fi
echo "expect_failure: PASS: exit status $rc after ${seconds} s"
exit 0

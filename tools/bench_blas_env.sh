#!/usr/bin/env bash
# Usage: tools/bench_blas_env.sh [--rounds R] [--job SPEC] [--] [SETTING]...
#
# Is the default fast? Runs `rmoe_bench step` on a job (default configs/quickstart.pbtxt)
# with no BLAS/OpenMP variables set and with each SETTING (space-separated VAR=VALUE
# assignments in one argument), R rounds (default 3) interleaved so that a shared machine's
# drift hits every setting alike, and prints each setting's median tokens/s and its ratio to
# the default. Without SETTINGs it tries the variables that matter for the BLAS in use:
# OpenBLAS cores (OPENBLAS_CORETYPE) or MKL's instruction-set cap, and OpenMP's wait policy.
#
#   tools/bench_blas_env.sh
#   tools/bench_blas_env.sh --rounds 5 -- "OPENBLAS_CORETYPE=Haswell" "OMP_WAIT_POLICY=PASSIVE"
set -euo pipefail
cd "$(dirname "$0")/.."
bench=build/tools/rmoe_bench
rounds=3 job=configs/quickstart.pbtxt blas=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --job) job=$2; shift 2 ;;
    --help|-h) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[ -x "$bench" ] || { echo "bench_blas_env: $bench is not built (run tools/setup.sh)" >&2; exit 1; }
# The defaults must really be defaults: none of these may leak in from the caller.
unset OPENBLAS_CORETYPE MKL_ENABLE_INSTRUCTIONS MKL_DEBUG_CPU_TYPE OMP_WAIT_POLICY \
  GOMP_SPINCOUNT OMP_NUM_THREADS MKL_NUM_THREADS OPENBLAS_NUM_THREADS
settings=("(default)" "$@")
if [ $# -eq 0 ]; then
  blas=$("$bench" matmul --sizes 64 2>/dev/null | grep -o 'BLAS core: [^|]*' || true)
  case "$blas" in
    *MKL*) settings+=("MKL_ENABLE_INSTRUCTIONS=AVX2" "MKL_ENABLE_INSTRUCTIONS=AVX512") ;;
    *) settings+=("OPENBLAS_CORETYPE=Haswell" "OPENBLAS_CORETYPE=SkylakeX" "OPENBLAS_CORETYPE=Zen") ;;
  esac
  settings+=("OMP_WAIT_POLICY=PASSIVE" "OMP_WAIT_POLICY=ACTIVE")
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "$blas" | sed 's/^/# /'
for ((round = 0; round < rounds; ++round)); do
  for i in "${!settings[@]}"; do
    assignments=()
    [ "${settings[$i]}" = "(default)" ] || read -r -a assignments <<< "${settings[$i]}"
    env "${assignments[@]}" "$bench" step --job "$job" --steps 10 --warmup 2 \
      --json "$out/$i.$round.json" > /dev/null 2>&1 || echo "failed: ${settings[$i]}" >&2
    grep -o '"tokens_per_s":[0-9.e+]*' "$out/$i.$round.json" | cut -d: -f2 >> "$out/$i.txt"
  done
done
median() { sort -g "$1" | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
base=$(median "$out/0.txt")
printf '%-40s %12s %10s\n' "setting" "tokens/s" "x default"
for i in "${!settings[@]}"; do
  m=$(median "$out/$i.txt")
  printf '%-40s %12.0f %10.3f\n' "${settings[$i]}" "$m" "$(awk -v a="$m" -v b="$base" 'BEGIN {print a / b}')"
done

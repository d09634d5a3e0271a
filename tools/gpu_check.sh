#!/usr/bin/env bash
# One-shot GPU bring-up: proves, in one run of a few minutes, that rmoe trains on a CUDA
# machine, and measures it. Every step runs under `timeout`, writes its log to the output
# folder, and adds a line (PASS / FAIL / SKIP and its numbers) to <out>/summary.txt; a
# failed step does not stop the next ones.
#
# Usage:
#   tools/gpu_check.sh --bundle DIR [--also-build] [--out DIR]
#       binaries, Debian packages, data and CPU reference losses made by tools/gpu_bundle.sh;
#       --also-build then builds from source here too, timed, as the last step
#   tools/gpu_check.sh --build [--out DIR]
#       configure and build here against this machine's PyTorch (LibTorch, NCCL), then check
#   tools/gpu_check.sh --cpu --build-dir DIR [--out DIR]
#       the same steps on the CPU, GPU-only parts skipped: CTest runs this so it cannot rot
# Options: --budget SECONDS (540: the whole run), --peak-tflops T (989: H100/H200 bf16).
#
# Steps: probe (GPU, driver, torch, CUDA, NCCL, C++ ABI) -> the libraries the machine lacks
# (OpenMPI, protobuf, Abseil, GoogleTest from the bundle's Debian packages, relocated) ->
# binaries -> the CUDA unit tests -> the NCCL communicator tests on 1 rank and on 2 ranks of
# one GPU (a distinct NCCL_HOSTID per rank) -> 50 training steps on CUDA and on the CPU,
# whose losses must agree within 1e-3 relative (fp32), and resumed from the step-25
# checkpoint -> the same on 2 ranks with expert parallelism over NCCL -> rmoe_bench step on configs/rmoe_seed.pbtxt in bf16: tokens/s,
# peak memory, model FLOP utilisation against the datasheet peak and the measured products.
set -uo pipefail
set -a  # every variable set here is exported, for the steps' functions (export -f below)
cd "$(dirname "$0")/.."
ROOT=$(pwd)

MODE="" BUNDLE="" BUILD_DIR="" OUT="${OUT:-gpu_check_out}"
ALSO_BUILD=0
BUDGET=540       # seconds for the whole run: every step's limit is cut to what is left
PEAK_TFLOPS=989  # H100/H200 SXM dense bf16, from NVIDIA's datasheet
while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) MODE=bundle; BUNDLE=$(cd "$2" && pwd); shift 2 ;;
    --build) MODE=build; shift ;;
    --also-build) ALSO_BUILD=1; shift ;;
    --cpu) MODE=cpu; shift ;;
    --build-dir) BUILD_DIR=$(cd "$2" && pwd); shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --peak-tflops) PEAK_TFLOPS=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$MODE" ] || { echo "gpu_check: choose --bundle DIR, --build or --cpu (see --help)" >&2; exit 2; }
if [ "$MODE" = cpu ] && [ -z "$BUILD_DIR" ]; then
  echo "gpu_check: --cpu needs --build-dir (a configured and built tree)" >&2; exit 2
fi
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WORK="$OUT/work"
rm -rf "$WORK" && mkdir -p "$WORK"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
START=$(date +%s)
FAILED=0
DEVICE=cuda THREADS=4
[ "$MODE" = cpu ] && DEVICE=cpu THREADS=1

note() { echo "$*" | tee -a "$SUMMARY"; }
# step NAME SECONDS COMMAND...: runs COMMAND with its output in $OUT/NAME.log, for at most
# SECONDS and never past the run's budget.
step() {
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  local left=$(( START + BUDGET - t0 ))
  if [ "$left" -lt 5 ]; then
    note "SKIP $name: the run's ${BUDGET}s budget is spent"; FAILED=$((FAILED + 1)); return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  # timeout runs programs: a function of this script runs in a bash that inherits it.
  declare -F "$1" > /dev/null && set -- bash -c '"$@"' "$1" "$@"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$? t=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then
    note "PASS $name (${t}s)"
  else
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && note "FAIL $name: timed out after ${limit}s" \
                                       || note "FAIL $name: exit status $rc after ${t}s (see $name.log)"
    FAILED=$((FAILED + 1))
    tail -n 15 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
  fi
  return $rc
}
skip() { note "SKIP $1: $2"; }

PYTHON=python3
[ "$MODE" = cpu ] && [ -x .venv/bin/python ] && PYTHON=.venv/bin/python

# --- probe ------------------------------------------------------------------------------
probe() {
  date -u; uname -a; nproc; free -g | head -2
  command -v nvidia-smi > /dev/null && nvidia-smi || echo "nvidia-smi: not found"
  "$PYTHON" - <<'EOF'
import glob, os, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cxx11 abi", torch._C._GLIBCXX_USE_CXX11_ABI)
print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device 0:", p.name, round(p.total_memory / 2**30, 1), "GiB, sm", p.major, p.minor)
    print("nccl", torch.cuda.nccl.version(), "cudnn", torch.backends.cudnn.version())
print("cmake prefix", torch.utils.cmake_prefix_path)
print("torch lib", os.path.join(os.path.dirname(torch.__file__), "lib"))
site = os.path.dirname(os.path.dirname(torch.__file__))
print("nvidia libs", " ".join(sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib")))))
EOF
}
step probe 60 probe
TORCH_LIB=$(sed -n 's/^torch lib //p' "$OUT/probe.log")
NVIDIA_LIBS=$(sed -n 's/^nvidia libs //p' "$OUT/probe.log" | tr ' ' ':')
TORCH_PREFIX=$(sed -n 's/^cmake prefix //p' "$OUT/probe.log")
if [ "$MODE" != cpu ] && ! grep -q "^cuda available True" "$OUT/probe.log"; then
  note "FAIL probe: torch sees no CUDA device; the GPU steps below will fail"
  FAILED=$((FAILED + 1))
fi

# --- libraries the machine lacks --------------------------------------------------------
unpack_debs() {
  local debs=$1 root=$WORK/root
  mkdir -p "$root"
  for deb in "$debs"/*.deb; do dpkg -x "$deb" "$root" || return 1; done
  ls "$root/usr/bin" | head -50
}
MPIRUN=mpirun
if [ "$MODE" != cpu ] && ! command -v mpirun > /dev/null; then
  DEBS=${BUNDLE:+$BUNDLE/debs}
  [ -d "${DEBS:-/nonexistent}" ] || DEBS=$ROOT/gpu_bundle/debs
  if step unpack_debs 120 unpack_debs "$DEBS"; then
    R=$WORK/root/usr
    export OPAL_PREFIX=$R PATH=$R/bin:$PATH
    export LD_LIBRARY_PATH=$R/lib/x86_64-linux-gnu:$R/lib/x86_64-linux-gnu/openmpi/lib:${LD_LIBRARY_PATH:-}
    # PMIx looks for its plugins where Debian puts them.
    [ -e /usr/lib/x86_64-linux-gnu/pmix2 ] || ln -s "$R/lib/x86_64-linux-gnu/pmix2" \
      /usr/lib/x86_64-linux-gnu/pmix2 2> /dev/null || true
    MPIRUN=mpirun.openmpi
  fi
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,vader OMPI_MCA_btl_vader_single_copy_mechanism=none
export LD_LIBRARY_PATH=${TORCH_LIB:+$TORCH_LIB:}${NVIDIA_LIBS:+$NVIDIA_LIBS:}${LD_LIBRARY_PATH:-}

# --- binaries ---------------------------------------------------------------------------
build_here() {
  local nccl_root nvcc mpicxx protoc
  nccl_root=$("$PYTHON" -c 'import nvidia.nccl, os; print(list(nvidia.nccl.__path__)[0])' 2> /dev/null)
  nvcc=$(command -v nvcc || ls "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" /usr/local/cuda/bin/nvcc 2> /dev/null | head -1)
  mpicxx=$(command -v mpicxx.openmpi || command -v mpicxx)
  protoc=$(command -v protoc)
  echo "nvcc ${nvcc:-not found}; mpicxx ${mpicxx:-not found}; protoc ${protoc:-not found}; NCCL ${nccl_root:-not found}"
  cmake -S "$ROOT" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$TORCH_PREFIX;$WORK/root/usr" -DRMOE_WITH_NCCL=ON \
    ${nccl_root:+-DNCCL_ROOT="$nccl_root"} ${nvcc:+-DCMAKE_CUDA_COMPILER="$nvcc"} \
    ${mpicxx:+-DMPI_CXX_COMPILER="$mpicxx"} ${protoc:+-DProtobuf_PROTOC_EXECUTABLE="$protoc"} &&
  ninja -C "$WORK/build" -k 0 rmoe_train rmoe_bench rmoe_prepare_data rmoe_model_tests rmoe_nccl_tests
}
case "$MODE" in
  bundle) BIN=$BUNDLE/bin ;;
  cpu) BIN=$WORK/bin ;;
  build) BIN=$WORK/bin ;;
esac
if [ "$MODE" = build ]; then
  step build 420 build_here
fi
if [ "$MODE" != bundle ]; then
  # One folder of binaries, as the bundle has them.
  B=${BUILD_DIR:-$WORK/build}
  mkdir -p "$BIN"
  for f in launcher/rmoe_train tools/rmoe_bench tools/rmoe_prepare_data tests/rmoe_model_tests \
           tests/distributed/rmoe_nccl_tests; do
    [ -x "$B/$f" ] && ln -sf "$B/$f" "$BIN/"
  done
fi
step version 60 "$BIN/rmoe_train" --version

# --- unit tests: the device paths (Cuda* skip without a GPU) ----------------------------
step cuda_unit_tests 300 "$BIN/rmoe_model_tests" \
  --gtest_filter='Cuda*:Device.*:Clipping.*:FusedOps.*:RecurrentScan*' --gtest_brief=1
grep -h "PASSED\|SKIPPED \]\|FAILED \]" "$OUT/cuda_unit_tests.log" | head -8 | sed 's/^/    /' >> "$SUMMARY"

# --- NCCL on 1 rank and on 2 ranks of one GPU -------------------------------------------
if [ -x "$BIN/rmoe_nccl_tests" ]; then
  step nccl_np1 180 "$BIN/rmoe_nccl_tests"
  # One GPU, two ranks: NCCL refuses a duplicate GPU within one host, so each rank claims
  # its own host id, and they talk over sockets on the loopback.
  step nccl_np2 240 env NCCL_SOCKET_IFNAME=lo NCCL_IB_DISABLE=1 "$MPIRUN" -np 2 \
    sh -c 'NCCL_HOSTID=rmoe-rank-$OMPI_COMM_WORLD_RANK exec "$0" "$@"' "$BIN/rmoe_nccl_tests"
else
  skip nccl "no rmoe_nccl_tests (a build without NCCL)"
fi

# --- 50 training steps: the device against the CPU --------------------------------------
DATA=$WORK/data
# The first 40 addresses of the quick-start corpus (about 1.3 MB, byte tokens): far more
# than 50 steps read, and small enough to carry.
prepare() {
  tools/fetch_corpus.sh "$DATA/sotu" && mkdir -p "$DATA/raw" &&
  ls "$DATA/sotu"/*.txt | sort | head -40 | xargs -I{} cp {} "$DATA/raw/" && rm -rf "$DATA/sotu" &&
  "$BIN/rmoe_prepare_data" --job configs/tiny_test.pbtxt --set data.dataset_dir="$DATA/byte" \
    --set data.raw_text="$DATA/raw"
}
# The bundle carries the data and the CPU reference runs (made where CPU time is free).
REFERENCE=${BUNDLE:+$BUNDLE/cpu_check/work}
if [ -n "$REFERENCE" ] && [ -d "$REFERENCE/data/byte" ]; then
  cp -r "$REFERENCE/data" "$DATA" && note "DATA from the bundle"
else
  step prepare_data 120 prepare
fi
train() {  # train NAME DEVICE RANKS [--set ... | --resume DIR]: a fresh run unless --resume
  local name=$1 device=$2 ranks=$3; shift 3
  local launch=() fresh=(--overwrite)
  [ "$ranks" -gt 1 ] && launch=(env NCCL_SOCKET_IFNAME=lo NCCL_IB_DISABLE=1 "$MPIRUN" -np "$ranks"
                                sh -c 'NCCL_HOSTID=rmoe-rank-$OMPI_COMM_WORLD_RANK exec "$0" "$@"')
  case " $* " in *" --resume "*) fresh=() ;; esac
  "${launch[@]}" "$BIN/rmoe_train" --job configs/tiny_test.pbtxt "${fresh[@]}" \
    --set data.dataset_dir="$DATA/byte" --set output_dir="$WORK/$name" \
    --set schedule.steps=50 --set logging.interval=1 --set schedule.eval_interval=25 \
    --set checkpoint.interval=0 --set runtime.device="$device" --set runtime.num_threads="$THREADS" "$@"
}
# resume RUN DEVICE RANKS [--set ...]: a copy of RUN continued from its step-25 checkpoint,
# which must reach the same losses (the checkpoint staged through host copies both ways).
resume() {
  local run=$1 device=$2 ranks=$3; shift 3
  rm -rf "$WORK/${run}_resumed" && cp -r "$WORK/$run" "$WORK/${run}_resumed" &&
  rm -rf "$WORK/${run}_resumed/checkpoints/step_00000050" &&
  train "${run}_resumed" "$device" "$ranks" --set checkpoint.interval=25 "$@" \
    --resume "$WORK/${run}_resumed/checkpoints/step_00000025"
}
compare() {  # compare REFERENCE RUN: train losses equal within 1e-3 relative
  "$PYTHON" - "$WORK/$1/metrics.jsonl" "$WORK/$2/metrics.jsonl" <<'EOF'
import json, sys
def losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, open(path)) if r.get("type") == "train"}
a, b = losses(sys.argv[1]), losses(sys.argv[2])
assert len(a) == 50 and a.keys() == b.keys(), f"steps differ: {len(a)} vs {len(b)}"
worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in a)
print(f"50 steps, final loss {a[50]:.5f} vs {b[50]:.5f}, largest relative difference {worst:.2e}")
sys.exit(0 if worst <= 1e-3 else 1)
EOF
}
# reference NAME ARGS...: the bundle's CPU run NAME, or that run made here.
reference() {
  local name=$1; shift
  if [ -n "$REFERENCE" ] && [ -f "$REFERENCE/$name/metrics.jsonl" ]; then
    mkdir -p "$WORK/$name" && cp "$REFERENCE/$name/metrics.jsonl" "$WORK/$name/" &&
      note "REFERENCE $name from the bundle"
  else
    step "train_$name" 300 train "$name" "$@"
  fi
}
reference ref_cpu cpu 1
step train_device 300 train run_device "$DEVICE" 1 --set checkpoint.interval=25
step losses_match 30 compare ref_cpu run_device && sed -n 1p "$OUT/losses_match.log" | sed 's/^/    /' >> "$SUMMARY"
step resume_device 300 resume run_device "$DEVICE" 1 &&
  step resumed_losses_match 30 compare run_device run_device_resumed &&
  sed -n 1p "$OUT/resumed_losses_match.log" | sed 's/^/    /' >> "$SUMMARY"
# Two ranks read twice the samples: their reference is the same layout over MPI on the CPU.
reference ref_cpu_ep2 cpu 2 --set parallel.expert_parallel_size=2
step train_device_ep2 300 train run_device_ep2 "$DEVICE" 2 --set parallel.expert_parallel_size=2 \
  --set checkpoint.interval=25
step losses_match_ep2 30 compare ref_cpu_ep2 run_device_ep2 && sed -n 1p "$OUT/losses_match_ep2.log" | sed 's/^/    /' >> "$SUMMARY"
step resume_device_ep2 300 resume run_device_ep2 "$DEVICE" 2 --set parallel.expert_parallel_size=2 &&
  step resumed_losses_match_ep2 30 compare run_device_ep2 run_device_ep2_resumed &&
  sed -n 1p "$OUT/resumed_losses_match_ep2.log" | sed 's/^/    /' >> "$SUMMARY"
# Whole-block recomputation (backward on the device's autograd thread) and ZeRO-1 (the
# owners' broadcasts over NCCL) change no loss beyond rounding: the same reference.
step train_device_ep2_recompute_zero1 300 train run_device_ep2_rz "$DEVICE" 2 \
  --set parallel.expert_parallel_size=2 --set runtime.recompute=FULL \
  --set parallel.shard_optimizer_state=true
step losses_match_ep2_recompute_zero1 30 compare ref_cpu_ep2 run_device_ep2_rz &&
  sed -n 1p "$OUT/losses_match_ep2_recompute_zero1.log" | sed 's/^/    /' >> "$SUMMARY"

# --- speed: the seed model in bf16 ------------------------------------------------------
if [ "$MODE" = cpu ]; then
  step bench_step 300 "$BIN/rmoe_bench" step --job configs/tiny_test.pbtxt --steps 2 --warmup 1 \
    --set model.vocab_size=256 --json "$OUT/bench_step.json"
else
  step bench_step 420 "$BIN/rmoe_bench" step --job configs/rmoe_seed.pbtxt --steps 10 --warmup 3 \
    --set runtime.device=cuda --set runtime.precision=BF16 --peak-tflops "$PEAK_TFLOPS" \
    --json "$OUT/bench_step.json"
fi
grep -E "tokens/s|ceiling:|utilisation" -A2 "$OUT/bench_step.log" | head -8 | sed 's/^/    /' >> "$SUMMARY"

# --- building here, timed against carrying binaries ------------------------------------
if [ "$ALSO_BUILD" = 1 ]; then
  step build 420 build_here && step built_version 30 "$WORK/build/launcher/rmoe_train" --version
fi

note "gpu_check ($MODE): $FAILED failed step(s) in $(( $(date +%s) - START ))s; logs in $OUT"
[ "$FAILED" -eq 0 ]

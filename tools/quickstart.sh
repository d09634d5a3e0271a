#!/usr/bin/env bash
# The quick start: installs everything, builds, fetches the State of the Union corpus,
# prepares it (SentencePiece BPE), trains the quick-start RMoE model on CPU for a few
# minutes, evaluates and saves it, and prints a text sample from it.
#   tools/quickstart.sh [--set FIELD=VALUE ...]    (extra arguments go to rmoe_train)
set -euo pipefail
cd "$(dirname "$0")/.."
JOB=${RMOE_JOB:-configs/quickstart.pbtxt}
BIN=${RMOE_BUILD_DIR:-build}

tools/setup.sh
tools/fetch_corpus.sh data/raw/sotu
"$BIN/tools/rmoe_prepare_data" --job "$JOB" "$@"
# Running the quick start again replaces its earlier run (unless asked to --resume it).
replace=--overwrite
for arg in "$@"; do [ "$arg" = --resume ] && replace=; done
"$BIN/launcher/rmoe_train" --job "$JOB" $replace "$@"

output_dir=$("$BIN/launcher/rmoe_train" --job "$JOB" "$@" --dry-run | sed -n 's/^output_dir: "\(.*\)"$/\1/p')
echo
echo "=== sample from $output_dir/model (temperature 0.8, top-p 0.95) ==="
"$BIN/tools/rmoe_generate" --model "$output_dir/model" --prompt "Fellow citizens, " \
  --max-new-tokens 120 --temperature 0.8 --top-p 0.95 --seed 1

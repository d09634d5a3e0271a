#!/bin/sh
# Trains a small model, exports it with rmoe_ckpt and checks the export outside RMoE: the
# PyTorch reference (python/rmoe_torch, tests/reference_check.py) or Hugging Face's
# MixtralForCausalLM (tests/mixtral_check.py) must reproduce rmoe_eval's loss at every
# position of a text and rmoe_generate's greedy tokens, both run on the export itself (so
# the export also reads back into RMoE).
#
#   export_check.sh BUILD_DIR PYTHON SOURCE_DIR DATASET_DIR WORK_DIR reference|mixtral [--set ...]
#
# The remaining arguments go to rmoe_train. A run that saved checkpoints is exported from
# its checkpoint root, otherwise from <output_dir>/model. Exit 77 (skipped) when PYTHON has
# no torch, safetensors (or transformers, for mixtral).
set -eu
build=$1 python=$2 source=$3 dataset=$4 work=$5 check=$6
shift 6

rm -rf "$work"
mkdir -p "$work"
"$build/launcher/rmoe_train" --job "$source/configs/tiny_test.pbtxt" \
  --set data.dataset_dir="$dataset" --set output_dir="$work/run" --set schedule.steps=120 \
  --set schedule.eval_interval=0 --set logging.tensorboard=false --set runtime.num_threads=1 \
  --quiet "$@"
from="$work/run/model"
[ -d "$work/run/checkpoints" ] && from="$work/run/checkpoints"
"$build/tools/rmoe_ckpt" export "$from" --out "$work/export"

# A text the model did not train on as such: the start of the corpus's last address.
text=$(ls "$source/data/raw/sotu"/*.txt | tail -1)
head -c 3000 "$text" > "$work/text.txt"
"$build/tools/rmoe_eval" --model "$work/export" --text "$work/text.txt" --dump "$work/dump.json" \
  --dump-windows 0 --top 1 --threads 1 --json "$work/eval.json"
"$build/tools/rmoe_generate" --model "$work/export" --prompt "The Congress" --temperature 0 \
  --max-new-tokens 40 --threads 1 --json "$work/generate.json"

case "$check" in
  reference)
    exec "$python" "$source/tests/reference_check.py" --export "$work/export" \
      --dump "$work/dump.json" --generate "$work/generate.json" ;;
  mixtral)
    exec "$python" "$source/tests/mixtral_check.py" --export "$work/export" \
      --out "$work/mixtral" --dump "$work/dump.json" --generate "$work/generate.json" ;;
  *)
    echo "export_check.sh: unknown check \"$check\" (reference or mixtral)" >&2
    exit 2 ;;
esac

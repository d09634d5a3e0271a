#!/usr/bin/env bash
# Measures collectives and training steps across the test cluster's nodes on shaped links,
# and what rmoe_plan predicts for them from a hardware profile of each setting; the raw
# numbers go to OUT, and tools/multinode_report.py turns them into the tables of
# docs/results/multinode.md.
#
#   tools/multinode_bench.sh OUT [--nodes "2 4"] [--settings "100mbit:50us 1gbit:500us ..."]
#   tools/multinode_bench.sh OUT --predict-only   profiles and predictions again from the
#                                                 measurements already in OUT (no cluster)
#
# Each setting RATE:DELAY shapes every node's link to RATE both ways and delays each frame
# DELAY on it (so two nodes are 2 x DELAY apart, one way); "none" leaves the links as they
# are (the stack's own cost: it calibrates the per-message overhead of the profiles).
# Per node count and setting, with one rank per node:
#   OUT/N<nodes>_<setting>.collectives.json   rmoe_bench collectives (measured)
#   OUT/N<nodes>_<setting>.profile.pbtxt      the profile: configs/hardware/this_cpu.pbtxt's
#                                             computation, one core per node, inter_node =
#                                             the shaped rate and the latency below
#   OUT/N<nodes>_<setting>.predicted.json     rmoe_plan --collectives with that profile
#   OUT/N<nodes>_<setting>.step.json          rmoe_bench step of configs/tiny_test.pbtxt,
#                                             EP = nodes (2 nodes only: more nodes than this
#                                             machine's cores would measure core sharing)
#   OUT/N<nodes>_<setting>.plan.json          rmoe_plan of that job and layout
# Latency of a profile = the measured "none" 8-byte all-reduce over 2 nodes / 3 (the model
# charges it 3 latencies: the argument agreement and the all-reduce's two steps; this is
# the stack's own per-message cost) + 2 x DELAY.
# Needs root; brings its own cluster up and down (refuses if one is up).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: tools/multinode_bench.sh OUT [--nodes LIST] [--settings LIST]}
shift
node_counts="2 4"
predict_only=""
settings="none 100mbit:50us 100mbit:500us 1gbit:50us 1gbit:500us"
while (($#)); do
  case $1 in
    --nodes) node_counts=$2; shift 2 ;;
    --settings) settings=$2; shift 2 ;;
    --predict-only) predict_only=yes; shift ;;
    *) echo "multinode_bench: unknown argument $1" >&2; exit 2 ;;
  esac
done
build=${RMOE_BUILD_DIR:-build}
cluster=tools/testcluster.sh
mkdir -p "$out"
[[ -n $predict_only ]] || trap '"$cluster" down' EXIT
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

# rate:delay -> the profile's inter_node bandwidth (bytes/s) and latency (s).
profile() {
  local setting=$1 overhead=$2 rate_bytes latency
  if [[ $setting == none ]]; then
    rate_bytes=$(python3 -c "import json,sys; r=[x for x in json.load(open('$3'))['result']['results'] if x['op']=='alltoall']; print(max(x['busbw_bytes_per_s'] for x in r))")
    latency=$overhead
  else
    local rate=${setting%%:*} delay=${setting#*:}
    rate_bytes=$(python3 -c "
import re; m=re.fullmatch(r'([0-9.]+)([kmg]?)bit', '$rate'); print(float(m[1])*{'':1,'k':1e3,'m':1e6,'g':1e9}[m[2]]/8)")
    latency=$(python3 -c "
import re; m=re.fullmatch(r'([0-9.]+)(s|ms|us)', '$delay'); print($overhead + 2*float(m[1])*{'s':1,'ms':1e-3,'us':1e-6}[m[2]])")
  fi
  sed -e '/^devices_per_node:/c devices_per_node: 1' -e '/^name:/c name: "test cluster node (one core)"' \
    -e '/^inter_node {/,/^}/d' configs/hardware/this_cpu.pbtxt
  printf 'inter_node {\n  bandwidth_bytes_per_s: %s\n  latency_s: %s\n}\n' "$rate_bytes" "$latency"
}

overhead=""
for nodes in $node_counts; do
  if [[ -z $predict_only ]]; then
    "$cluster" down
    "$cluster" up "$nodes"
  fi
  for setting in $settings; do
    name=N${nodes}_${setting/:/_}
    echo "== $name"
    if [[ -z $predict_only ]]; then
      if [[ $setting == none ]]; then
        "$cluster" shape all
      else
        "$cluster" shape all --rate "${setting%%:*}" --delay "${setting#*:}"
      fi
      "$cluster" mpirun --per-node 1 -np "$nodes" "$build/tools/rmoe_bench" collectives \
        --sizes 8,1024,65536,1048576,4194304 --seconds 0.5 --json "$out/$name.collectives.json"
    fi
    if [[ -z $overhead ]]; then
      [[ $setting == none && $nodes == 2 ]] || { echo "the first run must be --nodes 2 with setting none" >&2; exit 2; }
      overhead=$(python3 -c "
import json; r=[x for x in json.load(open('$out/$name.collectives.json'))['result']['results'] if x['op']=='allreduce' and x['bytes']==8]
print(r[0]['median_s']/3)")
    fi
    profile "$setting" "$overhead" "$out/$name.collectives.json" > "$out/$name.profile.pbtxt"
    "$build/tools/rmoe_plan" --collectives --gpus "$nodes" --ranks-per-node 1 \
      --hardware "$out/$name.profile.pbtxt" --sizes 8,1024,65536,1048576,4194304 \
      --json "$out/$name.predicted.json" > /dev/null
    if ((nodes == 2)); then
      if [[ -z $predict_only ]]; then
        "$cluster" mpirun --per-node 1 -np "$nodes" "$build/tools/rmoe_bench" step \
          --job configs/tiny_test.pbtxt --set parallel.expert_parallel_size="$nodes" \
          --set model.vocab_size=256 --steps 10 --warmup 2 --threads 1 --json "$out/$name.step.json"
      fi
      "$build/tools/rmoe_plan" --job configs/tiny_test.pbtxt --set parallel.expert_parallel_size="$nodes" \
        --set model.vocab_size=256 --gpus "$nodes" --ranks-per-node 1 --spec-only \
        --hardware "$out/$name.profile.pbtxt" --json "$out/$name.plan.json" > /dev/null
    fi
  done
done
echo "multinode_bench: raw numbers in $out"

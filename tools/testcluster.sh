#!/usr/bin/env bash
# A test cluster on one machine: N "nodes", each a network namespace with its own
# hostname (UTS namespace), its own mount namespace and its own address, joined by links to
# a bridge that lives in a namespace of its own. Each link is a pair of TAP devices joined
# by rmoe_linkem (tools/testcluster/linkem.cc), which adds delay and loss on demand; rates
# are the kernel's tbf. Jumbo frames (MTU 9000), as on cluster networks. Nothing is added to
# the machine's own network: only the nodes' addresses (10.213.0.0/24) are used.
#
#   testcluster.sh up N [--private-dir DIR]   make nodes node1..nodeN (N <= 32); with
#                                             --private-dir each node sees its own, empty
#                                             DIR (a node-local disk) instead of the shared one
#   testcluster.sh exec NODE CMD [ARG]...     run CMD on a node (NODE: 2, node2 or 10.213.0.2)
#   testcluster.sh mpirun [--per-node K] [MPIRUN ARG]...
#                                             mpirun from node1 across the nodes: a hostfile
#                                             of K slots per node (default 1), the ssh-like
#                                             launch agent, TCP only, the nodes' interface,
#                                             and rmoe's launch settings (tools/rmoe_mpirun.sh);
#                                             no core binding (every node's daemon would bind
#                                             its first rank to core 0 of the same machine)
#   testcluster.sh hostfile [SLOTS]           print a hostfile (SLOTS per node, default 1)
#   testcluster.sh shape NODE|all [--rate R] [--delay D] [--loss L]
#                                             shape a node's link, both directions: R (e.g.
#                                             1gbit, 500mbit), D one-way delay (e.g. 1ms,
#                                             50us: two nodes delayed D each are 2D apart),
#                                             L loss (e.g. 1%); `shape NODE` alone clears it
#   testcluster.sh link NODE up|down          take a node's link down (a lost node) or up
#   testcluster.sh kill NODE [SIGNAL]         signal every process on a node (KILL by default)
#   testcluster.sh status                     the nodes, their addresses and shaping
#   testcluster.sh down                       remove everything (safe to run twice)
#   testcluster.sh rsh HOST CMD...            the launch agent mpirun calls (as ssh HOST CMD)
#
# Needs root (or CAP_SYS_ADMIN and CAP_NET_ADMIN), iproute2, /dev/net/tun and rmoe_linkem
# (built by tools/setup.sh; RMOE_LINKEM names another); `up` exits 77 with a message saying
# what is missing where the cluster cannot be made (tests skip on 77).
# RMOE_TESTCLUSTER_STATE (default /run/rmoe-testcluster) holds the cluster's state: one
# cluster per machine at a time.
set -euo pipefail

readonly STATE=${RMOE_TESTCLUSTER_STATE:-/run/rmoe-testcluster}
readonly PREFIX=rmoe-tc
readonly SUBNET=10.213.0
readonly IFACE=eth0
readonly MTU=9000
readonly MAX_NODES=32
SELF=$(readlink -f "${BASH_SOURCE[0]}")
readonly SELF
LINKEM=${RMOE_LINKEM:-$(dirname "$SELF")/../${RMOE_BUILD_DIR:-build}/tools/rmoe_linkem}
readonly LINKEM

die() { echo "testcluster: error: $*" >&2; exit 1; }
log() { echo "testcluster: $*" >&2; }

node_count() {
  [[ -f $STATE/nodes ]] || die "no cluster is up (no $STATE/nodes); run: $0 up N"
  cat "$STATE/nodes"
}

# NODE as 2, node2 or 10.213.0.2 -> 2, checked against the cluster's size.
node_index() {
  local spec=$1 index
  case $spec in
    node[0-9]*) index=${spec#node} ;;
    "$SUBNET".[0-9]*) index=${spec##*.} ;;
    [0-9]*) index=$spec ;;
    *) die "unknown node '$spec': expected a number, nodeK or $SUBNET.K" ;;
  esac
  [[ $index =~ ^[0-9]+$ ]] || die "unknown node '$spec'"
  local count
  count=$(node_count)
  ((index >= 1 && index <= count)) || die "node '$spec' is not in this cluster of $count nodes"
  echo "$index"
}

holder_pid() { cat "$STATE/node$1.pid"; }

# Runs a command inside node $1's namespaces.
in_node() {
  local index=$1
  shift
  nsenter --target "$(holder_pid "$index")" --net --uts --mount --wd="$PWD" -- "$@"
}

check_permissions() {
  local missing=()
  for tool in ip tc nsenter unshare; do command -v "$tool" > /dev/null || missing+=("$tool"); done
  if ((${#missing[@]})); then
    echo "testcluster: cannot make a cluster here: missing ${missing[*]} (Debian: iproute2, util-linux)" >&2
    exit 77
  fi
  if [[ ! -x $LINKEM ]]; then
    echo "testcluster: cannot make a cluster here: no link emulator at $LINKEM (build it: tools/setup.sh, or set RMOE_LINKEM)" >&2
    exit 77
  fi
  if [[ ! -c /dev/net/tun ]]; then
    echo "testcluster: cannot make a cluster here: no /dev/net/tun (TAP devices)" >&2
    exit 77
  fi
  if ! unshare --net --uts --mount true 2> /dev/null; then
    echo "testcluster: cannot make a cluster here: creating network, UTS and mount namespaces is not permitted (needs root or CAP_SYS_ADMIN)" >&2
    exit 77
  fi
}

cmd_up() {
  local count=${1:-}
  shift || true
  local private_dir=""
  while (($#)); do
    case $1 in
      --private-dir) private_dir=$(readlink -m "${2:?--private-dir needs a directory}"); shift 2 ;;
      *) die "up: unknown argument '$1'" ;;
    esac
  done
  [[ $count =~ ^[0-9]+$ ]] && ((count >= 1 && count <= MAX_NODES)) ||
    die "up: the number of nodes must be 1..$MAX_NODES, got '$count'"
  check_permissions
  if [[ -f $STATE/nodes ]]; then
    die "a cluster is already up ($STATE); run: $0 down"
  fi
  mkdir -p "$STATE"
  # A failure half way leaves nothing behind.
  trap 'cmd_down > /dev/null 2>&1 || true' EXIT
  echo "$count" > "$STATE/nodes"
  echo "$private_dir" > "$STATE/private_dir"

  ip netns add "$PREFIX-switch"
  ip -n "$PREFIX-switch" link set lo up
  ip -n "$PREFIX-switch" link add br0 type bridge
  ip -n "$PREFIX-switch" link set br0 up

  # The nodes' own /etc/hosts, so that hostfiles name nodes as on a real cluster.
  {
    echo "127.0.0.1 localhost"
    for ((i = 1; i <= count; i++)); do echo "$SUBNET.$i node$i"; done
  } > "$STATE/hosts"

  for ((i = 1; i <= count; i++)); do
    local netns=$PREFIX-node$i
    ip netns add "$netns"
    ip -n "$netns" link set lo up
    # The link: n$i (becomes the node's eth0) and b$i (a bridge port), joined by rmoe_linkem.
    nsenter --net="/run/netns/$PREFIX-switch" "$LINKEM" "n$i" "b$i" "$STATE/node$i.link" \
      "$STATE/node$i.linkready" < /dev/null > "$STATE/node$i.linkem.log" 2>&1 &
    echo $! > "$STATE/node$i.linkem.pid"
    local waited=0
    until [[ -f $STATE/node$i.linkready ]]; do
      sleep 0.05
      ((++waited < 200)) || die "the link emulator of node$i did not start: $(cat "$STATE/node$i.linkem.log")"
    done
    ip -n "$PREFIX-switch" link set "n$i" netns "$netns"
    ip -n "$netns" link set "n$i" name "$IFACE"
    ip -n "$netns" link set "$IFACE" mtu "$MTU"
    ip -n "$netns" addr add "$SUBNET.$i/24" dev "$IFACE"
    ip -n "$netns" link set "$IFACE" up
    ip -n "$PREFIX-switch" link set "b$i" mtu "$MTU" master br0 up
    local private_setup=":"
    if [[ -n $private_dir ]]; then
      mkdir -p "$STATE/node$i.disk" "$private_dir"
      private_setup="mount --bind '$STATE/node$i.disk' '$private_dir'"
    fi
    # The holder: a process that keeps the node's UTS and mount namespaces alive; everything
    # run on the node enters its namespaces.
    nsenter --net="/run/netns/$netns" unshare --uts --mount --propagation slave sh -c "
      hostname node$i
      mount --bind '$STATE/hosts' /etc/hosts
      $private_setup
      echo ready > '$STATE/node$i.ready'
      exec sleep infinity" < /dev/null > /dev/null 2>&1 &
    echo $! > "$STATE/node$i.pid"
  done
  for ((i = 1; i <= count; i++)); do
    local waited=0
    until [[ -f $STATE/node$i.ready ]]; do
      sleep 0.05
      ((++waited < 200)) || die "node$i did not start"
    done
  done
  # Every node reaches every other one before `up` returns (where ping is installed).
  if command -v ping > /dev/null; then
    for ((i = 2; i <= count; i++)); do
      in_node 1 ping -c 1 -W 5 "$SUBNET.$i" > /dev/null || die "node1 cannot reach node$i"
    done
  fi
  trap - EXIT
  log "$count nodes up: $(for ((i = 1; i <= count; i++)); do printf 'node%d=%s.%d ' "$i" "$SUBNET" "$i"; done)"
}

cmd_down() {
  if [[ -d $STATE ]]; then
    for pidfile in "$STATE"/node[0-9]*.pid; do
      [[ -f $pidfile && $pidfile != *.linkem.pid ]] || continue
      local index=${pidfile##*/node}
      index=${index%.pid}
      # Whatever still runs on the node goes first, then the holder.
      local pids
      pids=$(ip netns pids "$PREFIX-node$index" 2> /dev/null || true)
      [[ -n $pids ]] && kill -9 $pids 2> /dev/null || true
      kill -9 "$(cat "$pidfile")" 2> /dev/null || true
      kill -9 "$(cat "$STATE/node$index.linkem.pid" 2> /dev/null)" 2> /dev/null || true
    done
  fi
  for netns in $(ip netns list 2> /dev/null | awk -v p="$PREFIX-" 'index($1, p) == 1 { print $1 }'); do
    ip netns delete "$netns" 2> /dev/null || true
  done
  rm -rf "$STATE"
}

cmd_exec() {
  local index
  index=$(node_index "${1:?exec: which node?}")
  shift
  (($#)) || die "exec: no command"
  in_node "$index" "$@"
}

# mpirun's launch agent, called as `agent HOST COMMAND...` like ssh: the command is one shell
# line, run by a shell on that node.
cmd_rsh() {
  local host=${1:?rsh: no host}
  shift
  local index
  index=$(node_index "$host")
  exec nsenter --target "$(holder_pid "$index")" --net --uts --mount -- /bin/sh -c "$*"
}

cmd_hostfile() {
  local slots=${1:-1} count
  count=$(node_count)
  for ((i = 1; i <= count; i++)); do echo "node$i slots=$slots"; done
}

# The MCA settings of a launch across nodes. The keepalive and timeout values make mpirun
# notice a node whose network is gone (docs/multinode.md); tools/rmoe_mpirun.sh adds them.
cmd_mpirun() {
  local per_node=1
  if [[ ${1:-} == --per-node ]]; then
    per_node=${2:?--per-node needs a number of ranks}
    shift 2
  fi
  cmd_hostfile "$per_node" > "$STATE/hostfile"
  local launcher
  launcher=$(dirname "$SELF")/rmoe_mpirun.sh
  in_node 1 env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
    "$launcher" --mca plm_rsh_agent "$SELF rsh" \
    --mca btl tcp,self --mca btl_tcp_if_include "$IFACE" --mca oob_tcp_if_include "$IFACE" \
    --bind-to none \
    --hostfile "$STATE/hostfile" "$@"
}

# "1gbit", "500mbit", "100kbit", "2000000bit" -> bits per second.
rate_bits() {
  local value=$1 number unit
  [[ $value =~ ^([0-9]+(\.[0-9]+)?)([kmg]?)bit$ ]] || die "shape: rate '$value' is not like 1gbit, 500mbit"
  number=${BASH_REMATCH[1]} unit=${BASH_REMATCH[3]}
  awk -v n="$number" -v u="$unit" 'BEGIN { m = u == "g" ? 1e9 : u == "m" ? 1e6 : u == "k" ? 1e3 : 1; printf "%.0f", n * m }'
}
# "20ms", "0.1ms", "50us", "1s" -> microseconds.
delay_us() {
  local value=$1
  [[ $value =~ ^([0-9]+(\.[0-9]+)?)(s|ms|us)$ ]] || die "shape: delay '$value' is not like 1ms, 50us"
  awk -v n="${BASH_REMATCH[1]}" -v u="${BASH_REMATCH[3]}" 'BEGIN { m = u == "s" ? 1e6 : u == "ms" ? 1e3 : 1; printf "%.0f", n * m }'
}
# "1%", "0.5%" -> parts per million.
loss_ppm() {
  local value=$1
  [[ $value =~ ^([0-9]+(\.[0-9]+)?)%$ ]] || die "shape: loss '$value' is not like 1%"
  awk -v n="${BASH_REMATCH[1]}" 'BEGIN { if (n > 100) exit 1; printf "%.0f", n * 1e4 }' || die "shape: loss over 100%"
}

cmd_shape() {
  local target=${1:?shape: which node?}
  shift
  if [[ $target == all ]]; then
    local count
    count=$(node_count)
    for ((i = 1; i <= count; i++)); do cmd_shape "$i" "$@"; done
    return 0
  fi
  local index
  index=$(node_index "$target")
  local rate="" delay="" loss=""
  while (($#)); do
    case $1 in
      --rate) rate=${2:?}; shift 2 ;;
      --delay) delay=${2:?}; shift 2 ;;
      --loss) loss=${2:?}; shift 2 ;;
      *) die "shape: unknown argument '$1' (expected --rate, --delay, --loss)" ;;
    esac
  done
  # The rate: tbf on both devices of the link (the node's sending, and the bridge port's
  # sending towards the node), with a bucket of 1 ms at the rate (at least 64 KiB).
  ip netns exec "$PREFIX-node$index" tc qdisc del dev "$IFACE" root 2> /dev/null || true
  ip netns exec "$PREFIX-switch" tc qdisc del dev "b$index" root 2> /dev/null || true
  if [[ -n $rate ]]; then
    local bits burst
    bits=$(rate_bits "$rate")
    burst=$((bits / 8 / 1000 > 65536 ? bits / 8 / 1000 : 65536))
    ip netns exec "$PREFIX-node$index" tc qdisc add dev "$IFACE" root tbf rate "${bits}bit" burst "$burst" latency 100ms
    ip netns exec "$PREFIX-switch" tc qdisc add dev "b$index" root tbf rate "${bits}bit" burst "$burst" latency 100ms
  fi
  local us=0 ppm=0
  [[ -n $delay ]] && us=$(delay_us "$delay")
  [[ -n $loss ]] && ppm=$(loss_ppm "$loss")
  echo "$us $ppm" > "$STATE/node$index.link"
  kill -HUP "$(cat "$STATE/node$index.linkem.pid")"
  echo "rate=${rate:-unlimited} delay=${delay:-0} loss=${loss:-0%}" > "$STATE/node$index.shape"
}

cmd_link() {
  local index
  index=$(node_index "${1:?link: which node?}")
  local state=${2:?link: up or down?}
  [[ $state == up || $state == down ]] || die "link: expected up or down, got '$state'"
  ip -n "$PREFIX-switch" link set "b$index" "$state"
}

cmd_kill() {
  local index
  index=$(node_index "${1:?kill: which node?}")
  local signal=${2:-KILL} holder pids=()
  holder=$(holder_pid "$index")
  for pid in $(ip netns pids "$PREFIX-node$index"); do
    [[ $pid == "$holder" ]] || pids+=("$pid")
  done
  ((${#pids[@]})) && kill "-$signal" "${pids[@]}" 2> /dev/null || true
  log "sent SIG$signal to ${#pids[@]} processes on node$index"
}

cmd_status() {
  local count
  count=$(node_count)
  for ((i = 1; i <= count; i++)); do
    local link shape
    link=$(ip -n "$PREFIX-switch" -o link show "b$i" | grep -q '[<,]UP[,>]' && echo up || echo down)
    shape=$(cat "$STATE/node$i.shape" 2> /dev/null || echo none)
    echo "node$i $SUBNET.$i link=$link shaping=$shape processes=$(ip netns pids "$PREFIX-node$i" | wc -l)"
  done
}

command=${1:-}
shift || true
case $command in
  up) cmd_up "$@" ;;
  down) cmd_down ;;
  exec) cmd_exec "$@" ;;
  rsh) cmd_rsh "$@" ;;
  mpirun) cmd_mpirun "$@" ;;
  hostfile) cmd_hostfile "$@" ;;
  shape) cmd_shape "$@" ;;
  link) cmd_link "$@" ;;
  kill) cmd_kill "$@" ;;
  status) cmd_status ;;
  -h | --help | help) sed -n '2,/^set -euo/p' "$SELF" | sed '$d; s/^# \{0,1\}//' ;;
  *) die "unknown command '${command}' (up, exec, mpirun, hostfile, shape, link, kill, status, down; --help)" ;;
esac

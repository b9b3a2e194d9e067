#!/usr/bin/env bash
# A multi-host test bed on one machine: N "hosts" made of Linux network namespaces, joined by a
# bridge through veth pairs, each with its own hostname, and Open MPI launching into them through
# its rsh agent. Ranks on different hosts talk TCP over the bridge; nothing of the machine's own
# network is used (all traffic stays on 10.213.0.0/24 or the subnet given, on links made here).
#
#   scripts/testbed.sh [options] up             make the hosts (replaces a test bed of that name)
#   scripts/testbed.sh [options] down           remove them (idempotent)
#   scripts/testbed.sh [options] run ARGS...    mpirun ARGS with the test bed's host file, agent
#                                               and transport settings
#   scripts/testbed.sh [options] exec K CMD...  run CMD on host K (1-based), with its hostname
#   scripts/testbed.sh [options] status         show the hosts, addresses and link shaping
#   scripts/testbed.sh check                    exit 0 where namespaces can be made, else print
#                                               why on stderr and exit 1
#
# Options (before the subcommand; `up` records them, later subcommands read them back):
#   --hosts N        number of hosts (default 2)
#   --slots S        slots per host in the host file (default 2)
#   --name NAME      prefix of every namespace, link and the state folder (default mstb), so
#                    that test beds of different names can coexist
#   --subnet A.B.C   the /24 to use (default 10.213.0); host K is A.B.C.K, the bridge A.B.C.254
#   --rate RATE      shape each host's link to RATE in both directions (tc tbf, e.g. 10gbit)
#   --delay D        one-way latency between two hosts (tc netem on each host's side, e.g. 50us)
#
# `run` passes: --hostfile, --mca plm_rsh_agent (an agent script that maps a host's address to
# `ip netns exec`), --mca pml ob1, --mca btl tcp,vader,self (vader only between ranks of one
# host: Open MPI knows the hosts are different nodes), --mca btl_tcp_if_include and
# oob_tcp_if_include the subnet, --bind-to none and --oversubscribe; MOESERVE_TESTBED_BTL
# overrides the btl list (e.g. tcp,self). mpirun itself runs in the machine's namespace and
# reaches the hosts' daemons through the bridge's address. Needs root (or CAP_NET_ADMIN and
# CAP_SYS_ADMIN), iproute2, util-linux unshare and, for --delay, the kernel's sch_netem.
set -Eeuo pipefail

hosts=2 slots=2 name=mstb subnet=10.213.0 rate="" delay=""
while [ $# -gt 0 ]; do
  case $1 in
    --hosts) hosts=$2; shift 2 ;;
    --slots) slots=$2; shift 2 ;;
    --name) name=$2; shift 2 ;;
    --subnet) subnet=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --delay) delay=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set /p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "testbed.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
cmd=${1:-}
[ -n "$cmd" ] || { echo "testbed.sh: no subcommand (up, down, run, exec, status, check; see --help)" >&2; exit 2; }
shift

[[ $name =~ ^[a-z][a-z0-9]{0,5}$ ]] || { echo "testbed.sh: --name must be 1-6 lower-case letters or digits" >&2; exit 2; }
[[ $subnet =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || { echo "testbed.sh: --subnet must look like 10.213.0" >&2; exit 2; }
state=${MOESERVE_TESTBED_STATE:-/tmp/moeserve-testbed-$name}
bridge="$name-br"

# Names: namespace NAME-hK, veth pair NAME-hK-b (bridge side) / eth0 (host side, renamed).
ns_of() { echo "$name-h$1"; }

die() { echo "testbed.sh: $*" >&2; exit 1; }

load_state() {
  [ -f "$state/config" ] || die "no test bed '$name' is up (run: scripts/testbed.sh --name $name up)"
  # shellcheck disable=SC1091
  . "$state/config"
}

check() {
  [ "$(id -u)" = 0 ] || { echo "testbed.sh: needs root to make network namespaces (running as uid $(id -u))" >&2; return 1; }
  command -v ip >/dev/null || { echo "testbed.sh: iproute2's ip is not installed" >&2; return 1; }
  command -v unshare >/dev/null || { echo "testbed.sh: util-linux's unshare is not installed" >&2; return 1; }
  command -v mpirun >/dev/null || { echo "testbed.sh: mpirun is not installed" >&2; return 1; }
  local probe="$name-probe$$"
  if ! ip netns add "$probe" 2>/dev/null; then
    echo "testbed.sh: cannot make a network namespace here (ip netns add failed: no CAP_SYS_ADMIN, or a container without it)" >&2
    return 1
  fi
  local ok=0
  ip netns exec "$probe" unshare --uts true 2>/dev/null || ok=1
  ip netns del "$probe" 2>/dev/null || true
  [ $ok = 0 ] || { echo "testbed.sh: cannot make a UTS namespace inside a network namespace (unshare --uts failed)" >&2; return 1; }
  return 0
}

down() {
  local n=${1:-}
  if [ -z "$n" ] && [ -f "$state/config" ]; then
    n=$(. "$state/config"; echo "$hosts")
  fi
  # Also whatever a larger, older test bed of this name left: every namespace with the prefix.
  local ns
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$name-h[0-9]+$" || true); do
    # Processes still inside (a crashed job) would keep it alive: end them first.
    local pids
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  local k
  for k in $(seq 1 "${n:-0}"); do ip link del "$name-h$k-b" 2>/dev/null || true; done
  ip link del "$bridge" 2>/dev/null || true
  rm -rf "$state"
}

# Bits per second of a tc rate such as 10gbit, 500mbit, 100kbit.
rate_bps() {
  local v=${1%%[a-zA-Z]*} u=${1##*[0-9.]}
  case $u in
    gbit) echo $(( v * 1000000000 )) ;;
    mbit) echo $(( v * 1000000 )) ;;
    kbit) echo $(( v * 1000 )) ;;
    bit|"") echo "$v" ;;
    *) die "--rate: unknown unit '$u' (gbit, mbit, kbit)" ;;
  esac
}

# shape DEV WITH_DELAY [COMMAND PREFIX...]: tbf at the configured rate (a bucket of 10 ms of
# traffic, at least 64 KiB), and under it netem with the delay where WITH_DELAY is 1.
shape() {
  local dev=$1 with_delay=$2
  shift 2
  local parent=root
  if [ -n "$rate" ]; then
    local burst=$(( $(rate_bps "$rate") / 8 / 100 ))
    [ "$burst" -ge 65536 ] || burst=65536
    "$@" tc qdisc replace dev "$dev" root handle 1: tbf rate "$rate" burst "$burst" latency 50ms
    parent="parent 1:1"
  fi
  if [ -n "$delay" ] && [ "$with_delay" = 1 ]; then
    # A queue of 10000 packets: netem's default (1000) drops under an all-to-all's bursts.
    # shellcheck disable=SC2086
    "$@" tc qdisc replace dev "$dev" $parent handle 10: netem limit 10000 delay "$delay" \
      || die "cannot add a netem qdisc for --delay (is the kernel's sch_netem there?)"
  fi
}

up() {
  check || exit 1
  [ "$hosts" -ge 1 ] && [ "$hosts" -le 200 ] || die "--hosts must be 1 to 200"
  down "$hosts"
  # A failure half-way leaves nothing behind.
  # shellcheck disable=SC2154  # rc is assigned inside the trap
  trap 'rc=$?; if [ $rc -ne 0 ]; then echo "testbed.sh: set-up failed; removing what was made" >&2; down "$hosts"; fi' EXIT
  mkdir -p "$state"
  ip link add "$bridge" type bridge
  ip addr add "$subnet.254/24" dev "$bridge"
  ip link set "$bridge" up
  local k ns
  : > "$state/hostfile"
  for k in $(seq 1 "$hosts"); do
    ns=$(ns_of "$k")
    ip netns add "$ns"
    ip link add "$name-h$k-b" type veth peer name "$name-h$k-e"
    ip link set "$name-h$k-e" netns "$ns"
    ip link set "$name-h$k-b" master "$bridge" up
    ip -n "$ns" link set "$name-h$k-e" name eth0
    ip -n "$ns" addr add "$subnet.$k/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    shape eth0 1 ip netns exec "$ns"
    shape "$name-h$k-b" 0
    echo "$subnet.$k slots=$slots" >> "$state/hostfile"
  done
  # The rsh agent: Open MPI runs `AGENT ADDRESS COMMAND...` to start its daemon on a host; the
  # command is a shell command line, as ssh would pass it on.
  cat > "$state/agent" <<EOF
#!/bin/sh
# Open MPI's rsh agent for the test bed '$name': runs a command on a host given by its address.
addr=\$1; shift
k=\${addr##*.}
case "\$addr" in
  $subnet.*) ;;
  *) echo "testbed agent: \$addr is not a host of the test bed '$name'" >&2; exit 1 ;;
esac
exec ip netns exec "$name-h\$k" unshare --uts /bin/sh -c "hostname host\$k && \$*"
EOF
  chmod +x "$state/agent"
  cat > "$state/config" <<EOF
hosts=$hosts
slots=$slots
subnet=$subnet
rate='$rate'
delay='$delay'
EOF
  trap - EXIT
  # Every host reaches the next one (where ping is installed).
  command -v ping >/dev/null && for k in $(seq 1 "$hosts"); do
    ip netns exec "$(ns_of "$k")" ping -c 1 -W 2 "$subnet.$(( k % hosts + 1 ))" >/dev/null \
      || { down "$hosts"; die "host $k cannot reach host $(( k % hosts + 1 ))"; }
  done
  echo "testbed.sh: $hosts hosts up ($subnet.1-$subnet.$hosts, bridge $bridge at $subnet.254${rate:+, rate $rate}${delay:+, delay $delay}); host file $state/hostfile"
}

run() {
  load_state
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  exec mpirun --hostfile "$state/hostfile" \
    --mca plm_rsh_agent "$state/agent" \
    --mca pml ob1 --mca btl "${MOESERVE_TESTBED_BTL:-tcp,vader,self}" \
    --mca btl_tcp_if_include "$subnet.0/24" --mca oob_tcp_if_include "$subnet.0/24" \
    --bind-to none --oversubscribe "$@"
}

case $cmd in
  up) up ;;
  down) down; echo "testbed.sh: test bed '$name' is down" ;;
  run) run "$@" ;;
  exec)
    load_state
    k=${1:?exec needs a host number}; shift
    [ "$k" -ge 1 ] && [ "$k" -le "$hosts" ] || die "host $k is not in 1..$hosts"
    exec ip netns exec "$(ns_of "$k")" unshare --uts /bin/sh -c 'hostname "$0" && exec "$@"' "host$k" "$@"
    ;;
  status)
    load_state
    echo "test bed '$name': $hosts hosts, $slots slots each, subnet $subnet.0/24${rate:+, rate $rate}${delay:+, delay $delay}"
    for k in $(seq 1 "$hosts"); do
      echo "host$k: namespace $(ns_of "$k"), address $subnet.$k, qdisc: $(ip netns exec "$(ns_of "$k")" tc qdisc show dev eth0 | head -1)"
    done
    ;;
  check) check ;;
  *) die "unknown subcommand '$cmd' (up, down, run, exec, status, check)" ;;
esac

#!/usr/bin/env bash
# A whole Drover cluster on one machine, for tests, benches and demos: a 3-member etcd, N droverd
# hosts (scripts/netns-hosts.sh, each joined with --cluster/--cluster-config) and 2 controllers.
#
#   scripts/cluster.sh up N              # start (or complete) it: N hosts (1..8); idempotent
#   scripts/cluster.sh status            # etcd members, hosts, controllers, who leads
#   scripts/cluster.sh kill-host NAME    # lose host NAME (e.g. h2): veth cut, droverd and QEMUs killed
#   scripts/cluster.sh kill-controller [ctl-1|ctl-2|leader]   # SIGKILL one controller (default: the leader)
#   scripts/cluster.sh kill-etcd I       # SIGKILL etcd member I (1..3); `up` starts it again
#   scripts/cluster.sh down              # remove everything (hosts' VMs and state dirs, etcd data)
#   scripts/cluster.sh --help
#
# etcd member I lives in namespace drover-SET-etcdI at NET.(1+I) (client port 2379, peer 2380),
# on the hosts' bridge; its data is in CLUSTER_DIR/etcdI. Hosts are netns-hosts.sh's: host I is
# SETI at NET.(10+I), with site a/b/c, labels ssd=yes|no and rack=rI, security level 1..3 and
# costs rising with I, so that rules (anti-affinity by site, pin_label, min_security,
# max_cost_per_hour, strategy = "cheapest") can be seen at work. The controllers, ctl-1 and ctl-2,
# run in the root namespace and reach the hosts through the remotes netns-hosts.sh registers.
# `up` makes the cluster the CLI's default (`drover cluster use`), so `drover service ...` works
# at once; `down` forgets it again. After kill-host, `up N` brings the host back (its droverd
# stops its stale members itself).
#
# Environment:
#   DROVER_NETNS_SET / DROVER_NETNS_NET   the namespace set and its /24 (as netns-hosts.sh; default
#                                         h on 10.77.0): separate clusters can run side by side
#   DROVER_NETNS_ROOT                     where state lives (default /var/lib): hosts' state dirs
#                                         and CLUSTER_DIR = ROOT/drover-SET-cluster
#   DROVER_CONFIG_DIR                     the CLI's config (remotes, default cluster)
#   DROVER_CLUSTER_TTL                    host and controller lease TTL in seconds (default 3)
#   DROVER_CLUSTER_CPUS                   vCPUs each host offers to members (default 8: overcommitted)
#   DROVER_BIN_DIR, DROVER_IMAGE_DIR, DROVER_AGENT_BIN, DROVER_QEMU_DIR: as netns-hosts.sh
# Needs root, iproute2 and Debian's etcd-server (scripts/install-deps.sh installs it).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
case "${1:-}" in -h | --help | help | "") usage; [ -n "${1:-}" ]; exit $? ;; esac

# The set and its /24 as netns-hosts.sh takes them (it checks both, and owns the bridge).
P=${DROVER_NETNS_SET:-h}
[[ "$P" =~ ^[a-z]{1,4}$ ]] || { echo "cluster: DROVER_NETNS_SET must be 1-4 letters a-z" >&2; exit 2; }
[ "$P" = h ] && NET=${DROVER_NETNS_NET:-10.77.0} || NET=${DROVER_NETNS_NET:-}
[[ "$NET" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || { echo "cluster: set DROVER_NETNS_NET (e.g. 10.81.0) for DROVER_NETNS_SET=$P" >&2; exit 2; }
export DROVER_NETNS_SET=$P DROVER_NETNS_NET=$NET
ROOT=$(realpath -m "${DROVER_NETNS_ROOT:-/var/lib}")
export DROVER_NETNS_ROOT=$ROOT
[ -z "${DROVER_BIN_DIR:-}" ] || export DROVER_BIN_DIR=$(realpath -m "$DROVER_BIN_DIR")
CL=$ROOT/drover-$P-cluster
TTL=${DROVER_CLUSTER_TTL:-3}
[[ "$TTL" =~ ^[1-9][0-9]?$ ]] || { echo "cluster: DROVER_CLUSTER_TTL must be 1..99 seconds" >&2; exit 2; }
cd "$(dirname "$0")/.."
NETNS_HOSTS=$PWD/scripts/netns-hosts.sh
CONFIG=${DROVER_CONFIG_DIR:-${HOME:?}/.config/drover}

die() { echo "cluster: $*" >&2; exit 1; }
say() { echo "==> $*" >&2; }

[ "$(id -u)" = 0 ] || die "needs root (network namespaces, bridge)"
command -v ip >/dev/null || die "needs iproute2 (apt-get install iproute2)"

etcd_ip() { echo "$NET.$((1 + $1))"; }
etcd_ns() { echo "drover-$P-etcd$1"; }
ENDPOINTS=$(for i in 1 2 3; do printf 'http://%s:2379,' "$(etcd_ip "$i")"; done | sed 's/,$//')

# Sets BIN to where droverd, drover and drover-controller are, building them when missing.
bins() {
  if [ -n "${DROVER_BIN_DIR:-}" ]; then
    BIN=$DROVER_BIN_DIR
  elif [ -x target/debug/drover-controller ] && [ -x target/debug/droverd ]; then
    BIN=$PWD/target/debug
  elif command -v drover-controller >/dev/null && command -v droverd >/dev/null; then
    BIN=$(dirname "$(command -v drover-controller)")
  else
    say "building droverd, drover and drover-controller (debug)"
    cargo build -q -p drover-host -p drover-cli -p drover-controller
    BIN=$PWD/target/debug
  fi
  for b in droverd drover drover-controller; do
    [ -x "$BIN/$b" ] || die "no $b in $BIN (cargo build -p drover-host -p drover-cli -p drover-controller)"
  done
  export DROVER_BIN_DIR=$BIN
}

# The pid in FILE if that process still runs and its command line contains WORD.
live_pid() {
  local f=$1 word=$2 pid
  [ -f "$f" ] || return 1
  pid=$(cat "$f")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  [[ "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" == *"$word"* ]] && echo "$pid"
}

# Host NAME (SETI) as its number I.
host_index() {
  local name=$1
  [[ "$name" =~ ^$P([1-8])$ ]] || die "no host '$name' in set $P (hosts are ${P}1..${P}8)"
  echo "${BASH_REMATCH[1]}"
}

etcd_start() {
  local i=$1 dir=$CL/etcd$1 ip peers state=new
  ip=$(etcd_ip "$i")
  if live_pid "$CL/etcd$i.pid" etcd >/dev/null; then return; fi
  peers=$(for j in 1 2 3; do printf 'e%s=http://%s:2380,' "$j" "$(etcd_ip "$j")"; done | sed 's/,$//')
  # A member with data rejoins what it was part of; a new one joins the others' first start.
  [ -d "$dir/member" ] && state=existing
  mkdir -p "$dir"
  say "etcd e$i: starting in namespace $(etcd_ns "$i") at $ip (log: $dir.log)"
  ip netns exec "$(etcd_ns "$i")" setsid etcd --name "e$i" --data-dir "$dir" \
    --listen-client-urls "http://$ip:2379" --advertise-client-urls "http://$ip:2379" \
    --listen-peer-urls "http://$ip:2380" --initial-advertise-peer-urls "http://$ip:2380" \
    --initial-cluster "$peers" --initial-cluster-state "$state" \
    --initial-cluster-token "drover-$P" \
    </dev/null >>"$dir.log" 2>&1 &
  echo $! >"$CL/etcd$i.pid"
}

etcd_wait() {
  for _ in $(seq 150); do
    ETCDCTL_API=3 etcdctl --endpoints "$ENDPOINTS" --dial-timeout 1s endpoint health >/dev/null 2>&1 && return
    sleep 0.2
  done
  die "etcd did not become healthy at $ENDPOINTS; see $CL/etcd*.log:
$(tail -n 5 "$CL"/etcd*.log)"
}

# What host I says of itself: distinct sites, labels, security levels and prices.
host_config() {
  local i=$1 dir=$ROOT/drover-$P$1 sites=(a b c)
  mkdir -p "$dir"
  cat >"$dir/cluster.toml" <<EOF
name = "$P$i"
site = "${sites[$(( (i - 1) % 3 ))]}"
security_level = $(( 1 + (i - 1) % 3 ))
ttl_s = $TTL
cpus = ${DROVER_CLUSTER_CPUS:-8}
[labels]
ssd = "$([ $((i % 2)) = 1 ] && echo yes || echo no)"
rack = "r$i"
[cost]
vcpu_hour = 0.0$i
gib_hour = 0.00$i
disk_gib_month = 0.04
EOF
}

controller_start() {
  local j=$1
  if live_pid "$CL/ctl-$j.pid" drover-controller >/dev/null; then return; fi
  say "controller ctl-$j: starting (log: $CL/ctl-$j.log)"
  setsid "$BIN/drover-controller" --etcd "$ENDPOINTS" --name "ctl-$j" --ttl "$TTL" \
    --hosts-file "$CONFIG/remotes.toml" </dev/null >>"$CL/ctl-$j.log" 2>&1 &
  echo $! >"$CL/ctl-$j.pid"
}

up() {
  local n=${1:-}
  [[ "$n" =~ ^[1-8]$ ]] || die "usage: $0 up N (N = 1..8 hosts)"
  command -v etcd >/dev/null || die "needs etcd (scripts/install-deps.sh, or apt-get install etcd-server etcd-client)"
  bins
  mkdir -p "$CL"
  for i in 1 2 3; do
    "$NETNS_HOSTS" attach "$(etcd_ns "$i")" "dre-$P$i" "$(etcd_ip "$i")"
    etcd_start "$i"
  done
  etcd_wait
  for i in $(seq "$n"); do host_config "$i"; done
  DROVER_NETNS_CLUSTER=$ENDPOINTS DROVER_CONFIG_DIR=$CONFIG "$NETNS_HOSTS" up "$n" >/dev/null
  # The controllers read the remotes once, at start: after the hosts are registered.
  for j in 1 2; do controller_start "$j"; done
  DROVER_CONFIG_DIR=$CONFIG "$BIN/drover" cluster use "$ENDPOINTS" >/dev/null
  for _ in $(seq 100); do
    DROVER_CONFIG_DIR=$CONFIG "$BIN/drover" cluster status >/dev/null 2>&1 && break
    sleep 0.2
  done
  status
  cat >&2 <<EOF

The cluster is up and is the CLI's default (drover cluster use $ENDPOINTS):
  drover cluster status                 # etcd, the leading controller, hosts
  drover host list
  drover service apply -f shop.toml && drover service show shop
  drover --remote ${P}1 vm list          # one host's VMs
Logs: $CL/{etcd1..3,ctl-1,ctl-2}.log, $ROOT/drover-${P}I/droverd.log. Remove it: $0 down
EOF
}

leader() {
  # etcd's election: the leader is the oldest key under the election prefix.
  ETCDCTL_API=3 etcdctl --endpoints "$ENDPOINTS" --dial-timeout 2s get --prefix /drover/election/ \
    --sort-by=CREATE --order=ASCEND --print-value-only 2>/dev/null | head -n 1
}

status() {
  local i pid
  bins
  for i in 1 2 3; do
    if pid=$(live_pid "$CL/etcd$i.pid" etcd); then
      echo "etcd e$i  http://$(etcd_ip "$i"):2379  pid $pid"
    else
      echo "etcd e$i  http://$(etcd_ip "$i"):2379  (not running)"
    fi
  done
  for j in 1 2; do
    if pid=$(live_pid "$CL/ctl-$j.pid" drover-controller); then
      echo "controller ctl-$j  pid $pid"
    else
      echo "controller ctl-$j  (not running)"
    fi
  done
  "$NETNS_HOSTS" status
  DROVER_CONFIG_DIR=$CONFIG "$BIN/drover" cluster status --etcd "$ENDPOINTS" 2>&1 || true
}

kill_host() {
  local name=${1:-} i ns p
  [ -n "$name" ] || die "usage: $0 kill-host NAME (e.g. ${P}2)"
  i=$(host_index "$name")
  ns=drover-$P$i
  [ -e "/run/netns/$ns" ] || die "no host $name (namespace $ns)"
  # As a power loss looks to the others: the network goes first, then every process at once.
  ip link set "drv-$P$i" down 2>/dev/null || true
  for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
  say "$name: veth drv-$P$i cut; droverd and its QEMUs killed ($0 up N brings it back)"
}

kill_controller() {
  local which=${1:-leader} pid
  if [ "$which" = leader ]; then
    which=$(leader)
    [[ "$which" =~ ^ctl-[12]$ ]] || die "no controller of this script leads (leader: '${which:-none}')"
  fi
  [[ "$which" =~ ^ctl-([12])$ ]] || die "usage: $0 kill-controller [ctl-1|ctl-2|leader]"
  pid=$(live_pid "$CL/$which.pid" drover-controller) || die "$which does not run"
  kill -KILL "$pid"
  say "$which (pid $pid) killed; \`$0 up N\` starts it again"
}

kill_etcd() {
  local i=${1:-} pid
  [[ "$i" =~ ^[123]$ ]] || die "usage: $0 kill-etcd I (I = 1..3)"
  pid=$(live_pid "$CL/etcd$i.pid" etcd) || die "etcd e$i does not run"
  kill -KILL "$pid"
  say "etcd e$i (pid $pid) killed; \`$0 up N\` starts it again"
}

down() {
  local pid i
  find_bin_quiet
  for j in 1 2; do
    if pid=$(live_pid "$CL/ctl-$j.pid" drover-controller); then
      say "controller ctl-$j: stopping (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  # The hosts stop their VMs while etcd still answers (they would fence them anyway).
  DROVER_CONFIG_DIR=$CONFIG "$NETNS_HOSTS" down --purge
  for i in 1 2 3; do
    if pid=$(live_pid "$CL/etcd$i.pid" etcd); then kill -KILL "$pid" 2>/dev/null || true; fi
    ip netns del "$(etcd_ns "$i")" 2>/dev/null || true
    ip link del "dre-$P$i" 2>/dev/null || true
  done
  rm -rf "$CL"
  # Forget it as the CLI's default if it is (another cluster's registration is left alone).
  if [ -f "$CONFIG/cluster.toml" ] && grep -qF "$(etcd_ip 1):2379" "$CONFIG/cluster.toml"; then
    rm -f "$CONFIG/cluster.toml"
  fi
  say "cluster $P removed"
}

# BIN for `down`, which must work even when nothing was built.
find_bin_quiet() {
  if [ -n "${DROVER_BIN_DIR:-}" ]; then BIN=$DROVER_BIN_DIR
  elif [ -x target/debug/drover ]; then BIN=$PWD/target/debug
  else BIN=$(dirname "$(command -v drover 2>/dev/null || echo /nonexistent/drover)")
  fi
}

case "$1" in
  up) up "${2:-}" ;;
  status) status ;;
  kill-host) kill_host "${2:-}" ;;
  kill-controller) kill_controller "${2:-}" ;;
  kill-etcd) kill_etcd "${2:-}" ;;
  down) down ;;
  *) usage >&2; exit 2 ;;
esac

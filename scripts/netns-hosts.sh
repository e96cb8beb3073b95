#!/usr/bin/env bash
# Several Drover hosts on one machine, for tests and demos of what crosses a network.
#
#   scripts/netns-hosts.sh up N      # N droverd's (1..8), each in its own network namespace
#   scripts/netns-hosts.sh status    # what runs
#   scripts/netns-hosts.sh down      # stop them (and their VMs), remove namespaces, veths, bridge
#   scripts/netns-hosts.sh down --purge   # ... and their state dirs
#
# Host I lives in namespace drover-hI, reached through a veth pair on the bridge drover-br0
# (root side 10.77.0.1/24, host I = 10.77.0.(10+I)). Each droverd has its own state dir
# ($DROVER_NETNS_ROOT/drover-hI, default /var/lib/drover-hI), its own unix socket
# (/run/drover/hI.sock), host id hI, serves HTTPS on 10.77.0.(10+I):7443 and logs to
# STATE_DIR/droverd.log. All share one guest image dir ($DROVER_IMAGE_DIR, default
# $DROVER_NETNS_ROOT/drover-images). `up` registers each as the remote hI (`drover remote add`),
# in $DROVER_CONFIG_DIR or ~/.config/drover, so `drover --remote h2 vm list` works at once.
# Separate sets can run side by side (parallel tests): DROVER_NETNS_SET=ma (letters, default h)
# names namespaces drover-maI, remotes/host ids maI, sockets /run/drover/maI.sock, a bridge of
# its own, on DROVER_NETNS_NET (default 10.77.0 for the set h, else required, e.g. 10.81.0).
# QEMU: DROVER_QEMU_DIR (droverd --qemu-dir) for every host, or per host DROVER_NETNS_QEMU_DIR_I
# (a directory, or `system`), e.g. host 1 on QEMU 7.2 and host 2 on 10.0. DROVER_NETNS_CLUSTER=URLS:
# every droverd joins that etcd (--cluster), with STATE_DIR/cluster.toml as --cluster-config. Both commands are idempotent. Binaries: $DROVER_BIN_DIR, else target/debug or target/release
# (built if neither has them), else PATH. Needs root and iproute2.
set -euo pipefail

P=${DROVER_NETNS_SET:-h}
[[ "$P" =~ ^[a-z]{1,4}$ ]] || { echo "netns-hosts: DROVER_NETNS_SET must be 1-4 letters a-z" >&2; exit 2; }
if [ "$P" = h ]; then
  BRIDGE=drover-br0
  NET=${DROVER_NETNS_NET:-10.77.0}
else
  BRIDGE=drbr-$P
  NET=${DROVER_NETNS_NET:?set DROVER_NETNS_NET (e.g. 10.81.0) for DROVER_NETNS_SET=$P}
fi
[[ "$NET" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || { echo "netns-hosts: DROVER_NETNS_NET must look like 10.81.0" >&2; exit 2; }
PORT=7443
# Absolute before the cd below; droverd keys its /dev/shm dir on the absolute state dir.
ROOT=$(realpath -m "${DROVER_NETNS_ROOT:-/var/lib}")
IMAGES=$(realpath -m "${DROVER_IMAGE_DIR:-$ROOT/drover-images}")
[ -z "${DROVER_BIN_DIR:-}" ] || DROVER_BIN_DIR=$(realpath -m "$DROVER_BIN_DIR")
if [ -n "${DROVER_QEMU_DIR:-}" ]; then export DROVER_QEMU_DIR=$(realpath -m "$DROVER_QEMU_DIR"); else unset DROVER_QEMU_DIR; fi
cd "$(dirname "$0")/.."
RUN=/run/drover

die() { echo "netns-hosts: $*" >&2; exit 1; }
say() { echo "==> $*" >&2; }

[ "$(id -u)" = 0 ] || die "needs root (network namespaces, bridge)"
command -v ip >/dev/null || die "needs iproute2 (apt-get install iproute2)"

# Sets BIN to where droverd and drover are; fails when there are none.
find_bins() {
  if [ -n "${DROVER_BIN_DIR:-}" ]; then
    BIN=$DROVER_BIN_DIR
  elif [ -x target/debug/droverd ] && [ -x target/debug/drover ]; then
    BIN=$PWD/target/debug
  elif [ -x target/release/droverd ] && [ -x target/release/drover ]; then
    BIN=$PWD/target/release
  elif command -v droverd >/dev/null && command -v drover >/dev/null; then
    BIN=$(dirname "$(command -v droverd)")
  else
    return 1
  fi
  [ -x "$BIN/droverd" ] && [ -x "$BIN/drover" ]
}

bins() {
  if ! find_bins; then
    say "building droverd and drover (debug)"
    cargo build -q -p drover-host -p drover-cli
    BIN=$PWD/target/debug
  fi
  [ -x "$BIN/droverd" ] && [ -x "$BIN/drover" ] || die "no droverd/drover in $BIN"
}

state_dir() { echo "$ROOT/drover-$P$1"; }
sock() { echo "$RUN/$P$1.sock"; }
ipof() { echo "$NET.$((10 + $1))"; }

# Our namespaces, as host numbers.
hosts() { ip netns list 2>/dev/null | sed -n "s/^drover-$P\\([0-9]\\+\\)\\b.*/\\1/p" | sort -n; }

# Pid of host I's droverd, if it runs.
daemon_pid() {
  local f pid
  f=$(state_dir "$1")/droverd.pid
  [ -f "$f" ] || return 1
  pid=$(cat "$f")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  [[ "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" == *droverd* ]] && echo "$pid"
}

# Namespace NS joined to the bridge (made if missing) through veth VETH, at IP/24 with the bridge
# as its default route. Hosts use it, and scripts/cluster.sh for its etcd members.
attach() {
  local ns=$1 veth=$2 ip=$3
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
  fi
  # Output into a variable first: `ip ... | grep -q` can fail under pipefail when grep quits early.
  local addrs
  addrs=$(ip addr show dev "$BRIDGE")
  [[ "$addrs" == *"inet $NET.1/24"* ]] || ip addr add "$NET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  [ -e "/run/netns/$ns" ] || ip netns add "$ns"
  if ! ip link show "$veth" >/dev/null 2>&1; then
    ip link add "$veth" type veth peer name "$veth-ns"
    ip link set "$veth-ns" netns "$ns"
    ip -n "$ns" link set "$veth-ns" name eth0
  fi
  ip link set "$veth" master "$BRIDGE" up
  addrs=$(ip -n "$ns" addr show dev eth0)
  [[ "$addrs" == *"inet $ip/24"* ]] || ip -n "$ns" addr add "$ip/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
  ip -n "$ns" route replace default via "$NET.1" dev eth0
}

net_up() { attach "drover-$P$1" "drv-$P$1" "$(ipof "$1")"; }

start_daemon() {
  local i=$1 dir log extra=()
  dir=$(state_dir "$i")
  log=$dir/droverd.log
  mkdir -p "$dir" "$IMAGES" "$RUN"
  if daemon_pid "$i" >/dev/null; then
    say "$P$i: droverd already runs (pid $(daemon_pid "$i"))"
    return
  fi
  # Another helper adds --host-id; older droverd's run without it.
  local help
  help=$("$BIN/droverd" --help 2>/dev/null || true)
  if [[ "$help" == *--host-id* ]]; then
    extra+=(--host-id "$P$i")
  fi
  # A cluster host (scripts/cluster.sh): joins the etcd at DROVER_NETNS_CLUSTER with what its
  # state dir's cluster.toml says of it (name, site, labels, costs).
  if [ -n "${DROVER_NETNS_CLUSTER:-}" ]; then
    extra+=(--cluster "$DROVER_NETNS_CLUSTER")
    [ -f "$dir/cluster.toml" ] && extra+=(--cluster-config "$dir/cluster.toml")
  fi
  local agent=${DROVER_AGENT_BIN:-$PWD/target/x86_64-unknown-linux-gnu/release/drover-agent}
  [ -x "$agent" ] && extra+=(--agent-binary "$agent")
  # A QEMU installation per host (DROVER_NETNS_QEMU_DIR_I=DIR, or =system for the system's one
  # even when DROVER_QEMU_DIR names another for the rest): hosts with different QEMU versions.
  local qdir_var="DROVER_NETNS_QEMU_DIR_$i" unset_env=()
  case "${!qdir_var:-}" in
    "") ;;
    system) unset_env=(-u DROVER_QEMU_DIR) ;;
    *) extra+=(--qemu-dir "${!qdir_var}") ;;
  esac
  say "$P$i: starting droverd in namespace drover-$P$i (log: $log)"
  # setsid: the daemon outlives this script and gets no signal from its terminal.
  ip netns exec "drover-$P$i" env "${unset_env[@]}" setsid "$BIN/droverd" \
    --state-dir "$dir" --socket "$(sock "$i")" --image-dir "$IMAGES" \
    --listen "$(ipof "$i"):$PORT" "${extra[@]}" \
    </dev/null >>"$log" 2>&1 &
  echo $! >"$dir/droverd.pid"
}

wait_and_register() {
  local i=$1 dir
  dir=$(state_dir "$i")
  for _ in $(seq 200); do
    "$BIN/drover" --socket "$(sock "$i")" host info >/dev/null 2>&1 && break
    daemon_pid "$i" >/dev/null || die "$P$i: droverd exited; see $dir/droverd.log:
$(tail -n 20 "$dir/droverd.log")"
    sleep 0.1
  done
  "$BIN/drover" --socket "$(sock "$i")" host info >/dev/null 2>&1 ||
    die "$P$i: droverd does not answer on $(sock "$i"); see $dir/droverd.log"
  [ -f "$dir/tls/admin.token" ] ||
    die "$P$i: no $dir/tls/admin.token (the token file $dir/tokens had tokens before); register it by hand with drover remote add"
  # Over TCP through the veth: proves the HTTPS side answers too.
  "$BIN/drover" remote add "$P$i" "https://$(ipof "$i"):$PORT" \
    --token-file "$dir/tls/admin.token" --ca-file "$dir/tls/cert.pem" --replace >/dev/null ||
    die "$P$i: https://$(ipof "$i"):$PORT does not answer; see $dir/droverd.log"
}

up() {
  local n=${1:-}
  [[ "$n" =~ ^[1-8]$ ]] || die "usage: $0 up N (N = 1..8)"
  bins
  for i in $(seq "$n"); do
    net_up "$i"
    start_daemon "$i"
  done
  for i in $(seq "$n"); do wait_and_register "$i"; done
  status
}

status() {
  local any=
  printf '%-6s %-25s %-38s %-36s %s\n' REMOTE URL TOKEN_FILE CA_FILE SOCKET
  for i in $(hosts); do
    any=1
    local dir state=running
    dir=$(state_dir "$i")
    daemon_pid "$i" >/dev/null || state="droverd not running"
    printf '%-6s %-25s %-38s %-36s %s%s\n' "$P$i" "https://$(ipof "$i"):$PORT" \
      "$dir/tls/admin.token" "$dir/tls/cert.pem" "$(sock "$i")" \
      "$([ "$state" = running ] || echo "  ($state)")"
  done
  [ -n "$any" ] || echo "(no drover-$P* namespaces)"
}

# Stop host I's VMs (force: these are test hosts), then its droverd, then anything left in its
# namespace (QEMUs of a droverd that would not answer).
stop_host() {
  local i=$1 ns=drover-$P$1 s pid
  s=$(sock "$i")
  if [ -n "${BIN:-}" ] && [ -S "$s" ] && command -v python3 >/dev/null; then
    for vm in $("$BIN/drover" --socket "$s" -o json vm list 2>/dev/null |
      python3 -c 'import json,sys; [print(v["name"]) for v in json.load(sys.stdin) if v.get("state") not in ("stopped","created")]' 2>/dev/null); do
      say "$P$i: stopping VM $vm"
      "$BIN/drover" --socket "$s" vm stop "$vm" --force >/dev/null 2>&1 || true
    done
  fi
  if pid=$(daemon_pid "$i"); then
    say "$P$i: stopping droverd (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  for p in $(ip netns pids "$ns" 2>/dev/null); do
    say "$P$i: killing leftover process $p ($(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | cut -c1-60))"
    kill -KILL "$p" 2>/dev/null || true
  done
  rm -f "$(state_dir "$i")/droverd.pid" "$s"
  # droverd keeps guest RAM in /dev/shm/drover-<first 12 hex of sha256(state dir)>; the VMs are
  # stopped, so only an empty dir (or files of killed QEMUs) can be left.
  local shm
  shm=/dev/shm/drover-$(printf %s "$(state_dir "$i")" | sha256sum | cut -c1-12)
  [ -d "$shm" ] && rm -rf "$shm"
  return 0
}

down() {
  local purge=${1:-}
  find_bins || BIN=
  for i in $(hosts); do
    stop_host "$i"
    ip netns del "drover-$P$i" 2>/dev/null || true
    ip link del "drv-$P$i" 2>/dev/null || true
    [ -n "$BIN" ] && "$BIN/drover" remote remove "$P$i" >/dev/null 2>&1 || true
    if [ "$purge" = --purge ]; then rm -rf "$(state_dir "$i")"; fi
    say "$P$i: removed"
  done
  # veths whose namespace vanished some other way.
  for v in $(ip -o link show 2>/dev/null | sed -n "s/^[0-9]\\+: \\(drv-$P[0-9]\\+\\)@.*/\\1/p"); do
    ip link del "$v" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
}

case "${1:-}" in
  up) up "${2:-}" ;;
  down) down "${2:-}" ;;
  status) status ;;
  # For scripts/cluster.sh: another namespace of this set on the bridge (attach NS VETH IP).
  attach)
    [[ "${2:-}" =~ ^drover-$P-[a-z0-9]+$ && "${3:-}" =~ ^[a-z0-9-]{1,12}$ && "${4:-}" == "$NET".* ]] ||
      die "usage: $0 attach drover-$P-NAME VETH $NET.X"
    attach "$2" "$3" "$4" ;;
  *) die "usage: $0 up N | status | down [--purge]" ;;
esac

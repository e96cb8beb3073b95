#!/usr/bin/env bash
# bench/boot: time to a usable guest, Drover vs raw QEMU, same kernel, initramfs, shape and accel.
#
#   drover: `drover vm start NAME --wait` until the in-guest agent has answered the host
#   raw:    qemu-system-x86_64 with PLATFORM.md's fastest command line until /init prints its
#           DROVER-INIT-READY marker on the serial console (polled every 5 ms)
#
# Runs are interleaved (drover, raw, drover, raw, ...) so drift on the machine hits both alike.
# Prints each run, the medians and the ratio, then droverd's RSS with 10 VMs defined and 2 running.
# Usage: bench/boot.sh [RUNS] (default 7). Needs scripts/build.sh (release) to have run.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-7}
bin=${DROVER_BIN_DIR:-$PWD/target/release}
agent=${DROVER_AGENT_BIN:-$PWD/target/x86_64-unknown-linux-gnu/release/drover-agent}
images=${DROVER_IMAGE_DIR:-$PWD/target/drover-images}
tmp=$(mktemp -d /tmp/drover-bench.XXXXXX)
sock=$tmp/d.sock
"$bin/droverd" --state-dir "$tmp/state" --socket "$sock" --image-dir "$images" --agent-binary "$agent" \
  --log warn >"$tmp/droverd.log" 2>&1 &
dpid=$!
cleanup() { kill "$dpid" 2>/dev/null || true; pkill -9 -f "$tmp" 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
d() { "$bin/drover" --socket "$sock" "$@"; }
for _ in $(seq 100); do d host info >/dev/null 2>&1 && break; sleep 0.1; done
d image build >/dev/null 2>&1
kernel=$(d --output json image show | python3 -c 'import json,sys; print(json.load(sys.stdin)["kernel"])')
initrd=$(d --output json image show | python3 -c 'import json,sys; print(json.load(sys.stdin)["initrd"])')
cmdline=$(d --output json image show | python3 -c 'import json,sys; print(json.load(sys.stdin)["manifest"]["default_cmdline"])')
d vm create bench --cpus 1 --memory 512M >/dev/null
now() { date +%s.%N; }

raw_boot() {
  local dir=$tmp/raw; rm -rf "$dir"; mkdir -p "$dir"
  local t0; t0=$(now)
  qemu-system-x86_64 -accel tcg -cpu max -M q35 -bios /usr/share/qemu/qboot.rom -smp 1 -m 512 \
    -nodefaults -no-user-config -display none -serial "file:$dir/console.log" \
    -kernel "$kernel" -initrd "$initrd" -append "$cmdline" \
    -device virtio-serial-pci,id=vser0 \
    -chardev "socket,id=req,path=$dir/req.sock,server=on,wait=off" -device virtserialport,bus=vser0.0,chardev=req,name=org.drover.req \
    -chardev "socket,id=evt,path=$dir/evt.sock,server=on,wait=off" -device virtserialport,bus=vser0.0,chardev=evt,name=org.drover.evt \
    -qmp "unix:$dir/qmp.sock,server=on,wait=off" &
  local q=$!
  until grep -q DROVER-INIT-READY "$dir/console.log" 2>/dev/null; do sleep 0.005; done
  local t1; t1=$(now)
  kill -9 $q; wait $q 2>/dev/null || true
  echo "$t1 - $t0" | bc -l
}

drover_boot() {
  local t0; t0=$(now)
  d vm start bench --wait >/dev/null 2>&1
  local t1; t1=$(now)
  d vm stop bench --force >/dev/null 2>&1
  echo "$t1 - $t0" | bc -l
}

median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

echo "boot to a usable guest, TCG, 1 vCPU, 512 MiB, $runs runs each (interleaved)"
: >"$tmp/drover.txt"; : >"$tmp/raw.txt"
for i in $(seq "$runs"); do
  a=$(drover_boot); b=$(raw_boot)
  echo "$a" >>"$tmp/drover.txt"; echo "$b" >>"$tmp/raw.txt"
  printf '  run %d: drover %.3f s   raw %.3f s\n' "$i" "$a" "$b"
done
md=$(median <"$tmp/drover.txt"); mr=$(median <"$tmp/raw.txt")
printf 'median: drover start --wait %.3f s, raw QEMU to /init marker %.3f s, ratio %.3f (goal <= 1.05)\n' "$md" "$mr" "$(echo "$md / $mr" | bc -l)"

# Memory of the daemon itself with 10 VMs defined, 2 running.
for i in $(seq 1 9); do d vm create "idle$i" --memory 256M >/dev/null; done
d vm start bench --wait >/dev/null 2>&1; d vm start idle1 --wait >/dev/null 2>&1
rss=$(awk '/VmRSS/ {print $2}' /proc/$dpid/status)
echo "droverd RSS with 10 VMs defined, 2 running: $((rss / 1024)) MiB ($rss kB)"

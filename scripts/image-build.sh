#!/usr/bin/env bash
# Builds the default guest image into $DROVER_IMAGE_DIR with a throwaway droverd, the same way a
# user's `drover image build` does; arguments go to that command (`--distro debian-12` builds the
# Debian image instead). Needs the binaries from scripts/build.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${DROVER_BIN_DIR:-$PWD/target/release}
tmp=$(mktemp -d /tmp/drover-image.XXXXXX)
# QEMU runs as drover-qemu (droverd --qemu-user), which must pass through to the state dir.
chmod 711 "$tmp"
"$bin/droverd" --state-dir "$tmp/state" --socket "$tmp/d.sock" \
  --image-dir "${DROVER_IMAGE_DIR:-$PWD/target/drover-images}" \
  --agent-binary "${DROVER_AGENT_BIN:-$PWD/target/x86_64-unknown-linux-gnu/release/drover-agent}" \
  >"$tmp/droverd.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 100); do [ -S "$tmp/d.sock" ] && break; sleep 0.1; done
if ! "$bin/drover" --socket "$tmp/d.sock" image build "$@"; then
  cat "$tmp/droverd.log" >&2
  exit 1
fi

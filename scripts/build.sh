#!/usr/bin/env bash
# Builds Drover: the host binaries (PROFILE=debug|release, default release) and the statically
# linked in-guest agent (always release: it goes into the guest image).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PROFILE:-release}
flag=(); [ "$profile" = release ] && flag=(--release)
echo "==> building droverd, drover and drover-controller ($profile)" >&2
cargo build -q "${flag[@]}" -p drover-host -p drover-cli -p drover-controller
echo "==> building the static drover-agent" >&2
# An explicit --target keeps RUSTFLAGS away from build scripts and proc macros.
RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --release -p drover-agent --target x86_64-unknown-linux-gnu

#!/usr/bin/env bash
# Runs Drover's whole test suite on a fresh Debian 12 machine: installs what it needs, builds,
# builds the guest image once, then runs formatting and lint checks, unit and property tests, and
# the end-to-end tests that boot real guests under QEMU.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
scripts/install-deps.sh --tests
cargo fmt --all -- --check
PROFILE=debug scripts/build.sh
export DROVER_BIN_DIR=$PWD/target/debug
export DROVER_AGENT_BIN=$PWD/target/x86_64-unknown-linux-gnu/release/drover-agent
export DROVER_IMAGE_DIR=$PWD/target/drover-images
export DROVER_IMAGE_CACHE=$DROVER_IMAGE_DIR
echo "==> building the guest image (cached in $DROVER_IMAGE_DIR)" >&2
scripts/image-build.sh
echo "==> Debian packages (built from these binaries, then checked)" >&2
PROFILE=debug NO_BUILD=1 scripts/package.sh >/dev/null
scripts/check-packages.sh
echo "==> clippy" >&2
cargo clippy -q --workspace --all-targets -- -D warnings
echo "==> tests" >&2
cargo test --workspace -- --test-threads="${TEST_THREADS:-2}"
echo "==> test suite finished in $(( $(date +%s) - start ))s" >&2

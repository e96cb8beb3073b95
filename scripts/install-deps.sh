#!/usr/bin/env bash
# Installs what Drover needs on Debian 12: QEMU, busybox-static for the guest image, qemu-utils,
# cpio. Idempotent and quiet when everything is already there.
set -euo pipefail
need=()
for pkg in qemu-system-x86 qemu-utils busybox-static cpio ca-certificates; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
# The guest image needs a Debian kernel package from the archive; make sure the index knows it.
if [ ${#need[@]} -gt 0 ] || ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
  echo "==> apt-get update" >&2
  apt-get update -qq
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing ${need[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

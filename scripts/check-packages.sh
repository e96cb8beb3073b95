#!/usr/bin/env bash
# Checks the .debs in target/debian as a user installing them would meet them: lintian finds no
# errors; unpacked, the shipped droverd starts with the shipped /etc/drover/droverd.toml (pointed
# at a private state dir and socket), the shipped drover talks to it, and the completions and man
# pages are there. Called by scripts/test.sh after scripts/package.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
debs=(target/debian/droverd_*.deb target/debian/drover_*.deb)
[ ${#debs[@]} -eq 2 ] || { echo "check-packages.sh: expected one droverd and one drover .deb in target/debian" >&2; exit 1; }
echo "==> lintian ${debs[*]##*/}" >&2
# Errors fail; warnings are printed. Suppressed: what a locally built, unsigned package cannot have.
if ! lintian --fail-on error --suppress-tags no-manual-page,initial-upload-closes-no-bugs,statically-linked-binary,embedded-library,binary-without-manpage "${debs[@]}" >&2; then
  echo "check-packages.sh: lintian found errors" >&2
  exit 1
fi
root=$(mktemp -d /tmp/drover-pkg.XXXXXX)
pid=""
trap '[ -n "$pid" ] && kill $pid 2>/dev/null; rm -rf "$root"' EXIT
for d in "${debs[@]}"; do dpkg-deb -x "$d" "$root"; done
for f in usr/bin/droverd usr/bin/drover usr/lib/drover/drover-agent lib/systemd/system/droverd.service \
  etc/drover/droverd.toml etc/logrotate.d/drover usr/share/bash-completion/completions/drover \
  usr/share/man/man1/drover.1.gz usr/share/man/man1/drover-vm-start.1.gz; do
  [ -e "$root/$f" ] || { echo "check-packages.sh: the packages lack /$f" >&2; exit 1; }
done
grep -q '^KillMode=process' "$root/lib/systemd/system/droverd.service" ||
  { echo "check-packages.sh: droverd.service would kill the VMs on restart (no KillMode=process)" >&2; exit 1; }
# The shipped config, with only the paths moved into the scratch dir.
sed -e "s#/var/lib/drover#$root/state#; s#/run/drover/drover.sock#$root/d.sock#; s#/usr/lib/drover/drover-agent#$root/usr/lib/drover/drover-agent#" \
  "$root/etc/drover/droverd.toml" >"$root/droverd.toml"
"$root/usr/bin/droverd" --config "$root/droverd.toml" >"$root/droverd.log" 2>&1 &
pid=$!
for _ in $(seq 100); do [ -S "$root/d.sock" ] && break; sleep 0.1; done
if ! out=$("$root/usr/bin/drover" --socket "$root/d.sock" --output json host info); then
  cat "$root/droverd.log" >&2
  echo "check-packages.sh: the packaged drover could not talk to the packaged droverd" >&2
  exit 1
fi
echo "$out" | grep -q '"accel"' || { echo "check-packages.sh: host info said: $out" >&2; exit 1; }
[ "$(stat -c %a "$root/d.sock")" = 600 ] || { echo "check-packages.sh: socket mode from the config file not applied" >&2; exit 1; }
echo "packages: 2 passed, 0 failed"

#!/usr/bin/env bash
# Builds Drover's Debian packages into target/debian/ from release binaries:
#   droverd_VERSION_amd64.deb  the daemon, the static guest agent for the default image, a systemd
#                              unit, /etc/drover/droverd.toml, logrotate for console logs
#   drover_VERSION_amd64.deb   the CLI with bash/zsh/fish completions and man pages
# Reproducible: file times come from the last commit (SOURCE_DATE_EPOCH), owners are root.
#
#   scripts/package.sh            # builds (release) if needed, then packages
#   NO_BUILD=1 scripts/package.sh # package binaries already built (PROFILE=debug: target/debug,
#                                 # as CI does to check the packaging without a release build)
# Install: apt-get install ./target/debian/droverd_*.deb ./target/debian/drover_*.deb
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD
profile=${PROFILE:-release}
[ -n "${NO_BUILD:-}" ] || PROFILE=$profile scripts/build.sh
bin=$top/target/$profile
agent=$top/target/x86_64-unknown-linux-gnu/release/drover-agent
for f in "$bin/droverd" "$bin/drover" "$agent"; do
  [ -x "$f" ] || { echo "package.sh: $f is missing (run scripts/build.sh)" >&2; exit 1; }
done
base=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
rev=$(git rev-parse --short=10 HEAD 2>/dev/null || echo unknown)
version="$base+git$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y%m%d).$rev"
out=$top/target/debian
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
# Only this build's packages stay (check-packages.sh and `apt-get install ./target/debian/...`).
rm -f "$out"/droverd_*.deb "$out"/drover_*.deb

# Common parts of a package: docs, control file, fixed times, md5sums.
finish() {
  local name=$1 root=$work/$1
  mkdir -p "$root/usr/share/doc/$name"
  cp packaging/copyright "$root/usr/share/doc/$name/copyright"
  printf '%s (%s) unstable; urgency=medium\n\n  * Built from the Drover repository at %s.\n\n -- Drover <drover@example.invalid>  %s\n' \
    "$name" "$version" "$rev" "$(date -u -R -d "@$SOURCE_DATE_EPOCH")" |
    gzip -9n >"$root/usr/share/doc/$name/changelog.gz"
  local size
  size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
  sed -i "s/@SIZE@/$size/" "$root/DEBIAN/control"
  (cd "$root" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | sort -z | xargs -0 md5sum >DEBIAN/md5sums)
  find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
  dpkg-deb --root-owner-group -Zxz --build "$root" "$out/${name}_${version}_amd64.deb" >/dev/null
  echo "$out/${name}_${version}_amd64.deb"
}

# droverd
r=$work/droverd
# Binaries ship stripped, as Debian's do (debug info stays in target/).
install -D -s -m 0755 "$bin/droverd" "$r/usr/bin/droverd"
install -D -s -m 0755 "$agent" "$r/usr/lib/drover/drover-agent"
install -D -m 0644 packaging/droverd/droverd.service "$r/lib/systemd/system/droverd.service"
install -D -m 0644 packaging/droverd/droverd.toml "$r/etc/drover/droverd.toml"
install -D -m 0644 packaging/droverd/logrotate "$r/etc/logrotate.d/drover"
install -d "$r/DEBIAN"
for s in postinst prerm postrm; do install -m 0755 "packaging/droverd/$s" "$r/DEBIAN/$s"; done
printf '/etc/drover/droverd.toml\n/etc/logrotate.d/drover\n' >"$r/DEBIAN/conffiles"
cat >"$r/DEBIAN/control" <<CTL
Package: droverd
Version: $version
Architecture: amd64
Maintainer: Drover <drover@example.invalid>
Installed-Size: @SIZE@
Depends: libc6 (>= 2.34), adduser, qemu-system-x86, qemu-utils, busybox-static, cpio
Recommends: drover, logrotate
Section: admin
Priority: optional
Description: Drover host daemon: runs QEMU virtual machines
 droverd runs QEMU guests on one host, keeps their truth in an embedded store,
 re-adopts running VMs after its own restart, and serves the API the drover
 command line uses (unix socket; TCP with TLS and tokens on request).
CTL
finish droverd

# drover (CLI)
r=$work/drover
install -D -s -m 0755 "$bin/drover" "$r/usr/bin/drover"
install -d "$r/usr/share/bash-completion/completions" "$r/usr/share/zsh/vendor-completions" \
  "$r/usr/share/fish/vendor_completions.d" "$r/usr/share/man/man1"
"$bin/drover" completion bash >"$r/usr/share/bash-completion/completions/drover"
"$bin/drover" completion zsh >"$r/usr/share/zsh/vendor-completions/_drover"
"$bin/drover" completion fish >"$r/usr/share/fish/vendor_completions.d/drover.fish"
"$bin/drover" man --dir "$r/usr/share/man/man1" 2>/dev/null
gzip -9n "$r"/usr/share/man/man1/*.1
chmod 0644 "$r"/usr/share/man/man1/* "$r"/usr/share/bash-completion/completions/* \
  "$r"/usr/share/zsh/vendor-completions/* "$r"/usr/share/fish/vendor_completions.d/*
install -d "$r/DEBIAN"
cat >"$r/DEBIAN/control" <<CTL
Package: drover
Version: $version
Architecture: amd64
Maintainer: Drover <drover@example.invalid>
Installed-Size: @SIZE@
Depends: libc6 (>= 2.34)
Suggests: droverd
Section: admin
Priority: optional
Description: command line for Drover: create, run and move virtual machines
 drover talks to the local droverd over its unix socket or to remote ones over
 HTTPS: VMs, live changes kept across shutdown, saved states, migration.
CTL
finish drover

#!/usr/bin/env bash
# Installs what Drover needs on Debian 12: one consistent QEMU set (system emulator, qemu-utils,
# firmware, all of one version), busybox-static and cpio for the guest image. Idempotent and quiet
# when everything is already there; on failure it shows apt's own output and exits non-zero.
#
#   scripts/install-deps.sh                    # QEMU 7.2 from Debian 12 (bookworm), the default
#   scripts/install-deps.sh --qemu backports   # QEMU 10.0 from bookworm-backports instead
#   scripts/install-deps.sh --tests            # also what the test suite needs (lintian, prometheus, chromium)
#   scripts/install-deps.sh --qemu-prefix DIR  # also unpack backports' QEMU 10.0 into DIR (dpkg-deb
#                                              # -x), beside the system set, for `droverd --qemu-dir DIR`
#
# Why versions are pinned: a machine may already carry part of another set (this project's machine
# image ships backports' qemu-utils 10.0). Asking apt for `qemu-system-x86` alone then makes it
# remove qemu-utils 10.0 to satisfy 7.2's dependencies without installing 7.2's: no qemu-img.
# Installing every package of the set at one exact version (downgrading where needed) cannot
# half-succeed that way.
set -euo pipefail

set_name=${DROVER_QEMU_SET:-debian}
prefix=""
tests=""
while [ $# -gt 0 ]; do
  case "$1" in
    --qemu) set_name=${2:?--qemu takes debian or backports}; shift 2 ;;
    --qemu-prefix) prefix=${2:?--qemu-prefix takes a directory}; shift 2 ;;
    --tests) tests=1; shift ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install-deps.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$set_name" in
  debian) suite=bookworm ;;
  backports) suite=bookworm-backports ;;
  *) echo "install-deps.sh: --qemu takes debian or backports, not '$set_name'" >&2; exit 2 ;;
esac

log=$(mktemp /tmp/drover-install-deps.XXXXXX.log)
trap 'rm -f "$log"' EXIT
# Runs apt quietly; on failure prints everything apt said, then stops.
apt_run() {
  if ! DEBIAN_FRONTEND=noninteractive "$@" >"$log" 2>&1; then
    echo "install-deps.sh: '$*' failed; apt said:" >&2
    cat "$log" >&2
    exit 1
  fi
}

backports_list=/etc/apt/sources.list.d/drover-bookworm-backports.sources
if { [ "$suite" = bookworm-backports ] || [ -n "$prefix" ]; } && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "==> adding bookworm-backports to apt's sources ($backports_list)" >&2
  cat >"$backports_list" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  rm -f /var/lib/apt/lists/*bookworm-backports* 2>/dev/null || true
fi

# A package's version in the chosen suite (the newest there). Arch-independent packages of one
# QEMU set may lack the set's binNMU suffix (+bN), so each package is looked up on its own.
suite_version() {
  apt-cache madison "$1" 2>/dev/null |
    awk -F'|' -v s="${2:-$suite}" '{gsub(/ /,"",$2)} $3 ~ (" " s "/") {print $2; exit}'
}
version=$(suite_version qemu-system-x86)
if [ -z "$version" ] || { [ -n "$prefix" ] && [ -z "$(suite_version qemu-system-x86 bookworm-backports)" ]; }; then
  echo "==> apt-get update" >&2
  apt_run apt-get update
  version=$(suite_version qemu-system-x86)
fi
if [ -z "$version" ]; then
  echo "install-deps.sh: apt knows no qemu-system-x86 in $suite (apt-cache madison qemu-system-x86 shows what it has)" >&2
  exit 1
fi

qemu_pkgs=(qemu-system-x86 qemu-system-common qemu-system-data qemu-utils)
# etcd for the cluster; protoc and its well-known .proto files (libprotobuf-dev) build the etcd-client
# crate; debootstrap builds the Debian guest image.
other_pkgs=(busybox-static cpio ca-certificates seabios ipxe-qemu etcd-server etcd-client protobuf-compiler libprotobuf-dev debootstrap)
# Only for the test suite: lintian checks the packages scripts/package.sh builds; prometheus
# scrapes droverd's /metrics in the metrics e2e test (started by the test, never as a service);
# chromium and its chromedriver drive the web console in the web_console e2e test.
[ -z "$tests" ] || other_pkgs+=(lintian prometheus chromium chromium-driver)

installed_version() { dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null | sed -n 's/^install ok installed //p'; }
need=()
for pkg in "${qemu_pkgs[@]}"; do
  v=$(suite_version "$pkg")
  [ -n "$v" ] || { echo "install-deps.sh: apt knows no $pkg in $suite" >&2; exit 1; }
  [ "$(installed_version "$pkg")" = "$v" ] || need+=("$pkg=$v")
done
for pkg in "${other_pkgs[@]}"; do
  [ -n "$(installed_version "$pkg")" ] || need+=("$pkg")
done
# The guest image needs a Debian kernel package from the archive; make sure the index knows it.
if ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
  echo "==> apt-get update" >&2
  apt_run apt-get update
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing ${need[*]}" >&2
  apt_run apt-get install -y --no-install-recommends --allow-downgrades "${need[@]}"
fi

# Unpacks the chosen suite's QEMU set into a private prefix (no dpkg database touched), so a
# second QEMU version can run beside the system one: droverd --qemu-dir DIR.
if [ -n "$prefix" ]; then
  mkdir -p "$prefix"
  prefix=$(cd "$prefix" && pwd)
  pv=$(suite_version qemu-system-x86 bookworm-backports)
  prefix_pkgs=()
  for pkg in "${qemu_pkgs[@]}"; do prefix_pkgs+=("$pkg=$(suite_version "$pkg" bookworm-backports)"); done
  stamp="$prefix/.drover-qemu-version"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$pv" ]; then
    echo "==> unpacking QEMU $pv (bookworm-backports) into $prefix" >&2
    debs=$(mktemp -d)
    (cd "$debs" && apt_run apt-get download "${prefix_pkgs[@]}")
    rm -rf "${prefix:?}/usr"
    for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$prefix"; done
    rm -rf "$debs"
    echo "$pv" >"$stamp"
  fi
fi

# QEMU runs as its own user (droverd --qemu-user, default drover-qemu), in group kvm where the
# host has one (hardware KVM): a guest escaping into QEMU is that user, not root.
if ! getent passwd drover-qemu >/dev/null; then
  echo "==> creating the system user drover-qemu (QEMU runs as it)" >&2
  useradd --system --user-group --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin --comment "Drover QEMU" drover-qemu
fi
if getent group kvm >/dev/null && ! id -nG drover-qemu | grep -qw kvm; then
  usermod -a -G kvm drover-qemu
fi
# Fast saves write-protect guest RAM with userfaultfd. QEMU 8.1+ opens /dev/userfaultfd (droverd
# gives it to drover-qemu); QEMU 7.2 calls userfaultfd(2), which a non-root user may only with
# vm.unprivileged_userfaultfd = 1 (the alternative, CAP_SYS_PTRACE, would let an escaped QEMU
# trace root's processes).
if [ "$set_name" = debian ]; then
  echo "vm.unprivileged_userfaultfd = 1" >/etc/sysctl.d/60-drover-userfaultfd.conf
  sysctl -q -w vm.unprivileged_userfaultfd=1
fi

# Every binary Drover needs must run, and the QEMU ones must be of one version.
check() {
  local what=$1; shift
  local out
  # The whole output first: `| head -n 1` would kill a long-winded binary with SIGPIPE.
  if ! out=$("$@" 2>&1); then
    echo "install-deps.sh: $what does not run: $out" >&2
    exit 1
  fi
  out=${out%%$'\n'*}
  [ -n "$out" ] || { echo "install-deps.sh: $what printed no version" >&2; exit 1; }
  printf '  %-22s %s\n' "$what" "$out" >&2
  echo "$out" | { grep -oE '[0-9]+\.[0-9]+(\.[0-9]+)?' || true; } | awk 'NR == 1'
}
echo "==> QEMU set $set_name ($version):" >&2
v1=$(check qemu-system-x86_64 qemu-system-x86_64 --version)
v2=$(check qemu-img qemu-img --version)
v3=$(check qemu-nbd qemu-nbd --version)
for fw in /usr/share/qemu/qboot.rom /usr/share/seabios/bios-256k.bin; do
  [ -r "$fw" ] || { echo "install-deps.sh: firmware $fw is missing" >&2; exit 1; }
done
if [ "$v1" != "$v2" ] || [ "$v1" != "$v3" ]; then
  echo "install-deps.sh: QEMU binaries disagree: qemu-system-x86_64 $v1, qemu-img $v2, qemu-nbd $v3" >&2
  exit 1
fi
if [ -n "$prefix" ]; then
  pv=$(check "$prefix emulator" "$prefix/usr/bin/qemu-system-x86_64" -L "$prefix/usr/share/qemu" --version)
  check "$prefix qemu-img" "$prefix/usr/bin/qemu-img" --version >/dev/null
  check "$prefix qemu-nbd" "$prefix/usr/bin/qemu-nbd" --version >/dev/null
  [ -r "$prefix/usr/share/qemu/qboot.rom" ] || { echo "install-deps.sh: $prefix has no qboot.rom" >&2; exit 1; }
  echo "  (private QEMU $pv in $prefix)" >&2
fi
# droverd starts QEMU as drover-qemu: it must reach the emulator (a prefix under a closed
# directory would only fail at the first VM start).
check "qemu as drover-qemu" runuser -u drover-qemu -- qemu-system-x86_64 --version >/dev/null
if [ -n "$prefix" ]; then
  check "$prefix as drover-qemu" runuser -u drover-qemu -- "$prefix/usr/bin/qemu-system-x86_64" \
    -L "$prefix/usr/share/qemu" --version >/dev/null
fi
check busybox busybox --help >/dev/null
check cpio cpio --version >/dev/null

#!/usr/bin/env bash
# Re-fetches the web console's terminal, xterm.js, from the npm registry into
# crates/drover-host/web/vendor/xterm/ (droverd embeds those files; nothing is fetched at run
# time). The version and the registry's sha512 integrity are pinned here: a tarball that does
# not match is refused. To upgrade, change both (`npm view @xterm/xterm@VERSION dist.integrity`).
set -euo pipefail
VERSION=6.0.0
INTEGRITY=sha512-TQwDdQGtwwDt+2cgKDLn0IRaSxYu1tSUjgKarSDkUM0ZNiSRXFpjxEsvc/Zgc5kq5omJ+V0a8/kIM2WD3sMOYg==

root=$(cd "$(dirname "$0")/.." && pwd)
dest=$root/crates/drover-host/web/vendor/xterm
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
npm pack --silent "@xterm/xterm@$VERSION" >/dev/null
tgz=xterm-xterm-$VERSION.tgz
got="sha512-$(openssl dgst -sha512 -binary "$tgz" | base64 -w0)"
if [ "$got" != "$INTEGRITY" ]; then
    echo "vendor-xterm: $tgz has integrity $got, expected $INTEGRITY; not installed" >&2
    exit 1
fi
tar -xzf "$tgz"
mkdir -p "$dest"
cp package/lib/xterm.js "$dest/xterm.js"
cp package/css/xterm.css "$dest/xterm.css"
cp package/LICENSE "$dest/LICENSE"
printf '@xterm/xterm %s\n%s\n' "$VERSION" "$INTEGRITY" >"$dest/VERSION"
echo "vendor-xterm: @xterm/xterm $VERSION in $dest"

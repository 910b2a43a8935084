#!/usr/bin/env bash
# Prints the path of a Node binary of the given major version and architecture, fetched once from
# the npm registry's node-linux-<arch> package (the official build) into .cache/node/ (ignored).
#   scripts/node-fetch.sh 22 [x64|arm64]
set -euo pipefail
major=${1:?usage: node-fetch.sh MAJOR [ARCH]}
arch=${2:-x64}
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${USERFAULTFD_CACHE:-$root/.cache}/node
mkdir -p "$cache"
existing=$(ls -d "$cache/$arch-$major."* 2>/dev/null | sort -V | tail -1 || true)
if [ -n "$existing" ] && [ -x "$existing/bin/node" ] && [ -z "${REFRESH:-}" ]; then echo "$existing/bin/node"; exit 0; fi
tmp=$(mktemp -d "$cache/fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
tgz=$(cd "$tmp" && timeout 300 npm pack --silent "node-linux-$arch@$major" 2>"$tmp/log" | tail -1) \
  || { cat "$tmp/log" >&2; exit 1; }
tar -C "$tmp" -xzf "$tmp/$tgz"
version=$(node -p "require('$tmp/package/package.json').version")
rm -rf "$cache/$arch-$version"
mv "$tmp/package" "$cache/$arch-$version"
chmod +x "$cache/$arch-$version/bin/node"
echo "$cache/$arch-$version/bin/node"

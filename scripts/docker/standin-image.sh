#!/usr/bin/env bash
# Builds a local stand-in for the official Node bookworm image when it cannot be pulled (offline,
# or a registry other than Docker Hub only): Debian bookworm (debootstrap, minbase) + g++, make,
# python3 from Debian + THIS machine's node, npm and Node headers, laid out as the official image
# lays them out (/usr/local/bin/node, /usr/local/include/node, /usr/local/lib/node_modules/npm).
#
#   scripts/docker/standin-image.sh TAG
#
# The debootstrapped root is cached in .cache/docker/ (git-ignored), so a rebuild after the
# image was removed takes seconds; the image itself stays in Docker's store between runs.
# The Debian mirror is the one this machine's apt uses (DEBIAN_MIRROR overrides it): see
# debian-mirror.js. Nothing is archived or deleted through a mount debootstrap left behind
# (mounts.sh).
set -euo pipefail
tag=${1:?usage: standin-image.sh TAG}
here=$(cd "$(dirname "$0")" && pwd)
root_dir=$(cd "$here/../.." && pwd)
cache=${USERFAULTFD_CACHE:-$root_dir/.cache}/docker
# shellcheck source=mounts.sh
. "$here/mounts.sh"
docker=${DOCKER:-docker}
mkdir -p "$cache"

base_tar=$cache/bookworm-minbase-build.tar
if [ ! -s "$base_tar" ]; then
  command -v debootstrap >/dev/null || { echo "standin: installing debootstrap"; apt-get install -y -q debootstrap >/dev/null; }
  mirror=$(node "$here/debian-mirror.js")
  work=$(mktemp -d "$cache/rootfs.XXXXXX")
  trap 'safe_remove "$work"' EXIT
  echo "standin: debootstrap bookworm (minbase + g++ make python3) from $mirror"
  start=$SECONDS
  timeout 900 debootstrap --variant=minbase --include=ca-certificates,g++,make,python3 \
    bookworm "$work/root" "$mirror" > "$cache/debootstrap.log" 2>&1 \
    || { tail -30 "$cache/debootstrap.log"; exit 1; }
  release_mounts "$work/root"
  rm -rf --one-file-system "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
  tar --one-file-system -C "$work/root" -cf "$base_tar.tmp" .
  mv "$base_tar.tmp" "$base_tar"
  safe_remove "$work"; trap - EXIT
  echo "standin: debootstrap took $((SECONDS - start)) s"
fi

node_bin=$(readlink -f "$(command -v node)")
node_prefix=$(dirname "$(dirname "$node_bin")")
npm_dir=$(dirname "$(dirname "$(readlink -f "$(command -v npm)")")")
headers=$node_prefix/include/node
[ -f "$headers/node_api.h" ] || { echo "standin: no Node headers at $headers" >&2; exit 1; }

# The image = the cached base + node, npm and the headers.
layer=$(mktemp -d "$cache/image.XXXXXX")
trap 'safe_remove "$layer"' EXIT
tar -C "$layer" -xf "$base_tar"
mkdir -p "$layer/usr/local/bin" "$layer/usr/local/include" "$layer/usr/local/lib/node_modules"
cp "$node_bin" "$layer/usr/local/bin/node"
cp -r "$headers" "$layer/usr/local/include/node"
cp -r "$npm_dir" "$layer/usr/local/lib/node_modules/npm"
# this machine's npm may carry a builtin npmrc (a cafile of the host): the official image has none
rm -f "$layer/usr/local/lib/node_modules/npm/npmrc"
ln -s ../lib/node_modules/npm/bin/npm-cli.js "$layer/usr/local/bin/npm"
ln -s ../lib/node_modules/npm/bin/npx-cli.js "$layer/usr/local/bin/npx"
tar -C "$layer" -cf "$layer.tar" .
$docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["node"]' \
  --message "userfaultfd stand-in for node:$(node -p 'process.versions.node')-bookworm" \
  "$layer.tar" "$tag" >/dev/null
rm -f "$layer.tar"
echo "standin: imported $tag (node $(node -v), npm $(npm -v))"

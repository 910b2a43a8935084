#!/usr/bin/env bash
# Native style: `check` (npm run lint) fails on any file clang-format would change; `fix`
# (npm run format) rewrites them. The style is .clang-format, pinned to Debian's clang-format 14.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v clang-format >/dev/null; then
  echo "clang-format is not installed (Debian/Ubuntu: apt-get install clang-format): native/ cannot be checked" >&2
  exit 1
fi
mapfile -t files < <(git ls-files 'native/*.cc' 'native/*.h' 'bench/c/*.c' 'bench/c/*.h' 2>/dev/null || find native bench/c -name '*.cc' -o -name '*.h' -o -name '*.c')
case "${1:-check}" in
  check) clang-format --dry-run --Werror "${files[@]}" ;;
  fix) clang-format -i "${files[@]}" ;;
  *) echo "usage: $0 check|fix" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Fails when a C++ file under src/, tests/ or bench/ is not formatted as .clang-format says.
set -euo pipefail
cd "$(dirname "$0")/.."
files=$(git ls-files 'src/*.cpp' 'src/*.h' 'tests/*.cpp' 'tests/*.h' 'bench/*.cpp' 2>/dev/null || true)
[ -n "$files" ] || files=$(find src tests bench -name '*.cpp' -o -name '*.h')
if ! echo "$files" | xargs clang-format --dry-run --Werror; then
  echo "clang-format: run scripts/format.sh to fix the files above" >&2
  exit 1
fi
echo "format ok"

#!/usr/bin/env bash
# The unit tests under AddressSanitizer and UndefinedBehaviorSanitizer, in a build of their own
# (build-asan, -DMOESERVE_SANITIZE=ON): only the test programs named below and what they link.
# Any sanitizer report fails the run (UBSan stops at its first finding).
# Usage: scripts/test-sanitizers.sh [TEST_PROGRAM...]   (default: the list below)
set -euo pipefail
cd "$(dirname "$0")/.."
progs=("$@")
[ ${#progs[@]} -gt 0 ] ||
  progs=(test_core test_kernels test_tokenizer test_model test_moe test_engine test_server test_cli)
launcher=()
if command -v ccache >/dev/null 2>&1; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
  # Paths relative to the checkout, so another clone of it reuses the cache.
  export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$PWD}"
fi
start=$(date +%s)
# Build type "Sanitize": -O1 compiles the SIMD kernels about 3x faster than -O2 under the
# sanitizers; -g1 puts line numbers in the reports at little cost.
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Sanitize -DMOESERVE_SANITIZE=ON \
  -DCMAKE_CXX_FLAGS_SANITIZE="-O1 -g1" -DCMAKE_C_FLAGS_SANITIZE="-O1 -g1" "${launcher[@]}" \
  >/dev/null
ninja -C build-asan -j"$(nproc)" "${progs[@]}"
built=$(date +%s)

# exitcode 86: a report never passes for the exit status 1 that error-path tests expect.
export ASAN_OPTIONS=detect_leaks=1:check_initialization_order=1:strict_init_order=1:exitcode=86
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:exitcode=86
# Open MPI keeps allocations of its own until exit; the suppressions name only its libraries.
export LSAN_OPTIONS=suppressions=$PWD/scripts/lsan-suppressions.txt:print_suppressions=0
logs=build-asan/sanitizer-logs
rm -rf "$logs" && mkdir -p "$logs"
# nproc programs at a time, each with its output in its own log.
failed=()
running=()
finish_one() {
  local pid=${running[0]%%:*} name=${running[0]#*:}
  running=("${running[@]:1}")
  if wait "$pid"; then
    echo "sanitizers: ok   $name ($(tail -n 1 "$logs/$name.log"))"
  else
    echo "sanitizers: FAIL $name (log: $logs/$name.log)"
    tail -n 60 "$logs/$name.log"
    failed+=("$name")
  fi
}
# Left out here (scripts/test.sh runs them): the reference tests on the long YaRN fixture, one
# sequence of 5,000 tokens through the code the other fixtures run on up to 100 (they took 2 of
# the run's 9 minutes under the sanitizers).
skip='*/v3_long_yarn'
for p in "${progs[@]}"; do
  build-asan/"$p" --gtest_brief=1 --gtest_filter="-$skip" >"$logs/$p.log" 2>&1 &
  running+=("$!:$p")
  [ ${#running[@]} -lt "$(nproc)" ] || finish_one
done
while [ ${#running[@]} -gt 0 ]; do finish_one; done
end=$(date +%s)
echo "sanitizers: build $((built - start)) s, tests $((end - built)) s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "sanitizers: FAILED: ${failed[*]}" >&2
  exit 1
fi

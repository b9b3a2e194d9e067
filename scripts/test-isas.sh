#!/usr/bin/env bash
# The model-level tests (forward, reference against transformers, engine, MoE dispatch, model)
# once more for every instruction set below the best one this CPU has: MOESERVE_ISA caps the
# kernels' choice (scripts/test.sh ran the best). The kernel tests compare the ISAs themselves.
# Needs build/ from scripts/build.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
isas=()
if [[ " $flags " == *" avx2 "* && " $flags " == *" fma "* && " $flags " == *" f16c "* ]]; then
  isas+=(scalar)
  [[ " $flags " != *" avx512f "* ]] || isas+=(avx2)
  # With the bf16 dot-product instruction the best is avx512bf16: AVX-512F alone is below it.
  [[ " $flags " != *" avx512_bf16 "* ]] || isas+=(avx512)
fi
if [ ${#isas[@]} -eq 0 ]; then
  echo "isas: this CPU runs scalar kernels only, which scripts/test.sh tested"
  exit 0
fi
progs=(test_engine test_moe test_model)
ninja -C build -j"$(nproc)" "${progs[@]}" >/dev/null
failed=()
ninja -C build -j"$(nproc)" moeserve >/dev/null
for isa in "${isas[@]}"; do
  # The cap takes effect (moeserve --version names the kernels' instruction set).
  MOESERVE_ISA=$isa build/moeserve --version | grep -q "(kernels: $isa)" ||
    { echo "isas: MOESERVE_ISA=$isa is not applied: $(MOESERVE_ISA=$isa build/moeserve --version)" >&2; exit 1; }
  for p in "${progs[@]}"; do
    start=$(date +%s)
    if MOESERVE_ISA=$isa build/"$p" --gtest_brief=1 >"build/isa-$isa-$p.log" 2>&1; then
      echo "isas: ok   MOESERVE_ISA=$isa $p ($(($(date +%s) - start)) s)"
    else
      echo "isas: FAIL MOESERVE_ISA=$isa $p (log: build/isa-$isa-$p.log)"
      tail -n 60 "build/isa-$isa-$p.log"
      failed+=("$isa/$p")
    fi
  done
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "isas: FAILED: ${failed[*]}" >&2
  exit 1
fi

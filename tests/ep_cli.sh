#!/usr/bin/env bash
# Expert parallelism through the real binary under mpirun: for the same requests the output is
# bit-identical for EP = 1, 2, 4 and 8 ranks (oversubscribed), with and without redundant
# experts and with placement files (score and generate), for bf16, fp8 and int4 weights and
# for every KV cache dtype; a rank that fails ends the job with one clear message; speculative
# decoding (generate and bench --speculative-tokens) gives one process's tokens and acceptance.
# Usage: ep_cli.sh MOESERVE_BINARY SOURCE_DIR
set -euo pipefail
bin=$1
src=$2
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mpi="mpirun --oversubscribe -np"
fail() { echo "FAIL: $*" >&2; exit 1; }

"$bin" init-model --preset tiny --out "$tmp/tiny" --seed 11 2>/dev/null
ids=5,17,200,2,2,2,41,7,99,123,64,1,0,255
for model in "$tmp/tiny" "$src/tests/fixtures/models/v3_tiny" "$src/tests/fixtures/models/v3_fp8_tiny" \
  "$src/tests/fixtures/models/v3_tiny_int4"; do
  "$bin" score --model "$model" --ids $ids > "$tmp/ref.json"
  "$bin" generate --model "$model" --prompt-ids 3,1,4,1,5 --max-tokens 10 --json --ignore-eos > "$tmp/ref_gen.json" 2>/dev/null
  for n in 2 4 8; do
    for red in 0 3; do
      $mpi $n "$bin" score --model "$model" --ids $ids --redundant-experts $red --threads 1 > "$tmp/ep.json"
      cmp -s "$tmp/ref.json" "$tmp/ep.json" || fail "score differs at EP=$n redundant=$red on $model"
    done
    $mpi $n "$bin" generate --model "$model" --prompt-ids 3,1,4,1,5 --max-tokens 10 --json --ignore-eos --threads 1 \
      > "$tmp/ep_gen.json" 2>/dev/null
    cmp -s "$tmp/ref_gen.json" "$tmp/ep_gen.json" || fail "generate differs at EP=$n on $model"
  done
  echo "ok: $(basename "$model") bit-identical at EP 1/2/4/8"
done

# Overlapped micro-batches (--ep-overlap, a prompt over the threshold of 64 tokens) through
# MPI all-to-alls: on and off bit-identical to one process, score and generate.
long_ids=$(seq -s, 3 3 300)
gen="generate --model $tmp/tiny --prompt-ids $long_ids --max-tokens 6 --json --ignore-eos --threads 1"
"$bin" score --model "$tmp/tiny" --ids $long_ids > "$tmp/ref.json"
"$bin" $gen > "$tmp/ref_gen.json" 2>/dev/null
for n in 2 4; do
  for ov in on off; do
    $mpi $n "$bin" score --model "$tmp/tiny" --ids $long_ids --ep-transport messages --ep-overlap $ov \
      --threads 1 > "$tmp/ep.json"
    cmp -s "$tmp/ref.json" "$tmp/ep.json" || fail "score differs at EP=$n with --ep-overlap $ov"
    $mpi $n "$bin" $gen --ep-transport messages --ep-overlap $ov > "$tmp/ep_gen.json" 2>/dev/null
    cmp -s "$tmp/ref_gen.json" "$tmp/ep_gen.json" || fail "generate differs at EP=$n with --ep-overlap $ov"
  done
done
echo "ok: --ep-overlap on and off bit-identical at EP 1/2/4"
# fp8 dispatch: not the f32 output, but the same for every EP size and either overlap setting.
fp8="score --model $tmp/tiny --ids $long_ids --ep-transport messages --ep-dispatch-dtype fp8 --threads 1"
$mpi 2 "$bin" $fp8 > "$tmp/fp8_ref.json"
! cmp -s "$tmp/ref.json" "$tmp/fp8_ref.json" || fail "--ep-dispatch-dtype fp8 scores as f32 does"
for n in 2 4; do
  for ov in on off; do
    $mpi $n "$bin" $fp8 --ep-overlap $ov > "$tmp/ep.json"
    cmp -s "$tmp/fp8_ref.json" "$tmp/ep.json" || fail "fp8 dispatch differs at EP=$n, --ep-overlap $ov"
  done
done
echo "ok: fp8 dispatch the same at EP 2/4, overlap on and off"

# Every KV cache dtype (the runs above use the default, bf16): bit-identical across EP sizes,
# and each dtype's output its own (the flag is not ignored).
"$bin" score --model "$tmp/tiny" --ids $ids --kv-cache-dtype bf16 > "$tmp/ref_bf16.json"
for kvd in f32 fp8; do
  "$bin" score --model "$tmp/tiny" --ids $ids --kv-cache-dtype $kvd > "$tmp/ref.json"
  ! cmp -s "$tmp/ref.json" "$tmp/ref_bf16.json" || fail "--kv-cache-dtype $kvd scores as bf16 does"
  gen="generate --model $tmp/tiny --prompt-ids 3,1,4,1,5 --max-tokens 10 --json --ignore-eos --kv-cache-dtype $kvd"
  "$bin" $gen > "$tmp/ref_gen.json" 2>/dev/null
  for n in 2 4; do
    $mpi $n "$bin" score --model "$tmp/tiny" --ids $ids --kv-cache-dtype $kvd --threads 1 > "$tmp/ep.json"
    cmp -s "$tmp/ref.json" "$tmp/ep.json" || fail "score differs at EP=$n with the $kvd cache"
    $mpi $n "$bin" $gen --threads 1 > "$tmp/ep_gen.json" 2>/dev/null
    cmp -s "$tmp/ref_gen.json" "$tmp/ep_gen.json" || fail "generate differs at EP=$n with the $kvd cache"
  done
  echo "ok: $kvd cache bit-identical at EP 1/2/4"
done

# Per-expert load recorded, and a placement file (experts in reverse order over 3 ranks).
$mpi 2 "$bin" score --model "$tmp/tiny" --ids $ids --expert-load-out "$tmp/load.json" --threads 1 > /dev/null
grep -q '"n_experts": 16' "$tmp/load.json" || fail "no expert load written"
"$bin" plan-placement --load "$tmp/load.json" --ranks 4 --redundant-experts 4 --out "$tmp/planned.json" 2>/dev/null
$mpi 4 "$bin" score --model "$tmp/tiny" --ids $ids --placement "$tmp/planned.json" --threads 1 > "$tmp/ep.json"
"$bin" score --model "$tmp/tiny" --ids $ids > "$tmp/ref.json"
cmp -s "$tmp/ref.json" "$tmp/ep.json" || fail "score differs with a planned placement"
cat > "$tmp/placement.json" <<'JSON'
{"format": "moeserve-placement", "version": 1, "n_experts": 16, "n_ranks": 3,
 "default": [[15, 14, 13, 12, 11, 0], [10, 9, 8, 7, 6, 1], [5, 4, 3, 2, 0]]}
JSON
$mpi 3 "$bin" score --model "$tmp/tiny" --ids $ids --placement "$tmp/placement.json" --threads 1 > "$tmp/ep.json" \
  || fail "placement file run failed"
"$bin" score --model "$tmp/tiny" --ids $ids > "$tmp/ref.json"
cmp -s "$tmp/ref.json" "$tmp/ep.json" || fail "score differs with a placement file"
# generate, too, with redundant experts: from --redundant-experts, a planned placement and the file.
gen="generate --model $tmp/tiny --prompt-ids 3,1,4,1,5 --max-tokens 10 --json --ignore-eos --threads 1"
"$bin" $gen > "$tmp/ref_gen.json" 2>/dev/null
$mpi 2 "$bin" $gen --redundant-experts 3 > "$tmp/ep_gen.json" 2>/dev/null
cmp -s "$tmp/ref_gen.json" "$tmp/ep_gen.json" || fail "generate differs with redundant experts"
$mpi 4 "$bin" $gen --placement "$tmp/planned.json" > "$tmp/ep_gen.json" 2>/dev/null
cmp -s "$tmp/ref_gen.json" "$tmp/ep_gen.json" || fail "generate differs with a planned placement"
$mpi 3 "$bin" $gen --placement "$tmp/placement.json" > "$tmp/ep_gen.json" 2>/dev/null
cmp -s "$tmp/ref_gen.json" "$tmp/ep_gen.json" || fail "generate differs with a placement file"
echo "ok: load recording and placement file (score and generate)"

# A rank whose model folder lacks the weights: a clear message from rank 0, no hang.
mkdir -p "$tmp/broken" && cp "$tmp/tiny/config.json" "$tmp/broken/"
set +e
out=$(timeout 60 mpirun -np 1 "$bin" score --model "$tmp/tiny" --ids 1,2 : -np 1 "$bin" score --model "$tmp/broken" --ids 1,2 2>&1)
rc=$?
set -e
[ $rc -ne 0 ] && [ $rc -ne 124 ] || fail "a failing rank gave rc=$rc (124 = hang)"
echo "$out" | grep -q "error: rank 1 of 2 failed: model folder .* has no .safetensors files" \
  || fail "no clear message from rank 0: $out"
echo "ok: failing rank ends the job cleanly"

# Speculative decoding under mpirun (the MTP module's forwards in lockstep with the other
# ranks' empty ones): generate gives one process's output ids and draft and acceptance counts on
# the trained model, greedy and seeded-sampled, at EP 2 and 4; greedy, the ids of decoding
# without speculation.
shakes="$src/data/models/shakespeare-v3-tiny"
prompt=0,471,1141,286,817,29,329
"$bin" generate --model "$shakes" --prompt-ids $prompt --max-tokens 40 --json --ignore-eos \
  > "$tmp/plain.json" 2>/dev/null
plain_ids=$(grep -o '"output_ids":\[[0-9,]*\]' "$tmp/plain.json")
for sampling in "" "--temperature 0.8 --top-p 0.95 --seed 7"; do
  gen="generate --model $shakes --prompt-ids $prompt --max-tokens 40 --json --ignore-eos --speculative-tokens 2 $sampling"
  "$bin" $gen > "$tmp/ref_spec.json" 2>/dev/null
  grep -q '"draft_tokens":[1-9]' "$tmp/ref_spec.json" || fail "no drafts: $(cat "$tmp/ref_spec.json")"
  grep -q '"accepted_tokens":[1-9]' "$tmp/ref_spec.json" || fail "no draft accepted: $(cat "$tmp/ref_spec.json")"
  if [ -z "$sampling" ]; then
    grep -qF "$plain_ids" "$tmp/ref_spec.json" || fail "greedy speculative output differs from plain decoding"
  fi
  for n in 2 4; do
    $mpi $n "$bin" $gen --threads 1 > "$tmp/ep_spec.json" 2>/dev/null \
      || fail "generate --speculative-tokens 2 failed at EP=$n ($sampling)"
    cmp -s "$tmp/ref_spec.json" "$tmp/ep_spec.json" \
      || fail "speculative generate differs at EP=$n ($sampling): $(cat "$tmp/ep_spec.json") vs $(cat "$tmp/ref_spec.json")"
  done
done
echo "ok: generate --speculative-tokens 2 at EP 2/4 equals one process (ids and acceptance)"
# bench: every rank decodes its own copy of the sequence, so EP 2 verifies twice the drafts of
# one process and accepts twice as many.
bench="bench --model $shakes --prompt-len 16 --decode-tokens 12 --speculative-tokens 1 --json"
"$bin" $bench 2>/dev/null | tail -1 > "$tmp/bench1.json"
$mpi 2 "$bin" $bench --threads 1 2>/dev/null | tail -1 > "$tmp/bench2.json" \
  || fail "bench --speculative-tokens 1 failed at EP=2"
python3 - "$tmp/bench1.json" "$tmp/bench2.json" <<'PY' || fail "bench --speculative-tokens at EP 2"
import json, sys
one, two = (json.load(open(p)) for p in sys.argv[1:])
assert one["spec_draft_tokens"] > 0 and one["spec_accepted_tokens"] > 0, one
assert two["ranks"] == 2 and two["speculative_tokens"] == 1, two
for k in ("spec_draft_tokens", "spec_accepted_tokens"):
    assert two[k] == 2 * one[k], (k, one[k], two[k])
assert two["spec_decode_tokens_per_s"] > 0 and two["verify_seconds"] > 0, two
PY
echo "ok: bench --speculative-tokens 1 at EP 2 (acceptance of both ranks' sequences)"
echo "1 passed, 0 failed"

#!/usr/bin/env bash
# The newcomer's one command: installs what moeserve needs, builds it (the moeserve binary only)
# and generates from the model shipped in data/models/shakespeare-v3-tiny (the DeepSeek-V3
# architecture, 6.6 M parameters, trained on Shakespeare by tools/train_tiny.py): greedy and
# sampled with `moeserve generate`, then a chat request to `moeserve serve`.
# Arguments go to the two `generate` runs (e.g. --max-tokens 100).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
./scripts/build.sh moeserve
model=data/models/shakespeare-v3-tiny
prompt=$'KING HENRY:\nNow, my good lords,'
log=$(mktemp -d)
server=""
trap '[ -z "$server" ] || { kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; }; rm -rf "$log"' EXIT
# stderr (timings, the seed) goes to a file, shown only when a command fails.
generate() {
  ./build/moeserve generate "$model" --prompt "$prompt" --max-tokens 48 "$@" 2>"$log/err" ||
    { cat "$log/err" >&2; exit 1; }
}

echo "== moeserve generate, greedy (the prompt, then what the model wrote) =="
printf '%s' "$prompt"
generate "$@"
echo
echo
echo "== moeserve generate, sampled (--temperature 0.8 --top-p 0.95 --seed 7) =="
printf '%s' "$prompt"
generate --temperature 0.8 --top-p 0.95 --seed 7 "$@"
echo
echo

echo "== moeserve serve, and a chat request to /v1/chat/completions =="
./build/moeserve serve "$model" --port 0 --served-model-name shakespeare-v3-tiny \
  --disable-log-requests --disable-log-stats >"$log/out" 2>"$log/err" &
server=$!
url=""
for _ in $(seq 600); do  # up to 60 s for the "serving ... at http://..." line
  url=$(grep -o 'http://[0-9.]*:[0-9]*' "$log/out" 2>/dev/null | head -n1 || true)
  [ -n "$url" ] && break
  if ! kill -0 "$server" 2>/dev/null; then
    cat "$log/err" >&2
    exit 1
  fi
  sleep 0.1
done
[ -n "$url" ] || { echo "moeserve serve did not start" >&2; cat "$log/err" >&2; exit 1; }
request='{"model": "shakespeare-v3-tiny", "max_tokens": 64, "temperature": 0.8, "top_p": 0.95,
          "seed": 7, "messages": [{"role": "user", "content": "What news from Verona?"}]}'
echo "POST $url/v1/chat/completions"
echo "user: What news from Verona?"
curl -sS "$url/v1/chat/completions" -H 'Content-Type: application/json' -d "$request" |
  python3 -c 'import json, sys
r = json.load(sys.stdin)
if "choices" not in r: sys.exit("error: %s" % r)
c = r["choices"][0]
print("assistant:", c["message"]["content"])
print("(finish_reason %s, %d tokens)" % (c["finish_reason"], r["usage"]["completion_tokens"]))'

#!/usr/bin/env bash
# The newcomer's one command: installs what moeserve needs, builds it (the moeserve binary only),
# creates the demo model (DeepSeek-V3 architecture and tokenizer, small dimensions, RANDOM weights)
# and generates.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
./scripts/build.sh moeserve
if [ ! -f models/demo/model.safetensors ]; then
  ./build/moeserve init-model --preset demo --out models/demo
fi
echo "== moeserve generate on the demo model (random weights: the text is meaningless) =="
./build/moeserve generate models/demo --chat --prompt "Explain mixture-of-experts in one sentence." \
  --max-tokens 32 "$@"
echo

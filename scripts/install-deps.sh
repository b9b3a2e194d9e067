#!/usr/bin/env bash
# Installs the Debian packages moeserve builds and tests with (needs root or sudo).
set -euo pipefail
pkgs=(build-essential cmake ninja-build pkg-config git clang-format
      libopenmpi-dev openmpi-bin nlohmann-json3-dev libcli11-dev libpcre2-dev
      libcpp-httplib-dev libgtest-dev libgmock-dev libbenchmark-dev python3 python3-venv curl)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "dependencies: all installed"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"

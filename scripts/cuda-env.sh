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
CU="$("$CUDA_VENV/bin/python" - <<'PY' 2>/dev/null
import pathlib, site
for s in site.getsitepackages():
    p = pathlib.Path(s) / "nvidia" / "cu13"
    if (p / "bin" / "nvcc").exists():
        print(p)
PY
)"
if [ -z "$CU" ]; then
  "$CUDA_VENV/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-nvvm==13.0.88
  CU="$("$CUDA_VENV/bin/python" -c 'import pathlib, site; print(next(pathlib.Path(s) / "nvidia" / "cu13" for s in site.getsitepackages() if (pathlib.Path(s) / "nvidia" / "cu13" / "bin" / "nvcc").exists()))')"
fi
export CUDA_HOME="$CU" CUDA_PATH="$CU" PATH="$CU/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
echo "cuda-env: nvcc $("$CU/bin/nvcc" --version | tail -1), compute capability $CUDA_COMPUTE_CAP" >&2

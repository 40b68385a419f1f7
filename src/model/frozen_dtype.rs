//! `--frozen-dtype`: the storage dtype of weights that are never trained (the DPO reference
//! model, the LoRA base). Compute stays f32: a frozen matrix is upcast right before each use
//! (per layer, transient) and never kept as an f32 copy. Upcasting bf16/f16 to f32 is exact,
//! so holding a bf16 checkpoint's matrices in bf16 gives bit-identical results to holding them
//! in f32 at half the bytes; only downcasting an f32 checkpoint (`bf16`) changes numbers.
//! TRL has no such option (it holds the reference in the policy's `torch_dtype`).
//!
//! Only matrices (rank ≥ 2: linear weights, embeddings, lm_head) follow the rule; norm weights
//! and biases (rank 1, well under 0.1% of the parameters) are always f32, so the fused norm
//! kernels keep applying unchanged.

use candle_core::{DType, Tensor};

use crate::error::{LeashError, Result};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FrozenDtype {
    /// The checkpoint's own dtype when it is bf16/f16, else f32: exact.
    #[default]
    Auto,
    /// Everything f32 (leash's behaviour before the option).
    F32,
    /// bf16 always: an f32 checkpoint is rounded to bf16 (not exact).
    Bf16,
}

impl FrozenDtype {
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "auto" => Ok(FrozenDtype::Auto),
            "f32" | "float32" => Ok(FrozenDtype::F32),
            "bf16" | "bfloat16" => Ok(FrozenDtype::Bf16),
            other => Err(LeashError::usage(
                format!("--frozen-dtype `{other}` is not one of auto, f32, bf16"),
                "auto (default) keeps a bf16/f16 checkpoint's frozen weights in that dtype (exact); \
                 f32 upcasts everything; bf16 also rounds f32 checkpoints (not exact)",
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FrozenDtype::Auto => "auto",
            FrozenDtype::F32 => "f32",
            FrozenDtype::Bf16 => "bf16",
        }
    }

    /// The dtype a checkpoint tensor of `stored` dtype and `rank` is held in.
    pub fn storage(self, stored: DType, rank: usize) -> DType {
        if rank < 2 {
            return DType::F32;
        }
        match (self, stored) {
            (FrozenDtype::Auto, DType::BF16 | DType::F16) => stored,
            (FrozenDtype::Bf16, _) => DType::BF16,
            _ => DType::F32,
        }
    }
}

/// Whether `t` is held in a half-precision storage dtype that compute upcasts.
pub fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
}

/// The dtype compute runs in for weights stored as `dtype`: f32 for bf16/f16, else unchanged
/// (f64 in the finite-difference tests).
pub fn compute_dtype(dtype: DType) -> DType {
    if is_half(dtype) {
        DType::F32
    } else {
        dtype
    }
}

/// `t` in its compute dtype: an exact, transient f32 copy of a bf16/f16 tensor; `t` itself
/// (shared storage, no copy) otherwise.
pub fn upcast(t: &Tensor) -> candle_core::Result<Tensor> {
    if is_half(t.dtype()) {
        t.to_dtype(DType::F32)
    } else {
        Ok(t.clone())
    }
}

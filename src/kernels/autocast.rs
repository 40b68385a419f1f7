//! Mixed precision (`--bf16`, TRL's name): while [`autocast`] is on for a thread, every
//! matrix product of the decoders' linear layers and LoRA adapters runs on bf16 copies of its
//! operands and hands its result back in the caller's dtype (f32), as PyTorch's autocast does
//! for `nn.Linear` under TRL's `bf16=True`. Everything else stays f32: master weights and
//! AdamW's moments (the casts are ordinary differentiable ops, so gradients reach the f32
//! weights in f32), the residual stream, norms, RoPE, attention (with its q·kᵀ and p·v in bf16,
//! tiny Qwen2's log-probs moved by 0.080 nats, over the 0.05 allowed), the lm_head's product and
//! the log-softmax over the vocabulary (every log-prob is read from those logits: in bf16 they
//! moved tiny GPT-2's log-probs by up to 0.052 nats, in f32 by 0.039), the losses and every
//! reduction.
//!
//! Per thread, like [`super::force_composed`]: a training step's forward, its backward and
//! gradient checkpointing's reruns run on the thread that turned it on.

use std::cell::Cell;

use candle_core::{DType, Tensor};

thread_local! {
    static AUTOCAST: Cell<Option<DType>> = const { Cell::new(None) };
}

/// Runs this thread's matrix products in `dtype` (`None`: in their operands' dtype) until the
/// returned guard is dropped, which restores the previous setting.
pub fn autocast(dtype: Option<DType>) -> Autocast {
    Autocast {
        previous: AUTOCAST.with(|a| a.replace(dtype)),
    }
}

/// Guard of [`autocast`].
#[must_use = "mixed precision ends when this guard is dropped"]
pub struct Autocast {
    previous: Option<DType>,
}

impl Drop for Autocast {
    fn drop(&mut self) {
        AUTOCAST.with(|a| a.set(self.previous));
    }
}

/// The dtype this thread's products of `x` run in, when autocast changes it: only f32
/// activations are cast (an f64 finite-difference check, or bf16 data, keeps its own).
pub fn active_for(x: &Tensor) -> Option<DType> {
    AUTOCAST
        .with(Cell::get)
        .filter(|&dt| x.dtype() == DType::F32 && dt != DType::F32)
}

/// `x · w`, in the autocast dtype when it is on for `x` (result back in x's dtype), else as is.
pub fn matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    match active_for(x) {
        Some(dt) => x
            .to_dtype(dt)?
            .matmul(&w.to_dtype(dt)?)?
            .to_dtype(x.dtype()),
        None => x.matmul(w),
    }
}

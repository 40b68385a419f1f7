//! Device kernels, apart from the model definitions. Every op the decoders and losses need
//! beyond candle's own differentiable ops has two implementations:
//! - `cpu/`: fused CPU kernels (candle custom ops with hand-written backward), one per file;
//! - `composed.rs`: the same op composed from candle ops whose backward candle implements,
//!   which run on any device (CUDA included) and in any dtype.
//!
//! The functions in this file are what model and loss code call, so a decoder reads the same
//! whatever the device. Each decides here, and nowhere else, which implementation runs:
//! [`choice`] picks by device (and the test override [`force_composed`]), then the kernel's
//! own `supports` checks dtype and shape; anything a kernel does not take goes to the
//! composed path. tests/kernels/ checks every op's forward and gradients on both paths
//! against each other, and whole models with the composed path forced against the default.
//!
//! Frozen weights (tensors that track no gradient: a LoRA base, a frozen lm_head, the
//! reference model) get no gradient on either path: the CPU kernels hold them outside the
//! graph, and candle's backward (our patch, vendor/candle-core/LEASH-PATCH.md) neither
//! computes nor stores gradients for operands that lead to no variable.
//!
//! Legend: b batch, h heads, t time, s keys, d head dim, n rows, c channels, v vocab.

pub mod autocast;
pub mod composed;
pub mod cpu;
pub mod row_stats;

use std::cell::Cell;

use candle_core::Tensor;

pub use row_stats::RowStats;

/// Which implementation runs an op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// A fused CPU kernel from `cpu/` (when it also supports the operands' dtypes and shapes).
    CpuFused,
    /// The candle composition in `composed.rs` (any device, any dtype).
    Composed,
}

thread_local! {
    /// Set by [`force_composed`] for this thread.
    static FORCE_COMPOSED: Cell<bool> = const { Cell::new(false) };
}

/// The one device decision: the CPU kernels when every operand lives on the CPU, the composed
/// path on any other device (the CPU kernels have no `cuda_fwd`) or while [`force_composed`]
/// is on for this thread.
pub fn choice(operands: &[&Tensor]) -> Path {
    if FORCE_COMPOSED.with(Cell::get) || !operands.iter().all(|t| t.device().is_cpu()) {
        Path::Composed
    } else {
        Path::CpuFused
    }
}

/// [`choice`] for the linear layers' and adapters' products: the composed path also
/// while [`autocast`] is on, since the fused CPU kernels compute in their operands' f32.
fn matmul_choice(operands: &[&Tensor]) -> Path {
    match autocast::active_for(operands[0]) {
        Some(_) => Path::Composed,
        None => choice(operands),
    }
}

/// Makes every op on this thread take the composed path (`on`), or the default choice again,
/// until the returned guard is dropped (which restores the previous setting).
///
/// For tests: it lets the CPU run exactly what a GPU runs, to check the composed path against
/// the fused kernels. Per thread, so tests running in parallel do not see each other's
/// setting; a forward pass and its backward (including gradient checkpointing's reruns) run
/// on the calling thread, so the whole step takes the forced path.
pub fn force_composed(on: bool) -> ForcedPath {
    ForcedPath {
        previous: FORCE_COMPOSED.with(|f| f.replace(on)),
    }
}

/// Guard of [`force_composed`]: restores the previous setting when dropped.
#[must_use = "the override ends when this guard is dropped"]
pub struct ForcedPath {
    previous: bool,
}

impl Drop for ForcedPath {
    fn drop(&mut self) {
        FORCE_COMPOSED.with(|f| f.set(self.previous));
    }
}

/// RMSNorm over the last dim: `w ⊙ x / √(mean(x²) + eps)` (transformers' `LlamaRMSNorm`).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    match choice(&[x, weight]) {
        Path::CpuFused if cpu::rms_norm::supports(x, weight) => {
            cpu::rms_norm::rms_norm(x, weight, eps)
        }
        _ => composed::rms_norm(x, weight, eps),
    }
}

/// Softmax over the last dim.
pub fn softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    match choice(&[x]) {
        Path::CpuFused if cpu::softmax::supports(x) => cpu::softmax::softmax(x),
        _ => composed::softmax(x),
    }
}

/// Rotate-half rotary embedding `x ⊙ cos + rotate_half(x) ⊙ sin` for x (b, h, t, d) and
/// cos, sin (b or 1, 1, t, d). cos and sin get no gradient on the fused path.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    match choice(&[x, cos, sin]) {
        Path::CpuFused if cpu::rope::supports(x, cos, sin) => cpu::rope::apply_rope(x, cos, sin),
        _ => composed::apply_rope(x, cos, sin),
    }
}

/// SwiGLU's gating `silu(gate) ⊙ up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    match choice(&[gate, up]) {
        Path::CpuFused if cpu::swiglu::supports(gate, up) => cpu::swiglu::swiglu(gate, up),
        _ => composed::swiglu(gate, up),
    }
}

/// `softmax(scale·q·kᵀ + mask)·v` for q (b, hq, t, d), k and v (b, hkv, s, d) (grouped-query
/// when hkv < hq) and an additive mask (b, 1, t, s). Returns (b, hq, t, d).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    match choice(&[q, k, v, mask]) {
        Path::CpuFused if cpu::attention::supports(q, k, v, mask) => {
            cpu::attention::attention(q, k, v, mask, scale)
        }
        _ => composed::attention(q, k, v, mask, scale),
    }
}

/// `x · w` for x (n, k) and w (k, m). A w that tracks no gradient (a frozen base under LoRA,
/// the frozen lm_head) gets none, and its weight-sized gradient is never computed; a bf16/f16
/// w is upcast for the product only (exact).
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    match matmul_choice(&[x, w]) {
        // Decoding: a few rows, no gradient (src/kernels/cpu/thin_matmul.rs).
        Path::CpuFused if cpu::thin_matmul::supports(x, w) => cpu::thin_matmul::thin_matmul(x, w),
        Path::CpuFused if cpu::frozen_matmul::supports(x, w) => {
            cpu::frozen_matmul::frozen_matmul(x, w)
        }
        _ => composed::frozen_matmul(x, w),
    }
}

/// A LoRA layer over a frozen base: `x·W + b + s·(dropout(x)·Aᵀ)·Bᵀ` for x (n, i), W as
/// (in, out), bias (o), A (r, i), B (o, r). `dropout` is PEFT's training dropout on the
/// adapter's input: a 0/1 keep mask per element of x (row-major) and its probability p.
pub fn lora_linear(
    x: &Tensor,
    w_io: &Tensor,
    bias: Option<&Tensor>,
    (a, b): (&Tensor, &Tensor),
    scale: f64,
    dropout: Option<(Vec<u8>, f64)>,
) -> candle_core::Result<Tensor> {
    let mut operands = vec![x, w_io, a, b];
    operands.extend(bias);
    match (matmul_choice(&operands), dropout) {
        (Path::CpuFused, None) if cpu::lora_linear::supports(x, w_io, bias, a, b) => {
            cpu::lora_linear::lora_linear(x, w_io, bias, a, b, scale)
        }
        (Path::CpuFused, Some((keep, p))) if cpu::lora_linear::supports(x, w_io, bias, a, b) => {
            cpu::lora_linear::lora_linear_dropout(x, w_io, bias, a, b, scale, keep, p)
        }
        (_, dropout) => {
            let dropout = dropout.as_ref().map(|(keep, p)| (keep.as_slice(), *p));
            composed::lora_linear(x, w_io, bias, (a, b), scale, dropout)
        }
    }
}

/// Per-row log-probs of the targets, and TRL's per-token statistics when asked for.
pub struct HeadLogprobs {
    /// (n,) log π(target).
    pub token_logps: Tensor,
    /// One per row when requested, else empty.
    pub stats: Vec<RowStats>,
}

/// `log_softmax(hidden · weightᵀ)[targets]` for hidden (n, c), weight (v, c): the lm_head,
/// log-softmax and gather in one (TRL's `selective_log_softmax` on the lm_head's logits). A
/// weight that tracks no gradient (a frozen lm_head) gets none.
pub fn head_logprobs(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &[u32],
    want_stats: bool,
) -> candle_core::Result<HeadLogprobs> {
    // Not autocast: under --bf16 the lm_head's product stays f32 with its log-softmax.
    match choice(&[hidden, weight]) {
        Path::CpuFused if cpu::lm_head_logprob::supports(hidden, weight) => {
            cpu::lm_head_logprob::head_logprobs(hidden, weight, targets, want_stats)
        }
        _ => composed::head_logprobs(hidden, weight, targets, want_stats),
    }
}

/// log p(target | row) for each row of `logits` (n, v) and `targets` (n,) u32 → (n,).
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    match choice(&[logits, targets]) {
        Path::CpuFused if cpu::token_logprob::supports(logits) => {
            cpu::token_logprob::token_logprobs(logits, targets)
        }
        _ => composed::token_logprobs(logits, targets),
    }
}

/// Elementwise log σ(z), stable for large |z|, with the exact gradient σ(−z) everywhere
/// (z = 0 included: every DPO pair at step 0).
pub fn log_sigmoid(z: &Tensor) -> candle_core::Result<Tensor> {
    match choice(&[z]) {
        Path::CpuFused if cpu::log_sigmoid::supports(z) => cpu::log_sigmoid::log_sigmoid(z),
        _ => composed::log_sigmoid(z),
    }
}

//! The composed path: every kernel op written with candle ops whose backward candle
//! implements, so it runs on any device (the GPU runs these) and in any dtype (the f64
//! finite-difference tests run these). Each is the reference its CPU kernel in `cpu/` is
//! checked against (tests/kernels/: forward and gradients).
//!
//! candle-nn's fused `rms_norm`, `softmax_last_dim` and `rope` are not used: they have no
//! backward pass and drop gradients silently (candle #2168, #3568, #3569). Frozen operands
//! (tracking no gradient) get none: candle's backward, with our patch
//! (vendor/candle-core/LEASH-PATCH.md), neither computes nor stores a gradient for a tensor
//! that leads to no variable, so a frozen weight costs no weight-sized product in backward.
//!
//! Legend: b batch, hq query heads, hkv key/value heads, t queries, s keys, d head dim,
//! n rows, i in features, o out features, r rank, c channels, v vocab.

use candle_core::{DType, Tensor, D};

use super::row_stats::row_stats;
use super::HeadLogprobs;
use crate::model::frozen_dtype::{is_half, upcast};

/// RMSNorm as transformers computes it: `w ⊙ x / √(mean(x²) + eps)`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv_rms)?.broadcast_mul(weight)
}

/// Softmax over the last dim: max, subtract, exp, sum, divide.
pub fn softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::ops::softmax(x, D::Minus1)
}

/// `x ⊙ cos + rotate_half(x) ⊙ sin`, rotate_half(x) = [−x₂, x₁] (transformers'
/// `apply_rotary_pos_emb`): narrow, negate, concatenate, two products and a sum.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// `silu(gate) ⊙ up` with candle's silu (whose backward candle implements).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::ops::silu(gate)? * up
}

/// `softmax(scale·q·kᵀ + mask)·v`, grouped-query aware without copying k/v: the `rep` query
/// heads sharing one kv head are folded into the time axis.
/// q: (b, hq, t, d); k, v: (b, hkv, s, d); mask: (b, 1, t, s) additive. Returns (b, hq, t, d).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (b, hq, t, d) = q.dims4()?;
    let (hkv, s) = (k.dim(1)?, k.dim(2)?);
    if hkv == 0 || hq % hkv != 0 {
        candle_core::bail!("attention: {hq} query heads on {hkv} key/value heads")
    }
    let rep = hq / hkv;
    let q = q.contiguous()?.reshape((b, hkv, rep * t, d))?;
    let mask = mask.to_dtype(q.dtype())?;
    let mask = if rep > 1 {
        mask.unsqueeze(2)?
            .broadcast_as((b, 1, rep, t, s))?
            .reshape((b, 1, rep * t, s))?
    } else {
        mask
    };
    let scores = (q.matmul(&k.contiguous()?.t()?)? * scale)?.broadcast_add(&mask)?; // (b, hkv, rep·t, s)
    let probs = softmax(&scores)?;
    probs.matmul(&v.contiguous()?)?.reshape((b, hq, t, d))
}

/// `x · w` with candle's matmul; a bf16/f16 w under an f32/f64 x is upcast for the product
/// only (exact). A w that tracks no gradient gets none (see the file header).
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if super::autocast::active_for(x).is_some() {
        // Mixed precision: the product in bf16 (a bf16-held frozen w is used as it is).
        super::autocast::matmul(x, w)
    } else {
        exact_matmul(x, w)
    }
}

/// `x · w` in x's dtype whatever autocast says (a bf16/f16 w under an f32/f64 x upcast).
fn exact_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if is_half(w.dtype()) && !is_half(x.dtype()) {
        x.matmul(&upcast(w)?.to_dtype(x.dtype())?)
    } else {
        x.matmul(w)
    }
}

/// `x·W + b + s·(dropout(x)·Aᵀ)·Bᵀ` (PEFT's `lora.Linear`): x (n, i), W as (i, o), bias (o),
/// A (r, i), B (o, r). `dropout`: a 0/1 keep mask per element of x and its probability p; the
/// low-rank branch sees `x ⊙ keep / (1 − p)`, the base sees x.
pub fn lora_linear(
    x: &Tensor,
    w_io: &Tensor,
    bias: Option<&Tensor>,
    (a, b): (&Tensor, &Tensor),
    scale: f64,
    dropout: Option<(&[u8], f64)>,
) -> candle_core::Result<Tensor> {
    let mut y = frozen_matmul(x, w_io)?; // (n, o)
    if let Some(bias) = bias {
        y = y.broadcast_add(bias)?;
    }
    let xin = match dropout {
        Some((keep, p)) => {
            let keep = Tensor::from_slice(keep, x.shape(), x.device())?.to_dtype(x.dtype())?;
            ((x * keep)? * (1.0 / (1.0 - p)))?
        }
        None => x.clone(),
    };
    // The low-rank branch: the small (r, o) factor is scaled, not the (n, o) activation.
    let low = super::autocast::matmul(&xin, &a.t()?)?; // (n, r)
    y + super::autocast::matmul(&low, &(b.t()? * scale)?)?
}

/// log p(target | row) for logits (n, v) and u32 targets (n,): log_softmax then gather.
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)
}

/// `log_softmax(hidden · weightᵀ)[targets]` from the full (n, v) logits; the statistics are
/// read from the logits copied to the host.
pub fn head_logprobs(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &[u32],
    want_stats: bool,
) -> candle_core::Result<HeadLogprobs> {
    // f32 even under --bf16: every log-prob is read from these logits.
    let logits = exact_matmul(hidden, &weight.t()?)?; // (n, v)
    let t = Tensor::new(targets, hidden.device())?;
    let token_logps = token_logprobs(&logits, &t)?;
    let stats = if want_stats {
        row_stats(&logits.detach().to_dtype(DType::F32)?, targets)?
    } else {
        Vec::new()
    };
    Ok(HeadLogprobs { token_logps, stats })
}

/// log σ(z) = −log(1 + e^{−z}) for z ≥ 0 and z − log(1 + e^{z}) for z < 0: each branch is
/// smooth where it is selected and stable (its exponent is ≤ 0), so the gradient is σ(−z)
/// everywhere, z = 0 included, unlike compositions through |z| or relu whose subgradients
/// candle picks inconsistently at 0. Each branch is fed 0 where it is not selected, so it
/// neither overflows nor sends a NaN back through the unselected side.
pub fn log_sigmoid(z: &Tensor) -> candle_core::Result<Tensor> {
    let pos = z.ge(0.0)?;
    let zero = z.zeros_like()?;
    let zp = pos.where_cond(z, &zero)?; // z where z ≥ 0, else 0
    let zn = pos.where_cond(&zero, z)?; // z where z < 0, else 0
    let upper = (zp.neg()?.exp()? + 1.0)?.log()?.neg()?;
    let lower = (&zn - (zn.exp()? + 1.0)?.log()?)?;
    pos.where_cond(&upper, &lower)
}

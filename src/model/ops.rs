//! Differentiable building blocks of the decoders.
//!
//! candle-nn's fused `rms_norm`, `layer_norm`, `softmax_last_dim` and `rope` have no backward
//! pass and drop gradients silently (candle #2168, #3568, #3569), so everything here is either
//! composed from ops whose backward candle implements or a custom op with its own `bwd`.
//! `rms_norm`, `softmax`, `apply_rope` and `swiglu` take our fused CPU kernels (`fused.rs`)
//! for f32 on CPU and the composed `*_composed` reference path otherwise (f64
//! finite-difference tests, other devices); `fused.rs` tests each kernel against it.
//!
//! Legend: b batch, t time, h heads, d head dim, c channels.

use candle_core::{DType, Device, Tensor, D};

use super::config::RopeScaling;
use super::fused;

/// RMSNorm as Hugging Face computes it: `w ⊙ x / sqrt(mean(x²) + eps)`, mean(x²) in f32.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if fused::applies(x) && fused::applies(weight) && weight.dims() == [x.dim(D::Minus1)?] {
        fused::rms_norm(x, weight, eps)
    } else {
        rms_norm_composed(x, weight, eps)
    }
}

/// Reference path of [`rms_norm`] (any dtype and device).
pub fn rms_norm_composed(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv_rms)?.broadcast_mul(weight)
}

/// LayerNorm over the last dim with biased variance, as PyTorch computes it.
pub fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_std = (var + eps)?.sqrt()?.recip()?;
    centered
        .broadcast_mul(&inv_std)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

/// Softmax along the last dim, with a backward pass.
pub fn softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    if fused::applies(x) {
        fused::softmax(x)
    } else {
        softmax_composed(x)
    }
}

/// Reference path of [`softmax`]: max, subtract, exp, sum, divide.
pub fn softmax_composed(x: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::ops::softmax(x, D::Minus1)
}

/// SwiGLU's gating `silu(gate) ⊙ up`, with a backward pass.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if fused::applies(gate) && fused::applies(up) && gate.shape() == up.shape() {
        fused::swiglu(gate, up)
    } else {
        swiglu_composed(gate, up)
    }
}

/// Reference path of [`swiglu`].
pub fn swiglu_composed(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::ops::silu(gate)? * up
}

/// Rotary inverse frequencies (head_dim / 2 of them), computed in f32 like transformers.
pub fn rope_inv_freq(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Vec<f32> {
    let base = (0..head_dim / 2).map(|i| {
        let exponent = (2 * i) as f32 / head_dim as f32;
        1.0f32 / (theta as f32).powf(exponent)
    });
    match scaling {
        RopeScaling::None => base.collect(),
        RopeScaling::Linear { factor } => base.map(|f| f / *factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let low_wavelen = original_max_position_embeddings / low_freq_factor;
            let high_wavelen = original_max_position_embeddings / high_freq_factor;
            base.map(|f| {
                let wavelen = 2.0 * std::f64::consts::PI / f as f64;
                if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    (f as f64 / factor) as f32
                } else {
                    let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    ((1.0 - smooth) * f as f64 / factor + smooth * f as f64) as f32
                }
            })
            .collect()
        }
    }
}

/// cos and sin tables for the given positions: each (n, head_dim), rotate-half layout
/// (the frequencies repeated twice), as Hugging Face's Llama builds them.
pub fn rope_tables(
    positions: &[u32],
    inv_freq: &[f32],
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(positions.len() * half * 2);
    let mut sin = Vec::with_capacity(positions.len() * half * 2);
    for &p in positions {
        for _ in 0..2 {
            for &f in inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    let shape = (positions.len(), half * 2);
    Ok((
        Tensor::from_vec(cos, shape, device)?,
        Tensor::from_vec(sin, shape, device)?,
    ))
}

/// Applies rotary embedding: `x ⊙ cos + rotate_half(x) ⊙ sin`.
/// x: (b, h, t, d); cos, sin: (b, 1, t, d).
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    if fused::rope_applies(x, cos, sin) {
        fused::apply_rope(x, cos, sin)
    } else {
        apply_rope_composed(x, cos, sin)
    }
}

/// Reference path of [`apply_rope`]: narrow, negate, concatenate, two products and a sum.
pub fn apply_rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// Scaled dot-product attention with an additive mask, grouped-query aware without copying
/// k/v: the `rep` query heads sharing one kv head are folded into the time axis.
/// q: (b, hq, t, d); k, v: (b, hkv, s, d); mask: (b, 1, t, s) additive (0 or large negative).
/// Returns (b, hq, t, d).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    if fused::applies(q) && fused::applies(k) && fused::applies(v) && fused::applies(mask) {
        let scale = 1.0 / (q.dim(3)? as f64).sqrt();
        return super::fused_attention::attention(q, k, v, mask, scale);
    }
    attention_composed(q, k, v, mask)
}

/// Reference path of [`attention`], composed from candle ops.
pub fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
) -> candle_core::Result<Tensor> {
    let (b, hq, t, d) = q.dims4()?;
    let hkv = k.dim(1)?;
    let s = k.dim(2)?;
    let rep = hq / hkv;
    let scale = 1.0 / (d as f64).sqrt();
    let q = q.contiguous()?.reshape((b, hkv, rep * t, d))?;
    let mask = mask.to_dtype(q.dtype())?;
    let mask = if rep > 1 {
        mask.unsqueeze(2)?
            .broadcast_as((b, 1, rep, t, s))?
            .reshape((b, 1, rep * t, s))?
    } else {
        mask
    };
    let scores = (q.matmul(&k.contiguous()?.t()?)? * scale)?.broadcast_add(&mask)?; // (b, hkv, rep*t, s)
    let probs = softmax(&scores)?;
    probs.matmul(&v.contiguous()?)?.reshape((b, hq, t, d))
}

/// Additive attention mask (b, 1, t, t): causal within each row, never attending to padding
/// keys past `lengths[i]`, and optionally limited to a sliding window.
pub fn causal_mask(
    lengths: &[usize],
    t: usize,
    sliding_window: Option<usize>,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let b = lengths.len();
    let mut data = vec![0f32; b * t * t];
    for (row, &len) in lengths.iter().enumerate() {
        for i in 0..t {
            for j in 0..t {
                // Padding queries see the real tokens but not the padding (as transformers'
                // mask does); a row with no real token sees itself so softmax stays finite.
                let visible = j <= i
                    && (j < len || (len == 0 && j == i))
                    && sliding_window.is_none_or(|w| i - j < w);
                if !visible {
                    data[(row * t + i) * t + j] = MASKED;
                }
            }
        }
    }
    Tensor::from_vec(data, (b, 1, t, t), device)
}

/// A large negative logit: exp() of it is 0, but it never produces inf − inf.
pub const MASKED: f32 = -1e30;

/// The dtype all compute runs in.
pub const COMPUTE_DTYPE: DType = DType::F32;

//! Building blocks of the decoders that are not device kernels: LayerNorm (composed from
//! candle ops, whose backward candle implements), the rotary tables, and attention masks.
//! RMSNorm, softmax, RoPE, SwiGLU and attention are in [`crate::kernels`], which picks a
//! fused CPU kernel or the composed path per device.
//!
//! Legend: b batch, t time, h heads, d head dim, c channels.

use candle_core::{DType, Device, Tensor, D};

use super::config::RopeScaling;

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

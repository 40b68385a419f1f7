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
    use rayon::prelude::*;
    let half = inv_freq.len();
    let width = 2 * half;
    let mut cos = vec![0f32; positions.len() * width];
    let mut sin = vec![0f32; positions.len() * width];
    // Each angle once (its two halves are equal), rows on the pool: serial, the tables were
    // ~0.6 % of a DPO step of the side-by-side workload with the workers idle.
    if width > 0 {
        cos.par_chunks_mut(width)
            .zip(sin.par_chunks_mut(width))
            .zip(positions.par_iter())
            .with_min_len(64)
            .for_each(|((c, s), &p)| {
                for (j, &f) in inv_freq.iter().enumerate() {
                    let angle = p as f32 * f;
                    (c[j], s[j]) = (angle.cos(), angle.sin());
                    (c[j + half], s[j + half]) = (c[j], s[j]);
                }
            });
    }
    let shape = (positions.len(), width);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Row p holds cos/sin of p·f for each frequency, the frequencies repeated twice
    /// (rotate-half), for more rows than one task of the pool; against f64 by hand.
    #[test]
    fn rope_tables_by_hand() {
        let inv_freq = [1.0f32, 0.25, 0.01];
        let positions: Vec<u32> = (0..300).rev().collect();
        let (cos, sin) = rope_tables(&positions, &inv_freq, &Device::Cpu).unwrap();
        assert_eq!(cos.dims(), &[300, 6]);
        let (cos, sin) = (cos.to_vec2::<f32>().unwrap(), sin.to_vec2::<f32>().unwrap());
        for (row, &p) in positions.iter().enumerate() {
            for col in 0..6 {
                let angle = (p as f32 * inv_freq[col % 3]) as f64;
                assert!((cos[row][col] as f64 - angle.cos()).abs() < 1e-6);
                assert!((sin[row][col] as f64 - angle.sin()).abs() < 1e-6);
            }
        }
        let (c0, _) = rope_tables(&positions, &[], &Device::Cpu).unwrap();
        assert_eq!(c0.dims(), &[300, 0]);
    }
}

//! The CPU kernels: candle custom ops (`cpu_fwd` only) with hand-written backward passes, one
//! op per file, each checked against its composed counterpart in `super::composed` by
//! tests/kernels/. Nothing here is called by model code directly: `super` (kernels/mod.rs)
//! decides per call whether a kernel runs or the composed path does.
//!
//! This file holds what several kernels share: reading a contiguous f32 input, the
//! vectorisable dot product and sum, and the fixed task sizes that keep results independent of
//! the thread count.

pub mod attention;
pub mod frozen_matmul;
pub(crate) mod gemm;
pub mod lm_head_logprob;
pub mod log_sigmoid;
pub mod lora_linear;
pub mod rms_norm;
pub mod rope;
pub mod softmax;
pub mod swiglu;
pub mod thin_matmul;
pub mod token_logprob;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Tensor};

/// Rows per rayon task for row-wise kernels, and rows per partial sum of a weight gradient
/// (fixed so the summation order, hence the result, does not depend on scheduling).
pub(crate) const ROWS_PER_TASK: usize = 32;
/// Elements per rayon task for element-wise kernels.
pub(crate) const ELEMS_PER_TASK: usize = 16 * 1024;

/// `exp(z)` for a softmax term `z = x − max ≤ 0`, without glibc's slow path for underflow.
///
/// Masked scores (`ops::MASKED` = −1e30 added) underflow `expf`, which then goes through its
/// error-reporting path (`__math_uflowf`, setting `errno`): ~3 % of a DPO step's time on the
/// bench config, as half of every causal score matrix (and more with packed rows) is masked.
/// Below −104, e^z < 2^−150, which `expf` rounds to exactly 0: the result is bit-identical.
/// `black_box` keeps the branch: without it LLVM treats `exp` as free of side effects, calls
/// it for every lane and selects afterwards, which is the slow path again (seen in the
/// disassembly of the attention kernel).
#[inline]
pub fn exp_or_zero(z: f32) -> f32 {
    if z < -104.0 {
        0.0
    } else {
        std::hint::black_box(z).exp()
    }
}

/// True when `t` is f32: the dtype the row-wise kernels (RMSNorm, softmax, RoPE, SwiGLU,
/// attention, log-softmax + gather, log-sigmoid) are written for.
pub fn is_f32(t: &Tensor) -> bool {
    t.dtype() == DType::F32
}

/// The contiguous f32 data of one op input.
pub(crate) fn data<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(d) = s else {
        candle_core::bail!("{op}: expected f32, got {:?}", s.dtype())
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: input must be contiguous")
    };
    Ok(&d[a..b])
}

/// The whole f32 storage of one op input (for kernels that read strided layouts).
pub(crate) fn f32s<'a>(s: &'a CpuStorage, op: &str) -> candle_core::Result<&'a [f32]> {
    match s {
        CpuStorage::F32(d) => Ok(d),
        _ => candle_core::bail!("{op}: expected f32, got {:?}", s.dtype()),
    }
}

/// Σ a_i·b_i with 8 independent accumulators (vectorises; same spirit as candle's `vec_sum`).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

/// Σ x with 8 independent accumulators.
pub(crate) fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for x in chunks {
        for k in 0..8 {
            acc[k] += x[k];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_or_zero_is_bit_identical_to_expf() {
        // Densely around the cut (e^z crosses 2^-150 near -103.97) and across the range.
        let near = (0..200_000).map(|i| -110.0 + i as f32 * 1e-4);
        let wide = (0..100_000).map(|i| -1e4 + i as f32 * 0.1);
        for z in near
            .chain(wide)
            .chain([0.0, -0.5, -1e30, f32::MIN, f32::NEG_INFINITY])
        {
            assert_eq!(exp_or_zero(z).to_bits(), z.exp().to_bits(), "z = {z}");
        }
    }
}

//! Fused softmax over the last dim on the CPU (f32), with its own backward.
//!
//! Why: candle-nn's `softmax_last_dim` has no backward (candle #3568); the composed path
//! (`kernels::composed::softmax`: max, subtract, exp, sum, divide) makes five passes and keeps
//! their intermediates. Here forward reads each row once and backward needs only the output.
//!
//! y = softmax(x) per row; with g the upstream gradient: dx = y ⊙ (g − Σ g ⊙ y).
//!
//! Legend: c last dim.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::fast_exp::{divide_in_place, exp_shifted_in_place};
use super::{data, dot, is_f32, max, ROWS_PER_TASK};

/// Whether the kernel takes `x`: f32.
pub fn supports(x: &Tensor) -> bool {
    is_f32(x)
}

/// Softmax over the last dim. Input must pass [`supports`].
pub fn softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = data(s, l, "softmax")?;
        let c = l.dims().last().copied().unwrap_or(1).max(1);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(c)
            .zip(x.par_chunks(c))
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(y, x)| {
                y.copy_from_slice(x);
                let total = exp_shifted_in_place(y, max(x));
                divide_in_place(y, total);
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxGrad)?))
    }
}

struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = data(s1, l1, "softmax grad")?;
        let g = data(s2, l2, "softmax grad")?;
        if y.len() != g.len() {
            candle_core::bail!("softmax grad: y {:?} vs grad {:?}", l1.shape(), l2.shape())
        }
        let c = l1.dims().last().copied().unwrap_or(1).max(1);
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(c)
            .zip(y.par_chunks(c).zip(g.par_chunks(c)))
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(dx, (y, g))| {
                let s = dot(g, y);
                for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                    *dx = y * (g - s);
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

//! Fused SwiGLU gating `silu(gate) ⊙ up` on the CPU (f32), with its own backward.
//!
//! Why: composed (`kernels::composed::swiglu`: candle's silu, then a product) it is two passes
//! over (rows × MLP width) and keeps silu(gate) for backward; here forward writes the output
//! once and backward recomputes σ(gate) from the inputs in one pass giving both gradients.
//!
//! Reference: transformers' `LlamaMLP` (`act_fn(gate_proj(x)) * up_proj(x)`, act_fn = SiLU).
//! y = silu(a) ⊙ u, silu(a) = a·σ(a); with g the upstream gradient:
//! da = g ⊙ u ⊙ σ(a)(1 + a(1 − σ(a))), du = g ⊙ silu(a).
//!
//! Legend: n elements.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

use super::{assume_written, data, fast_exp, is_f32, uninit, ELEMS_PER_TASK};

/// Whether the kernel takes these operands: f32 gate and up of one shape.
pub fn supports(gate: &Tensor, up: &Tensor) -> bool {
    is_f32(gate) && is_f32(up) && gate.shape() == up.shape()
}

/// `silu(gate) ⊙ up`. Operands must pass [`supports`].
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

struct SwiGlu;

/// σ(a) and silu(a) = a / (1 + e^{−a}) (candle's form; e^x from [`fast_exp::exp`], within
/// 2 ulp of candle's, so the loops below vectorise).
#[inline(always)]
fn sigmoid_silu(a: f32) -> (f32, f32) {
    let e = 1.0 + fast_exp::exp(-a);
    (1.0 / e, a / e)
}

/// y = silu(a) · u over one task's elements.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
fn forward_chunk(y: &mut [MaybeUninit<f32>], a: &[f32], u: &[f32]) {
    for ((y, &a), &u) in y.iter_mut().zip(a).zip(u) {
        y.write(sigmoid_silu(a).1 * u);
    }
}

/// d gate and d up of y = silu(a) · u for upstream g, over one task's elements.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
fn backward_chunk(
    da: &mut [MaybeUninit<f32>],
    du: &mut [MaybeUninit<f32>],
    a: &[f32],
    u: &[f32],
    g: &[f32],
) {
    let grads = da.iter_mut().zip(du.iter_mut());
    for ((da, du), ((&a, &u), &g)) in grads.zip(a.iter().zip(u).zip(g)) {
        let (s, silu) = sigmoid_silu(a);
        da.write(g * u * s * (1.0 + a * (1.0 - s)));
        du.write(g * silu);
    }
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = data(s1, l1, "swiglu")?;
        let u = data(s2, l2, "swiglu")?;
        if l1.shape() != l2.shape() {
            candle_core::bail!("swiglu: gate {:?} vs up {:?}", l1.shape(), l2.shape())
        }
        let mut y = uninit(a.len());
        y.par_chunks_mut(ELEMS_PER_TASK)
            .zip(
                a.par_chunks(ELEMS_PER_TASK)
                    .zip(u.par_chunks(ELEMS_PER_TASK)),
            )
            .for_each(|(y, (a, u))| forward_chunk(y, a, u));
        // SAFETY: a, u and y have one length (checked above), so the zipped chunks cover y
        // and `forward_chunk` writes every element of each.
        let y = unsafe { assume_written(y) };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // Packed as [d gate (n), d up (n)].
        let packed = gate.apply_op3_no_bwd(up, &g.contiguous()?, &SwiGluGrad)?;
        let n = gate.elem_count();
        let da = packed.narrow(0, 0, n)?.reshape(gate.shape())?;
        let du = packed.narrow(0, n, n)?.reshape(up.shape())?;
        Ok((Some(da), Some(du)))
    }
}

struct SwiGluGrad;

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "fused-swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = data(s1, l1, "swiglu grad")?;
        let u = data(s2, l2, "swiglu grad")?;
        let g = data(s3, l3, "swiglu grad")?;
        if a.len() != u.len() || a.len() != g.len() {
            candle_core::bail!("swiglu grad: mismatched gate, up and grad sizes")
        }
        let n = a.len();
        let mut out = uninit(2 * n);
        let (da, du) = out.split_at_mut(n);
        da.par_chunks_mut(ELEMS_PER_TASK)
            .zip(du.par_chunks_mut(ELEMS_PER_TASK))
            .zip(a.par_chunks(ELEMS_PER_TASK))
            .zip(
                u.par_chunks(ELEMS_PER_TASK)
                    .zip(g.par_chunks(ELEMS_PER_TASK)),
            )
            .for_each(|(((da, du), a), (u, g))| backward_chunk(da, du, a, u, g));
        // SAFETY: da, du, a, u and g all have n elements (checked above), so the zipped
        // chunks cover both halves and `backward_chunk` writes every element of each.
        let out = unsafe { assume_written(out) };
        Ok((CpuStorage::F32(out), Shape::from(2 * n)))
    }
}

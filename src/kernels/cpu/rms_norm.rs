//! Fused RMSNorm on the CPU (f32) with its own backward: one pass over each row forward, one
//! backward pass giving both gradients.
//!
//! Why: candle-nn's `rms_norm` has no backward and drops gradients silently (candle #2168);
//! the composed path (`kernels::composed::rms_norm`) makes five passes and keeps their
//! intermediates alive. Reference: transformers' `LlamaRMSNorm` (mean(x²) in f32).
//!
//! y = x̂ ⊙ w, x̂ = x·r, r = 1/√(mean(x²)+ε); with g the upstream gradient:
//! dx = r ⊙ (g⊙w − x̂ ⊙ mean(g⊙w⊙x̂)), dw = Σ_rows g ⊙ x̂. dw is summed over fixed blocks of
//! rows in a fixed order, so results do not depend on the thread count.
//!
//! Legend: n rows (all leading dims flattened), c last dim.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, D};
use multiversion::multiversion;
use rayon::prelude::*;

use super::{assume_written, data, dot, is_f32, uninit, ROWS_PER_TASK};

/// Whether the kernel takes these operands: f32 x (…, c) and weight (c).
pub fn supports(x: &Tensor, w: &Tensor) -> bool {
    is_f32(x) && is_f32(w) && x.dim(D::Minus1).is_ok_and(|c| w.dims() == [c])
}

/// RMSNorm over the last dim of x (…, c) with weight w (c). Operands must pass [`supports`].
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}

/// 1/√(mean(x²) + ε), in the same f32 steps as the composed path (sum · (1/c), + ε, √, 1/·).
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let mean = dot(row, row) * (1.0 / row.len() as f64) as f32;
    1.0 / (mean + eps).sqrt()
}

/// One row of y = x·r ⊙ w. A function of its own (as [`grad_block`]) so the loops are compiled
/// for AVX-512 and AVX2, not for the baseline x86-64 as inside a rayon closure.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
fn normalize_row(y: &mut [MaybeUninit<f32>], x: &[f32], w: &[f32], eps: f32) {
    let r = inv_rms(x, eps);
    for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
        y.write(x * r * w);
    }
}

/// dx of a block of rows (written, every element) and the block's partial dw.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
fn grad_block(dx: &mut [MaybeUninit<f32>], x: &[f32], g: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let c = w.len().max(1);
    let mut dw = vec![0f32; w.len()];
    let mut gw = vec![0f32; w.len()];
    for ((dx, x), g) in dx.chunks_mut(c).zip(x.chunks(c)).zip(g.chunks(c)) {
        let r = inv_rms(x, eps);
        for (((gw, dw), &g), (&w, &x)) in gw.iter_mut().zip(&mut dw).zip(g).zip(w.iter().zip(x)) {
            *gw = g * w;
            *dw += g * x * r;
        }
        // mean(g⊙w⊙x̂) = r · mean(g⊙w⊙x)
        let s = dot(&gw, x) * r / c as f32;
        for ((dx, &gw), &x) in dx.iter_mut().zip(&gw).zip(x) {
            dx.write(r * (gw - x * r * s));
        }
    }
    dw
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = data(s1, l1, "rms_norm")?;
        let w = data(s2, l2, "rms_norm")?;
        let c = w.len();
        if l1.shape().dims().last() != Some(&c) {
            candle_core::bail!("rms_norm: x {:?} vs weight {:?}", l1.shape(), l2.shape())
        }
        let mut y = uninit(x.len());
        y.par_chunks_mut(c.max(1))
            .zip(x.par_chunks(c.max(1)))
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(y, x)| normalize_row(y, x, w, self.eps));
        // SAFETY: y and x have one length, so the zipped rows cover y, and `normalize_row`
        // writes every element of each (w has c elements, each row at most c).
        let y = unsafe { assume_written(y) };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // One pass gives both gradients, packed as [dx (n·c), dw (c)].
        let packed = x.apply_op3_no_bwd(w, &g.contiguous()?, &RmsNormGrad { eps: self.eps })?;
        let (nc, c) = (x.elem_count(), w.elem_count());
        let dx = packed.narrow(0, 0, nc)?.reshape(x.shape())?;
        // A frozen weight (LoRA's base) gets no gradient entry.
        let dw = if w.track_op() {
            Some(packed.narrow(0, nc, c)?.reshape(w.shape())?)
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}

struct RmsNormGrad {
    eps: f32,
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "fused-rms-norm-grad"
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
        let x = data(s1, l1, "rms_norm grad")?;
        let w = data(s2, l2, "rms_norm grad")?;
        let g = data(s3, l3, "rms_norm grad")?;
        let c = w.len();
        if g.len() != x.len() {
            candle_core::bail!("rms_norm grad: x {:?} vs grad {:?}", l1.shape(), l3.shape())
        }
        let mut out = uninit(x.len() + c);
        let (dx, dw) = out.split_at_mut(x.len());
        let block = ROWS_PER_TASK * c.max(1);
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(block)
            .zip(x.par_chunks(block))
            .zip(g.par_chunks(block))
            .map(|((dx, x), g)| grad_block(dx, x, g, w, self.eps))
            .collect();
        let mut sum = vec![0f32; c];
        for p in &partials {
            for (s, p) in sum.iter_mut().zip(p) {
                *s += p;
            }
        }
        for (dw, s) in dw.iter_mut().zip(sum) {
            dw.write(s);
        }
        // SAFETY: dx, x and g have one length (checked above), so the zipped blocks cover dx
        // and `grad_block` writes every element of each; the c elements of dw were written
        // just above.
        let out = unsafe { assume_written(out) };
        let n = out.len();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn filled(n: usize, c: usize, seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..n * c).map(|_| rng.gen_range(-1.5..1.5)).collect();
        Tensor::from_vec(v, (n, c), &Device::Cpu).unwrap()
    }

    /// dw sums over blocks of rows in a fixed order: one thread and the default pool give
    /// bit-identical gradients.
    #[test]
    fn results_do_not_depend_on_thread_count() {
        let x = filled(300, 48, 1);
        let w = Var::from_tensor(&filled(1, 48, 2).squeeze(0).unwrap()).unwrap();
        let g = filled(300, 48, 3);
        let grad = || {
            let y = rms_norm(&x, w.as_tensor(), 1e-6).unwrap();
            let store = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            store.get(&w).unwrap().to_vec1::<f32>().unwrap()
        };
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(grad);
        assert_eq!(one, grad());
    }
}

//! Fused rotate-half rotary position embedding (RoPE) on the CPU (f32), with its own backward.
//!
//! Why: candle-nn's `rotary_emb::rope` has no backward (candle #3569); the composed path
//! (`kernels::composed::apply_rope`: narrow, negate, concatenate, two products and a sum)
//! makes six passes and allocations. Here each output row is written once, reading the heads
//! in place through their strides (heads transposed out of (b, t, h, d) need no copy).
//!
//! Reference: transformers' `apply_rotary_pos_emb` with `rotate_half`:
//! y = x ⊙ cos + rotate_half(x) ⊙ sin. RoPE is a rotation per (i, i + d/2) pair, so its
//! backward is the transposed rotation: the same kernel with −sin (exact when both halves of
//! the tables are equal, as `ops::rope_tables` builds them).
//!
//! Legend: b batch, h heads, t time, d head dim.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

use super::{assume_written, f32s, is_f32, uninit, ROWS_PER_TASK};

/// Whether the kernel takes these operands: f32 x (b, h, t, d) with even d; cos and sin of
/// one shape with size 1 or x's size in each of the first three dims and d in the last.
pub fn supports(x: &Tensor, cos: &Tensor, sin: &Tensor) -> bool {
    let (xd, cd, sd) = (x.dims(), cos.dims(), sin.dims());
    is_f32(x)
        && is_f32(cos)
        && is_f32(sin)
        && xd.len() == 4
        && xd[3] % 2 == 0
        && cd == sd
        && cd.len() == 4
        && cd[3] == xd[3]
        && (0..3).all(|i| cd[i] == xd[i] || cd[i] == 1)
}

/// Rotate-half RoPE: x (b, h, t, d) with any strides (read in place when the last dim is
/// dense); cos, sin as [`supports`] says. Returns a contiguous (b, h, t, d). cos and sin get
/// no gradient.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    unit_last_stride(x)?.apply_op3(
        &unit_last_stride(cos)?,
        &unit_last_stride(sin)?,
        Rope { inverse: false },
    )
}

/// `t` itself when its last dim is dense (the kernel reads any other strides), else a
/// contiguous copy.
fn unit_last_stride(t: &Tensor) -> candle_core::Result<Tensor> {
    if t.stride().last() == Some(&1) {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// Rotate-half rotary embedding on (b, h, t, d); `inverse` applies the transposed rotation
/// (the backward): per pair (x1, x2) = (x[i], x[i + d/2]),
/// forward  y1 = x1·cos₁ − x2·sin₁, y2 = x2·cos₂ + x1·sin₂;
/// inverse  y1 = x1·cos₁ + x2·sin₂, y2 = x2·cos₂ − x1·sin₁.
struct Rope {
    inverse: bool,
}

/// Element strides of the first three dims of a 4-d layout broadcast to `dims` (0 where the
/// layout has size 1), requiring a unit stride on the last dim.
fn strides3(l: &Layout, dims: &[usize], op: &str) -> candle_core::Result<[usize; 3]> {
    let (ld, ls) = (l.dims(), l.stride());
    if ld.len() != 4 || ld[3] != dims[3] || (ls[3] != 1 && ld[3] > 1) {
        candle_core::bail!("{op}: layout {ld:?}/{ls:?} does not fit {dims:?}")
    }
    let mut out = [0usize; 3];
    for i in 0..3 {
        out[i] = match ld[i] {
            1 => 0,
            n if n == dims[i] => ls[i],
            _ => candle_core::bail!("{op}: dims {ld:?} do not broadcast to {dims:?}"),
        };
    }
    Ok(out)
}

/// One row of [`Rope`]: writes every element of `y` from x, cos and sin (each d long, d even).
/// A function of its own so the loop is compiled for AVX-512 and AVX2 (a closure in the rayon
/// call was compiled for the baseline x86-64 only: 2 % of the DPO step's samples).
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
fn rotate_row(y: &mut [MaybeUninit<f32>], x: &[f32], cos: &[f32], sin: &[f32], inverse: bool) {
    debug_assert!(x.len() == y.len() && cos.len() == y.len() && sin.len() == y.len());
    let half = y.len() / 2;
    let (y1, y2) = y.split_at_mut(half);
    let (x1, x2) = x.split_at(half);
    let (c1, c2) = cos.split_at(half);
    let (s1, s2) = sin.split_at(half);
    let n = half.min(y2.len()).min(x1.len()).min(x2.len());
    let (y1, y2, x1, x2) = (&mut y1[..n], &mut y2[..n], &x1[..n], &x2[..n]);
    let (c1, c2, s1, s2) = (&c1[..n], &c2[..n], &s1[..n], &s2[..n]);
    if inverse {
        for i in 0..n {
            y1[i].write(x1[i] * c1[i] + x2[i] * s2[i]);
            y2[i].write(x2[i] * c2[i] - x1[i] * s1[i]);
        }
    } else {
        for i in 0..n {
            y1[i].write(x1[i] * c1[i] - x2[i] * s1[i]);
            y2[i].write(x2[i] * c2[i] + x1[i] * s2[i]);
        }
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
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
        let dims = l1.dims();
        let (x, cos, sin) = (f32s(s1, "rope")?, f32s(s2, "rope")?, f32s(s3, "rope")?);
        let xs = strides3(l1, dims, "rope x")?;
        let cs = strides3(l2, dims, "rope cos")?;
        let ss = strides3(l3, dims, "rope sin")?;
        let (h, t, d) = (dims[1], dims[2], dims[3]);
        if d % 2 != 0 {
            candle_core::bail!("rope: head dim {d} is odd")
        }
        let at = |start: usize, st: &[usize; 3], row: usize| {
            let (bi, hi, ti) = (row / (h * t), (row / t) % h, row % t);
            start + bi * st[0] + hi * st[1] + ti * st[2]
        };
        let mut y = uninit(l1.shape().elem_count());
        y.par_chunks_mut(d.max(1))
            .enumerate()
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(row, y)| {
                let xo = at(l1.start_offset(), &xs, row);
                let co = at(l2.start_offset(), &cs, row);
                let so = at(l3.start_offset(), &ss, row);
                let (x, c, s) = (&x[xo..xo + d], &cos[co..co + d], &sin[so..so + d]);
                rotate_row(y, x, c, s, self.inverse);
            });
        // SAFETY: the rows above cover the buffer, and `rotate_row` writes all of each.
        let y = unsafe { assume_written(y) };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let rope = Rope {
            inverse: !self.inverse,
        };
        let dx = unit_last_stride(g)?.apply_op3_no_bwd(cos, sin, &rope)?;
        Ok((Some(dx), None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::RopeScaling;
    use crate::model::ops::{rope_inv_freq, rope_tables};
    use candle_core::Device;

    /// The inverse rotation (the backward's kernel) undoes the forward one.
    #[test]
    fn rope_inverse_undoes_rope() {
        let (b, t, d) = (1, 7, 6);
        let inv_freq = rope_inv_freq(d, 10_000.0, &RopeScaling::None);
        let positions: Vec<u32> = (0..t as u32).map(|i| i * 3).collect();
        let (cos, sin) = rope_tables(&positions, &inv_freq, &Device::Cpu).unwrap();
        let (cos, sin) = (
            cos.reshape((b, 1, t, d)).unwrap(),
            sin.reshape((b, 1, t, d)).unwrap(),
        );
        let v: Vec<f32> = (0..2 * t * d).map(|i| (i as f32 * 0.37).sin()).collect();
        let x = Tensor::from_vec(v, (b, 2, t, d), &Device::Cpu).unwrap();
        let y = apply_rope(&x, &cos, &sin).unwrap();
        let back = y
            .apply_op3_no_bwd(&cos, &sin, &Rope { inverse: true })
            .unwrap();
        let diff: f32 = (back - &x)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-6, "{diff}");
    }
}

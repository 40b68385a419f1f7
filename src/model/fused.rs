//! Fused CPU kernels, each with its own backward, for the decoder's memory-bound ops: RMSNorm,
//! softmax over the last dim, rotate-half RoPE and SwiGLU (`silu(gate) ⊙ up`).
//!
//! Why: candle's own fused ops (`candle_nn::ops::rms_norm`, `softmax_last_dim`,
//! `rotary_emb::rope`) have no backward pass and drop gradients silently (candle #2168, #3568,
//! #3569; ../shared/notes/candle-training.md). The composed versions in `ops.rs` are correct but
//! make one full pass and one allocation per elementary op (6 for RoPE, 5 for softmax), and
//! keep the intermediates alive for backward. Each op here reads its inputs once, writes one
//! output, and recomputes what its backward needs from the inputs or the saved output.
//!
//! Backward formulas (g is the upstream gradient):
//! - RMSNorm y = x̂ ⊙ w, x̂ = x·r, r = 1/√(mean(x²)+ε):
//!   dx = r ⊙ (g⊙w − x̂ ⊙ mean(g⊙w⊙x̂)), dw = Σ_rows g ⊙ x̂.
//! - softmax y: dx = y ⊙ (g − Σ g ⊙ y).
//! - RoPE is a rotation per (i, i + d/2) pair: its backward is the transposed rotation
//!   (the same kernel with −sin when both halves of the tables are equal, as they are).
//! - SwiGLU y = silu(a) ⊙ u: da = g ⊙ u ⊙ σ(a)(1 + a(1 − σ(a))), du = g ⊙ silu(a).
//!
//! Only f32 on CPU: `ops.rs` routes everything else (f64 finite-difference tests, other
//! devices) to the composed reference path, and the tests below check every op against it.
//! Kernels that reduce across rows (dw) sum fixed blocks in a fixed order, so results do not
//! depend on the thread count.
//!
//! Legend: n rows (all leading dims flattened), c last dim, b batch, h heads, t time, d head dim.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Rows per rayon task for row-wise kernels, and rows per partial sum of dw (fixed so the
/// summation order, hence the result, does not depend on scheduling).
const ROWS_PER_TASK: usize = 32;
/// Elements per rayon task for element-wise kernels.
const ELEMS_PER_TASK: usize = 16 * 1024;

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

/// True when `t` can take a fused kernel: f32 on CPU.
pub fn applies(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

/// RMSNorm over the last dim of x (…, c) with weight w (c). Inputs must satisfy [`applies`].
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}

/// Softmax over the last dim. Input must satisfy [`applies`].
pub fn softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

/// Rotate-half RoPE: x (b, h, t, d) with any strides (read in place when the last dim is
/// dense, as for heads transposed out of (b, t, h, d)); cos, sin with size 1 or x's size in
/// each of the first three dims and d in the last. Returns a contiguous (b, h, t, d). cos and
/// sin get no gradient.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    unit_last_stride(x)?.apply_op3(
        &unit_last_stride(cos)?,
        &unit_last_stride(sin)?,
        Rope { inverse: false },
    )
}

/// `t` itself when its last dim is dense (the RoPE kernel reads any other strides), else a
/// contiguous copy.
fn unit_last_stride(t: &Tensor) -> candle_core::Result<Tensor> {
    if t.stride().last() == Some(&1) {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// Whether [`apply_rope`] accepts these tensors (else use the composed path).
pub fn rope_applies(x: &Tensor, cos: &Tensor, sin: &Tensor) -> bool {
    let (xd, cd, sd) = (x.dims(), cos.dims(), sin.dims());
    applies(x)
        && applies(cos)
        && applies(sin)
        && xd.len() == 4
        && xd[3] % 2 == 0
        && cd == sd
        && cd.len() == 4
        && cd[3] == xd[3]
        && (0..3).all(|i| cd[i] == xd[i] || cd[i] == 1)
}

/// `silu(gate) ⊙ up` for same-shaped gate and up. Inputs must satisfy [`applies`].
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

/// The contiguous f32 data of one op input.
pub(super) fn data<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(d) = s else {
        candle_core::bail!("{op}: expected f32, got {:?}", s.dtype())
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: input must be contiguous")
    };
    Ok(&d[a..b])
}

/// Σ a_i·b_i with 8 independent accumulators (vectorises; same spirit as candle's `vec_sum`).
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
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

/// 1/√(mean(x²) + ε), in the same f32 steps as the composed path (sum · (1/c), + ε, √, 1/·).
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let mean = dot(row, row) * (1.0 / row.len() as f64) as f32;
    1.0 / (mean + eps).sqrt()
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
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(c)
            .zip(x.par_chunks(c))
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(y, x)| {
                let r = inv_rms(x, self.eps);
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                    *y = x * r * w;
                }
            });
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
        let mut out = vec![0f32; x.len() + c];
        let (dx, dw) = out.split_at_mut(x.len());
        let block = ROWS_PER_TASK * c;
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(block)
            .zip(x.par_chunks(block))
            .zip(g.par_chunks(block))
            .map(|((dx, x), g)| {
                let mut dw = vec![0f32; c];
                let mut gw = vec![0f32; c];
                for ((dx, x), g) in dx.chunks_mut(c).zip(x.chunks(c)).zip(g.chunks(c)) {
                    let r = inv_rms(x, self.eps);
                    for (((gw, dw), &g), (&w, &x)) in
                        gw.iter_mut().zip(&mut dw).zip(g).zip(w.iter().zip(x))
                    {
                        *gw = g * w;
                        *dw += g * x * r;
                    }
                    // mean(g⊙w⊙x̂) = r · mean(g⊙w⊙x)
                    let s = dot(&gw, x) * r / c as f32;
                    for ((dx, &gw), &x) in dx.iter_mut().zip(&gw).zip(x) {
                        *dx = r * (gw - x * r * s);
                    }
                }
                dw
            })
            .collect();
        for p in &partials {
            for (dw, p) in dw.iter_mut().zip(p) {
                *dw += p;
            }
        }
        let n = out.len();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }
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
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = exp_or_zero(x - max);
                }
                let total = sum(y);
                for y in y.iter_mut() {
                    *y /= total;
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxGrad)?))
    }
}

/// Σ x with 8 independent accumulators.
pub(super) fn sum(xs: &[f32]) -> f32 {
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

fn f32s<'a>(s: &'a CpuStorage, op: &str) -> candle_core::Result<&'a [f32]> {
    match s {
        CpuStorage::F32(d) => Ok(d),
        _ => candle_core::bail!("{op}: expected f32, got {:?}", s.dtype()),
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
        let half = d / 2;
        let at = |start: usize, st: &[usize; 3], row: usize| {
            let (bi, hi, ti) = (row / (h * t), (row / t) % h, row % t);
            start + bi * st[0] + hi * st[1] + ti * st[2]
        };
        let mut y = vec![0f32; l1.shape().elem_count()];
        y.par_chunks_mut(d.max(1))
            .enumerate()
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(row, y)| {
                let xo = at(l1.start_offset(), &xs, row);
                let co = at(l2.start_offset(), &cs, row);
                let so = at(l3.start_offset(), &ss, row);
                let (x1, x2) = (&x[xo..xo + half], &x[xo + half..xo + d]);
                let (c1, c2) = (&cos[co..co + half], &cos[co + half..co + d]);
                let (s1, s2) = (&sin[so..so + half], &sin[so + half..so + d]);
                let (y1, y2) = y.split_at_mut(half);
                for i in 0..half {
                    if self.inverse {
                        y1[i] = x1[i] * c1[i] + x2[i] * s2[i];
                        y2[i] = x2[i] * c2[i] - x1[i] * s1[i];
                    } else {
                        y1[i] = x1[i] * c1[i] - x2[i] * s1[i];
                        y2[i] = x2[i] * c2[i] + x1[i] * s2[i];
                    }
                }
            });
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

struct SwiGlu;

/// σ(a) and silu(a) = a / (1 + e^{−a}) (candle's form, so the forward matches bit for bit).
fn sigmoid_silu(a: f32) -> (f32, f32) {
    let e = 1.0 + (-a).exp();
    (1.0 / e, a / e)
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
        let mut y = vec![0f32; a.len()];
        y.par_chunks_mut(ELEMS_PER_TASK)
            .zip(
                a.par_chunks(ELEMS_PER_TASK)
                    .zip(u.par_chunks(ELEMS_PER_TASK)),
            )
            .for_each(|(y, (a, u))| {
                for ((y, &a), &u) in y.iter_mut().zip(a).zip(u) {
                    *y = sigmoid_silu(a).1 * u;
                }
            });
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
        let mut out = vec![0f32; 2 * n];
        let (da, du) = out.split_at_mut(n);
        da.par_chunks_mut(ELEMS_PER_TASK)
            .zip(du.par_chunks_mut(ELEMS_PER_TASK))
            .zip(a.par_chunks(ELEMS_PER_TASK))
            .zip(
                u.par_chunks(ELEMS_PER_TASK)
                    .zip(g.par_chunks(ELEMS_PER_TASK)),
            )
            .for_each(|(((da, du), a), (u, g))| {
                for i in 0..a.len() {
                    let (s, silu) = sigmoid_silu(a[i]);
                    da[i] = g[i] * u[i] * s * (1.0 + a[i] * (1.0 - s));
                    du[i] = g[i] * silu;
                }
            });
        Ok((CpuStorage::F32(out), Shape::from(2 * n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops;
    use candle_core::{DType, Device, Var};

    /// Forward: max |fused − composed| ≤ FWD_TOL; backward: the same on the gradients of a
    /// random weighted sum of the output, for every input that is a Var, with BWD_TOL taken
    /// relative to max(1, max |composed grad|): dw sums every row, and over a few hundred
    /// rows of O(1) terms the two summation orders differ by a few f32 ulps of a sum ≈ 20.
    const FWD_TOL: f32 = 1e-6;
    const BWD_TOL: f32 = 1e-5;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    thread_local! {
        static SEED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    /// Seeded zero-mean noise of standard deviation `std` (uniform, so tests are repeatable).
    fn randn(shape: &[usize], std: f32) -> Tensor {
        use rand::{Rng, SeedableRng};
        let seed = SEED.with(|s| s.replace(s.get() + 1));
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n = shape.iter().product();
        let half_width = std * 3f32.sqrt();
        let v: Vec<f32> = (0..n)
            .map(|_| rng.gen_range(-half_width..half_width))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// A Var of `shape` handed out as a non-contiguous view (the transpose of its last two dims).
    fn transposed_var(shape: &[usize], std: f32) -> (Var, Tensor) {
        let r = shape.len();
        let mut stored = shape.to_vec();
        stored.swap(r - 1, r - 2);
        let var = Var::from_tensor(&randn(&stored, std)).unwrap();
        let view = var.as_tensor().transpose(r - 1, r - 2).unwrap();
        assert!(!view.is_contiguous());
        (var, view)
    }

    fn check(name: &str, vars: &[&Var], fused: impl Fn() -> Tensor, composed: impl Fn() -> Tensor) {
        let (yf, yc) = (fused(), composed());
        let d = max_abs_diff(&yf, &yc);
        assert!(d <= FWD_TOL, "{name} forward: {d:e}");
        let w = randn(yf.dims(), 1.0);
        let gf = (&yf * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (&yc * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in vars.iter().enumerate() {
            let (a, b) = (gf.get(v).unwrap(), gc.get(v).unwrap());
            let scale = max_abs_diff(b, &b.zeros_like().unwrap()).max(1.0);
            let d = max_abs_diff(a, b) / scale;
            assert!(
                d <= BWD_TOL,
                "{name} grad of input {i}: {d:e} (scale {scale})"
            );
        }
    }

    #[test]
    fn rms_norm_matches_composed() {
        for (shape, eps) in [
            (&[3, 5, 37][..], 1e-6),
            (&[2, 64][..], 1e-5),
            (&[1, 1, 3][..], 1e-6),
        ] {
            let x = Var::from_tensor(&randn(shape, 1.5)).unwrap();
            let c = shape[shape.len() - 1];
            let w = Var::from_tensor(&(randn(&[c], 0.3) + 1.0).unwrap()).unwrap();
            let (xt, wt) = (x.as_tensor(), w.as_tensor());
            check(
                "rms_norm",
                &[&x, &w],
                || rms_norm(xt, wt, eps).unwrap(),
                || ops::rms_norm_composed(xt, wt, eps).unwrap(),
            );
        }
        // Non-contiguous input, and more rows than one partial-sum block for dw.
        let (x, xt) = transposed_var(&[5, 41, 19], 1.0);
        let w = Var::from_tensor(&(randn(&[19], 0.3) + 1.0).unwrap()).unwrap();
        let wt = w.as_tensor();
        check(
            "rms_norm (strided)",
            &[&x, &w],
            || rms_norm(&xt, wt, 1e-6).unwrap(),
            || ops::rms_norm_composed(&xt, wt, 1e-6).unwrap(),
        );
    }

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

    #[test]
    fn softmax_matches_composed() {
        let x = Var::from_tensor(&randn(&[2, 3, 7, 13], 3.0)).unwrap();
        let xt = x.as_tensor();
        check(
            "softmax",
            &[&x],
            || softmax(xt).unwrap(),
            || ops::softmax_composed(xt).unwrap(),
        );
        // Masked scores, as attention produces them (causal: row i sees columns ≤ i).
        let mask: Vec<f32> = (0..9 * 9)
            .map(|k| if k % 9 <= k / 9 { 0.0 } else { ops::MASKED })
            .collect();
        let mask = Tensor::from_vec(mask, (9, 9), &Device::Cpu).unwrap();
        let (x, xt) = transposed_var(&[4, 9, 9], 2.0);
        let masked = xt.broadcast_add(&mask).unwrap();
        check(
            "softmax (masked, strided)",
            &[&x],
            || softmax(&masked).unwrap(),
            || ops::softmax_composed(&masked).unwrap(),
        );
    }

    fn rope_tables(b: usize, t: usize, d: usize) -> (Tensor, Tensor) {
        let inv_freq = ops::rope_inv_freq(d, 10_000.0, &crate::model::config::RopeScaling::None);
        let positions: Vec<u32> = (0..b * t).map(|i| (i % t + 3 * (i / t)) as u32).collect();
        let (cos, sin) = ops::rope_tables(&positions, &inv_freq, &Device::Cpu).unwrap();
        (
            cos.reshape((b, 1, t, d)).unwrap(),
            sin.reshape((b, 1, t, d)).unwrap(),
        )
    }

    #[test]
    fn rope_matches_composed() {
        let (b, h, t, d) = (2, 3, 5, 10);
        let (cos, sin) = rope_tables(b, t, d);
        let x = Var::from_tensor(&randn(&[b, h, t, d], 1.0)).unwrap();
        let xt = x.as_tensor();
        check(
            "rope",
            &[&x],
            || apply_rope(xt, &cos, &sin).unwrap(),
            || ops::apply_rope_composed(xt, &cos, &sin).unwrap(),
        );
        // As the decoder calls it: heads split from (b, t, h·d) then transposed (strided),
        // and tables shared across the batch (1, 1, t, d).
        let y = Var::from_tensor(&randn(&[b, t, h * d], 1.0)).unwrap();
        let heads = y
            .as_tensor()
            .reshape((b, t, h, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        assert!(!heads.is_contiguous());
        let (cos1, sin1) = (cos.narrow(0, 0, 1).unwrap(), sin.narrow(0, 0, 1).unwrap());
        assert!(rope_applies(&heads, &cos1, &sin1));
        check(
            "rope (strided heads, shared tables)",
            &[&y],
            || apply_rope(&heads, &cos1, &sin1).unwrap(),
            || ops::apply_rope_composed(&heads, &cos1, &sin1).unwrap(),
        );
        // Rows with a non-unit last-dim stride are copied first.
        let (z, zt) = transposed_var(&[b, h, t, d], 1.0);
        check(
            "rope (transposed last dims)",
            &[&z],
            || apply_rope(&zt, &cos, &sin).unwrap(),
            || ops::apply_rope_composed(&zt, &cos, &sin).unwrap(),
        );
    }

    #[test]
    fn rope_inverse_undoes_rope() {
        let (cos, sin) = rope_tables(1, 7, 6);
        let x = randn(&[1, 2, 7, 6], 1.0);
        let y = apply_rope(&x, &cos, &sin).unwrap();
        let back = y
            .apply_op3_no_bwd(&cos, &sin, &Rope { inverse: true })
            .unwrap();
        assert!(max_abs_diff(&back, &x) < FWD_TOL);
    }

    #[test]
    fn swiglu_matches_composed() {
        let a = Var::from_tensor(&randn(&[3, 7, 29], 3.0)).unwrap();
        let u = Var::from_tensor(&randn(&[3, 7, 29], 1.0)).unwrap();
        let (at, ut) = (a.as_tensor(), u.as_tensor());
        check(
            "swiglu",
            &[&a, &u],
            || swiglu(at, ut).unwrap(),
            || ops::swiglu_composed(at, ut).unwrap(),
        );
        let (a, at) = transposed_var(&[4, 33], 2.0);
        let u = Var::from_tensor(&randn(&[4, 33], 1.0)).unwrap();
        let ut = u.as_tensor();
        check(
            "swiglu (strided)",
            &[&a, &u],
            || swiglu(&at, ut).unwrap(),
            || ops::swiglu_composed(&at, ut).unwrap(),
        );
    }

    #[test]
    fn results_do_not_depend_on_thread_count() {
        let x = randn(&[300, 48], 1.0);
        let w = Var::from_tensor(&randn(&[48], 1.0)).unwrap();
        let g = randn(&[300, 48], 1.0);
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

    #[test]
    fn other_dtypes_take_the_composed_path() {
        let x = randn(&[2, 3, 8], 1.0).to_dtype(DType::F64).unwrap();
        let w = randn(&[8], 1.0).to_dtype(DType::F64).unwrap();
        assert!(!applies(&x));
        let a = ops::rms_norm(&x, &w, 1e-6).unwrap();
        let b = ops::rms_norm_composed(&x, &w, 1e-6).unwrap();
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f64>().unwrap(), 0.0);
    }
}

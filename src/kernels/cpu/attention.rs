//! Scaled dot-product attention as one graph node with its own backward, on the CPU in f32.
//!
//! Why: composed from candle ops, attention is five nodes per layer (q·kᵀ, scale, mask,
//! softmax, p·v) plus layout copies, each a full pass over the (b·h·t·s) scores with an
//! allocation, and candle's backward zero-fills a gradient buffer for every edge before
//! adding into it. Here each (batch, query head) block runs its two products through `gemm`
//! on slices, the softmax in place, and keeps the probabilities for the backward; the graph
//! sees one node with three input gradients.
//!
//! Per block, with S = scale·Q·Kᵀ + M, P = softmax(S), O = P·V and upstream dO:
//! dV = Σ_heads Pᵀ·dO, dP = dO·Vᵀ, dS = P ⊙ (dP − rowsum(dP ⊙ P)), dQ = scale·dS·K,
//! dK = Σ_heads scale·dSᵀ·Q — the sums run over the query heads sharing a key/value head
//! (grouped-query attention). Reference: the composed path (`kernels::composed::attention`,
//! transformers' `eager_attention_forward`); tests/kernels/ checks output and gradients
//! against it with grouped-query heads, padding masks and strided inputs.
//!
//! Legend: b batch, hq query heads, hkv key/value heads, t queries, s keys, d head dim.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::fast_exp::exp_shifted_in_place;
use super::gemm::{gemm_into_serial, Mat};
use super::{data, dot, is_f32};

/// Whether the kernel takes these operands: all f32 (shapes are checked by [`attention`]).
pub fn supports(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> bool {
    [q, k, v, mask].iter().all(|t| is_f32(t))
}

/// softmax(scale·q·kᵀ + mask)·v for q (b, hq, t, d), k and v (b, hkv, s, d), mask (b, 1, t, s).
/// Returns (b, hq, t, d). All f32 on the CPU.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (b, hq, t, d) = q.dims4()?;
    let (kb, hkv, s, kd) = k.dims4()?;
    if kb != b || kd != d || v.dims() != k.dims() || hkv == 0 || hq % hkv != 0 {
        candle_core::bail!(
            "fused attention: q {:?}, k {:?}, v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    if mask.dims() != [b, 1, t, s] {
        candle_core::bail!(
            "fused attention: mask {:?} is not (b, 1, t, s)",
            mask.dims()
        )
    }
    let dims = Dims {
        b,
        hq,
        hkv,
        t,
        s,
        d,
    };
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        Attention {
            mask: mask.contiguous()?,
            scale: scale as f32,
            dims,
            probs: Mutex::new(None),
        },
    )
}

#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    hq: usize,
    hkv: usize,
    t: usize,
    s: usize,
    d: usize,
}

struct Attention {
    mask: Tensor,
    scale: f32,
    dims: Dims,
    /// P of the last forward, (b, hq, t, s), kept for the backward.
    probs: Mutex<Option<Vec<f32>>>,
}

/// `dst (m×n) = [dst +] alpha · lhs (m×k) · rhs (k×n)` on row-major slices; `*_t` reads the
/// operand transposed (its storage is k×m or n×k row-major). Single-threaded: blocks run in
/// parallel.
#[allow(clippy::too_many_arguments)]
fn matmul(
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    lhs_t: bool,
    rhs: &[f32],
    rhs_t: bool,
    (m, k, n): (usize, usize, usize),
    alpha: f32,
) -> candle_core::Result<()> {
    let lhs = if lhs_t {
        Mat::dense(lhs, k, m).t()
    } else {
        Mat::dense(lhs, m, k)
    };
    let rhs = if rhs_t {
        Mat::dense(rhs, n, k).t()
    } else {
        Mat::dense(rhs, k, n)
    };
    gemm_into_serial(dst, accumulate, alpha as f64, lhs, rhs)
}

fn f32_slice<'a>(storage: &'a Storage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    match storage {
        Storage::Cpu(s) => data(s, l, what),
        _ => candle_core::bail!("fused attention: {what} must be on the CPU"),
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            data(qs, ql, "attention q")?,
            data(ks, kl, "attention k")?,
            data(vs, vl, "attention v")?,
        );
        let mask_guard = self.mask.storage_and_layout();
        let mask = f32_slice(&mask_guard.0, mask_guard.1, "mask")?;
        let Dims {
            b,
            hq,
            hkv,
            t,
            s,
            d,
        } = self.dims;
        let rep = hq / hkv;
        let mut probs = vec![0f32; b * hq * t * s];
        let mut out = vec![0f32; b * hq * t * d];
        probs
            .par_chunks_mut(t * s)
            .zip(out.par_chunks_mut(t * d))
            .enumerate()
            .try_for_each(|(block, (p, o))| -> candle_core::Result<()> {
                let (batch, head) = (block / hq, block % hq);
                let kv = (batch * hkv + head / rep) * s * d;
                let qb = &q[block * t * d..(block + 1) * t * d];
                matmul(
                    p,
                    false,
                    qb,
                    false,
                    &k[kv..kv + s * d],
                    true,
                    (t, d, s),
                    1.0,
                )?;
                for (i, row) in p.chunks_mut(s).enumerate() {
                    let m = &mask[(batch * t + i) * s..(batch * t + i + 1) * s];
                    let mut max = f32::NEG_INFINITY;
                    for (x, &m) in row.iter_mut().zip(m) {
                        *x = self.scale * *x + m;
                        max = max.max(*x);
                    }
                    let total = exp_shifted_in_place(row, max);
                    for x in row.iter_mut() {
                        *x /= total;
                    }
                }
                matmul(
                    o,
                    false,
                    p,
                    false,
                    &v[kv..kv + s * d],
                    false,
                    (t, s, d),
                    1.0,
                )
            })?;
        if let Ok(mut saved) = self.probs.lock() {
            *saved = Some(probs);
        }
        Ok((CpuStorage::F32(out), Shape::from((b, hq, t, d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let probs = match self.probs.lock() {
            Ok(mut saved) => saved.take(),
            Err(_) => None,
        };
        let Some(probs) = probs else {
            candle_core::bail!("fused attention: backward without a saved forward")
        };
        let grad = grad.contiguous()?;
        let (qg, kg, vg, gg) = (
            q.storage_and_layout(),
            k.storage_and_layout(),
            v.storage_and_layout(),
            grad.storage_and_layout(),
        );
        let q_ = f32_slice(&qg.0, qg.1, "q")?;
        let k_ = f32_slice(&kg.0, kg.1, "k")?;
        let v_ = f32_slice(&vg.0, vg.1, "v")?;
        let g_ = f32_slice(&gg.0, gg.1, "grad")?;
        let Dims {
            b,
            hq,
            hkv,
            t,
            s,
            d,
        } = self.dims;
        let rep = hq / hkv;
        let mut dq = vec![0f32; b * hq * t * d];
        let mut dk = vec![0f32; b * hkv * s * d];
        let mut dv = vec![0f32; b * hkv * s * d];
        // One task per (batch, kv head): it owns dK, dV of that head and dQ of its query heads.
        dk.par_chunks_mut(s * d)
            .zip(dv.par_chunks_mut(s * d))
            .zip(dq.par_chunks_mut(rep * t * d))
            .enumerate()
            .try_for_each(|(group, ((dk, dv), dq))| -> candle_core::Result<()> {
                let kv = group * s * d;
                let (kb, vb) = (&k_[kv..kv + s * d], &v_[kv..kv + s * d]);
                let mut ds = vec![0f32; t * s];
                for r in 0..rep {
                    let block = group * rep + r;
                    let p = &probs[block * t * s..(block + 1) * t * s];
                    let go = &g_[block * t * d..(block + 1) * t * d];
                    let qb = &q_[block * t * d..(block + 1) * t * d];
                    // dV += Pᵀ·dO
                    matmul(dv, r > 0, p, true, go, false, (s, t, d), 1.0)?;
                    // dP = dO·Vᵀ, then dS = P ⊙ (dP − rowsum(dP ⊙ P))
                    matmul(&mut ds, false, go, false, vb, true, (t, d, s), 1.0)?;
                    for (dsr, pr) in ds.chunks_mut(s).zip(p.chunks(s)) {
                        let c = dot(dsr, pr);
                        for (x, &p) in dsr.iter_mut().zip(pr) {
                            *x = p * (*x - c);
                        }
                    }
                    // dQ = scale·dS·K; dK += scale·dSᵀ·Q
                    let dqb = &mut dq[r * t * d..(r + 1) * t * d];
                    matmul(dqb, false, &ds, false, kb, false, (t, s, d), self.scale)?;
                    matmul(dk, r > 0, &ds, true, qb, false, (s, t, d), self.scale)?;
                }
                Ok(())
            })?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, (b, hq, t, d), dev)?),
            Some(Tensor::from_vec(dk, (b, hkv, s, d), dev)?),
            Some(Tensor::from_vec(dv, (b, hkv, s, d), dev)?),
        ))
    }
}

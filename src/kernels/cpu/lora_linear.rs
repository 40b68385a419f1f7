//! Fused LoRA linear layer over a frozen base, on CPU: one op computes
//! `y = x·W + b + s·(x·Aᵀ)·Bᵀ` into a single output and has its own backward.
//!
//! Why: the composed path (`kernels::composed::lora_linear`) keeps three activation-sized
//! tensors per adapted layer for backward (the base output, the low-rank product, their sum).
//! Here the graph keeps only x (already alive as the previous op's output) and the op's
//! output; the base matmul and the low-rank update are accumulated in place by gemm, and
//! the small (n, r) product `x·Aᵀ` is kept for backward's dB (n·r values, not recomputed).
//!
//! Reference: PEFT's `lora.Linear.forward` (`base(x) + lora_B(lora_A(dropout(x))) · scaling`).
//! Backward (g the upstream gradient, W as (in, out)):
//!   dx = g·Wᵀ + s·(g·B)·A,   dA = s·(g·B)ᵀ·x,   dB = s·gᵀ·(x·Aᵀ).
//! W and b are held by the op, not passed as inputs, so they get no gradient and no entry in
//! candle's GradStore. GPT-2's transposed (in, out) storage and Llama's (out, in) are both
//! read in place through strides. Training dropout (`lora_dropout` > 0) happens inside the op
//! on the low-rank branch only, from a 0/1 keep mask the op holds (one byte per input element).
//!
//! f32 and f64 (the f64 path exists so gradients can be checked by finite differences);
//! tests/gradients.rs checks it against finite differences, tests/kernels/ against the
//! composed path (with and without dropout).
//!
//! Legend: n rows (all leading dims flattened), i in features, o out features, r rank.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Storage, Tensor};

use super::gemm::{gemm_into, gemm_new, Float, Mat};
use crate::model::frozen_dtype::is_half;

/// Whether the fused op takes these operands: x, A, B (and the bias) in one f32/f64 dtype, W
/// in it or in bf16/f16, and the base weight and bias frozen (tracking no gradient).
pub fn supports(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, a: &Tensor, b: &Tensor) -> bool {
    let dt = x.dtype();
    let ok = |t: &Tensor| t.device().is_cpu() && t.dtype() == dt;
    matches!(dt, DType::F32 | DType::F64)
        && ok(x)
        && w.device().is_cpu()
        && (w.dtype() == dt || is_half(w.dtype()))
        && ok(a)
        && ok(b)
        && bias.is_none_or(|t| ok(t) && !t.track_op())
        && !w.track_op()
}

/// x (n, i), w_io (i, o) frozen, bias (o) frozen, a (r, i), b (o, r) → (n, o).
/// Operands must pass [`supports`].
pub fn lora_linear(
    x: &Tensor,
    w_io: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    x.apply_op3(
        a,
        b,
        LoraLinear {
            w: w_io.clone(),
            bias: bias.cloned(),
            scale,
            dropout: None,
            low: OnceLock::new(),
        },
    )
}

/// As [`lora_linear`], with training dropout on the adapter's input (PEFT's `lora_dropout`):
/// the low-rank path sees `x ⊙ keep / (1 − p)`, the base sees x. `keep` (one 0/1 byte per
/// element of x, row-major) is held by the op — a quarter of x's bytes — and the dropped input
/// is rebuilt in backward instead of kept.
#[allow(clippy::too_many_arguments)]
pub fn lora_linear_dropout(
    x: &Tensor,
    w_io: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    keep: Vec<u8>,
    p: f64,
) -> candle_core::Result<Tensor> {
    if keep.len() != x.elem_count() || !(0.0..1.0).contains(&p) {
        candle_core::bail!(
            "lora-linear: dropout mask of {} for {} inputs, p {p}",
            keep.len(),
            x.elem_count()
        )
    }
    x.apply_op3(
        a,
        b,
        LoraLinear {
            w: w_io.clone(),
            bias: bias.cloned(),
            scale,
            dropout: Some(Dropout {
                keep,
                inv_keep: 1.0 / (1.0 - p),
            }),
            low: OnceLock::new(),
        },
    )
}

struct Dropout {
    keep: Vec<u8>,
    inv_keep: f64,
}

impl Dropout {
    /// x ⊙ keep / (1 − p) as a dense (n, i) buffer.
    fn apply<T: Float>(&self, x: Mat<T>) -> Vec<T> {
        let mut out = vec![T::ZERO; x.rows * x.cols];
        let k = T::of(self.inv_keep);
        for r in 0..x.rows {
            for c in 0..x.cols {
                if self.keep[r * x.cols + c] != 0 {
                    out[r * x.cols + c] = x.data[r * x.rs + c * x.cs] * k;
                }
            }
        }
        out
    }

    /// v ⊙ keep / (1 − p) in place (v dense, same shape as x).
    fn mask_in_place<T: Float>(&self, v: &mut [T]) {
        let k = T::of(self.inv_keep);
        for (v, &keep) in v.iter_mut().zip(&self.keep) {
            *v = if keep != 0 { *v * k } else { T::ZERO };
        }
    }
}

struct LoraLinear {
    /// (i, o), any strides.
    w: Tensor,
    /// (o)
    bias: Option<Tensor>,
    scale: f64,
    dropout: Option<Dropout>,
    /// Forward's `x·Aᵀ` (n, r), kept for dB in backward instead of recomputed: n·r values
    /// (48 KB at 768 tokens and rank 16) against a product over all of x.
    low: OnceLock<CpuStorage>,
}

/// The (CPU storage, layout) of a held tensor, read under its lock by `f`.
fn with_cpu<R>(
    t: &Tensor,
    f: impl FnOnce(&CpuStorage, &Layout) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => f(s, layout),
        _ => candle_core::bail!("lora-linear: tensors must be on the CPU"),
    }
}

impl LoraLinear {
    /// W in the compute dtype `dt`: itself, or (held in bf16/f16) an exact transient upcast.
    fn w_as(&self, dt: DType) -> candle_core::Result<Tensor> {
        if self.w.dtype() == dt {
            Ok(self.w.clone())
        } else {
            self.w.to_dtype(dt)
        }
    }

    fn fwd<T: Float + candle_core::WithDType>(
        &self,
        x: Mat<T>,
        a: Mat<T>,
        b: Mat<T>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        with_cpu(&self.w_as(T::DTYPE)?, |ws, wl| {
            let w = Mat::<T>::of(ws, wl, "W")?; // (i, o)
            let (n, o, r) = (x.rows, w.cols, a.rows);
            if a.cols != x.cols || b.rows != o || b.cols != r {
                candle_core::bail!(
                    "lora-linear: x {:?}, W {:?}, A {:?}, B {:?} do not fit",
                    (x.rows, x.cols),
                    (w.rows, w.cols),
                    (a.rows, a.cols),
                    (b.rows, b.cols)
                )
            }
            let mut y = match &self.bias {
                // y = x·W, written by gemm without a zero fill first.
                None => gemm_new(1.0, x, w)?,
                // y = b + x·W: the bias in every row, then the product added.
                Some(bias) => {
                    let mut y = vec![T::ZERO; n * o];
                    with_cpu(bias, |bs, bl| {
                        let Some((s, e)) = bl.contiguous_offsets() else {
                            candle_core::bail!("lora-linear: bias must be contiguous")
                        };
                        let Some(bv) = T::slice(bs) else {
                            candle_core::bail!("lora-linear: bias dtype differs")
                        };
                        let bv = &bv[s..e];
                        if bv.len() != o {
                            candle_core::bail!(
                                "lora-linear: bias has {} entries, not {o}",
                                bv.len()
                            )
                        }
                        y.chunks_exact_mut(o)
                            .for_each(|row| row.copy_from_slice(bv));
                        Ok(())
                    })?;
                    gemm_into(&mut y, true, 1.0, x, w)?;
                    y
                }
            };
            let dropped = self.dropout.as_ref().map(|d| d.apply(x));
            let xin = dropped.as_deref().map_or(x, |v| Mat::dense(v, n, x.cols));
            let low = gemm_new(1.0, xin, a.t())?; // (n, r) = x·Aᵀ
            gemm_into(&mut y, true, self.scale, Mat::dense(&low, n, r), b.t())?; // y += s·low·Bᵀ
                                                                                 // Kept for backward's dB. Each op value runs forward once (candle applies it
                                                                                 // immediately), so the cell is always empty here.
            let _ = self.low.set(T::storage(low));
            Ok((T::storage(y), Shape::from((n, o))))
        })
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
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
        match s1.dtype() {
            DType::F32 => self.fwd::<f32>(
                Mat::of(s1, l1, "x")?,
                Mat::of(s2, l2, "A")?,
                Mat::of(s3, l3, "B")?,
            ),
            DType::F64 => self.fwd::<f64>(
                Mat::of(s1, l1, "x")?,
                Mat::of(s2, l2, "A")?,
                Mat::of(s3, l3, "B")?,
            ),
            dt => candle_core::bail!("lora-linear: f32 or f64 only, got {dt:?}"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        match x.dtype() {
            DType::F32 => self.grads::<f32>(x, a, b, g),
            DType::F64 => self.grads::<f64>(x, a, b, g),
            dt => candle_core::bail!("lora-linear: f32 or f64 only, got {dt:?}"),
        }
    }
}

type Grads = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

impl LoraLinear {
    /// (dx, dA, dB), each only for an input that tracks gradients.
    fn grads<T: Float + candle_core::WithDType>(
        &self,
        xt: &Tensor,
        at: &Tensor,
        bt: &Tensor,
        gt: &Tensor,
    ) -> candle_core::Result<Grads> {
        let s = self.scale;
        with_cpu(xt, |xs, xl| {
            with_cpu(at, |as_, al| {
                with_cpu(bt, |bs, bl| {
                    with_cpu(gt, |gs, gl| {
                        with_cpu(&self.w_as(T::DTYPE)?, |ws, wl| {
                            let x = Mat::<T>::of(xs, xl, "x")?; // (n, i)
                            let a = Mat::<T>::of(as_, al, "A")?; // (r, i)
                            let b = Mat::<T>::of(bs, bl, "B")?; // (o, r)
                            let g = Mat::<T>::of(gs, gl, "grad")?; // (n, o)
                            let w = Mat::<T>::of(ws, wl, "W")?; // (i, o)
                            let (n, i, o, r) = (x.rows, x.cols, w.cols, a.rows);
                            let gb = gemm_new(1.0, g, b)?; // (n, r) = g·B
                            let gb = Mat::dense(&gb, n, r);
                            let dx = if xt.track_op() {
                                let mut dx = gemm_new(1.0, g, w.t())?; // g·Wᵀ
                                match &self.dropout {
                                    None => gemm_into(&mut dx, true, s, gb, a)?, // + s·(g·B)·A
                                    Some(d) => {
                                        // + s·((g·B)·A) ⊙ keep / (1 − p)
                                        let mut low_grad = gemm_new(s, gb, a)?;
                                        d.mask_in_place(&mut low_grad);
                                        for (dx, &l) in dx.iter_mut().zip(&low_grad) {
                                            *dx += l;
                                        }
                                    }
                                }
                                Some(Tensor::from_vec(dx, (n, i), &Device::Cpu)?)
                            } else {
                                None
                            };
                            // The adapter's input: x, or x with this step's dropout rebuilt.
                            let dropped = self.dropout.as_ref().map(|d| d.apply(x));
                            let x = dropped.as_deref().map_or(x, |v| Mat::dense(v, n, i));
                            let da = if at.track_op() {
                                let da = gemm_new(s, gb.t(), x)?; // s·(g·B)ᵀ·x
                                Some(Tensor::from_vec(da, (r, i), &Device::Cpu)?)
                            } else {
                                None
                            };
                            let db = if bt.track_op() {
                                // x·Aᵀ as forward computed it.
                                let Some(low) = self.low.get().and_then(T::slice) else {
                                    candle_core::bail!("lora-linear: backward without a forward")
                                };
                                let db = gemm_new(s, g.t(), Mat::dense(low, n, r))?;
                                Some(Tensor::from_vec(db, (o, r), &Device::Cpu)?)
                            } else {
                                None
                            };
                            Ok((dx, da, db))
                        })
                    })
                })
            })
        })
    }
}

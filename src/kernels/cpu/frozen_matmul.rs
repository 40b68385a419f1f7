//! `x · W` for a frozen W (a LoRA base layer, the frozen lm_head) on the CPU: one graph node
//! whose backward returns only the input's gradient `g · Wᵀ`.
//!
//! Why: candle's matmul backward computes the gradient of both operands; for a frozen W that
//! is a weight-sized product per layer per step that nobody reads. W is held by the op, not
//! passed as an input, so it is not part of the graph at all. The forward is candle's own CPU
//! matmul on the two storages in place (any strides), so values equal `x.matmul(w)` exactly.
//! A W held in bf16/f16 ([`crate::model::frozen_dtype`]) is upcast to x's dtype for each
//! product only (exact), so no f32 copy outlives the call.
//!
//! Reference: the composed path (`kernels::composed::frozen_matmul`, a plain matmul whose
//! frozen operand candle gives no gradient); tests/kernels/ checks values and gradients.
//!
//! Legend: m rows, k in features, n out features.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};

/// Whether the op applies: x tracks gradients and w does not (frozen). Otherwise a plain
/// matmul is as cheap (no graph, or both gradients wanted).
pub fn supports(x: &Tensor, w: &Tensor) -> bool {
    x.track_op() && !w.track_op()
}

/// `x · w` for x (m, k) and a frozen w (k, n). Operands must pass [`supports`].
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.apply_op1(FrozenMatmul { w: w.clone() })
}

/// `x · W` for a frozen W (in, out): backward returns only the input's gradient `g · Wᵀ`.
struct FrozenMatmul {
    w: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        // A half-precision W is upcast to x's dtype for this product only.
        let w = if self.w.dtype() != s.dtype() {
            self.w.to_dtype(s.dtype())?
        } else {
            self.w.clone()
        };
        let (w_storage, wl) = w.storage_and_layout();
        let Storage::Cpu(ws) = &*w_storage else {
            candle_core::bail!("frozen-matmul: the weight must be on the CPU")
        };
        let (&[m, k], &[k2, n]) = (l.dims(), wl.dims()) else {
            candle_core::bail!(
                "frozen-matmul: expected 2-d operands, got {:?} and {:?}",
                l.dims(),
                wl.dims()
            )
        };
        if k != k2 {
            candle_core::bail!("frozen-matmul: ({m}, {k}) · ({k2}, {n})")
        }
        let y = s.matmul(ws, (1, m, n, k), l, wl)?;
        Ok((y, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let w = if self.w.dtype() != grad.dtype() {
            self.w.to_dtype(grad.dtype())?
        } else {
            self.w.clone()
        };
        Ok(Some(grad.matmul(&w.t()?)?))
    }
}

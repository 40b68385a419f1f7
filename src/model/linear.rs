//! A dense layer `y = x Wᵀ + b` as stored in Hugging Face checkpoints, optionally with a LoRA
//! adapter. GPT-2's `Conv1D` stores W transposed, (in, out); `transposed` marks that layout
//! so the weights stay byte-identical to the checkpoint and save back under the same name.
//!
//! A frozen W under an adapter goes through [`FrozenMatmul`]: candle's matmul backward always
//! computes the gradient of both operands, which for a frozen base would cost a weight-sized
//! gradient per layer per step for nothing.

use candle_core::{CpuStorage, CustomOp1, Layout, Module, Shape, Storage, Tensor};

use super::lora::Adapter;

#[derive(Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// Weight stored as (in, out) (GPT-2 Conv1D) instead of (out, in).
    pub transposed: bool,
    pub lora: Option<Adapter>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight,
            bias,
            transposed: false,
            lora: None,
        }
    }

    pub fn conv1d(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight,
            bias,
            transposed: true,
            lora: None,
        }
    }

    /// W as (in, out), ready to right-multiply rows.
    fn weight_in_out(&self) -> candle_core::Result<Tensor> {
        if self.transposed {
            Ok(self.weight.clone())
        } else {
            self.weight.t()
        }
    }
}

impl Module for Linear {
    /// x: (..., in) → (..., out)
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let inp = dims[dims.len() - 1];
        let x2 = x.reshape((x.elem_count() / inp, inp))?; // (rows, in)
        let frozen_base = self.lora.is_some() && !self.weight.is_variable() && x2.device().is_cpu();
        let mut y = if frozen_base {
            x2.contiguous()?.apply_op1(FrozenMatmul {
                w: self.weight_in_out()?,
            })?
        } else {
            x2.matmul(&self.weight_in_out()?)?
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(ad) = &self.lora {
            let xin = if ad.dropout > 0.0 && ad.a.is_variable() {
                candle_nn::ops::dropout(&x2, ad.dropout as f32)?
            } else {
                x2
            };
            let low = xin.matmul(&ad.a.t()?)?; // (rows, r)
                                               // Scale the small (r, out) factor, not the (rows, out) activation.
            y = (y + low.matmul(&(ad.b.t()? * ad.scale)?)?)?;
        }
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = y.dim(1)?;
        y.reshape(out_dims)
    }
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
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("frozen-matmul: input must be contiguous")
        };
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("frozen-matmul: f32 only")
        };
        let x = Tensor::from_slice(&data[a..b], l.shape(), &candle_core::Device::Cpu)?;
        let y = x.matmul(&self.w)?.contiguous()?;
        let (storage, layout) = y.storage_and_layout();
        let out = match &*storage {
            Storage::Cpu(CpuStorage::F32(v)) => match layout.contiguous_offsets() {
                Some((o1, o2)) => v[o1..o2].to_vec(),
                None => candle_core::bail!("frozen-matmul: non-contiguous result"),
            },
            _ => candle_core::bail!("frozen-matmul: unexpected storage"),
        };
        Ok((CpuStorage::F32(out), y.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w.t()?)?))
    }
}

//! A dense layer `y = x Wᵀ + b` as stored in Hugging Face checkpoints.
//! GPT-2's `Conv1D` stores W transposed, (in, out); `transposed` marks that layout so the
//! weights stay byte-identical to the checkpoint and save back under the same name.

use candle_core::{Module, Tensor};

#[derive(Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// Weight stored as (in, out) (GPT-2 Conv1D) instead of (out, in).
    pub transposed: bool,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight,
            bias,
            transposed: false,
        }
    }

    pub fn conv1d(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight,
            bias,
            transposed: true,
        }
    }
}

impl Module for Linear {
    /// x: (..., in) → (..., out)
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let (rows, inp) = (x.elem_count() / dims[dims.len() - 1], dims[dims.len() - 1]);
        let x2 = x.reshape((rows, inp))?;
        let y = if self.transposed {
            x2.matmul(&self.weight)?
        } else {
            x2.matmul(&self.weight.t()?)?
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = y.dim(1)?;
        y.reshape(out_dims)
    }
}

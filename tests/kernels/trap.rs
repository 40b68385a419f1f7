//! The trap in our vendored candle-core backward patch (vendor/candle-core/LEASH-PATCH.md):
//! the patch stores a tensor's first gradient contribution as is, so a transpose's strided
//! gradient reached the matmul that produced the transposed tensor, and candle's matmul
//! backward refused it (`MatMulUnexpectedStriding`, "non-contiguous lhs"). Stock candle
//! added every contribution to zeros, which made it contiguous. Found composing attention as
//! a GPU does: `probs.matmul(v)?.transpose(1, 2)?.reshape((b * t, h * d))?` then a linear
//! layer. Reference: the same layer with the fused CPU attention kernel.

use candle_core::{Device, Tensor, Var};
use leash::kernels::{composed, cpu};
use leash::model::ops::causal_mask;

use super::{noise, rel_diff};

const B: usize = 2;
const H: usize = 3;
const T: usize = 5;
const D: usize = 4;

struct Layer {
    q: Var,
    k: Var,
    v: Var,
    w: Var,
    mask: Tensor,
}

impl Layer {
    fn new() -> Self {
        let var = |shape: &[usize], seed| Var::from_tensor(&noise(shape, 1.0, seed)).unwrap();
        Layer {
            q: var(&[B, H, T, D], 40),
            k: var(&[B, H, T, D], 41),
            v: var(&[B, H, T, D], 42),
            w: var(&[H * D, 6], 43),
            // Row 1 is padded after 3 tokens.
            mask: causal_mask(&[T, 3], T, None, &Device::Cpu).unwrap(),
        }
    }

    /// Attention (composed from candle ops, or the fused kernel), heads merged back into
    /// (b·t, h·d) rows, then a linear layer: (b·t, 6).
    fn forward(&self, fused: bool) -> candle_core::Result<Tensor> {
        let (q, k, v) = (self.q.as_tensor(), self.k.as_tensor(), self.v.as_tensor());
        let scale = 1.0 / (D as f64).sqrt();
        let y = if fused {
            cpu::attention::attention(q, k, v, &self.mask, scale)?
        } else {
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&self.mask)?;
            composed::softmax(&scores)?.matmul(v)? // (b, h, t, d)
        };
        y.transpose(1, 2)?
            .reshape((B * T, H * D))?
            .matmul(self.w.as_tensor())
    }

    fn vars(&self) -> [&Var; 4] {
        [&self.q, &self.k, &self.v, &self.w]
    }
}

/// Backward through the composed attention works and gives the fused kernel's gradients;
/// then a few steps of gradient descent on it lower a squared error.
#[test]
fn composed_attention_trains_through_the_patched_backward() {
    let layer = Layer::new();
    let target = noise(&[B * T, 6], 1.0, 44);
    let loss = |fused: bool| -> candle_core::Result<Tensor> {
        (layer.forward(fused)? - &target)?.sqr()?.mean_all()
    };
    let composed = loss(false)
        .unwrap()
        .backward()
        .expect("backward through the composed attention");
    let fused = loss(true).unwrap().backward().unwrap();
    for (i, v) in layer.vars().iter().enumerate() {
        let d = rel_diff(composed.get(v).unwrap(), fused.get(v).unwrap(), 1e-3);
        assert!(d < 1e-5, "gradient of input {i}: {d:e}");
    }
    let first: f32 = loss(false).unwrap().to_scalar().unwrap();
    for _ in 0..20 {
        let grads = loss(false).unwrap().backward().unwrap();
        for v in layer.vars() {
            let g = grads.get(v).unwrap();
            v.set(&(v.as_tensor() - (g * 0.5).unwrap()).unwrap())
                .unwrap();
        }
    }
    let last: f32 = loss(false).unwrap().to_scalar().unwrap();
    assert!(last < 0.8 * first, "loss {first} → {last}");
}

//! The two paths of every kernel op (src/kernels): the fused CPU kernel and the composed
//! candle path a GPU runs, checked against each other on the CPU.
//! - ops.rs: each op's forward and gradients, fused vs composed (masks, padding and
//!   grouped-query heads for attention; LoRA with and without dropout), frozen weights getting
//!   no gradient on both paths, and the dispatch following `kernels::choice`.
//! - dispatch.rs: the dispatching functions run the CPU kernel by default and the composed
//!   path under `kernels::force_composed`.
//! - models.rs: whole models (Llama, Qwen2, GPT-2, Gemma 3, Phi-3 fixtures) with the composed
//!   path forced: log-probs and the gradients of one DPO step (full and LoRA) equal the
//!   default path's, and gradient checkpointing stays exact on the composed path.
//! - gemm_bands.rs: the vendored candle-core's matrix product shared among threads by
//!   column bands (LEASH-PATCH.md) against the product computed by hand.
//! - strided_copy.rs: the vendored candle-core's copies shared among threads (transposed
//!   heads, column slices, concatenation, whole copies) against indices computed by hand.
//! - trap.rs: the vendored candle-core backward patch hands an op a contiguous gradient even
//!   when its first contribution is a strided view (vendor/candle-core/LEASH-PATCH.md).
//!
//! The reference for each comparison is the other path (itself checked against finite
//! differences in tests/gradients.rs and the kernels' unit tests, and against transformers'
//! goldens in tests/logps_golden.rs and tests/families*.rs).

#[path = "../common/mod.rs"]
mod common;
mod dispatch;
mod gemm_bands;
mod models;
mod ops;
mod strided_copy;
mod trap;

use candle_core::{DType, Device, Tensor};
use leash::model::config::RopeScaling;
use leash::model::ops::{rope_inv_freq, rope_tables};

/// Seeded zero-mean noise of standard deviation `std` (uniform, so tests are repeatable).
pub fn noise(shape: &[usize], std: f32, seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = shape.iter().product();
    let half_width = std * 3f32.sqrt();
    let v: Vec<f32> = (0..n)
        .map(|_| rng.gen_range(-half_width..half_width))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// max |a − b| over all elements, in f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    d.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

/// max |t|, in f64.
pub fn max_abs(t: &Tensor) -> f64 {
    let t = t.to_dtype(DType::F64).unwrap();
    t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

/// max |a − b| relative to max(|b|, `floor`): the error measure every comparison uses.
pub fn rel_diff(a: &Tensor, b: &Tensor, floor: f64) -> f64 {
    max_abs_diff(a, b) / max_abs(b).max(floor)
}

/// cos, sin tables (b, 1, t, d) for positions offset per row (as packed rows have them).
pub fn rope_tables_for(b: usize, t: usize, d: usize) -> (Tensor, Tensor) {
    let inv_freq = rope_inv_freq(d, 10_000.0, &RopeScaling::None);
    let positions: Vec<u32> = (0..b * t).map(|i| (i % t + 3 * (i / t)) as u32).collect();
    let (cos, sin) = rope_tables(&positions, &inv_freq, &Device::Cpu).unwrap();
    (
        cos.reshape((b, 1, t, d)).unwrap(),
        sin.reshape((b, 1, t, d)).unwrap(),
    )
}

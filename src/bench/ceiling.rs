//! The machine's matmul ceiling: the best GFLOP/s candle's matmul (gemm) reaches on this
//! machine with the current thread count, over the shapes a training step multiplies. Every
//! training figure is printed as a fraction of it.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::model::ModelConfig;

/// GFLOP/s of `(m × k) · (k × n)` in `dtype`, best of `reps` after a warm-up.
fn matmul_gflops(
    (m, k, n): (usize, usize, usize),
    dtype: DType,
    reps: usize,
    device: &Device,
) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (m, k), device)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (k, n), device)?.to_dtype(dtype)?;
    a.matmul(&b)?;
    device.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let start = Instant::now();
        a.matmul(&b)?;
        // A GPU queues the product; the time is until it is done.
        device.synchronize()?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(2.0 * (m * k * n) as f64 / best / 1e9)
}

/// The best GFLOP/s over the shape's projections (2,048 rows × hidden → intermediate, and the
/// lm_head) and a large square product, in the dtype the step's products use (bf16 under
/// `--bf16`).
pub fn matmul_ceiling(cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<f64> {
    let d = cfg.hidden_size;
    let shapes = [
        (2048, d, cfg.intermediate_size),
        (2048, cfg.intermediate_size, d),
        (2048, d, cfg.vocab_size.min(16_384)),
        (2048, 2048, 2048),
    ];
    let mut best: f64 = 0.0;
    for (m, k, n) in shapes {
        best = best.max(matmul_gflops((m, k, n), dtype, 5, device)?);
    }
    Ok(best)
}

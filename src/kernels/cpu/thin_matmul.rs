//! `x · W` with only a few rows of x and no gradient on the CPU: decoding, where each step
//! multiplies one new position per sequence by every weight matrix. gemm packs W on every call,
//! which for a handful of rows costs as much as the product itself and streams W through memory
//! twice more; here W is read once, in place: each output is one dot product of an x row with a
//! contiguous row of W as the checkpoint stores it (out, in), split over threads by output.
//!
//! Reference: candle's matmul (tests/kernels/ compares them on random data).
//!
//! Legend: m rows, k in features, n out features.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use rayon::prelude::*;

use super::dot;

/// Rows up to which the thin product beats gemm (one decode step of up to 8 sequences).
pub const MAX_ROWS: usize = 8;

/// Outputs per task: enough work per thread hand-off, small enough to balance 2–16 threads.
const OUTPUTS_PER_TASK: usize = 256;

/// Whether the thin product applies: f32 on the CPU, no gradient wanted, x (m ≤ 8, k) and w a
/// (k, n) view of a contiguous (n, k) matrix (`W.t()` of a checkpoint's weight).
pub fn supports(x: &Tensor, w: &Tensor) -> bool {
    let (xd, wd) = (x.dims(), w.dims());
    x.device().is_cpu()
        && w.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && !x.track_op()
        && !w.track_op()
        && xd.len() == 2
        && wd.len() == 2
        && xd[0] <= MAX_ROWS
        && xd[1] == wd[0]
        && w.t().is_ok_and(|t| t.is_contiguous())
}

/// `x · w` for operands that pass [`supports`]; values equal candle's matmul up to the order
/// of the k additions.
pub fn thin_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (m, k) = x.dims2()?;
    let n = w.dim(1)?;
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let wt = w.t()?; // (n, k), contiguous
    let (storage, layout) = wt.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) =
        (&*storage, layout.contiguous_offsets())
    else {
        candle_core::bail!("thin-matmul: expected a contiguous f32 weight on the CPU")
    };
    let rows = &data[start..end]; // n rows of k
    let mut out_t = vec![0f32; n * m]; // (n, m): each task fills whole rows
    out_t
        .par_chunks_mut(OUTPUTS_PER_TASK * m)
        .enumerate()
        .for_each(|(task, chunk)| {
            for (i, out) in chunk.chunks_mut(m).enumerate() {
                let j = task * OUTPUTS_PER_TASK + i;
                let wj = &rows[j * k..(j + 1) * k];
                for (r, o) in out.iter_mut().enumerate() {
                    *o = dot(&xs[r * k..(r + 1) * k], wj);
                }
            }
        });
    Tensor::from_vec(out_t, (n, m), x.device())?
        .t()?
        .contiguous()
}

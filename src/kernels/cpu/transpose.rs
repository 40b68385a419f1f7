//! A contiguous copy of a transposed 2-D f32 tensor, made by the pool in tiles.
//!
//! candle's backward hands a linear layer's weight gradient back as a transposed view
//! (`(gᵀ·x)ᵀ`); its `contiguous()` copies such a view one element at a time through a
//! strided index, on the calling thread. On the side-by-side DPO workload (full fine-tuning,
//! 5.3 M parameters) that copy and the tensor-op fallbacks it forced in clipping and AdamW
//! were ~5 % of the step with the workers idle (BENCHMARKS.md, eighth session).

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::with_host_f32;

/// Output rows per task: each task reads `TILE` adjacent elements of every source row.
const TILE: usize = 32;

/// `t` laid out contiguously: a 2-D f32 CPU tensor whose transpose is contiguous is copied
/// by the pool; a contiguous one is returned as it is; anything else goes to candle.
pub fn contiguous(t: &Tensor) -> candle_core::Result<Tensor> {
    if t.is_contiguous() {
        return Ok(t.clone());
    }
    if t.rank() == 2 && t.dtype() == DType::F32 {
        let (rows, cols) = t.dims2()?;
        let tt = t.t()?; // (cols, rows), contiguous when t is a plain transpose
        if tt.is_contiguous() {
            if let Some(out) = with_host_f32(&tt, |src| transposed(src, cols, rows)) {
                return Tensor::from_vec(out, (rows, cols), t.device());
            }
        }
    }
    t.contiguous()
}

/// The row-major (c, r) transpose of a row-major (r, c) matrix.
fn transposed(src: &[f32], r: usize, c: usize) -> Vec<f32> {
    let mut out = vec![0f32; r * c];
    if r == 0 || c == 0 {
        return out;
    }
    out.par_chunks_mut(TILE * r)
        .enumerate()
        .for_each(|(block, dst)| {
            let j0 = block * TILE;
            let width = dst.len() / r;
            for (i, row) in src.chunks_exact(c).enumerate() {
                for (dj, &x) in row[j0..j0 + width].iter().enumerate() {
                    dst[dj * r + i] = x;
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Transposed views of several shapes (ragged last tile, a single row or column) copy to
    /// exactly candle's own `contiguous()`; other layouts fall through to it.
    #[test]
    fn matches_candles_copy() {
        for (r, c) in [(70, 45), (1, 33), (33, 1), (32, 64), (0, 5)] {
            let data: Vec<f32> = (0..r * c).map(|i| i as f32 * 0.5 - 3.0).collect();
            let base = Tensor::from_vec(data, (r, c), &Device::Cpu).unwrap();
            let view = base.t().unwrap();
            assert!(view.t().unwrap().is_contiguous(), "the tiled path is taken");
            let got = contiguous(&view).unwrap();
            assert!(got.is_contiguous());
            let want = view.contiguous().unwrap();
            assert_eq!(got.dims(), want.dims());
            assert_eq!(
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "({r}, {c})"
            );
        }
        let cube = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        let permuted = cube.transpose(0, 2).unwrap();
        let got = contiguous(&permuted).unwrap();
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            permuted
                .contiguous()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
    }
}

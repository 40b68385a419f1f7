//! The CPU kernels: candle custom ops (`cpu_fwd` only) with hand-written backward passes, one
//! op per file, each checked against its composed counterpart in `super::composed` by
//! tests/kernels/. Nothing here is called by model code directly: `super` (kernels/mod.rs)
//! decides per call whether a kernel runs or the composed path does.
//!
//! This file holds what several kernels share: reading a contiguous f32 input, the
//! vectorisable dot product and sum, and the fixed task sizes that keep results independent of
//! the thread count.

pub mod attention;
pub mod fast_exp;
pub mod frozen_matmul;
pub(crate) mod gemm;
pub mod lm_head_logprob;
pub mod log_sigmoid;
pub mod lora_linear;
pub mod rms_norm;
pub mod rope;
pub mod softmax;
pub mod swiglu;
pub mod thin_matmul;
pub mod token_logprob;
pub mod transpose;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Tensor};
use multiversion::multiversion;

/// Rows per rayon task for row-wise kernels, and rows per partial sum of a weight gradient
/// (fixed so the summation order, hence the result, does not depend on scheduling).
pub(crate) const ROWS_PER_TASK: usize = 32;
/// Elements per rayon task for element-wise kernels.
pub(crate) const ELEMS_PER_TASK: usize = 16 * 1024;

/// `len` zeros, written by the rayon pool in chunks of [`ELEMS_PER_TASK`] instead of by one
/// `memset` on the calling thread. The kernels' output buffers are filled by parallel tasks
/// anyway; zeroing a 4.7 MB activation (768 tokens × 1,536) serially left the pool idle:
/// `perf` of the SmolLM-135M LoRA DPO step showed the main thread in `memset` for ~40 % of its
/// samples while the workers waited.
pub(crate) fn par_zeros(len: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(ELEMS_PER_TASK)
        .for_each(|chunk| chunk.fill(std::mem::MaybeUninit::new(0.0)));
    // SAFETY: the chunks above cover the first `len` elements of the allocation, and every
    // one was written.
    unsafe { out.set_len(len) };
    out
}

/// `len` uninitialised f32s, for a kernel that writes every one of them before
/// [`assume_written`] hands the buffer on: no zero fill first. The DPO step on the
/// side-by-side workload zero-filled ~400 MB of activations a step that its kernels then
/// overwrote (RoPE, RMSNorm, SwiGLU, attention's output and probabilities): ~3 % of the
/// workers' samples in `memset`.
pub(crate) fn uninit(len: usize) -> Vec<std::mem::MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: `MaybeUninit` elements need no initialisation, and the capacity is `len`.
    unsafe { v.set_len(len) };
    v
}

/// The buffer of [`uninit`] as the f32s a kernel wrote into it.
///
/// # Safety
/// Every element of `v` was written.
pub(crate) unsafe fn assume_written(v: Vec<std::mem::MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: `MaybeUninit<f32>` has f32's size and alignment, the allocation is the same
    // (pointer, length, capacity), and the caller guarantees every element is initialised.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), v.len(), v.capacity()) }
}

/// A part of an [`uninit`] buffer as the f32s a kernel wrote into it (to read them back
/// before the whole buffer is written).
///
/// # Safety
/// Every element of `s` was written.
pub(crate) unsafe fn written_mut(s: &mut [std::mem::MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: same layout; the caller guarantees every element is initialised.
    unsafe { &mut *(s as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) }
}

/// True when `t` is f32: the dtype the row-wise kernels (RMSNorm, softmax, RoPE, SwiGLU,
/// attention, log-softmax + gather, log-sigmoid) are written for.
pub fn is_f32(t: &Tensor) -> bool {
    t.dtype() == DType::F32
}

/// Runs `f` on the data of `t` when it is a contiguous f32 tensor on the CPU (no copy, under
/// its storage's read lock); `None` for any other tensor.
pub(crate) fn with_host_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(CpuStorage::F32(d)), Some((a, b))) => Some(f(&d[a..b])),
        _ => None,
    }
}

/// The contiguous f32 data of one op input.
pub(crate) fn data<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(d) = s else {
        candle_core::bail!("{op}: expected f32, got {:?}", s.dtype())
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: input must be contiguous")
    };
    Ok(&d[a..b])
}

/// The whole f32 storage of one op input (for kernels that read strided layouts).
pub(crate) fn f32s<'a>(s: &'a CpuStorage, op: &str) -> candle_core::Result<&'a [f32]> {
    match s {
        CpuStorage::F32(d) => Ok(d),
        _ => candle_core::bail!("{op}: expected f32, got {:?}", s.dtype()),
    }
}

/// Σ a_i·b_i with 8 independent accumulators (vectorises; same spirit as candle's `vec_sum`).
/// Compiled for AVX-512 and AVX2 too, picked at run time; the fixed lanes give every CPU the
/// same result.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

/// Σ x with 8 independent accumulators.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
pub(crate) fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for x in chunks {
        for k in 0..8 {
            acc[k] += x[k];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// The largest element (−∞ for an empty slice), in 16 lanes: a row's softmax shift without a
/// serial chain of comparisons. Exact, so the same as a sequential fold.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
pub(crate) fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = xs.chunks_exact(16);
    let rest = chunks.remainder();
    for x in chunks {
        for k in 0..16 {
            acc[k] = acc[k].max(x[k]);
        }
    }
    rest.iter()
        .chain(&acc)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_reductions_match_sequential_ones() {
        let xs: Vec<f32> = (0..37).map(|i| ((i * 13) % 7) as f32 - 2.5).collect();
        let ys: Vec<f32> = (0..37).map(|i| ((i * 5) % 11) as f32 * 0.25).collect();
        let seq_dot: f64 = xs.iter().zip(&ys).map(|(&a, &b)| a as f64 * b as f64).sum();
        assert!((dot(&xs, &ys) as f64 - seq_dot).abs() < 1e-5);
        assert!((sum(&xs) as f64 - xs.iter().map(|&x| x as f64).sum::<f64>()).abs() < 1e-5);
        assert_eq!(max(&xs), 3.5);
        assert_eq!(max(&xs[..1]), -2.5);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }
}

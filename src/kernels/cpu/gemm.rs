//! Matrix products on CPU slices through the `gemm` crate (the kernels candle's own matmul
//! uses, shared among threads by candle's patched `gemm_threaded`), for the fused ops that
//! multiply inside one graph node: strided views, f32 and f64, bounds checked before the one
//! `unsafe` call.

use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout};

/// The element types the kernels run in.
pub(super) trait Float:
    Copy + Send + Sync + 'static + std::ops::AddAssign + std::ops::Mul<Output = Self>
{
    const ZERO: Self;
    fn of(v: f64) -> Self;
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    fn storage(v: Vec<Self>) -> CpuStorage;
}

impl Float for f32 {
    const ZERO: Self = 0.0;
    fn of(v: f64) -> Self {
        v as f32
    }
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(v)
    }
}

impl Float for f64 {
    const ZERO: Self = 0.0;
    fn of(v: f64) -> Self {
        v
    }
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
    fn storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(v)
    }
}

/// A strided matrix view: element (i, j) at `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(super) struct Mat<'a, T> {
    pub(super) data: &'a [T],
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) rs: usize,
    pub(super) cs: usize,
}

impl<'a, T: Float> Mat<'a, T> {
    pub(super) fn of(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<Self> {
        let Some(data) = T::slice(s) else {
            candle_core::bail!("fused op: {what} has dtype {:?}", s.dtype())
        };
        let (dims, st) = (l.dims(), l.stride());
        if dims.len() != 2 {
            candle_core::bail!("fused op: {what} must be 2-d, got {dims:?}")
        }
        let data = &data[l.start_offset()..];
        let (rows, cols) = (dims[0], dims[1]);
        if rows > 0 && cols > 0 && (rows - 1) * st[0] + (cols - 1) * st[1] >= data.len() {
            candle_core::bail!("fused op: {what} layout runs past its storage")
        }
        Ok(Mat {
            data,
            rows,
            cols,
            rs: st[0],
            cs: st[1],
        })
    }

    pub(super) fn dense(data: &'a [T], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    pub(super) fn t(self) -> Self {
        Mat {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

impl<T> Mat<'_, T> {
    /// Whether every element the view addresses is inside its slice.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// dst (m, n) row-major ← (dst if `accumulate`) + beta·lhs·rhs, on candle's thread count
/// (in bands of output columns or rows, see candle-core's `gemm_threaded`).
pub(super) fn gemm_into<T: Float>(
    dst: &mut [T],
    accumulate: bool,
    beta: f64,
    lhs: Mat<T>,
    rhs: Mat<T>,
) -> candle_core::Result<()> {
    let stride = dense_stride(dst, lhs, rhs)?;
    gemm_into_tile(dst, stride, accumulate, beta, lhs, rhs, threads())
}

/// beta·lhs·rhs as a new dense (m, n) row-major buffer, on candle's thread count. The buffer
/// is not zero-filled first (a serial pass over it on the calling thread): gemm writes every
/// element when it does not read the destination, which candle's own matmul relies on too
/// (vendor/candle-core/LEASH-PATCH.md, fourth change; tests/kernels/gemm_bands.rs).
pub(super) fn gemm_new<T: Float>(
    beta: f64,
    lhs: Mat<T>,
    rhs: Mat<T>,
) -> candle_core::Result<Vec<T>> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if !operands_fit(lhs, rhs) {
        candle_core::bail!(
            "gemm: shapes ({m}, {k}) · ({}, {n}), or a view past its slice",
            rhs.rows
        )
    }
    if m == 0 || n == 0 || k == 0 {
        return Ok(vec![T::ZERO; m * n]);
    }
    let len = m * n;
    let mut out = Vec::with_capacity(len);
    // SAFETY: the allocation holds len = m·n elements, the dense (m, n) destination gemm
    // writes (row stride n); lhs and rhs were checked in bounds above. With read_dst false,
    // gemm stores every element of the destination without loading it, so all len elements
    // are initialised when the length is set.
    unsafe {
        product_into(out.as_mut_ptr(), n, false, beta, lhs, rhs, threads());
        out.set_len(len);
    }
    Ok(out)
}

/// As [`gemm_into`] on the calling thread only (for kernels that parallelise over blocks).
pub(super) fn gemm_into_serial<T: Float>(
    dst: &mut [T],
    accumulate: bool,
    beta: f64,
    lhs: Mat<T>,
    rhs: Mat<T>,
) -> candle_core::Result<()> {
    let stride = dense_stride(dst, lhs, rhs)?;
    gemm_into_tile(dst, stride, accumulate, beta, lhs, rhs, 1)
}

/// The row stride of a dense (m, n) destination, which must be exactly m·n long.
fn dense_stride<T: Float>(dst: &[T], lhs: Mat<T>, rhs: Mat<T>) -> candle_core::Result<usize> {
    let (m, n) = (lhs.rows, rhs.cols);
    if dst.len() != m * n {
        candle_core::bail!("gemm: ({m}, {n}) product into {} elements", dst.len())
    }
    Ok(n)
}

/// dst (m, n) ← (dst if `accumulate`) + beta·lhs·rhs into the (m, n) block of a row-major
/// matrix with rows `dst_stride` apart: row i of the product goes to `dst[i·dst_stride ..][..n]`
/// (a tile of attention's score matrix), on up to `threads` threads.
pub(super) fn gemm_into_tile<T: Float>(
    dst: &mut [T],
    dst_stride: usize,
    accumulate: bool,
    beta: f64,
    lhs: Mat<T>,
    rhs: Mat<T>,
    threads: usize,
) -> candle_core::Result<()> {
    check_tile(dst.len(), dst_stride, lhs, rhs)?;
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if m == 0 || n == 0 || k == 0 {
        if !accumulate {
            for row in dst.chunks_mut(dst_stride.max(1)).take(m) {
                row[..n].fill(T::ZERO);
            }
        }
        return Ok(());
    }
    // SAFETY: every index gemm touches is inside its slice: dst's last element
    // ((m−1)·dst_stride + n − 1) and the last element of each of lhs and rhs were checked in
    // bounds above, and dst_stride ≥ n keeps rows from overlapping.
    unsafe {
        product_into(
            dst.as_mut_ptr(),
            dst_stride,
            accumulate,
            beta,
            lhs,
            rhs,
            threads,
        )
    };
    Ok(())
}

/// dst (m, n) ← beta·lhs·rhs into the (m, n) block of a row-major buffer not written yet
/// (rows `dst_stride` apart, as [`gemm_into_tile`]), on the calling thread: every element of
/// the block is written, so the caller may read it as initialised afterwards. For kernels
/// whose outputs are products (attention's scores and output), so they are not zero-filled
/// first only to be overwritten.
pub(super) fn gemm_write_tile<T: Float>(
    dst: &mut [MaybeUninit<T>],
    dst_stride: usize,
    beta: f64,
    lhs: Mat<T>,
    rhs: Mat<T>,
) -> candle_core::Result<()> {
    check_tile(dst.len(), dst_stride, lhs, rhs)?;
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        for row in dst.chunks_mut(dst_stride).take(m) {
            row[..n].iter_mut().for_each(|x| {
                x.write(T::ZERO);
            });
        }
        return Ok(());
    }
    // SAFETY: as in `gemm_into_tile` (bounds checked by `check_tile`); `MaybeUninit<T>` has
    // T's layout, and with accumulate false gemm stores every element of the block without
    // loading it (as `gemm_new` relies on).
    unsafe {
        product_into(
            dst.as_mut_ptr().cast::<T>(),
            dst_stride,
            false,
            beta,
            lhs,
            rhs,
            1,
        )
    };
    Ok(())
}

/// That an (m, n) product fits a destination of `dst_len` elements with rows `dst_stride`
/// apart, and lhs and rhs fit each other and their slices.
fn check_tile<T: Float>(
    dst_len: usize,
    dst_stride: usize,
    lhs: Mat<T>,
    rhs: Mat<T>,
) -> candle_core::Result<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    let dst_fits = m == 0 || n == 0 || (dst_stride >= n && (m - 1) * dst_stride + n <= dst_len);
    if !dst_fits || !operands_fit(lhs, rhs) {
        candle_core::bail!(
            "gemm: shapes ({m}, {k}) · ({}, {n}) into {dst_len} elements with row stride \
             {dst_stride}, or a view past its slice",
            rhs.rows
        )
    }
    Ok(())
}

/// Whether lhs's columns meet rhs's rows and both views stay inside their slices.
fn operands_fit<T>(lhs: Mat<T>, rhs: Mat<T>) -> bool {
    lhs.cols == rhs.rows && lhs.in_bounds() && rhs.in_bounds()
}

/// candle's thread count for products (detected once by the vendored candle-core).
fn threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// `gemm_threaded` on (m, n) = (lhs.rows, rhs.cols) into `dst`, row stride `dst_stride`:
/// dst ← (dst if `accumulate`) + beta·lhs·rhs.
///
/// # Safety
/// lhs and rhs in bounds (`Mat::in_bounds`), k = lhs.cols = rhs.rows ≥ 1, and `dst` valid for
/// writes (and, if `accumulate`, reads) of every `dst[i·dst_stride + j]`, i < m, j < n,
/// with dst_stride ≥ n; dst must not overlap lhs or rhs. (The safe entries above check these
/// and take the same arguments, with dst as a slice.)
unsafe fn product_into<T: Float>(
    dst: *mut T,
    dst_stride: usize,
    accumulate: bool,
    beta: f64,
    lhs: Mat<T>,
    rhs: Mat<T>,
    threads: usize,
) {
    candle_core::cpu_backend::gemm_threaded(
        lhs.rows,
        rhs.cols,
        lhs.cols,
        dst,
        1,
        dst_stride as isize,
        accumulate,
        lhs.data.as_ptr(),
        lhs.cs as isize,
        lhs.rs as isize,
        rhs.data.as_ptr(),
        rhs.cs as isize,
        rhs.rs as isize,
        T::of(1.0),
        T::of(beta),
        threads,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `gemm_write_tile` writes exactly the (m, n) block of a strided destination: each element
    /// equals the product summed by hand in f64, and the elements around the block (between
    /// its rows, after its last row) keep the values they had. With k = 0 the block is zeros.
    #[test]
    fn write_tile_writes_exactly_its_block() {
        let (m, k, n, stride) = (5, 7, 3, 4);
        let lhs: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        // rhs stored transposed, as attention's keys are read: (n, k) row-major.
        let rhs: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.71).cos()).collect();
        let sentinel = -7.5f32;
        let len = (m - 1) * stride + n + 2;
        let mut dst = vec![MaybeUninit::new(sentinel); len];
        let (a, b) = (Mat::dense(&lhs, m, k), Mat::dense(&rhs, n, k).t());
        gemm_write_tile(&mut dst, stride, 2.0, a, b).unwrap();
        for (at, x) in dst.iter().enumerate() {
            // SAFETY: every element started initialised (the sentinel).
            let x = unsafe { x.assume_init() };
            let (i, j) = (at / stride, at % stride);
            if i < m && j < n {
                let want: f64 = (0..k)
                    .map(|p| 2.0 * lhs[i * k + p] as f64 * rhs[j * k + p] as f64)
                    .sum();
                assert!((x as f64 - want).abs() < 1e-5, "({i}, {j}): {x} vs {want}");
            } else {
                assert_eq!(x, sentinel, "element {at} outside the block was written");
            }
        }
        let empty: [f32; 0] = [];
        let mut dst = vec![MaybeUninit::new(sentinel); len];
        let (a, b) = (Mat::dense(&empty, m, 0), Mat::dense(&empty, 0, n));
        gemm_write_tile(&mut dst, stride, 1.0, a, b).unwrap();
        for (at, x) in dst.iter().enumerate() {
            // SAFETY: as above.
            let x = unsafe { x.assume_init() };
            let inside = at / stride < m && at % stride < n;
            assert_eq!(x, if inside { 0.0 } else { sentinel }, "element {at}");
        }
    }
}

//! leash patch: a matrix product shared among threads by bands of output columns or rows.
//!
//! `gemm`'s own `Parallelism::Rayon` splits the inner loops of one product and meets at a
//! barrier for every packed block; at the sizes of a small model's layers (a few hundred
//! rows) two threads often do little better than one (64 × 576 × 576: 77 GFLOP/s on two
//! threads, 78 on one). Giving each thread its own band of the output, computed start to
//! finish as a serial product, has no barrier: measured on a 2-core AVX-512 server
//! (LEASH-PATCH.md), 512 × 576 × 576 went 155 → 193 GFLOP/s and the lm_head's
//! 85 × 576 × 49,152 input gradient 138 → 212 (medians). The longer side of the output is the
//! one split, since every thread packs the other operand whole: 4,096 × 256 × 3,072 (the bench
//! config's lm_head weight gradient) ran at 122 GFLOP/s in column bands and 205 in row bands.
//! Where the bands would be narrower than [`MIN_BAND`] (many threads, a small output), `gemm`'s
//! own threading is used as before.

use gemm::Parallelism;

/// Columns (or rows) below which a band is not worth a thread of its own.
const MIN_BAND: usize = 64;

/// Products below this many multiply-adds (m·n·k) run on the calling thread: handing them
/// out costs more than they take.
const MIN_THREADED_WORK: usize = 1 << 21;

/// Bands are multiples of this (gemm's widest f32 register tile), so each ends on a whole
/// tile.
const BAND_ALIGN: usize = 16;

/// A raw pointer handed to the worker threads; every thread writes a disjoint band.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: the pointer is only dereferenced by `gemm` inside one band of the output, and bands
// never overlap (see `gemm_threaded`).
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// Through a method, so a closure captures the wrapper (Send), not its raw field.
    fn get(self) -> *mut T {
        self.0
    }
}

#[derive(Clone, Copy)]
struct SendConst<T>(*const T);
// SAFETY: read-only operands, shared by every band.
unsafe impl<T> Send for SendConst<T> {}
unsafe impl<T> Sync for SendConst<T> {}

impl<T> SendConst<T> {
    fn get(self) -> *const T {
        self.0
    }
}

/// `gemm::gemm` with the same arguments (strides in elements, column stride first), on up to
/// `threads` threads: bands of output columns if n ≥ m, else of output rows, when each band has
/// at least [`MIN_BAND`] of them (else gemm's own threading); one thread for a small product.
///
/// # Safety
/// As `gemm::gemm`: every element the strides address for an (m, k) lhs, a (k, n) rhs and an
/// (m, n) dst must be valid, and dst must not alias the operands.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_threaded<T: 'static + Copy + Send + Sync>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_cs: isize,
    dst_rs: isize,
    read_dst: bool,
    lhs: *const T,
    lhs_cs: isize,
    lhs_rs: isize,
    rhs: *const T,
    rhs_cs: isize,
    rhs_rs: isize,
    alpha: T,
    beta: T,
    threads: usize,
) {
    let (dst, lhs, rhs) = (SendPtr(dst), SendConst(lhs), SendConst(rhs));
    // Output rows r0 .. r0 + rows and columns j0 .. j0 + cols on this thread: inside the
    // caller's (m, n) dst, (m, k) lhs and (k, n) rhs; bands below never overlap.
    let part = |r0: usize, rows: usize, j0: usize, cols: usize, parallelism| {
        gemm::gemm(
            rows,
            cols,
            k,
            dst.get().offset(r0 as isize * dst_rs + j0 as isize * dst_cs),
            dst_cs,
            dst_rs,
            read_dst,
            lhs.get().offset(r0 as isize * lhs_rs),
            lhs_cs,
            lhs_rs,
            rhs.get().offset(j0 as isize * rhs_cs),
            rhs_cs,
            rhs_rs,
            alpha,
            beta,
            false,
            false,
            false,
            parallelism,
        )
    };
    if threads <= 1 || m.saturating_mul(n).saturating_mul(k) < MIN_THREADED_WORK {
        return part(0, m, 0, n, Parallelism::None);
    }
    // Each thread packs the operand it shares whole: all of lhs (m × k) in a column band, all
    // of rhs (k × n) in a row band. So the longer side is split, copying the smaller operand.
    let (by_columns, len) = (m <= n, m.max(n));
    let band = len.div_ceil(threads).div_ceil(BAND_ALIGN) * BAND_ALIGN;
    if band < MIN_BAND {
        return part(0, m, 0, n, Parallelism::Rayon(threads));
    }
    use rayon::prelude::*;
    (0..len.div_ceil(band)).into_par_iter().for_each(|i| {
        let (start, width) = (i * band, band.min(len - i * band));
        if by_columns {
            part(0, m, start, width, Parallelism::None)
        } else {
            part(start, width, 0, n, Parallelism::None)
        }
    });
}

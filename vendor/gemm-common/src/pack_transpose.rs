//! leash patch: packing a row-major operand into gemm's column panels with AVX-512 16 × 16
//! transposes instead of one scalar load and store per element.
//!
//! gemm's f32 AVX-512 microkernels read lhs in panels of 64 rows stored column by column. When
//! the operand is row-major (each row contiguous along k) — `x · Wᵀ` with W stored (out, in)
//! as checkpoints store it, which is every linear layer's forward and the lm_head — the panel
//! was gathered one element at a time, 64 strided loads and stores per k. Here 16 rows × 16 k
//! are loaded as 16 vectors, transposed in registers (16 unpacks of 32-bit pairs, 16 of 64-bit
//! pairs, 32 128-bit lane shuffles) and stored as 16 vectors. Values are moved, never changed.

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::*;

/// Whether [`pack_rows_f32`] may run here (AVX-512F present; checked once by std).
#[inline]
pub fn available() -> bool {
    #[cfg(all(target_arch = "x86_64", feature = "std"))]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(all(target_arch = "x86_64", feature = "std")))]
    {
        false
    }
}

/// Packs `width` rows (a multiple of 16) of a row-major f32 operand, row j at `src + j·src_rs`,
/// for depths 0..k rounded down to a multiple of 16: `dst[p·width + j] = src[j·src_rs + p]`.
/// Returns the depths packed; the caller packs the rest.
///
/// # Safety
/// [`available`] must be true; every `src[j·src_rs + p]` (j < width, p < k) must be readable
/// and every `dst[p·width + j]` writable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn pack_rows_f32(
    dst: *mut f32,
    src: *const f32,
    src_rs: isize,
    width: usize,
    k: usize,
) -> usize {
    let depth = k / 16 * 16;
    let mut p0 = 0;
    while p0 < depth {
        let mut g = 0;
        while g < width {
            let mut rows = [_mm512_setzero_ps(); 16];
            for (r, row) in rows.iter_mut().enumerate() {
                *row = _mm512_loadu_ps(src.offset((g + r) as isize * src_rs + p0 as isize));
            }
            let cols = transpose_16x16(rows);
            for (q, col) in cols.iter().enumerate() {
                _mm512_storeu_ps(dst.add((p0 + q) * width + g), *col);
            }
            g += 16;
        }
        p0 += 16;
    }
    depth
}

#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn pack_rows_f32(_: *mut f32, _: *const f32, _: isize, _: usize, _: usize) -> usize {
    0
}

/// The transpose of a 16 × 16 block held as 16 row vectors: returns its 16 columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_16x16(r: [__m512; 16]) -> [__m512; 16] {
    // Rows a..p. After the 32-bit unpacks, t[2i] holds (row 2i, row 2i+1) pairs of columns
    // 0,1 | 4,5 | 8,9 | 12,13 per 128-bit lane, t[2i + 1] columns 2,3 | 6,7 | ...
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // After the 64-bit unpacks, u[4q + c] holds rows 4q..4q+4 of column c + 4·lane in each
    // 128-bit lane (q a group of four rows, c in 0..4).
    let mut u = [_mm512_setzero_ps(); 16];
    for q in 0..4 {
        let (lo, hi) = (t[4 * q], t[4 * q + 2]);
        let (lo2, hi2) = (t[4 * q + 1], t[4 * q + 3]);
        let pd = _mm512_castps_pd;
        u[4 * q] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(lo), pd(hi)));
        u[4 * q + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(lo), pd(hi)));
        u[4 * q + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(lo2), pd(hi2)));
        u[4 * q + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(lo2), pd(hi2)));
    }
    // Lane shuffles gather the four row groups of each column: 0x88 takes lanes 0 and 2 of
    // each operand, 0xdd lanes 1 and 3.
    let mut out = [_mm512_setzero_ps(); 16];
    for c in 0..4 {
        let v0 = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]); // cols c, c+8: rows a-h
        let v1 = _mm512_shuffle_f32x4::<0xdd>(u[c], u[4 + c]); // cols c+4, c+12: rows a-h
        let v2 = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]); // cols c, c+8: rows i-p
        let v3 = _mm512_shuffle_f32x4::<0xdd>(u[8 + c], u[12 + c]); // cols c+4, c+12: rows i-p
        out[c] = _mm512_shuffle_f32x4::<0x88>(v0, v2);
        out[c + 8] = _mm512_shuffle_f32x4::<0xdd>(v0, v2);
        out[c + 4] = _mm512_shuffle_f32x4::<0x88>(v1, v3);
        out[c + 12] = _mm512_shuffle_f32x4::<0xdd>(v1, v3);
    }
    out
}

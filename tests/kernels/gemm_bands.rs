//! The vendored candle-core's `gemm_threaded` (vendor/candle-core/LEASH-PATCH.md, third
//! change): a product shared among threads by bands of output columns (n ≥ m) or of output
//! rows (a LoRA rank-wide output) equals the product computed by hand in f64, for band counts
//! that do and do not divide the side, strided (transposed) operands, an accumulating
//! destination, and the fallbacks (a small product on one thread; bands too narrow, handed to
//! gemm's own threading). Called with explicit thread counts so every branch runs whatever the
//! machine's core count. The fourth change (candle's matmul output left uninitialised) is
//! checked by starting from NaN on every path gemm can take.

use candle_core::cpu_backend::gemm_threaded;

/// Seeded values in [−1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

/// One case: (m, k) lhs stored transposed or not, (k, n) rhs stored transposed or not, dst
/// (m, n) row-major, `dst ← alpha·dst + beta·lhs·rhs` when `read_dst`, else `beta·lhs·rhs`.
fn check(m: usize, n: usize, k: usize, lhs_t: bool, rhs_t: bool, read_dst: bool, threads: usize) {
    check_from(m, n, k, (lhs_t, rhs_t), read_dst, threads, values(m * n, 3));
}

/// `check` with the destination's starting values given (NaN: a buffer nobody initialised).
fn check_from(
    m: usize,
    n: usize,
    k: usize,
    (lhs_t, rhs_t): (bool, bool),
    read_dst: bool,
    threads: usize,
    start: Vec<f32>,
) {
    let (lhs, rhs) = (values(m * k, 1), values(k * n, 2));
    // Element (i, p) of lhs at i·lrs + p·lcs; (p, j) of rhs at p·rrs + j·rcs.
    let (lrs, lcs) = if lhs_t { (1, m) } else { (k, 1) };
    let (rrs, rcs) = if rhs_t { (1, k) } else { (n, 1) };
    let (alpha, beta) = (0.5f32, 2.0f32);
    let mut want = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let dot: f64 = (0..k)
                .map(|p| lhs[i * lrs + p * lcs] as f64 * rhs[p * rrs + j * rcs] as f64)
                .sum();
            let keep = if read_dst {
                alpha as f64 * start[i * n + j] as f64
            } else {
                0.0
            };
            want[i * n + j] = keep + beta as f64 * dot;
        }
    }
    let mut dst = start.clone();
    // SAFETY: the strides address exactly the (m, k), (k, n) and (m, n) buffers above.
    unsafe {
        gemm_threaded(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            read_dst,
            lhs.as_ptr(),
            lcs as isize,
            lrs as isize,
            rhs.as_ptr(),
            rcs as isize,
            rrs as isize,
            alpha,
            beta,
            threads,
        )
    };
    // A NaN left anywhere (an element never written) makes `worst` NaN, which fails below.
    let worst = dst
        .iter()
        .zip(&want)
        .map(|(&g, &w)| (g as f64 - w).abs())
        .fold(
            0.0,
            |a: f64, d| if d.is_nan() { f64::NAN } else { a.max(d) },
        );
    // f32 sums of k terms of size ≤ 2 (beta · |a·b| ≤ 2).
    let tol = 4.0 * k as f64 * f32::EPSILON as f64;
    assert!(
        !worst.is_nan() && worst <= tol,
        "({m}, {k})·({k}, {n}), lhs_t {lhs_t}, rhs_t {rhs_t}, read_dst {read_dst}, \
         {threads} threads: off by {worst:e} (tolerance {tol:e})"
    );
}

/// `check` with every operand layout and with and without an accumulating destination.
fn check_every_layout(m: usize, n: usize, k: usize, threads: usize) {
    for (lhs_t, rhs_t) in [(false, false), (false, true), (true, false), (true, true)] {
        for read_dst in [false, true] {
            check(m, n, k, lhs_t, rhs_t, read_dst, threads);
        }
    }
}

#[test]
fn column_bands_equal_the_product() {
    // 300 columns: 2 threads → bands of 160 + 140, 3 → 112 + 112 + 76 (last band short).
    for threads in [2, 3] {
        check_every_layout(40, 300, 200, threads);
    }
}

#[test]
fn row_bands_equal_the_product() {
    // 16 columns (a LoRA rank): 2 threads → bands of 208 + 192 rows, 3 → 144 + 144 + 112.
    for threads in [2, 3] {
        check_every_layout(400, 16, 400, threads);
    }
}

#[test]
fn fallbacks_equal_the_product() {
    check(8, 20, 12, false, true, true, 2); // small: one thread
    check(300, 100, 120, false, true, false, 8); // row bands of 48 < 64: gemm's own threading
    check(40, 300, 200, true, false, true, 1); // one thread asked for
}

/// candle's MatMul hands `gemm_threaded` an output it never zero-fills (LEASH-PATCH.md, fourth
/// change), so every path gemm may take with `read_dst = false` must write every element:
/// NaN as the starting values fails the check for any element left unwritten.
#[test]
fn every_path_overwrites_a_dirty_destination() {
    let nan = |m: usize, n: usize| vec![f32::NAN; m * n];
    for (m, n, k, threads) in [
        (200, 300, 64, 2),  // column bands, gemm's packed microkernels
        (400, 16, 64, 2),   // row bands
        (300, 100, 120, 8), // gemm's own threading
        (8, 20, 12, 1),     // small (m·n ≤ 256: gemm's horizontal kernels)
        (50, 40, 2, 1),     // k ≤ 2: gemm's outer-product path
        (50, 40, 0, 2),     // k = 0: zeros
        (1, 70, 30, 1),     // one row: gemv
        (70, 1, 30, 1),     // one column: gemv
    ] {
        for layout in [(false, false), (false, true), (true, false), (true, true)] {
            check_from(m, n, k, layout, false, threads, nan(m, n));
        }
    }
}

/// The same through candle's matmul in each dtype it multiplies on the CPU (f32, f64, and
/// f16 through gemm-f16's own kernels), after dropping NaN-filled buffers of the output's
/// size so the allocator is likely to hand one back.
#[test]
fn candle_matmul_output_is_fully_written() {
    use candle_core::{DType, Device, Tensor};
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::F64, 1e-9), (DType::F16, 0.1)] {
        for (m, k, n) in [(64, 48, 80), (3, 5, 7), (33, 0, 9), (96, 64, 1)] {
            for _ in 0..4 {
                drop(std::hint::black_box(vec![f64::NAN; m * n]));
                drop(std::hint::black_box(vec![f32::NAN; m * n]));
                drop(std::hint::black_box(vec![u16::MAX; m * n])); // an f16 NaN
            }
            let (av, bv) = (values(m * k, 4), values(k * n, 5));
            let a = Tensor::from_vec(av.clone(), (m, k), &Device::Cpu).unwrap();
            let b = Tensor::from_vec(bv.clone(), (k, n), &Device::Cpu).unwrap();
            let (a, b) = (a.to_dtype(dtype).unwrap(), b.to_dtype(dtype).unwrap());
            let got = a.matmul(&b).unwrap().to_dtype(DType::F64).unwrap();
            let got = got.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            // The operands as the dtype holds them (f16 rounds them).
            let held = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
            let (av, bv) = (
                held(&a).to_vec1::<f64>().unwrap(),
                held(&b).to_vec1::<f64>().unwrap(),
            );
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|p| av[i * k + p] * bv[p * n + j]).sum();
                    let g = got[i * n + j];
                    assert!(
                        (g - want).abs() <= tol,
                        "{dtype:?} ({m}, {k})·({k}, {n}) at ({i}, {j}): {g} vs {want}"
                    );
                }
            }
        }
    }
}

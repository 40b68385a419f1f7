//! e^x for f32 as straight-line arithmetic, so loops over rows vectorise (16 lanes with
//! AVX-512, 8 with AVX2), and the softmax-shaped loops the kernels run over it.
//!
//! Why: glibc's `expf` is a call per element that the compiler cannot vectorise. Profiled on the
//! SmolLM-135M LoRA DPO step (BENCHMARKS.md), the exps of attention's softmax, the lm_head's
//! log-softmax and SwiGLU's sigmoid were a fifth of the step: the attention forward took longer
//! than its backward, which has twice the products and no exp.
//!
//! Method (Cephes `expf`, S. Moshier): n = round(x·log₂e), r = x − n·ln2 in two parts (so r is
//! exact to f32), e^r by a degree-7 polynomial on |r| ≤ ln2/2, then × 2ⁿ built from the
//! exponent bits in two halves, so results down to the subnormals are formed with one
//! rounding. Error within 2 ulp of the exact value over the whole range (tested below against
//! f64); below −104 the result is 0, as glibc rounds it (e^x < 2⁻¹⁵⁰), above ln(f32::MAX) +∞,
//! NaN stays NaN. No fused multiply-add is used, so every CPU and every vector width gives the
//! same bits.
//!
//! The row functions take their sums in 16 fixed lanes (then added in a fixed order): the
//! result does not depend on the vector width the CPU has.

use multiversion::multiversion;

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split so that n·LN2_HI is exact for |n| ≤ 2⁹.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Round-to-nearest by adding and subtracting 1.5·2²³ (no `round` call, which would not
/// vectorise without SSE4.1).
const ROUNDER: f32 = 12_582_912.0;
/// e^x rounds to 0 in f32 below this (e^x < 2⁻¹⁵⁰).
const ZERO_BELOW: f32 = -104.0;
/// ln(f32::MAX): above it e^x overflows.
const INF_ABOVE: f32 = 88.722_84;
/// Lanes of the row sums.
const LANES: usize = 16;

/// e^x, within 2 ulp; see the module comment.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(ZERO_BELOW, INF_ABOVE);
    let rounded = xc * LOG2E + ROUNDER;
    let n = rounded - ROUNDER;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * (r * r) + r + 1.0;
    // 2ⁿ as 2^(n/2) · 2^(n − n/2): both factors are normal for n in [−150, 128]. n as an
    // integer is read from the rounded sum's low mantissa bits (an `as i32` conversion would
    // be done one lane at a time).
    let n = rounded.to_bits().wrapping_sub(ROUNDER.to_bits()) as i32;
    let half = n >> 1;
    let s1 = f32::from_bits(((half + 127) << 23) as u32);
    let s2 = f32::from_bits(((n - half + 127) << 23) as u32);
    let e = y * s1 * s2;
    if x < ZERO_BELOW {
        0.0
    } else if x > INF_ABOVE {
        f32::INFINITY
    } else {
        e
    }
}

/// Adds 16 lane sums in a fixed order.
#[inline(always)]
fn total(acc: [f32; LANES]) -> f32 {
    acc.iter().sum()
}

/// xs[i] ← e^(xs[i] − shift); returns Σ of the new values (a softmax numerator and its
/// normaliser, in one pass).
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
pub fn exp_shifted_in_place(xs: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for k in 0..LANES {
            let e = exp(c[k] - shift);
            c[k] = e;
            acc[k] += e;
        }
    }
    let mut rest = 0f32;
    for x in chunks.into_remainder() {
        *x = exp(*x - shift);
        rest += *x;
    }
    total(acc) + rest
}

/// (Σ e^(x − shift), Σ e^(x − shift)·(x − shift)) over a row: a softmax normaliser and the
/// first moment an entropy needs.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
pub fn sum_exp_shifted(xs: &[f32], shift: f32) -> (f32, f32) {
    let (mut z, mut zx) = ([0f32; LANES], [0f32; LANES]);
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            let d = c[k] - shift;
            let e = exp(d);
            z[k] += e;
            zx[k] += e * d;
        }
    }
    let (mut rz, mut rzx) = (0f32, 0f32);
    for &x in rest {
        let d = x - shift;
        let e = exp(d);
        rz += e;
        rzx += e * d;
    }
    (total(z) + rz, total(zx) + rzx)
}

/// ln Σ e^x over a row, shifted by its max (a log-softmax normaliser).
pub fn log_sum_exp(xs: &[f32]) -> f32 {
    let max = super::max(xs);
    max + sum_exp_shifted(xs, max).0.ln()
}

/// out[i] = scale · e^(xs[i] − shift) (a softmax row times an upstream gradient).
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
pub fn scaled_exp_shifted(out: &mut [f32], xs: &[f32], shift: f32, scale: f32) {
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = scale * exp(x - shift);
    }
}

/// xs[i] ← scale · e^(xs[i] − shift): [`scaled_exp_shifted`] over a buffer it may overwrite
/// (logits kept from forward become their own gradient, with no second buffer).
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
pub fn scaled_exp_shifted_in_place(xs: &mut [f32], shift: f32, scale: f32) {
    for x in xs.iter_mut() {
        *x = scale * exp(*x - shift);
    }
}

/// xs[i] ← xs[i] / total: a row of exps made a softmax row (a division, as the composed
/// softmax rounds it; softmax's and attention's forward).
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
pub fn divide_in_place(xs: &mut [f32], total: f32) {
    for x in xs.iter_mut() {
        *x /= total;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place of the f32 nearest the exact value (subnormals
    /// counted in their own spacing).
    fn ulps(got: f32, x: f32) -> f64 {
        let exact = (x as f64).exp();
        let nearest = exact as f32;
        let ulp = if nearest == 0.0 || !nearest.is_normal() {
            f32::from_bits(1) as f64
        } else {
            (f32::from_bits(nearest.to_bits() + 1) - nearest) as f64
        };
        (got as f64 - exact).abs() / ulp
    }

    #[test]
    fn exp_is_within_two_ulp_of_the_exact_value_everywhere() {
        let mut worst = (0.0, 0.0f32);
        // Every 101st f32 from −104 to 88.72 (about 22 million), subnormal results included.
        let (lo, hi) = ((-104f32).to_bits(), 88.722_84f32.to_bits());
        let negatives = (0x8000_0000..=lo).step_by(101).map(f32::from_bits);
        let positives = (0..=hi).step_by(101).map(f32::from_bits);
        for x in negatives.chain(positives) {
            let u = ulps(exp(x), x);
            if u > worst.0 {
                worst = (u, x);
            }
        }
        assert!(worst.0 <= 2.0, "{} ulp at x = {}", worst.0, worst.1);
    }

    #[test]
    fn exp_flushes_below_the_f32_range_and_overflows_above_it() {
        for x in [-104.000_01, -110.0, -1e30, f32::MIN, f32::NEG_INFINITY] {
            assert_eq!(exp(x), 0.0, "x = {x}");
            assert_eq!(x.exp(), 0.0, "glibc agrees at x = {x}");
        }
        for x in [88.8, 1e10, f32::INFINITY] {
            assert_eq!(exp(x), f32::INFINITY, "x = {x}");
        }
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn row_functions_match_a_direct_f64_softmax() {
        // A row with a masked tail and a length that is not a multiple of the lanes.
        let row: Vec<f32> = (0..101)
            .map(|i| {
                if i > 90 {
                    -1e30
                } else {
                    ((i * 37) % 23) as f32 * 0.7 - 5.0
                }
            })
            .collect();
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let z64: f64 = row.iter().map(|&x| (x as f64 - max as f64).exp()).sum();
        let zx64: f64 = row
            .iter()
            .map(|&x| {
                let d = x as f64 - max as f64;
                if d < -200.0 {
                    0.0
                } else {
                    d.exp() * d
                }
            })
            .sum();
        let (z, zx) = sum_exp_shifted(&row, max);
        assert!((z as f64 - z64).abs() < 1e-5 * z64, "{z} vs {z64}");
        assert!(
            (zx as f64 - zx64).abs() < 1e-5 * zx64.abs(),
            "{zx} vs {zx64}"
        );

        let mut p = row.clone();
        let s = exp_shifted_in_place(&mut p, max);
        assert!((s as f64 - z64).abs() < 1e-5 * z64);
        let mut q = vec![0f32; row.len()];
        scaled_exp_shifted(&mut q, &row, max, -0.5);
        let mut r = row.clone();
        scaled_exp_shifted_in_place(&mut r, max, -0.5);
        assert_eq!(q, r);
        for ((&x, &pi), &qi) in row.iter().zip(&p).zip(&q) {
            // The shift is taken in f32, as the functions do.
            let want = ((x - max) as f64).exp();
            assert!(
                (pi as f64 - want).abs() <= 2.5e-7 * want.max(1e-30),
                "{pi} vs {want}"
            );
            assert_eq!(qi, -0.5 * pi);
        }
    }
}

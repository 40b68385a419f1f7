//! The lm_head and the log-softmax + gather as one op, `log softmax(h·Wᵀ)[target]` per row,
//! with an exact backward that never holds a (tokens × vocab) tensor twice.
//!
//! The composed path (`kernels::composed::head_logprobs`: matmul, log-softmax, gather) keeps
//! the (n, v) logits for backward and then writes an (n, v) gradient beside them: two f32
//! copies, 1.2 GB for 1,000 tokens of a 151,936-word vocabulary. Here forward computes the logits (for TRL's metrics
//! too: entropy, mean logit, top-1 hit, in the same pass as the normaliser) and keeps, per
//! row, only the log-normaliser; backward rebuilds `g·(onehot − softmax)` one chunk of rows at
//! a time and multiplies it out at once into the hidden states' and the weight's gradients.
//! Below [`KEEP_LOGITS_BYTES`] of logits the forward keeps them (held once) and backward
//! overwrites them with their gradient instead of recomputing them; above it they are
//! recomputed chunk by chunk (one extra lm_head matmul in backward, the price of memory that
//! no longer grows with the vocabulary).
//!
//! Reference: the composed `log_softmax(x @ W.T).gather(target)` (PyTorch / TRL's
//! `selective_log_softmax`); checked against it and finite differences in the tests below.
//!
//! CPU only: the chunk loop reads logits in host memory.
//!
//! Legend: n scored rows, c channels, v vocab.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::fast_exp::{log_sum_exp, scaled_exp_shifted_in_place};
use super::gemm::{gemm_new, Mat};
use super::with_host_f32;
use crate::kernels::row_stats::{stats_of_row, RowStats};
use crate::kernels::HeadLogprobs;
use crate::model::frozen_dtype::{is_half, upcast};

/// Logits up to this size (n·v·4 bytes) are kept from forward to backward; larger ones are
/// recomputed chunk by chunk. 128 MiB keeps the SmolLM-135M bench's 512 × 49,152 (100 MB):
/// 1.11× its step, peak RSS 1,776 → 1,825 MiB (BENCHMARKS.md, eighth session); a 151,936-word
/// vocabulary is kept up to 220 rows.
pub const KEEP_LOGITS_BYTES: usize = 128 << 20;

/// Rows per chunk: about this many logits (32 MiB of f32) at a time. The chunk's product is
/// (rows × c)·(c × v): at 49,152 words and 576 channels, 74-row chunks ran at 143 GFLOP/s
/// and 171-row ones at 211 on the 2-core server (BENCHMARKS.md), so not smaller.
const CHUNK_ELEMS: usize = 8 << 20;

/// Whether the kernel takes these operands: f32 hidden states, an f32 or bf16/f16 weight.
pub fn supports(hidden: &Tensor, weight: &Tensor) -> bool {
    hidden.dtype() == DType::F32 && (weight.dtype() == DType::F32 || is_half(weight.dtype()))
}

/// `log_softmax(hidden · weightᵀ)[targets]` for hidden (n, c), weight (v, c), with the
/// default chunking. Operands must pass [`supports`].
pub fn head_logprobs(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &[u32],
    want_stats: bool,
) -> candle_core::Result<HeadLogprobs> {
    chunked(
        hidden,
        weight,
        targets,
        want_stats,
        KEEP_LOGITS_BYTES,
        CHUNK_ELEMS,
    )
}

/// One pass over a row: log-normaliser and (optionally) the row's statistics.
fn row_pass(row: &[f32], target: u32, want_stats: bool) -> (f32, Option<RowStats>) {
    if want_stats {
        let (l, s) = stats_of_row(row, target);
        (l, Some(s))
    } else {
        (log_sum_exp(row), None)
    }
}

/// Runs `f` on the elements of a contiguous f32 CPU tensor, in place (no copy).
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    match with_host_f32(t, f) {
        Some(r) => Ok(r),
        None => candle_core::bail!("lm-head-logprob: expected a contiguous f32 CPU tensor"),
    }
}

/// Per row of (rows, v) logits: the target's log-probability, the log-normaliser and the
/// statistics when asked.
fn score_rows(
    data: &[f32],
    v: usize,
    targets: &[u32],
    want_stats: bool,
) -> Vec<(f32, f32, Option<RowStats>)> {
    data.par_chunks(v.max(1))
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            let (l, s) = row_pass(row, t, want_stats);
            (row[t as usize] - l, l, s)
        })
        .collect()
}

/// hidden (n, c) · weightᵀ for an f32 weight (v, c): all (n, v) logits in one buffer.
fn all_logits(hidden: &Tensor, weight: &Tensor) -> candle_core::Result<Vec<f32>> {
    let ((n, c), (v, _)) = (hidden.dims2()?, weight.dims2()?);
    let (hidden, weight) = (hidden.contiguous()?, weight.contiguous()?);
    let product = with_f32(&hidden, |h| {
        with_f32(&weight, |w| {
            gemm_new(1.0, Mat::dense(h, n, c), Mat::dense(w, v, c).t())
        })
    });
    product??
}

/// The fused path; `keep_bytes` is the largest logits tensor kept for backward, and chunks
/// hold at most `chunk_elems` logits (one row at least), the rows shared evenly.
pub fn chunked(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &[u32],
    want_stats: bool,
    keep_bytes: usize,
    chunk_elems: usize,
) -> candle_core::Result<HeadLogprobs> {
    let (n, c) = hidden.dims2()?;
    let (v, c2) = weight.dims2()?;
    if c != c2 || targets.len() != n {
        candle_core::bail!(
            "lm-head-logprob: hidden ({n}, {c}), weight ({v}, {c2}), {} targets",
            targets.len()
        );
    }
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("lm-head-logprob: target {bad} outside the vocabulary of {v}");
    }
    // A bf16/f16 frozen head is upcast for this call only (exact).
    let (h, w) = (hidden.detach(), upcast(&weight.detach())?);
    // As many chunks as the size asks, with the rows shared evenly among them (512 rows in
    // chunks of at most 170 are 3 of 171, not 3 of 170 and one of 2 that rereads W alone).
    let most = (chunk_elems / v.max(1)).max(1);
    let chunk = n.div_ceil(n.div_ceil(most).max(1)).max(1);
    // Kept logits come from one product over all rows (the best use of the cores, and the
    // row-major head is transposed into gemm's panels once, not once per chunk).
    let keep = n * v * 4 <= keep_bytes;
    let mut logps = Vec::with_capacity(n);
    let mut lses = Vec::with_capacity(n);
    let mut stats = Vec::new();
    let mut record = |data: &[f32], tg: &[u32]| {
        for (lp, l, s) in score_rows(data, v, tg, want_stats) {
            logps.push(lp);
            lses.push(l);
            stats.extend(s);
        }
    };
    let mut kept = None;
    if keep {
        let logits = all_logits(&h, &w)?;
        record(&logits, targets);
        kept = Some(logits);
    } else {
        for r0 in (0..n).step_by(chunk) {
            let len = chunk.min(n - r0);
            let logits = all_logits(&h.narrow(0, r0, len)?, &w)?; // (len, v)
            record(&logits, &targets[r0..r0 + len]);
        }
    }
    let token_logps = if hidden.track_op() || weight.track_op() {
        let op = LmHeadLogprob {
            targets: targets.to_vec(),
            logps,
            lses,
            kept: Mutex::new(kept),
            rows: chunk,
        };
        hidden.apply_op2(weight, op)?
    } else {
        hidden.apply_op2_no_bwd(weight, &Precomputed(logps))?
    };
    Ok(HeadLogprobs { token_logps, stats })
}

/// Forward of an untracked call: the values computed above, as a tensor.
struct Precomputed(Vec<f32>);

impl CustomOp2 for Precomputed {
    fn name(&self) -> &'static str {
        "lm-head-logprob-values"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(self.0.clone()), Shape::from(self.0.len())))
    }
}

/// The tracked op: forward hands back the values computed eagerly (the chunk loop above
/// needs tensors, which `cpu_fwd` does not get); backward does the work.
struct LmHeadLogprob {
    targets: Vec<u32>,
    logps: Vec<f32>,
    lses: Vec<f32>,
    /// Forward's (n, v) logits when kept: backward takes them and overwrites them with their
    /// gradient, so they are freed with it (and a second backward recomputes them).
    kept: Mutex<Option<Vec<f32>>>,
    rows: usize,
}

impl CustomOp2 for LmHeadLogprob {
    fn name(&self) -> &'static str {
        "lm-head-logprob"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((
            CpuStorage::F32(self.logps.clone()),
            Shape::from(self.logps.len()),
        ))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, _) = hidden.dims2()?;
        let (v, _) = weight.dims2()?;
        // A bf16/f16 frozen head is upcast for this call only (exact).
        let (h, w) = (hidden.detach(), upcast(&weight.detach())?);
        let g = grad_res.detach().to_vec1::<f32>()?;
        // d logp / d logits = onehot(target) − softmax, times the upstream gradient.
        let grad_of_row = |i: usize, row: &mut [f32]| {
            let (gi, l, t) = (g[i], self.lses[i], self.targets[i]);
            scaled_exp_shifted_in_place(row, l, -gi);
            row[t as usize] += gi;
        };
        // Forward's logits if it kept them (one chunk of all rows), else each chunk's
        // recomputed by the same product; either way overwritten in place by their gradient.
        let mut kept = self
            .kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let rows = if kept.is_some() { n.max(1) } else { self.rows };
        let mut grad_h = Vec::new();
        let mut grad_w: Option<Tensor> = None;
        for r0 in (0..n).step_by(rows) {
            let len = rows.min(n - r0);
            let h_c = h.narrow(0, r0, len)?;
            let mut gl = match kept.take() {
                Some(logits) => logits,
                None => all_logits(&h_c, &w)?,
            };
            gl.par_chunks_mut(v.max(1))
                .enumerate()
                .for_each(|(i, row)| grad_of_row(r0 + i, row));
            let gl = Tensor::from_vec(gl, (len, v), hidden.device())?;
            if hidden.track_op() {
                grad_h.push(gl.matmul(&w)?); // (len, c)
            }
            if weight.track_op() {
                let gw = gl.t()?.matmul(&h_c)?; // (v, c)
                grad_w = Some(match grad_w {
                    Some(acc) => (acc + gw)?,
                    None => gw,
                });
            }
        }
        let grad_h = if hidden.track_op() && n > 0 {
            Some(Tensor::cat(&grad_h, 0)?)
        } else {
            None
        };
        Ok((grad_h, grad_w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::composed;
    use candle_core::{Device, Var};

    fn randn(shape: (usize, usize), seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let data: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| rng.gen_range(-1.0f32..1.0))
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    const TARGETS: [u32; 7] = [0, 12, 3, 3, 9, 1, 12];

    /// Every path of the op (logits kept; recomputed in chunks of 2 rows; chunks of 1 row)
    /// against the composed matmul → log-softmax → gather: values, statistics, and the
    /// gradients of both the hidden states and the weight under a weighted sum.
    #[test]
    fn matches_the_composed_path() {
        let (h, w) = (
            Var::from_tensor(&randn((7, 5), 1)).unwrap(),
            Var::from_tensor(&(randn((13, 5), 2) * 3.0).unwrap()).unwrap(),
        );
        let up = Tensor::new(&[1f32, -2.0, 0.5, 3.0, 1.5, -0.7, 2.0], &Device::Cpu).unwrap();
        let reference =
            composed::head_logprobs(h.as_tensor(), w.as_tensor(), &TARGETS, true).unwrap();
        let gr = (&reference.token_logps * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (keep, chunk) in [(usize::MAX, 26), (0, 26), (0, 13)] {
            let got = chunked(h.as_tensor(), w.as_tensor(), &TARGETS, true, keep, chunk).unwrap();
            assert!(max_diff(&got.token_logps, &reference.token_logps) < 1e-5);
            for (a, b) in got.stats.iter().zip(&reference.stats) {
                assert!((a.entropy - b.entropy).abs() < 1e-5);
                assert!((a.mean_logit - b.mean_logit).abs() < 1e-6);
                assert_eq!(a.argmax_hit, b.argmax_hit);
            }
            let g = (&got.token_logps * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for var in [&h, &w] {
                let d = max_diff(g.get(var).unwrap(), gr.get(var).unwrap());
                assert!(d < 1e-5, "keep {keep} chunk {chunk}: {d}");
            }
        }
    }

    /// Backward takes the kept logits (and overwrites them with their gradient); a second
    /// backward over the same graph finds none and recomputes them, to the same gradients.
    #[test]
    fn a_second_backward_recomputes_the_taken_logits() {
        let (h, w) = (
            Var::from_tensor(&randn((7, 5), 5)).unwrap(),
            Var::from_tensor(&randn((13, 5), 6)).unwrap(),
        );
        let got = chunked(
            h.as_tensor(),
            w.as_tensor(),
            &TARGETS,
            false,
            usize::MAX,
            26,
        )
        .unwrap();
        let loss = got.token_logps.sum_all().unwrap();
        let (first, second) = (loss.backward().unwrap(), loss.backward().unwrap());
        for var in [&h, &w] {
            let d = max_diff(first.get(var).unwrap(), second.get(var).unwrap());
            assert!(d < 1e-6, "{d}");
        }
    }

    /// A frozen weight (LoRA's lm_head) gets no gradient; the hidden states' gradient is
    /// unchanged.
    #[test]
    fn frozen_weight_gets_no_gradient() {
        let h = Var::from_tensor(&randn((7, 5), 3)).unwrap();
        let w = randn((13, 5), 4);
        let got = chunked(h.as_tensor(), &w, &TARGETS, false, 0, 13).unwrap();
        assert!(got.stats.is_empty());
        let g = got.token_logps.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&w).is_none());
        let r = composed::head_logprobs(h.as_tensor(), &w, &TARGETS, false).unwrap();
        let gr = r.token_logps.sum_all().unwrap().backward().unwrap();
        assert!(max_diff(g.get(&h).unwrap(), gr.get(&h).unwrap()) < 1e-5);
    }

    /// Central differences of f = Σ_i u_i · logp_i in every hidden and weight entry (chunks
    /// of 3 rows, logits recomputed), evaluated in f64 from the op's own f32 forward.
    #[test]
    fn gradient_matches_finite_differences() {
        let (h0, w0) = (randn((7, 5), 5), randn((13, 5), 6));
        let up = [0.3f64, -1.0, 0.5, 2.0, 1.0, -0.4, 0.8];
        let f = |h: &Tensor, w: &Tensor| -> f64 {
            let lp = chunked(h, w, &TARGETS, false, 0, 39).unwrap().token_logps;
            let lp: Vec<f32> = lp.to_vec1().unwrap();
            lp.iter().zip(&up).map(|(&a, b)| a as f64 * b).sum()
        };
        let (h, w) = (
            Var::from_tensor(&h0).unwrap(),
            Var::from_tensor(&w0).unwrap(),
        );
        let u = Tensor::new(&up.map(|x| x as f32), &Device::Cpu).unwrap();
        let lp = chunked(h.as_tensor(), w.as_tensor(), &TARGETS, false, 0, 39).unwrap();
        let g = (lp.token_logps * u)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let eps = 1e-2f32;
        for (which, base, var) in [(0, &h0, &h), (1, &w0, &w)] {
            let analytic: Vec<f32> = g
                .get(var)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let flat: Vec<f32> = base.flatten_all().unwrap().to_vec1().unwrap();
            for i in 0..flat.len() {
                let shifted = |d: f32| {
                    let mut v = flat.clone();
                    v[i] += d;
                    Tensor::from_vec(v, base.shape(), &Device::Cpu).unwrap()
                };
                let (p, m) = (shifted(eps), shifted(-eps));
                let numeric = if which == 0 {
                    (f(&p, &w0) - f(&m, &w0)) / (2.0 * eps as f64)
                } else {
                    (f(&h0, &p) - f(&h0, &m)) / (2.0 * eps as f64)
                };
                assert!(
                    (numeric - analytic[i] as f64).abs() < 2e-3,
                    "{which} {i}: {numeric} vs {}",
                    analytic[i]
                );
            }
        }
    }
}

//! Sampling completions: temperature, top-k, top-p (nucleus), greedy at temperature 0, stop
//! at EOS. Incremental decoding through a key/value cache (one position per step); the
//! uncached path recomputes the whole prefix each step and exists to check the cache.
//!
//! Legend: n samples (rows), p prompt length, s positions so far, c channels, v vocab.

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::Rng;

use crate::error::{LeashError, Result};
use crate::model::cache::KvCache;
use crate::model::ops::{causal_mask, MASKED};
use crate::model::{Decoder, ForwardInput};

#[derive(Debug, Clone)]
pub struct SamplingOptions {
    /// 0 = greedy.
    pub temperature: f64,
    /// 0 = off.
    pub top_k: usize,
    /// 1 = off.
    pub top_p: f64,
    pub max_new_tokens: usize,
}

impl SamplingOptions {
    /// True when samples come from the model's own distribution (needed for an unbiased KL).
    pub fn is_pure(&self) -> bool {
        self.temperature == 1.0 && self.top_k == 0 && self.top_p >= 1.0
    }

    /// Refuses values that have no meaning: a negative or non-finite temperature (0 is
    /// greedy), top_p outside (0, 1], no tokens to generate.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(LeashError::usage(
                format!("temperature must be ≥ 0 (got {})", self.temperature),
                "0 is greedy decoding, 1 samples from the model as it is (e.g. --temperature 0.7)",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(LeashError::usage(
                format!("top_p must be in (0, 1] (got {})", self.top_p),
                "it is the probability mass nucleus sampling keeps; 1 turns it off (e.g. --top-p 0.9)",
            ));
        }
        if self.max_new_tokens == 0 {
            return Err(LeashError::usage(
                "max_new_tokens must be ≥ 1".to_string(),
                "e.g. --max-new-tokens 64",
            ));
        }
        Ok(())
    }
}

/// Picks the next token from one row of logits.
pub fn sample_token(logits: &[f32], opt: &SamplingOptions, rng: &mut StdRng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &x)| {
                if x > best.1 {
                    (i, x)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if opt.temperature <= 0.0 {
        return argmax();
    }
    // Candidates, most likely first. (Plain sampling does not need the order, but the order
    // decides which token a seeded draw lands on; the demo's and labs' seeded lessons were
    // checked with this one.)
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if opt.top_k > 0 {
        order.truncate(opt.top_k);
    }
    let max = logits[order[0]] as f64;
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / opt.temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut keep = weights.len();
    if opt.top_p < 1.0 {
        let mut cum = 0.0;
        for (k, w) in weights.iter().enumerate() {
            cum += w / total;
            if cum >= opt.top_p {
                keep = k + 1;
                break;
            }
        }
    }
    let kept_total: f64 = weights[..keep].iter().sum();
    let mut u = rng.gen::<f64>() * kept_total;
    for k in 0..keep {
        u -= weights[k];
        if u <= 0.0 {
            return order[k] as u32;
        }
    }
    order[keep - 1] as u32
}

/// Logits (n, v) at the last position of `hidden` (n, t, c).
fn last_logits(model: &Decoder, hidden: &Tensor) -> Result<Vec<Vec<f32>>> {
    let t = hidden.dim(1)?;
    let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?; // (n, c)

    // The lm_head stays f32 under --bf16, here as in training's log-probs.
    let _f32 = crate::kernels::autocast::autocast(None);
    Ok(crate::kernels::frozen_matmul(&last, &model.lm_head().t()?)?.to_vec2::<f32>()?)
}

/// Mask for `t` new queries at positions s0.. over s0 + t keys (all earlier keys visible).
fn step_mask(
    n: usize,
    s0: usize,
    t: usize,
    window: Option<usize>,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let s = s0 + t;
    let mut data = vec![0f32; n * t * s];
    for r in 0..n {
        for i in 0..t {
            let q = s0 + i;
            for j in 0..s {
                if j > q || window.is_some_and(|w| q - j >= w) {
                    data[(r * t + i) * s + j] = MASKED;
                }
            }
        }
    }
    Tensor::from_vec(data, (n, 1, t, s), device)
}

/// `n` completions of one prompt. Each is the generated ids up to and including the first
/// EOS (or `max_new_tokens` ids).
pub fn generate(
    model: &Decoder,
    prompt: &[u32],
    n: usize,
    opt: &SamplingOptions,
    eos: &[u32],
    rng: &mut StdRng,
    use_cache: bool,
) -> Result<Vec<Vec<u32>>> {
    // Prompt, KV cache and logits stay on the model's device; only the last position's
    // logits come to the host, where the seeded sampler draws (the same draws on any device).
    let device = model.device().clone();
    let window = model.config.sliding_window;
    let p = prompt.len();
    let mut rows: Vec<Vec<u32>> = vec![prompt.to_vec(); n];
    let mut done = vec![false; n];
    let mut cache = KvCache::new();
    // Prefill.
    let ids: Vec<u32> = rows.iter().flatten().copied().collect();
    let input = ForwardInput {
        ids: Tensor::from_vec(ids, (n, p), &device)?,
        positions: (0..n).flat_map(|_| 0..p as u32).collect(),
        mask: causal_mask(&vec![p; n], p, window, &device)?,
    };
    let hidden = model.forward_cached(&input, use_cache.then_some(&mut cache))?;
    let mut logits = last_logits(model, &hidden)?;
    for step in 0..opt.max_new_tokens {
        for r in 0..n {
            let tok = if done[r] {
                eos.first().copied().unwrap_or(0)
            } else {
                sample_token(&logits[r], opt, rng)
            };
            if !done[r] && eos.contains(&tok) {
                done[r] = true;
                rows[r].push(tok);
            } else if !done[r] {
                rows[r].push(tok);
            }
        }
        if done.iter().all(|&d| d) || step + 1 == opt.max_new_tokens {
            break;
        }
        // Every row advances one position (finished rows repeat their last token; ignored).
        let s = p + step + 1;
        let hidden = if use_cache {
            let last: Vec<u32> = rows
                .iter()
                .map(|r| {
                    r.get(s - 1)
                        .copied()
                        .unwrap_or(eos.first().copied().unwrap_or(0))
                })
                .collect();
            let input = ForwardInput {
                ids: Tensor::from_vec(last, (n, 1), &device)?,
                positions: vec![(s - 1) as u32; n],
                mask: step_mask(n, s - 1, 1, window, &device)?,
            };
            model.forward_cached(&input, Some(&mut cache))?
        } else {
            let ids: Vec<u32> = rows
                .iter()
                .flat_map(|r| {
                    (0..s).map(move |i| r.get(i).copied().unwrap_or(*r.last().unwrap_or(&0)))
                })
                .collect();
            let input = ForwardInput {
                ids: Tensor::from_vec(ids, (n, s), &device)?,
                positions: (0..n).flat_map(|_| 0..s as u32).collect(),
                mask: step_mask(n, 0, s, window, &device)?,
            };
            model.forward_hidden(&input)?
        };
        logits = last_logits(model, &hidden)?;
    }
    Ok(rows.into_iter().map(|r| r[p..].to_vec()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn greedy_top_k_and_top_p() {
        let logits = [0.0f32, 3.0, 1.0, 2.9];
        let mut rng = StdRng::seed_from_u64(0);
        let greedy = SamplingOptions {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 1,
        };
        assert_eq!(sample_token(&logits, &greedy, &mut rng), 1);
        let top1 = SamplingOptions {
            temperature: 1.0,
            top_k: 1,
            top_p: 1.0,
            max_new_tokens: 1,
        };
        assert!((0..50).all(|_| sample_token(&logits, &top1, &mut rng) == 1));
        // Nucleus at 0.5: token 1 alone holds < 0.5, so {1, 3} are kept, never 0 or 2.
        let nucleus = SamplingOptions {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            max_new_tokens: 1,
        };
        let picks: Vec<u32> = (0..200)
            .map(|_| sample_token(&logits, &nucleus, &mut rng))
            .collect();
        assert!(picks.iter().all(|&t| t == 1 || t == 3));
        assert!(picks.contains(&1) && picks.contains(&3));
    }

    /// Frequencies of 40,000 draws against softmax(logits / T) computed by hand, for plain
    /// sampling and top_k (the k most likely, renormalised).
    #[test]
    fn sampling_follows_the_softmax() {
        let logits = [0.5f32, 2.0, -1.0, 1.0, 0.0, 1.5];
        let mut rng = StdRng::seed_from_u64(11);
        let freq = |opt: &SamplingOptions, rng: &mut StdRng| {
            let mut counts = [0usize; 6];
            for _ in 0..40_000 {
                counts[sample_token(&logits, opt, rng) as usize] += 1;
            }
            counts.map(|c| c as f64 / 40_000.0)
        };
        let softmax = |keep: &[usize], t: f64| {
            let w: Vec<f64> = (0..6)
                .map(|i| {
                    if keep.contains(&i) {
                        (logits[i] as f64 / t).exp()
                    } else {
                        0.0
                    }
                })
                .collect();
            let total: f64 = w.iter().sum();
            w.into_iter().map(|x| x / total).collect::<Vec<_>>()
        };
        for (top_k, t, keep) in [
            (0, 1.0, vec![0, 1, 2, 3, 4, 5]),
            (0, 0.7, vec![0, 1, 2, 3, 4, 5]),
            (3, 1.0, vec![1, 5, 3]),
        ] {
            let opt = SamplingOptions {
                temperature: t,
                top_k,
                top_p: 1.0,
                max_new_tokens: 1,
            };
            let got = freq(&opt, &mut rng);
            for (i, (g, want)) in got.iter().zip(softmax(&keep, t)).enumerate() {
                // 40,000 draws: a standard error of at most 0.0025 per frequency.
                assert!(
                    (g - want).abs() < 0.012,
                    "top_k {top_k}, T {t}: token {i} drawn {g:.4}, softmax {want:.4}"
                );
            }
        }
    }
}

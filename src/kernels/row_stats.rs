//! Per-token statistics TRL logs beside the log-probs (entropy of the predicted distribution,
//! mean logit, top-1 accuracy), read straight from a row of logits without copies. Used by the
//! CPU lm_head kernel in the same pass as its normaliser and, on the composed path, on logits
//! copied to the host.
//!
//! Reference: TRL's `entropy_from_logits`, `mean_token_accuracy` and the logged
//! `logits/chosen` means; checked against a direct f64 softmax below.

use candle_core::{CpuStorage, Tensor};
use rayon::prelude::*;

use crate::kernels::cpu;
use crate::kernels::cpu::fast_exp::sum_exp_shifted;

/// Per-row statistics for logging, read straight from the logits (no copies):
/// entropy of softmax(row), mean logit, and whether argmax equals the target.
pub struct RowStats {
    pub entropy: f32,
    pub mean_logit: f32,
    pub argmax_hit: bool,
}

pub fn row_stats(logits: &Tensor, targets: &[u32]) -> candle_core::Result<Vec<RowStats>> {
    let logits = logits.contiguous()?.to_device(&candle_core::Device::Cpu)?;
    let (_, v) = logits.dims2()?;
    let (storage, layout) = logits.storage_and_layout();
    let data = match &*storage {
        candle_core::Storage::Cpu(CpuStorage::F32(d)) => d,
        _ => candle_core::bail!("row_stats: logits must be f32 on cpu"),
    };
    let Some((a, b)) = layout.contiguous_offsets() else {
        candle_core::bail!("row_stats: logits must be contiguous")
    };
    Ok(data[a..b]
        .par_chunks(v)
        .zip(targets.par_iter())
        .map(|(row, &t)| stats_of_row(row, t).1)
        .collect())
}

/// Passes over the row: max and sum (in lanes), the argmax (the first element equal to the
/// max); then the softmax normaliser and Σ p·(x − max) together, so entropy =
/// ln Σe^(x−max) − Σ p·(x − max) needs one exp per logit. Returns the row's log-sum-exp too.
pub fn stats_of_row(row: &[f32], target: u32) -> (f32, RowStats) {
    let max = cpu::max(row);
    let best = row.iter().position(|&x| x == max).unwrap_or(0);
    let (z, zx) = sum_exp_shifted(row, max);
    let stats = RowStats {
        entropy: z.ln() - zx / z,
        mean_logit: cpu::sum(row) / row.len() as f32,
        argmax_hit: best == target as usize,
    };
    (max + z.ln(), stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entropy, mean logit, top-1 hit and log-sum-exp of one row against a by-hand f64
    /// softmax.
    #[test]
    fn row_statistics_match_a_direct_softmax() {
        let row: Vec<f32> = (0..37)
            .map(|i| ((i * 13 % 11) as f32 - 5.0) * 0.9)
            .collect();
        let (lse, s) = stats_of_row(&row, 3);
        let max = row.iter().map(|&x| x as f64).fold(f64::MIN, f64::max);
        let z: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
        let want_lse = max + z.ln();
        let entropy: f64 = row
            .iter()
            .map(|&x| {
                let lp = x as f64 - want_lse;
                -lp.exp() * lp
            })
            .sum();
        let mean = row.iter().map(|&x| x as f64).sum::<f64>() / row.len() as f64;
        let argmax = (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b });
        assert!((lse as f64 - want_lse).abs() < 1e-5);
        assert!(
            (s.entropy as f64 - entropy).abs() < 1e-5,
            "{} vs {entropy}",
            s.entropy
        );
        assert!((s.mean_logit as f64 - mean).abs() < 1e-6);
        assert_eq!(s.argmax_hit, argmax == 3);
        assert!(stats_of_row(&row, argmax as u32).1.argmax_hit);
    }
}

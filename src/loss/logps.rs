//! Sequence log-probabilities: the sum over completion tokens of log π(token | prefix).
//!
//! Only the hidden states that predict scored tokens go through the lm_head, so the logits
//! are (scored tokens × vocab), never (all tokens × vocab); the lm_head, log-softmax and gather
//! are one op ([`crate::kernels::head_logprobs`]) that holds no (tokens × vocab) tensor twice
//! and yields TRL's per-token statistics from the same pass.
//!
//! Legend: b batch, t time, c channels, n scored tokens, v vocab, s sequences.

use candle_core::{Tensor, D};

use crate::data::collate::Collated;
use crate::error::Result;
use crate::kernels::{head_logprobs, RowStats};
use crate::model::Decoder;

/// Log-probs of one collated batch.
pub struct Scored {
    /// (b, t, c) final hidden states.
    pub hidden: Tensor,
    /// Entropy, mean logit and top-1 hit of each scored position (empty unless asked for).
    pub stats: Vec<RowStats>,
    /// (n,) log π of each scored token.
    pub token_logps: Tensor,
    /// (s,) summed log-prob of each sequence's completion tokens.
    pub seq_logps: Tensor,
    /// Completion tokens per sequence.
    pub seq_tokens: Vec<usize>,
}

/// Runs the decoder and scores every completion token in `batch`.
pub fn score(model: &Decoder, batch: &Collated) -> Result<Scored> {
    score_at_temperature(model, batch, 1.0, false)
}

/// As [`score`], with each scored position's statistics (TRL's entropy, logits and accuracy
/// metrics).
pub fn score_with_stats(model: &Decoder, batch: &Collated) -> Result<Scored> {
    score_at_temperature(model, batch, 1.0, true)
}

/// As [`score`], with the logits divided by `temperature` first (TRL's GRPO scores the
/// policy and the reference at the sampling temperature), and the statistics if `stats`.
pub fn score_at_temperature(
    model: &Decoder,
    batch: &Collated,
    temperature: f64,
    stats: bool,
) -> Result<Scored> {
    let hidden = model.forward_hidden(&batch.input)?; // (b, t, c)
    let device = hidden.device().clone();
    let c = hidden.dim(D::Minus1)?;
    let rows = Tensor::new(batch.score_rows.as_slice(), &device)?;
    let picked = hidden.reshape(((), c))?.index_select(&rows, 0)?; // (n, c)
                                                                   // (h·Wᵀ)/T = (h/T)·Wᵀ: the temperature scales the (n, c) input, not (n, v) logits.
    let picked = if temperature == 1.0 {
        picked
    } else {
        (picked / temperature)?
    };
    let head = head_logprobs(&picked, model.lm_head(), &batch.targets, stats)?;
    let token_logps = head.token_logps; // (n,)
    let completion: Vec<f32> = batch
        .in_completion
        .iter()
        .map(|&c| c as u8 as f32)
        .collect();
    let seq_logps = segment_sum(&token_logps, &batch.seq_of, Some(&completion), batch.n_seqs)?;
    let mut seq_tokens = vec![0usize; batch.n_seqs];
    for (&s, &inc) in batch.seq_of.iter().zip(&batch.in_completion) {
        seq_tokens[s as usize] += inc as usize;
    }
    Ok(Scored {
        hidden,
        stats: head.stats,
        token_logps,
        seq_logps,
        seq_tokens,
    })
}

/// Sums `values` (n,) into `n_segments` buckets by `segment_of`, optionally weighting each
/// value: a (s, n) selection matrix times the values, which keeps the backward pass a matmul.
pub fn segment_sum(
    values: &Tensor,
    segment_of: &[u32],
    weights: Option<&[f32]>,
    n_segments: usize,
) -> candle_core::Result<Tensor> {
    let n = segment_of.len();
    let mut select = vec![0f32; n_segments * n];
    for (i, &s) in segment_of.iter().enumerate() {
        select[s as usize * n + i] = weights.map_or(1.0, |w| w[i]);
    }
    let select =
        Tensor::from_vec(select, (n_segments, n), values.device())?.to_dtype(values.dtype())?;
    select.matmul(&values.unsqueeze(1)?)?.squeeze(1) // (s,)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::encode::Sequence;
    use crate::model::weights::{RandomInit, Weights};
    use crate::model::ModelConfig;
    use candle_core::{DType, Device};

    /// Scoring at temperature T equals log_softmax(logits / T) gathered and summed by hand.
    #[test]
    fn temperature_divides_the_logits() {
        let cfg = ModelConfig::from_json_str(
            r#"{"model_type":"llama","vocab_size":11,"hidden_size":8,"intermediate_size":12,"num_hidden_layers":1,"num_attention_heads":2}"#,
            std::path::Path::new("config.json"),
        )
        .unwrap();
        let init = RandomInit {
            seed: 3,
            std: 0.5,
            norm_jitter: 0.0,
            bias_std: 0.0,
            dtype: DType::F32,
        };
        let model = Decoder::from_weights(cfg, &Weights::random(init, &Device::Cpu)).unwrap();
        let seq = Sequence {
            ids: vec![1, 4, 7, 2, 9],
            loss_start: 2,
        };
        let batch = crate::data::collate::collate(&[&seq], 0, None, &[], &Device::Cpu).unwrap();
        let got = score_at_temperature(&model, &batch, 0.7, false)
            .unwrap()
            .seq_logps
            .to_vec1::<f32>()
            .unwrap()[0];
        let hidden = model
            .forward_hidden(&batch.input)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let logits = hidden
            .matmul(
                &crate::model::frozen_dtype::upcast(model.lm_head())
                    .unwrap()
                    .t()
                    .unwrap(),
            )
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let mut expected = 0.0f64;
        for t in 2..seq.ids.len() {
            let row: Vec<f64> = logits[t - 1].iter().map(|&x| x as f64 / 0.7).collect();
            let max = row.iter().cloned().fold(f64::MIN, f64::max);
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            expected += row[seq.ids[t] as usize] - lse;
        }
        assert!((got as f64 - expected).abs() < 1e-5, "{got} vs {expected}");
    }
}

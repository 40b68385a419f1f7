//! Sequence log-probabilities: the sum over completion tokens of log π(token | prefix).
//!
//! Only the hidden states that predict scored tokens go through the lm_head, so the logits
//! tensor is (scored tokens × vocab), never (all tokens × vocab); the log-softmax + gather is
//! one fused op ([`super::token_logprob`]) that keeps no further vocab-sized intermediates.
//!
//! Legend: b batch, t time, c channels, n scored tokens, v vocab, s sequences.

use candle_core::{Tensor, D};

use super::token_logprob::token_logprobs;
use crate::data::collate::Collated;
use crate::error::Result;
use crate::model::Decoder;

/// Log-probs of one collated batch.
pub struct Scored {
    /// (b, t, c) final hidden states.
    pub hidden: Tensor,
    /// (n, v) logits of the scored positions (kept for metrics; detach before use).
    pub logits: Tensor,
    /// (n,) log π of each scored token.
    pub token_logps: Tensor,
    /// (s,) summed log-prob of each sequence's completion tokens.
    pub seq_logps: Tensor,
    /// Completion tokens per sequence.
    pub seq_tokens: Vec<usize>,
}

/// Runs the decoder and scores every completion token in `batch`.
pub fn score(model: &Decoder, batch: &Collated) -> Result<Scored> {
    let hidden = model.forward_hidden(&batch.input)?; // (b, t, c)
    let device = hidden.device().clone();
    let c = hidden.dim(D::Minus1)?;
    let rows = Tensor::new(batch.score_rows.as_slice(), &device)?;
    let picked = hidden.reshape(((), c))?.index_select(&rows, 0)?; // (n, c)
    let logits = picked.matmul(&model.lm_head().t()?)?; // (n, v)
    let targets = Tensor::new(batch.targets.as_slice(), &device)?;
    let token_logps = token_logprobs(&logits, &targets)?; // (n,)
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
        logits,
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

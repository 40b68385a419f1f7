//! Stacks sequences into one right-padded batch for the decoder and records which positions
//! are scored: token t is scored by the logits at t − 1, for t in the completion.

use candle_core::{Device, Tensor};

use super::encode::Sequence;
use crate::model::ops::causal_mask;
use crate::model::ForwardInput;

/// A padded batch plus its scoring plan.
pub struct Collated {
    pub input: ForwardInput,
    /// Flat (row·t + position) index of the hidden state that predicts each scored token.
    pub score_rows: Vec<u32>,
    /// The scored token ids, aligned with `score_rows`.
    pub targets: Vec<u32>,
    /// Which sequence each scored token belongs to.
    pub seq_of: Vec<u32>,
    /// Whether each scored token is a completion token (false only for prompt tokens scored
    /// with `score_prompt`, e.g. ORPO's whole-sequence NLL).
    pub in_completion: Vec<bool>,
    pub n_seqs: usize,
    /// Non-padding tokens in the batch (TRL's `num_tokens`).
    pub n_tokens: usize,
}

pub fn collate(
    seqs: &[&Sequence],
    pad_id: u32,
    sliding_window: Option<usize>,
    score_prompt: &[bool],
    device: &Device,
) -> candle_core::Result<Collated> {
    let b = seqs.len();
    let t = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(1).max(1);
    let mut ids = vec![pad_id; b * t];
    let mut positions = Vec::with_capacity(b * t);
    let mut score_rows = Vec::new();
    let mut targets = Vec::new();
    let mut seq_of = Vec::new();
    let mut in_completion = Vec::new();
    for (row, s) in seqs.iter().enumerate() {
        ids[row * t..row * t + s.ids.len()].copy_from_slice(&s.ids);
        positions.extend(0..t as u32);
        let first = if score_prompt.get(row).copied().unwrap_or(false) {
            1
        } else {
            s.loss_start.max(1)
        };
        for p in first..s.ids.len() {
            score_rows.push((row * t + p - 1) as u32);
            targets.push(s.ids[p]);
            seq_of.push(row as u32);
            in_completion.push(p >= s.loss_start);
        }
    }
    let lengths: Vec<usize> = seqs.iter().map(|s| s.ids.len()).collect();
    Ok(Collated {
        input: ForwardInput {
            ids: Tensor::from_vec(ids, (b, t), device)?,
            positions,
            mask: causal_mask(&lengths, t, sliding_window, device)?,
        },
        score_rows,
        targets,
        seq_of,
        in_completion,
        n_seqs: b,
        n_tokens: lengths.iter().sum(),
    })
}

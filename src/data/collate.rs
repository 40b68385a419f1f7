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

/// Keeps only the scored tokens at positions `keep(sequence, position)` accepts (SFT's
/// assistant_only_loss). Both [`collate`] and `collate_packed` list each sequence's scored
/// tokens in order from position `max(loss_start, 1)`, which is how positions are recovered;
/// a target that is not the sequence's id at that position is an error, not a silent skip.
pub fn retain_scored(
    b: &mut Collated,
    seqs: &[&Sequence],
    keep: impl Fn(usize, usize) -> bool,
) -> crate::error::Result<()> {
    let mut next: Vec<usize> = seqs
        .iter()
        .map(|s| s.loss_start.min(s.ids.len()).max(1))
        .collect();
    let mut kept = 0;
    for i in 0..b.targets.len() {
        let s = b.seq_of[i] as usize;
        let pos = next.get(s).copied().unwrap_or(usize::MAX);
        if seqs.get(s).and_then(|q| q.ids.get(pos)) != Some(&b.targets[i]) {
            return Err(crate::error::LeashError::usage(
                format!("scored token {i} is not token {pos} of sequence {s}"),
                "this is a bug in leash's batching; please report it",
            ));
        }
        next[s] += 1;
        if keep(s, pos) {
            b.score_rows[kept] = b.score_rows[i];
            b.targets[kept] = b.targets[i];
            b.seq_of[kept] = b.seq_of[i];
            b.in_completion[kept] = b.in_completion[i];
            kept += 1;
        }
    }
    b.score_rows.truncate(kept);
    b.targets.truncate(kept);
    b.seq_of.truncate(kept);
    b.in_completion.truncate(kept);
    Ok(())
}

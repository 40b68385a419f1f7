//! Prefix sharing and packing: several sequences in one row, scored exactly as if each had a
//! row of its own.
//!
//! Sequences with the same prompt (a DPO pair's chosen and rejected, a GRPO group) become one
//! *unit*: the prompt once, then each completion. A completion's tokens take the positions they
//! would have after the prompt alone, and attend to the prompt and to their own earlier tokens,
//! never to a sibling completion. Units are then packed into rows, first-fit by decreasing
//! length, with no row longer than the longest unit, and a token never sees another unit.
//! Every real query therefore sees exactly the keys, at exactly the positions, it sees in the
//! padded layout of [`collate`](super::collate::collate): the log-probs are the same up to
//! float summation order. The saving: a pair's prompt is encoded once instead of twice, and
//! rows are not padded to the longest sequence of the batch.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::collate::Collated;
use super::encode::Sequence;
use crate::model::ops::MASKED;
use crate::model::ForwardInput;

/// One shared prompt and the completions that branch from it, each with its sequence index.
struct Unit<'a> {
    prompt: &'a [u32],
    completions: Vec<(u32, &'a [u32])>,
}

impl Unit<'_> {
    fn len(&self) -> usize {
        self.prompt.len() + self.completions.iter().map(|c| c.1.len()).sum::<usize>()
    }
}

/// Groups sequences with identical prompt ids into units, in first-seen order. A unit stops
/// growing at `limit` tokens (the longest sequence plus the longest completion, so a pair
/// always fits) to keep rows — and attention's t² — from growing with the group.
fn units<'a>(seqs: &[&'a Sequence], share_prompts: bool) -> Vec<Unit<'a>> {
    let longest = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0);
    let longest_completion = seqs
        .iter()
        .map(|s| s.ids.len() - s.loss_start.min(s.ids.len()))
        .max()
        .unwrap_or(0);
    let limit = longest + longest_completion;
    let mut out: Vec<Unit> = Vec::new();
    let mut open: HashMap<&[u32], usize> = HashMap::new();
    for (i, s) in seqs.iter().enumerate() {
        let split = s.loss_start.min(s.ids.len());
        let (prompt, completion) = s.ids.split_at(split);
        let seq = (i as u32, completion);
        // An empty prompt has no token to share (and its first token is not scored).
        let joinable = share_prompts && !prompt.is_empty();
        match open.get(prompt).copied() {
            Some(u) if joinable && out[u].len() + completion.len() <= limit => {
                out[u].completions.push(seq)
            }
            _ => {
                if joinable {
                    open.insert(prompt, out.len());
                }
                out.push(Unit {
                    prompt,
                    completions: vec![seq],
                });
            }
        }
    }
    out
}

/// Row index of each unit: first fit in order of decreasing length, capacity = longest unit.
fn pack_rows(units: &[Unit]) -> (Vec<Vec<usize>>, usize) {
    let capacity = units.iter().map(Unit::len).max().unwrap_or(1).max(1);
    let mut order: Vec<usize> = (0..units.len()).collect();
    order.sort_by_key(|&u| std::cmp::Reverse(units[u].len()));
    let mut rows: Vec<(usize, Vec<usize>)> = Vec::new();
    for u in order {
        let len = units[u].len();
        match rows.iter_mut().find(|(fill, _)| fill + len <= capacity) {
            Some((fill, members)) => {
                *fill += len;
                members.push(u);
            }
            None => rows.push((len, vec![u])),
        }
    }
    (rows.into_iter().map(|r| r.1).collect(), capacity)
}

/// Who a token is, for the mask: its unit, its branch (0 = the prompt, k = completion k) and
/// its position id. Padding has no unit.
#[derive(Clone, Copy)]
struct Slot {
    unit: Option<usize>,
    branch: usize,
    position: usize,
}

fn visible(q: Slot, k: Slot, sliding_window: Option<usize>) -> bool {
    q.unit.is_some()
        && q.unit == k.unit
        && (k.branch == 0 || k.branch == q.branch)
        && sliding_window.is_none_or(|w| q.position - k.position < w)
}

/// Collates `seqs` (no prompt scoring) sharing identical prompts when `share_prompts`, and
/// packing the units into as few rows as fit. `seq_of` indexes `seqs`, as in `collate`.
/// `n_tokens` counts every sequence's own tokens (prompt included each time), as TRL does.
pub fn collate_packed(
    seqs: &[&Sequence],
    pad_id: u32,
    sliding_window: Option<usize>,
    share_prompts: bool,
    device: &Device,
) -> candle_core::Result<Collated> {
    let units = units(seqs, share_prompts);
    let (rows, t) = pack_rows(&units);
    let b = rows.len().max(1);
    let pad = Slot {
        unit: None,
        branch: 0,
        position: 0,
    };
    let mut ids = vec![pad_id; b * t];
    let mut slots = vec![pad; b * t];
    let mut score_rows = Vec::new();
    let mut targets = Vec::new();
    let mut seq_of = Vec::new();
    for (r, members) in rows.iter().enumerate() {
        let mut at = r * t;
        for &u in members {
            let unit = &units[u];
            let p = unit.prompt.len();
            for (i, &id) in unit.prompt.iter().enumerate() {
                ids[at + i] = id;
                slots[at + i] = Slot {
                    unit: Some(u),
                    branch: 0,
                    position: i,
                };
            }
            let last_prompt = at + p;
            at += p;
            for (k, &(seq, completion)) in unit.completions.iter().enumerate() {
                for (m, &id) in completion.iter().enumerate() {
                    ids[at + m] = id;
                    slots[at + m] = Slot {
                        unit: Some(u),
                        branch: k + 1,
                        position: p + m,
                    };
                    // Token m is predicted by the token before it in its own sequence: the
                    // previous completion token, or for m = 0 the prompt's last token.
                    let predictor = match m {
                        0 if p == 0 => continue,
                        0 => last_prompt - 1,
                        _ => at + m - 1,
                    };
                    score_rows.push(predictor as u32);
                    targets.push(id);
                    seq_of.push(seq);
                }
                at += completion.len();
            }
        }
    }
    let mut mask = vec![0f32; b * t * t];
    let mut positions = Vec::with_capacity(b * t);
    for r in 0..b {
        for i in 0..t {
            let q = slots[r * t + i];
            positions.push(q.position as u32);
            for j in 0..t {
                let k = slots[r * t + j];
                // A padding query sees only itself, so its softmax stays finite.
                let see = j <= i && (visible(q, k, sliding_window) || (q.unit.is_none() && j == i));
                if !see {
                    mask[(r * t + i) * t + j] = MASKED;
                }
            }
        }
    }
    let n_scored = targets.len();
    Ok(Collated {
        input: ForwardInput {
            ids: Tensor::from_vec(ids, (b, t), device)?,
            positions,
            mask: Tensor::from_vec(mask, (b, 1, t, t), device)?,
        },
        score_rows,
        targets,
        seq_of,
        in_completion: vec![true; n_scored],
        n_seqs: seqs.len(),
        n_tokens: seqs.iter().map(|s| s.ids.len()).sum(),
    })
}

/// Tokens the forward pass processes (rows × row length), to compare layouts.
pub fn processed_tokens(batch: &Collated) -> usize {
    batch.input.ids.elem_count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(prompt: &[u32], completion: &[u32]) -> Sequence {
        Sequence {
            ids: prompt.iter().chain(completion).copied().collect(),
            loss_start: prompt.len(),
        }
    }

    #[test]
    fn a_pair_shares_its_prompt_and_keeps_its_positions() {
        let c = seq(&[1, 2, 3], &[4, 5]);
        let r = seq(&[1, 2, 3], &[6, 7, 8]);
        let b = collate_packed(&[&c, &r], 0, None, true, &Device::Cpu).unwrap();
        assert_eq!(
            b.input.ids.to_vec2::<u32>().unwrap(),
            vec![vec![1, 2, 3, 4, 5, 6, 7, 8]]
        );
        assert_eq!(b.input.positions, vec![0, 1, 2, 3, 4, 3, 4, 5]);
        // chosen: 4 from the prompt's end (2), 5 from 4 (3); rejected: 6 from the prompt's
        // end (2), 7 from 6 (5), 8 from 7 (6).
        assert_eq!(b.score_rows, vec![2, 3, 2, 5, 6]);
        assert_eq!(b.targets, vec![4, 5, 6, 7, 8]);
        assert_eq!(b.seq_of, vec![0, 0, 1, 1, 1]);
        assert_eq!(b.n_tokens, 11);
        let mask = b
            .input
            .mask
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let sees = |i: usize, j: usize| mask[i * 8 + j] == 0.0;
        assert!(sees(5, 0) && sees(5, 2) && sees(5, 5));
        assert!(!sees(5, 3) && !sees(5, 4), "rejected must not see chosen");
        assert!(sees(4, 3) && !sees(3, 4));
    }

    #[test]
    fn different_prompts_pack_into_one_row_without_seeing_each_other() {
        let a = seq(&[1, 2], &[3, 4, 5, 6]);
        let b2 = seq(&[7], &[8]);
        let c = seq(&[9], &[10]);
        let b = collate_packed(&[&a, &b2, &c], 0, None, true, &Device::Cpu).unwrap();
        // Capacity 6 (the longest unit): `a` fills row 0, the two short units share row 1.
        assert_eq!(b.input.ids.dims(), &[2, 6]);
        let mask = b
            .input
            .mask
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let sees = |r: usize, i: usize, j: usize| mask[(r * 6 + i) * 6 + j] == 0.0;
        assert!(sees(1, 1, 0) && !sees(1, 2, 1) && sees(1, 3, 2));
        assert_eq!(b.input.positions[6..10], [0, 1, 0, 1]);
    }

    #[test]
    fn an_empty_prompt_is_not_shared_and_its_first_token_is_not_scored() {
        let a = seq(&[], &[3, 4]);
        let b2 = seq(&[], &[5, 6]);
        let b = collate_packed(&[&a, &b2], 0, None, true, &Device::Cpu).unwrap();
        assert_eq!(b.targets, vec![4, 6]);
    }
}

//! Timed training steps on TRL's DPO workload (prompts and completions of fixed length, each
//! pair's chosen and rejected sharing the prompt), in the padded layout or padding-free
//! (shared prompt, packed rows).

use candle_core::{DType, Device, Tensor, Var};

use super::time;
use crate::data::collate::{collate, Collated};
use crate::data::encode::Sequence;
use crate::data::pack::collate_packed;
use crate::error::Result;
use crate::loss::dpo::{dpo_loss, DpoLossType, DpoOptions, PairLogps};
use crate::loss::logps::score;
use crate::model::{Decoder, ModelConfig};
use crate::train::grads::GradAccumulator;
use crate::train::optimizer::{clip_grad_norm, AdamW, AdamWSettings};

/// `pairs` chosen sequences then their rejected ones: a shared `prompt`-token prompt per pair
/// and two different `completion`-token completions.
pub fn pair_sequences(
    vocab: usize,
    pairs: usize,
    prompt: usize,
    completion: usize,
) -> Vec<Sequence> {
    let token = |i: usize, j: usize, salt: usize| ((i * 7919 + j * 104_729 + salt) % vocab) as u32;
    let mut out = Vec::with_capacity(2 * pairs);
    for salt in [0, 17] {
        for i in 0..pairs {
            let ids = (0..prompt)
                .map(|j| token(i, j, 0))
                .chain((prompt..prompt + completion).map(|j| token(i, j, salt)))
                .collect();
            out.push(Sequence {
                ids,
                loss_start: prompt,
            });
        }
    }
    out
}

/// The padded batch, or the padding-free one.
pub fn layout(seqs: &[Sequence], padding_free: bool) -> Result<Collated> {
    let refs: Vec<&Sequence> = seqs.iter().collect();
    Ok(if padding_free {
        collate_packed(&refs, 0, None, true, &Device::Cpu)?
    } else {
        collate(&refs, 0, None, &[], &Device::Cpu)?
    })
}

/// FLOPs of one forward over the batch as laid out: 2·N per processed position (padding
/// included: it is computed) plus attention's 4·t²·d per layer and row (masked scores are
/// computed too). The lm_head runs only on scored positions.
pub fn forward_flops(cfg: &ModelConfig, batch: &Collated) -> f64 {
    let (rows, t) = (
        batch.input.ids.dim(0).unwrap_or(0),
        batch.input.ids.dim(1).unwrap_or(0),
    );
    let head = cfg.hidden_size * cfg.vocab_size;
    let body = (cfg.matmul_params() - head) as f64 * (rows * t) as f64;
    let lm_head = head as f64 * batch.targets.len() as f64;
    let attention = 4.0
        * (t * t) as f64
        * (cfg.num_attention_heads * cfg.head_dim) as f64
        * (cfg.num_hidden_layers * rows) as f64;
    2.0 * (body + lm_head) + attention
}

fn adamw(vars: &[(String, Var)]) -> AdamW {
    AdamW::new(
        vars,
        AdamWSettings {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )
}

/// Backward of `loss`, clip to norm 1, one AdamW update.
fn update(loss: &Tensor, vars: &[(String, Var)], opt: &mut AdamW) -> Result<()> {
    let store = loss.backward()?;
    let mut grads = GradAccumulator::of(&store, vars)?;
    clip_grad_norm(&mut grads, 1.0)?;
    opt.step(vars, &grads, 1e-6)
}

/// Median seconds of a forward + backward of the summed log-probs (no optimizer).
pub fn time_forward_backward(policy: &Decoder, batch: &Collated, steps: usize) -> Result<f64> {
    time(steps, || {
        let lp = score(policy, batch)?.seq_logps.sum_all()?;
        lp.backward()?;
        Ok(())
    })
}

/// Median seconds of one SFT step: completion NLL, backward, clip, AdamW.
pub fn time_sft_step(
    policy: &Decoder,
    vars: &[(String, Var)],
    batch: &Collated,
    steps: usize,
) -> Result<f64> {
    let mut opt = adamw(vars);
    let n = batch.targets.len().max(1) as f64;
    time(steps, || {
        let nll = (score(policy, batch)?.token_logps.sum_all()?.neg()? / n)?;
        update(&nll, vars, &mut opt)
    })
}

/// Median seconds of one DPO step (policy forward+backward, clip, AdamW) over `batch` (its
/// first half of sequences chosen, second half rejected), with the reference scored by
/// `reference` each step or taken from a cache when `None`.
pub fn time_dpo_step(
    policy: &Decoder,
    vars: &[(String, Var)],
    reference: Option<&Decoder>,
    batch: &Collated,
    steps: usize,
) -> Result<f64> {
    let device = Device::Cpu;
    let p = batch.n_seqs / 2;
    let mut opt = adamw(vars);
    let cached = Tensor::zeros(p, DType::F32, &device)?.affine(1.0, -300.0)?;
    time(steps, || {
        let (ref_c, ref_r) = match reference {
            Some(r) => {
                let r = score(r, batch)?.seq_logps;
                (r.narrow(0, 0, p)?, r.narrow(0, p, p)?)
            }
            None => (cached.clone(), cached.clone()),
        };
        let s = score(policy, batch)?;
        let counts: Vec<f32> = s.seq_tokens.iter().map(|&n| n as f32).collect();
        let n_c = Tensor::new(&counts[..p], &device)?;
        let n_r = Tensor::new(&counts[p..], &device)?;
        let out = dpo_loss(
            &PairLogps {
                chosen: &s.seq_logps.narrow(0, 0, p)?,
                rejected: &s.seq_logps.narrow(0, p, p)?,
                ref_chosen: &ref_c,
                ref_rejected: &ref_r,
                chosen_tokens: &n_c,
                rejected_tokens: &n_r,
            },
            &DpoOptions {
                beta: 0.1,
                loss_type: DpoLossType::Sigmoid,
                label_smoothing: 0.0,
            },
        )?;
        update(&out.loss, vars, &mut opt)
    })
}

//! Timed training steps on TRL's DPO workload (prompts and completions of fixed length, each
//! pair's chosen and rejected sharing the prompt), in the padded layout or padding-free
//! (shared prompt, packed rows). Every timed step is the trainer's own: the engine's
//! [`crate::train::update::update`] over [`crate::train::step::offline_losses`], with
//! `leash <method>`'s default options.

use std::collections::HashMap;

use candle_core::{Device, Var};

use super::time;
use crate::data::collate::{collate, Collated};
use crate::data::encode::{PromptCompletion, Sequence};
use crate::data::pack::collate_packed;
use crate::error::Result;
use crate::loss::logps::score;
use crate::model::{Decoder, ModelConfig};
use crate::train::config::{resolve, Method, TrainArgs, TrainConfig};
use crate::train::examples::TrainExample;
use crate::train::metrics::Accumulator;
use crate::train::step::{RefLogps, Reference, StepContext};
use crate::train::update::{adamw, fixed_lr_step};

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
pub fn layout(seqs: &[Sequence], padding_free: bool, device: &Device) -> Result<Collated> {
    let refs: Vec<&Sequence> = seqs.iter().collect();
    Ok(if padding_free {
        collate_packed(&refs, 0, None, true, device)?
    } else {
        collate(&refs, 0, None, &[], device)?
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

/// Median seconds of a forward + backward of the summed log-probs (no optimizer).
pub fn time_forward_backward(policy: &Decoder, batch: &Collated, steps: usize) -> Result<f64> {
    time(steps, policy.device(), || {
        let lp = score(policy, batch)?.seq_logps.sum_all()?;
        crate::model::checkpoint::backward(&lp)?;
        Ok(())
    })
}

/// The pairs of [`pair_sequences`] as training examples (`Sft` rows of the chosen sequences
/// when `sft`), so the timed step goes through the trainer's data handling too.
pub fn examples(seqs: &[Sequence], sft: bool) -> Vec<TrainExample> {
    let pc = |s: &Sequence| PromptCompletion {
        prompt: s.ids[..s.loss_start].to_vec(),
        completion: s.ids[s.loss_start..].to_vec(),
        loss_mask: None,
    };
    let p = seqs.len() / 2;
    if sft {
        return seqs.iter().map(|s| TrainExample::Sft(pc(s))).collect();
    }
    (0..p)
        .map(|i| TrainExample::Pair {
            chosen: pc(&seqs[i]),
            rejected: pc(&seqs[p + i]),
        })
        .collect()
}

/// The options `leash <method>` resolves to by default, with `padding_free` as given and the
/// paths unused (the bench reads and writes no files).
pub fn config(method: Method, padding_free: bool) -> Result<TrainConfig> {
    let none = std::path::PathBuf::from("<bench>");
    resolve(
        method,
        &TrainArgs {
            model: Some(none.clone()),
            dataset: Some(none.clone()),
            output_dir: Some(none),
            padding_free: Some(padding_free),
            ..TrainArgs::default()
        },
    )
}

/// Median seconds of one optimizer step of the trainer ([`fixed_lr_step`], the trainer's
/// update: collate, forward, loss, TRL's metrics, backward, clip, AdamW) over `examples` as one
/// micro-batch. `reference` scores the reference live; `None` takes it from a cache, as
/// `--precompute-ref-log-probs`.
pub fn time_train_step(
    cfg: &TrainConfig,
    policy: &Decoder,
    vars: &[(String, Var)],
    reference: Option<&Decoder>,
    examples: &[TrainExample],
    steps: usize,
) -> Result<f64> {
    let device = policy.device();
    // Only KTO reads the policy's frozen view (its KL estimate); a LoRA policy has none to build.
    let frozen = match cfg.method {
        Method::Kto => Some(Decoder::frozen_view(&policy.config, vars)?),
        _ => None,
    };
    let cache: HashMap<usize, RefLogps> =
        (0..examples.len()).map(|i| (i, (-300.0, -300.0))).collect();
    let micro = vec![examples.iter().enumerate().collect::<Vec<_>>()];
    let mut opt = adamw(cfg, vars);
    let mut metrics = Accumulator::default();
    let mut step = 0;
    time(steps, device, || {
        let ctx = StepContext {
            cfg,
            policy,
            policy_frozen: frozen.as_ref().unwrap_or(policy),
            reference: match (cfg.method, reference) {
                (Method::Sft | Method::Orpo, _) => Reference::None,
                (_, Some(r)) => Reference::Model(r),
                (_, None) => Reference::Cached(&cache),
            },
            pad_id: 0,
            device,
        };
        fixed_lr_step(&ctx, vars, &mut opt, &micro, step, &mut metrics)?;
        metrics.take();
        step += 1;
        Ok(())
    })
}

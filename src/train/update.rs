//! One optimizer step of the offline methods (SFT/DPO/KTO/ORPO): each micro-batch's forward
//! and backward, gradients summed, the non-finite guard, clipping, AdamW. `leash dpo` (the
//! trainer) and `leash bench` both call [`optimizer_step`], so a bench figure is the figure of
//! the step users run — metrics, collation and host copies included. Mirrors the inner loop
//! of transformers' `Trainer._inner_training_loop` (accumulate → clip → step).

use candle_core::Var;

use super::config::TrainConfig;
use super::divergence::stopped;
use super::examples::{to_sequence, TrainExample};
use super::grads::GradAccumulator;
use super::metrics::Accumulator;
use super::optimizer::{clip_grad_norm, AdamW, AdamWSettings};
use super::step::{micro_batch, StepContext};
use crate::error::Result;
use crate::model::checkpoint;

/// What one optimizer step reports (its metrics go to the caller's [`Accumulator`]).
pub struct StepOutcome {
    /// Sum of the micro-batches' losses, each already divided by the number of micro-batches.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Non-padding tokens processed (TRL's `num_tokens` increment).
    pub tokens: usize,
}

/// AdamW with the run's betas, epsilon and weight decay.
pub fn adamw(cfg: &TrainConfig, vars: &[(String, Var)]) -> AdamW {
    AdamW::new(
        vars,
        AdamWSettings {
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_epsilon,
            weight_decay: cfg.weight_decay,
        },
    )
}

/// Completion tokens SFT normalises the step's summed NLL by (TRL counts the whole step).
pub fn sft_token_count(micro: &[Vec<(usize, &TrainExample)>], max_length: usize) -> f64 {
    micro
        .iter()
        .flatten()
        .map(|(_, e)| match e {
            TrainExample::Sft(pc) => {
                // assistant_only_loss: only the tokens the loss mask keeps count.
                let s = to_sequence(pc, max_length);
                match pc.loss_mask {
                    None => s.scored_tokens(),
                    Some(_) => (s.loss_start.max(1)..s.ids.len())
                        .filter(|&p| pc.in_loss(p))
                        .count(),
                }
            }
            _ => 0,
        })
        .sum::<usize>() as f64
}

/// Runs the micro-batches `micro` of optimizer step `step` (0-based, for messages) and applies
/// one AdamW update at learning rate `lr`. A non-finite loss stops before anything of the step
/// is applied.
pub fn optimizer_step(
    ctx: &StepContext,
    vars: &[(String, Var)],
    opt: &mut AdamW,
    micro: &[Vec<(usize, &TrainExample)>],
    lr: f64,
    step: usize,
    metrics: &mut Accumulator,
) -> Result<StepOutcome> {
    let cfg: &TrainConfig = ctx.cfg;
    crate::model::linear::seed_dropout(cfg.seed, step);
    let sft_tokens = sft_token_count(micro, cfg.max_length);
    let scale = 1.0 / micro.len().max(1) as f64;
    let mut grads = GradAccumulator::new(vars.len());
    let (mut loss, mut tokens) = (0.0f64, 0usize);
    for examples in micro {
        let out = micro_batch(ctx, examples, scale, sft_tokens)?;
        let value = out.loss.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            return Err(stopped(
                &cfg.output_dir,
                step + 1,
                &format!("the loss became {value} (nothing of this step was applied)"),
                "lower --learning-rate or --beta, or keep --max-grad-norm on",
            ));
        }
        loss += value;
        // Adds checkpointed layers' parameter gradients (the same as backward() without).
        let store = checkpoint::backward(&out.loss)?;
        grads.add(&store, vars)?;
        metrics.add(&out.metrics);
        tokens += out.tokens;
    }
    let mut grads = grads.finish(vars)?;
    let grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
    if !grad_norm.is_finite() {
        return Err(stopped(
            &cfg.output_dir,
            step + 1,
            &format!("the gradient norm is {grad_norm} (nothing of this step was applied)"),
            "lower --learning-rate (typical: 1e-6–1e-4 for fine-tuning) and keep --max-grad-norm on",
        ));
    }
    opt.step(vars, &grads, lr)?;
    Ok(StepOutcome {
        loss,
        grad_norm,
        tokens,
    })
}

//! One optimizer step, for every method: each micro-batch's forward and backward, gradients
//! summed, the non-finite guard, clipping, AdamW. Mirrors the inner loop of transformers'
//! `Trainer._inner_training_loop` (accumulate → clip → step). The method supplies only the
//! micro-batch's loss ([`super::step::offline_losses`] for SFT/DPO/KTO/ORPO,
//! [`super::grpo::grpo_losses`] for GRPO);
//! `leash <method>` (through [`crate::train::engine`]) and `leash bench` both run [`update`],
//! so a bench figure is the figure of the step users run.

use candle_core::{Tensor, Var};

use super::config::TrainConfig;
use super::divergence::{stopped, DivergenceGuard};
use super::examples::TrainExample;
use super::grads::GradAccumulator;
use super::metrics::Accumulator;
use super::optimizer::{clip_grad_norm, AdamW, AdamWSettings};
use super::step::{offline_losses, StepContext};
use crate::error::Result;
use crate::model::checkpoint;

/// What one micro-batch hands the update.
pub struct MicroLoss {
    /// Scalar loss already divided for accumulation; backward() this.
    pub loss: Tensor,
    /// Non-padding tokens processed (TRL's `num_tokens` increment).
    pub tokens: usize,
}

/// What one optimizer step reports (its metrics go to the caller's [`Accumulator`]).
pub struct StepOutcome {
    /// Sum of the micro-batches' losses, each already divided by the number of micro-batches.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Non-padding tokens processed.
    pub tokens: usize,
    /// The divergence guard's once-per-run notice (an exactly zero gradient).
    pub warning: Option<String>,
}

/// AdamW with the run's betas, epsilon and weight decay: the one optimizer construction.
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

/// The optimizer step `step` (0-based) at learning rate `lr`: runs `micro(i, metrics)` for
/// each of the `n_micro` micro-batches and backward on its loss, then clips and applies
/// AdamW. A non-finite loss or gradient norm stops before anything of the step is applied;
/// `guard` (a training run's; the bench has none) also checks the weights after it.
#[allow(clippy::too_many_arguments)]
pub fn update(
    cfg: &TrainConfig,
    vars: &[(String, Var)],
    opt: &mut AdamW,
    guard: Option<&mut DivergenceGuard>,
    step: usize,
    lr: f64,
    n_micro: usize,
    metrics: &mut Accumulator,
    mut micro: impl FnMut(usize, &mut Accumulator) -> Result<MicroLoss>,
) -> Result<StepOutcome> {
    crate::model::linear::seed_dropout(cfg.seed, step);
    let mut grads = GradAccumulator::new(vars.len());
    let (mut loss, mut tokens) = (0.0f64, 0usize);
    for i in 0..n_micro {
        let out = micro(i, metrics)?;
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
        tokens += out.tokens;
    }
    let grads = grads.finish(vars)?;
    let (grad_norm, clip) = clip_grad_norm(&grads, cfg.max_grad_norm)?;
    if !grad_norm.is_finite() {
        return Err(stopped(
            &cfg.output_dir,
            step + 1,
            &format!("the gradient norm is {grad_norm} (nothing of this step was applied)"),
            "lower --learning-rate (typical: 1e-6–1e-4 for fine-tuning) and keep --max-grad-norm on",
        ));
    }
    let warning = match guard {
        Some(g) => {
            let warning = g.check_grads(&cfg.output_dir, step + 1, grad_norm)?;
            opt.step_scaled(vars, &grads, clip, lr)?;
            g.check_weights(vars, &cfg.output_dir, step + 1)?;
            warning
        }
        None => {
            opt.step_scaled(vars, &grads, clip, lr)?;
            None
        }
    };
    Ok(StepOutcome {
        loss,
        grad_norm,
        tokens,
        warning,
    })
}

/// Offline-method (SFT/DPO/KTO/ORPO) step `step` over `micro` at the configured learning
/// rate, outside a training run (no schedule, no divergence guard): the step `leash bench`
/// times and the LoRA lab inspects, the same [`update`] as `leash <method>`'s.
pub fn fixed_lr_step(
    ctx: &StepContext,
    vars: &[(String, Var)],
    opt: &mut AdamW,
    micro: &[Vec<(usize, &TrainExample)>],
    step: usize,
    metrics: &mut Accumulator,
) -> Result<StepOutcome> {
    let (cfg, lr) = (ctx.cfg, ctx.cfg.learning_rate);
    let losses = offline_losses(ctx, micro);
    update(cfg, vars, opt, None, step, lr, micro.len(), metrics, losses)
}

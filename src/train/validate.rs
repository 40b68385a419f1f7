//! Checks a resolved [`TrainConfig`] before anything runs: every value in range and the
//! options consistent with each other, each refusal naming the option with a hint.

use super::config::{Method, TrainConfig, REPORT_TO, SCHEDULERS};
use crate::error::{LeashError, Result};

pub(super) fn validate(cfg: &TrainConfig) -> Result<()> {
    let bad = |msg: String, hint: &str| Err(LeashError::usage(msg, hint));
    crate::model::frozen_dtype::FrozenDtype::parse(&cfg.frozen_dtype)?;
    if cfg.method == Method::Grpo {
        validate_grpo(cfg)?;
    } else if cfg.beta <= 0.0 || !cfg.beta.is_finite() {
        return bad(
            format!("beta must be > 0 (got {})", cfg.beta),
            "typical values are 0.01–0.5; β → 0 removes the leash entirely",
        );
    }
    if !REPORT_TO.contains(&cfg.report_to.as_str()) {
        return bad(
            format!("unknown report_to `{}`", cfg.report_to),
            "valid: none, tensorboard",
        );
    }
    if !(0.0..0.5).contains(&cfg.label_smoothing) {
        return bad(
            format!(
                "label_smoothing must be in [0, 0.5) (got {})",
                cfg.label_smoothing
            ),
            "it is the assumed label-flip probability",
        );
    }
    if cfg.learning_rate <= 0.0 {
        return bad(
            format!("learning_rate must be > 0 (got {})", cfg.learning_rate),
            "e.g. --learning-rate 5e-7",
        );
    }
    if cfg.per_device_train_batch_size == 0
        || cfg.per_device_eval_batch_size == 0
        || cfg.gradient_accumulation_steps == 0
    {
        return bad(
            "batch sizes and gradient_accumulation_steps must be ≥ 1".into(),
            "use 1 or more",
        );
    }
    if cfg.method == Method::Kto && cfg.per_device_train_batch_size < 2 {
        return bad(
            "KTO needs per_device_train_batch_size ≥ 2".into(),
            "its KL reference point pairs each prompt with another row's completion in the same batch; use --per-device-train-batch-size 2 or more",
        );
    }
    if cfg.max_length < 2 {
        return bad(
            format!("max_length must be ≥ 2 (got {})", cfg.max_length),
            "e.g. --max-length 512",
        );
    }
    if !SCHEDULERS.contains(&cfg.lr_scheduler_type.as_str()) {
        return bad(
            format!("unknown lr_scheduler_type `{}`", cfg.lr_scheduler_type),
            "valid: constant, linear, cosine",
        );
    }
    if cfg.save_total_limit == Some(0) {
        return bad(
            "save_total_limit must be ≥ 1".into(),
            "it is how many checkpoint-* folders to keep; leave it unset to keep all",
        );
    }
    if cfg.logging_steps == 0 || cfg.save_steps == 0 || cfg.eval_steps == Some(0) {
        return bad(
            "logging_steps, save_steps and eval_steps must be ≥ 1".into(),
            "use 1 or more",
        );
    }
    if cfg.max_steps.is_none() && cfg.num_train_epochs <= 0.0 {
        return bad("num_train_epochs must be > 0".into(), "or pass --max-steps");
    }
    if cfg.use_peft && cfg.lora_r == 0 {
        return bad("lora_r must be ≥ 1".into(), "typical ranks are 8–64");
    }
    if !(0.0..1.0).contains(&cfg.lora_dropout) {
        return bad(
            format!("lora_dropout must be in [0, 1) (got {})", cfg.lora_dropout),
            "e.g. 0.05",
        );
    }
    if cfg.adapter.is_some() && !cfg.use_peft {
        return bad(
            "--adapter needs --use-peft".into(),
            "add --use-peft to continue training the adapter",
        );
    }
    if !(0.0..1.0).contains(&cfg.warmup_ratio) {
        return bad(
            format!("warmup_ratio must be in [0, 1) (got {})", cfg.warmup_ratio),
            "e.g. 0.1",
        );
    }
    Ok(())
}

fn validate_grpo(cfg: &TrainConfig) -> Result<()> {
    let bad = |msg: String, hint: &str| Err(LeashError::usage(msg, hint));
    if cfg.beta < 0.0 || !cfg.beta.is_finite() {
        return bad(
            format!("beta must be ≥ 0 (got {})", cfg.beta),
            "0 (TRL's default) trains without a reference model; 0.01–0.1 adds a KL penalty",
        );
    }
    if cfg.num_generations < 2 {
        return bad(
            format!("num_generations must be ≥ 2 (got {})", cfg.num_generations),
            "GRPO's baseline is the mean reward of a prompt's group: one completion has nothing to compare with; use --num-generations 4 or more",
        );
    }
    let per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps;
    if !per_step.is_multiple_of(cfg.num_generations) {
        return bad(
            format!(
                "per_device_train_batch_size × gradient_accumulation_steps ({per_step}) must be a multiple of num_generations ({})",
                cfg.num_generations
            ),
            "they count completions, as in TRL: e.g. --per-device-train-batch-size 16 --num-generations 8 trains on 2 prompts per step",
        );
    }
    if cfg.max_completion_length == 0 || cfg.num_iterations == 0 {
        return bad(
            "max_completion_length and num_iterations must be ≥ 1".into(),
            "use 1 or more",
        );
    }
    if cfg.temperature <= 0.0 || !(cfg.top_p > 0.0 && cfg.top_p <= 1.0) {
        return bad(
            format!(
                "temperature must be > 0 and top_p in (0, 1] (got {}, {})",
                cfg.temperature, cfg.top_p
            ),
            "GRPO needs different completions per prompt: greedy decoding gives a group nothing to compare",
        );
    }
    if cfg.epsilon <= 0.0 || cfg.epsilon_high.is_some_and(|e| e <= 0.0) {
        return bad(
            "epsilon and epsilon_high must be > 0".into(),
            "TRL's default is 0.2; DAPO uses epsilon_high 0.28",
        );
    }
    let n_rewards = cfg.reward_funcs.len() + cfg.reward_cmd.len();
    if n_rewards == 0 {
        return bad(
            "GRPO needs a reward".into(),
            "pass --reward-funcs correct,format (built-ins: correct, format, polite, length, arithmetic) and/or --reward-cmd \"python score.py\"",
        );
    }
    for name in &cfg.reward_funcs {
        if !crate::eval::judge::BUILTIN_JUDGES.contains(&name.as_str()) {
            return bad(
                format!("unknown reward function `{name}`"),
                &format!(
                    "built-in rewards: {}; or pass --reward-cmd",
                    crate::eval::judge::BUILTIN_JUDGES.join(", ")
                ),
            );
        }
    }
    if let Some(w) = &cfg.reward_weights {
        if w.len() != n_rewards {
            return bad(
                format!(
                    "{} reward weights for {n_rewards} reward functions",
                    w.len()
                ),
                "give one weight per reward, built-ins first in --reward-funcs order, then each --reward-cmd",
            );
        }
    }
    Ok(())
}

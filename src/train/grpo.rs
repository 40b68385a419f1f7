//! Online GRPO (TRL `GRPOTrainer`; Shao et al. 2024). Reads top to bottom:
//! load → prompts → for each optimizer step: every `num_iterations` steps sample
//! `num_generations` completions per prompt with the current policy (no gradients), score the
//! rewards, compute group advantages (and π_old / π_ref log-probs when needed) → micro-batches:
//! score the policy, GRPO loss ([`crate::loss::grpo`]), backward → clip → AdamW → log /
//! checkpoint → final save.
//!
//! Batch sizes count completions, as in TRL: one step trains on
//! per_device_train_batch_size × gradient_accumulation_steps completions, i.e. that many
//! ÷ num_generations prompts.

use std::time::Instant;

use candle_core::Tensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::config::TrainConfig;
use super::engine::{self, Engine, Plan, TrainSummary};
use super::method_options::LossType;
use super::metrics::Accumulator;
use super::policy::{build_policy, Policy};
pub use super::rewards::{load_prompts, PromptRow, Rewards};
use super::update::MicroLoss;
use crate::data::collate::{collate, Collated};
use crate::data::encode::Sequence;
use crate::data::pack::collate_packed;
use crate::data::tokenizer::TextTokenizer;
use crate::error::{LeashError, Result};
use crate::eval::evaluate::eos_ids;
use crate::eval::generate::{generate, SamplingOptions};
use crate::loss::grpo::{advantages, grpo_loss, GrpoInputs, GrpoOptions};
use crate::loss::logps::score_at_temperature;
use crate::model::frozen_dtype::FrozenDtype;
use crate::model::Decoder;
use crate::model_io::load_model_as;

/// One micro-batch of a rollout, collated once and reused for every iteration.
pub struct Micro {
    batch: Collated,
    /// Advantage of each sequence in the micro-batch.
    advantages: Vec<f64>,
    /// Loss mask per scored token.
    mask: Vec<f32>,
    /// (n,) log π_old at sampling time; only when num_iterations > 1.
    old: Option<Tensor>,
    /// (n,) log π_ref; only when β > 0.
    reference: Option<Tensor>,
}

/// A batch of generations and everything the updates on it need.
pub struct Rollout {
    pub micro: Vec<Micro>,
    pub metrics: Vec<(String, f64)>,
    pub tokens: usize,
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (m, var.sqrt())
}

/// Prompt positions of generation batch `gen`: epochs of a seeded permutation, cut in order.
fn prompt_positions(cfg: &TrainConfig, n: usize, per_gen: usize, gen: usize) -> Vec<usize> {
    (0..per_gen)
        .map(|j| {
            let k = gen * per_gen + j;
            let epoch = k / n;
            let mut order: Vec<usize> = (0..n).collect();
            if cfg.shuffle {
                let mut rng =
                    rand::rngs::StdRng::seed_from_u64(cfg.seed.wrapping_add(epoch as u64));
                order.shuffle(&mut rng);
            }
            order[k % n]
        })
        .collect()
}

/// The models a rollout uses: the policy's frozen view samples, the reference scores.
pub struct Models<'a> {
    pub sampler: &'a Decoder,
    pub reference: Option<&'a Decoder>,
    pub tok: &'a TextTokenizer,
    pub eos: &'a [u32],
}

/// Samples, scores and prepares generation batch `gen`.
pub fn rollout(
    cfg: &TrainConfig,
    m: &Models,
    rows: &[PromptRow],
    rewards: &Rewards,
    gen: usize,
) -> Result<Rollout> {
    let g = cfg.num_generations;
    let per_gen = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps / g;
    let positions = prompt_positions(cfg, rows.len(), per_gen, gen);
    let opt = SamplingOptions {
        temperature: cfg.temperature,
        top_k: 0,
        top_p: cfg.top_p,
        max_new_tokens: cfg.max_completion_length,
    };
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(cfg.seed.wrapping_add(1_000_003 * (gen as u64 + 1)));
    let mut seqs = Vec::with_capacity(per_gen * g);
    let mut texts: Vec<(&PromptRow, String)> = Vec::with_capacity(per_gen * g);
    let mut truncated = Vec::with_capacity(per_gen * g);
    for &p in &positions {
        let row = &rows[p];
        for c in generate(m.sampler, &row.ids, g, &opt, m.eos, &mut rng, true)? {
            truncated.push(!c.last().is_some_and(|t| m.eos.contains(t)));
            texts.push((row, m.tok.decode(&c, true)?));
            seqs.push(Sequence {
                ids: row.ids.iter().chain(&c).copied().collect(),
                loss_start: row.ids.len(),
            });
        }
    }
    let per_func = rewards.score(&texts)?; // (functions, completions)
    let total: Vec<f64> = (0..seqs.len())
        .map(|i| {
            per_func
                .iter()
                .zip(&rewards.weights)
                .map(|(f, w)| f[i] * w)
                .sum()
        })
        .collect();
    let (adv, group_stds) = advantages(&total, g, cfg.scale_rewards);
    let lengths: Vec<f64> = seqs
        .iter()
        .map(|s| (s.ids.len() - s.loss_start) as f64)
        .collect();
    let mut metrics = vec![
        ("reward".to_string(), mean_std(&total).0),
        (
            "reward_std".to_string(),
            group_stds.iter().sum::<f64>() / group_stds.len().max(1) as f64,
        ),
        (
            "frac_reward_zero_std".to_string(),
            group_stds.iter().filter(|&&s| s.abs() < 1e-8).count() as f64
                / group_stds.len().max(1) as f64,
        ),
        ("completions/mean_length".to_string(), mean_std(&lengths).0),
        (
            "completions/min_length".to_string(),
            lengths.iter().copied().fold(f64::INFINITY, f64::min),
        ),
        (
            "completions/max_length".to_string(),
            lengths.iter().copied().fold(0.0, f64::max),
        ),
        (
            "completions/clipped_ratio".to_string(),
            truncated.iter().filter(|&&t| t).count() as f64 / truncated.len().max(1) as f64,
        ),
    ];
    for (name, scores) in rewards.names.iter().zip(&per_func) {
        let (mean, std) = mean_std(scores);
        metrics.push((format!("rewards/{name}/mean"), mean));
        metrics.push((format!("rewards/{name}/std"), std));
    }
    let device = m.sampler.device();
    let mut micro = Vec::new();
    let mut tokens = 0;
    let bs = cfg.per_device_train_batch_size;
    for start in (0..seqs.len()).step_by(bs) {
        let end = (start + bs).min(seqs.len());
        let refs: Vec<&Sequence> = seqs[start..end].iter().collect();
        // A group's completions share their prompt: padding-free scores it once per group.
        let window = m.sampler.config.sliding_window;
        let batch = if cfg.padding_free {
            collate_packed(&refs, m.tok.pad_id, window, true, device)?
        } else {
            collate(&refs, m.tok.pad_id, window, &[], device)?
        };
        tokens += batch.n_tokens;
        let mask: Vec<f32> = batch
            .seq_of
            .iter()
            .zip(&batch.in_completion)
            .map(|(&s, &inc)| {
                let dropped = cfg.mask_truncated_completions && truncated[start + s as usize];
                (inc && !dropped) as u8 as f32
            })
            .collect();
        let old = if cfg.num_iterations > 1 {
            Some(
                score_at_temperature(m.sampler, &batch, cfg.temperature, false)?
                    .token_logps
                    .detach(),
            )
        } else {
            None
        };
        let reference = match m.reference {
            Some(r) => Some(
                score_at_temperature(r, &batch, cfg.temperature, false)?
                    .token_logps
                    .detach(),
            ),
            None => None,
        };
        micro.push(Micro {
            batch,
            advantages: adv[start..end].to_vec(),
            mask,
            old,
            reference,
        });
    }
    Ok(Rollout {
        micro,
        metrics,
        tokens,
    })
}

/// Saves a checkpoint and turns a reward failure into a stop with a resume hint.
fn stop_with_checkpoint(err: LeashError, cfg: &TrainConfig, engine: &Engine) -> LeashError {
    let interrupted = matches!(err, LeashError::Interrupted { .. });
    let (message, hint) = match err {
        LeashError::Usage { message, hint } | LeashError::Interrupted { message, hint } => {
            (message, hint)
        }
        other => (other.to_string(), String::new()),
    };
    let (message, hint) = match engine.save_checkpoint() {
        Ok(dir) => (
            format!("{message}\ncheckpoint saved: {}", dir.display()),
            format!(
                "{hint}; then continue with --resume-from-checkpoint {} --output-dir {}",
                dir.display(),
                cfg.output_dir.display()
            ),
        ),
        Err(e) => (
            format!("{message}\n(and saving a checkpoint failed too: {e})"),
            hint,
        ),
    };
    if interrupted {
        LeashError::Interrupted { message, hint }
    } else {
        LeashError::Stopped { message, hint }
    }
}

/// GRPO's loss options from the run's config.
pub fn loss_options(cfg: &TrainConfig) -> Result<GrpoOptions> {
    Ok(GrpoOptions {
        beta: cfg.beta,
        epsilon: cfg.epsilon,
        epsilon_high: cfg.epsilon_high.unwrap_or(cfg.epsilon),
        loss_type: LossType::grpo(cfg.loss_type)?,
        max_completion_length: cfg.max_completion_length,
    })
}

/// The losses of one optimizer step over a rollout, as [`crate::train::update::update`] takes
/// them: micro-batch `i` scored by the policy at the sampling temperature, its GRPO loss
/// (scaled for accumulation), and TRL's entropy, KL and clip-ratio metrics.
pub fn grpo_losses<'a>(
    cfg: &'a TrainConfig,
    policy: &'a Decoder,
    rollout: &'a Rollout,
    options: &'a GrpoOptions,
) -> impl FnMut(usize, &mut Accumulator) -> Result<MicroLoss> + 'a {
    let scale = 1.0 / rollout.micro.len().max(1) as f64;
    move |i, acc| {
        let mb = &rollout.micro[i];
        let scored = score_at_temperature(policy, &mb.batch, cfg.temperature, true)?;
        let out = grpo_loss(
            &GrpoInputs {
                logps: &scored.token_logps,
                old_logps: mb.old.as_ref(),
                ref_logps: mb.reference.as_ref(),
                advantages: &mb.advantages,
                seq_of: &mb.batch.seq_of,
                mask: &mb.mask,
            },
            options,
        )?;
        let (ent, cnt) = scored
            .stats
            .iter()
            .zip(&mb.mask)
            .fold((0.0, 0.0), |(e, c), (s, &m)| {
                (e + s.entropy as f64 * m as f64, c + m as f64)
            });
        acc.add_one("entropy", ent / f64::max(cnt, 1.0));
        if let Some(kl) = out.kl {
            acc.add_one("kl", kl);
        }
        acc.add_one("clip_ratio/low_mean", out.clip_low);
        acc.add_one("clip_ratio/high_mean", out.clip_high);
        acc.add_one("clip_ratio/region_mean", out.clip_region);
        Ok(MicroLoss {
            loss: (out.loss * scale)?,
            // The rollout counted its tokens once, whatever num_iterations reuses it.
            tokens: 0,
        })
    }
}

/// Runs GRPO as configured. Progress and human lines go to stderr.
pub fn train(cfg: &TrainConfig) -> Result<TrainSummary> {
    let (device, progress) = engine::open(cfg)?;
    let frozen = FrozenDtype::parse(&cfg.frozen_dtype)?;
    let (base, tok) = load_model_as(&cfg.model, &device, frozen)?;
    let rows = load_prompts(&cfg.dataset, Some(&cfg.dataset_train_split), &tok)?;
    let rewards = Rewards::from_config(cfg);
    let eos = eos_ids(&base, &tok);
    let Policy {
        model: policy,
        frozen,
        vars,
        reference,
        adapter_config,
    } = build_policy(cfg, base, &device)?;
    // β = 0: no KL term, so no reference is kept (TRL loads none).
    let reference = (cfg.beta > 0.0).then_some(reference);
    let g = cfg.num_generations;
    let per_gen = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps / g;
    progress.println(format!(
        "grpo: {} prompts, {per_gen} prompts × {g} generations per step, rewards: {}",
        rows.len(),
        rewards.names.join(", ")
    ));
    let options = loss_options(cfg)?;
    let mu = cfg.num_iterations;
    let gens_per_epoch = rows.len().div_ceil(per_gen);
    let plan = Plan {
        vars,
        adapter_config,
        total: cfg
            .max_steps
            .unwrap_or_else(|| (cfg.num_train_epochs * gens_per_epoch as f64).ceil() as usize * mu),
        steps_per_epoch: gens_per_epoch * mu,
        // Groups whose completions all score the same give exactly zero gradients.
        zero_grads_ok: true,
    };
    let mut engine = Engine::start(cfg, device, progress, plan)?;
    let models = Models {
        sampler: &frozen,
        reference: reference.as_ref(),
        tok: &tok,
        eos: &eos,
    };
    let mut current: Option<Rollout> = None;

    for step in engine.steps() {
        // Sampling: a fresh batch every μ steps (or after a resume mid-way).
        let t0 = Instant::now();
        if step % mu == 0 || current.is_none() {
            let r = match rollout(cfg, &models, &rows, &rewards, step / mu) {
                Ok(r) => r,
                Err(e) => {
                    engine.progress.abandon();
                    return Err(stop_with_checkpoint(e, cfg, &engine));
                }
            };
            for (k, v) in &r.metrics {
                engine.metrics.add_one(k, *v);
            }
            engine.state.total_tokens += r.tokens;
            current = Some(r);
        }
        let sampling_s = t0.elapsed().as_secs_f64();
        let Some(batch) = &current else { continue };

        // Learning: one optimizer step over every micro-batch of the rollout.
        let t1 = Instant::now();
        let losses = grpo_losses(cfg, &policy, batch, &options);
        let outcome = engine.update(step, batch.micro.len(), losses)?;
        engine.metrics.add_one("time/sampling_s", sampling_s);
        engine
            .metrics
            .add_one("time/training_s", t1.elapsed().as_secs_f64());
        if let Some(record) = engine.log_record(&outcome) {
            engine.write(&record)?;
        }
        engine.end_step()?;
    }
    engine.finish()
}

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

use std::time::{Duration, Instant};

use candle_core::Tensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::{Map, Value};

use super::checkpoint::save_checkpoint;
use super::config::TrainConfig;
use super::divergence::{stopped, DivergenceGuard};
use super::grads::GradAccumulator;
use super::method_options::LossType;
use super::metrics::{human_line, Accumulator, MetricsLog};
use super::optimizer::{clip_grad_norm, AdamW, AdamWSettings};
use super::policy::{build_policy, Policy};
use super::schedule::{lr_factor, warmup_steps};
use super::trainer::{
    checkpoint_or_stop, initial_state, install_ctrl_c, open_run, write_config, TrainSummary,
};
use crate::data::collate::{collate, Collated};
use crate::data::dataset::read_objects;
use crate::data::encode::Sequence;
use crate::data::pack::collate_packed;
use crate::data::tokenizer::TextTokenizer;
use crate::error::{LeashError, Result};
use crate::eval::evaluate::{eos_ids, prompts_of_split};
use crate::eval::generate::{generate, SamplingOptions};
use crate::eval::judge::{builtin_score, score_rows, Item};
use crate::loss::grpo::{advantages, grpo_loss, GrpoInputs, GrpoOptions, ScaleRewards};
use crate::loss::logps::score_at_temperature;
use crate::model::frozen_dtype::FrozenDtype;
use crate::model::Decoder;
use crate::model_io::load_model_as;
use crate::model_io::save_weights;

/// One prompt of the data set: rendered text, ids, and the row's columns (for reward commands).
pub struct PromptRow {
    pub text: String,
    pub ids: Vec<u32>,
    pub columns: Map<String, Value>,
}

/// Every row's prompt plus its JSON columns, in file order.
pub fn load_prompts(
    path: &std::path::Path,
    split: Option<&str>,
    tok: &TextTokenizer,
) -> Result<Vec<PromptRow>> {
    let listed = prompts_of_split(path, split, tok)?;
    // `prompts` already validated every row as an object with a prompt; these are the same
    // rows' columns as stored (JSONL objects, or Parquet rows converted to them).
    let columns = read_objects(path, split)?;
    Ok(listed
        .into_iter()
        .zip(columns)
        .map(|((text, ids), columns)| PromptRow { text, ids, columns })
        .collect())
}

/// The reward functions of a run, under the names their metrics use.
pub struct Rewards {
    pub names: Vec<String>,
    commands: Vec<Option<String>>,
    pub weights: Vec<f64>,
    timeout: Duration,
}

impl Rewards {
    pub fn from_config(cfg: &TrainConfig) -> Self {
        let mut names: Vec<String> = cfg.reward_funcs.clone();
        let mut commands: Vec<Option<String>> = vec![None; names.len()];
        for (i, cmd) in cfg.reward_cmd.iter().enumerate() {
            names.push(if cfg.reward_cmd.len() == 1 {
                "reward_cmd".into()
            } else {
                format!("reward_cmd_{}", i + 1)
            });
            commands.push(Some(cmd.clone()));
        }
        let weights = cfg
            .reward_weights
            .clone()
            .unwrap_or_else(|| vec![1.0; names.len()]);
        Rewards {
            names,
            commands,
            weights,
            timeout: Duration::from_secs(cfg.reward_timeout),
        }
    }

    /// Scores of each reward function for each completion: (functions × completions).
    pub fn score(&self, rows: &[(&PromptRow, String)]) -> Result<Vec<Vec<f64>>> {
        self.names
            .iter()
            .zip(&self.commands)
            .map(|(name, cmd)| match cmd {
                None => rows
                    .iter()
                    .map(|(p, c)| {
                        builtin_score(
                            name,
                            &Item {
                                prompt: &p.text,
                                completion: c,
                            },
                        )
                    })
                    .collect(),
                Some(cmd) => {
                    let input: Vec<Value> = rows
                        .iter()
                        .map(|(p, c)| {
                            let mut obj = p.columns.clone();
                            obj.insert("prompt".into(), p.text.clone().into());
                            obj.insert("completion".into(), c.clone().into());
                            Value::Object(obj)
                        })
                        .collect();
                    score_rows("reward", cmd, &input, self.timeout)
                }
            })
            .collect()
    }
}

/// One micro-batch of a rollout, collated once and reused for every iteration.
struct Micro {
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
struct Rollout {
    micro: Vec<Micro>,
    metrics: Vec<(String, f64)>,
    tokens: usize,
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

struct Models<'a> {
    sampler: &'a Decoder,
    reference: Option<&'a Decoder>,
    tok: &'a TextTokenizer,
    eos: &'a [u32],
}

/// Samples, scores and prepares one generation batch.
fn rollout(
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
    let (adv, group_stds) = advantages(&total, g, ScaleRewards::parse(&cfg.scale_rewards)?);
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
fn stop_with_checkpoint(
    err: LeashError,
    cfg: &TrainConfig,
    save: &dyn Fn() -> Result<std::path::PathBuf>,
) -> LeashError {
    let interrupted = matches!(err, LeashError::Interrupted { .. });
    let (message, hint) = match err {
        LeashError::Usage { message, hint } | LeashError::Interrupted { message, hint } => {
            (message, hint)
        }
        other => (other.to_string(), String::new()),
    };
    let (message, hint) = match save() {
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

/// Runs GRPO as configured. Progress and human lines go to stderr.
pub fn train(cfg: &TrainConfig) -> Result<TrainSummary> {
    let (device, mut progress) = open_run(cfg)?;
    install_ctrl_c();
    let frozen = FrozenDtype::parse(&cfg.frozen_dtype)?;
    let (base, tok) = load_model_as(&cfg.model, &device, frozen)?;
    let rows = load_prompts(&cfg.dataset, Some(&cfg.dataset_train_split), &tok)?;
    let rewards = Rewards::from_config(cfg);
    write_config(cfg, &device)?;
    let eos = eos_ids(&base, &tok);
    let built = build_policy(cfg, base, &device)?;
    let Policy {
        model: policy,
        frozen,
        vars,
        reference,
        adapter_config,
    } = built;
    // β = 0: no KL term, so no reference is kept (TRL loads none).
    let reference = (cfg.beta > 0.0).then_some(reference);
    let g = cfg.num_generations;
    let per_gen = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps / g;
    progress.println(format!(
        "grpo: {} prompts, {per_gen} prompts × {g} generations per step, rewards: {}",
        rows.len(),
        rewards.names.join(", ")
    ));
    let loss_opts = GrpoOptions {
        beta: cfg.beta,
        epsilon: cfg.epsilon,
        epsilon_high: cfg.epsilon_high.unwrap_or(cfg.epsilon),
        loss_type: LossType::grpo(cfg.loss_type)?,
        max_completion_length: cfg.max_completion_length,
    };
    let save_final =
        |dir: &std::path::Path| save_weights(dir, &cfg.model, &vars, adapter_config.as_ref());
    let mut opt = AdamW::new(
        &vars,
        AdamWSettings {
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_epsilon,
            weight_decay: cfg.weight_decay,
        },
    );
    let mut state = initial_state(cfg, &vars, &mut opt, &progress)?;
    // Groups whose completions all score the same give exactly zero gradients.
    let mut guard = DivergenceGuard::new(&vars, true)?;
    let mu = cfg.num_iterations;
    let gens_per_epoch = rows.len().div_ceil(per_gen);
    let total = cfg
        .max_steps
        .unwrap_or_else(|| (cfg.num_train_epochs * gens_per_epoch as f64).ceil() as usize * mu);
    let warmup = warmup_steps(cfg.warmup_steps, cfg.warmup_ratio, total);
    let mut log =
        MetricsLog::open(&cfg.output_dir, cfg.resume_from_checkpoint.is_some())?.report_to(cfg)?;
    let mut acc = Accumulator::default();
    let mut last_loss = None;
    progress.set_total(total as u64, state.global_step as u64);
    let models = Models {
        sampler: &frozen,
        reference: reference.as_ref(),
        tok: &tok,
        eos: &eos,
    };
    let mut current: Option<Rollout> = None;

    for step in state.global_step..total {
        crate::model::linear::seed_dropout(cfg.seed, step);
        // Sampling: a fresh batch every μ steps (or after a resume mid-way).
        let t0 = Instant::now();
        if step % mu == 0 || current.is_none() {
            let r = match rollout(cfg, &models, &rows, &rewards, step / mu) {
                Ok(r) => r,
                Err(e) => {
                    progress.abandon();
                    let save =
                        || save_checkpoint(&cfg.output_dir, &save_final, &vars, &opt, &state);
                    return Err(stop_with_checkpoint(e, cfg, &save));
                }
            };
            for (k, v) in &r.metrics {
                acc.add_one(k, *v);
            }
            state.total_tokens += r.tokens;
            current = Some(r);
        }
        let sampling_s = t0.elapsed().as_secs_f64();
        let Some(batch) = &current else { continue };

        // Learning: one optimizer step over every micro-batch of the rollout.
        let t1 = Instant::now();
        let scale = 1.0 / batch.micro.len() as f64;
        let mut grads = GradAccumulator::new(vars.len());
        let mut step_loss = 0.0;
        for mb in &batch.micro {
            let scored = score_at_temperature(&policy, &mb.batch, cfg.temperature, true)?;
            let out = grpo_loss(
                &GrpoInputs {
                    logps: &scored.token_logps,
                    old_logps: mb.old.as_ref(),
                    ref_logps: mb.reference.as_ref(),
                    advantages: &mb.advantages,
                    seq_of: &mb.batch.seq_of,
                    mask: &mb.mask,
                },
                &loss_opts,
            )?;
            let loss = (out.loss * scale)?;
            let value = loss.to_scalar::<f32>()? as f64;
            if !value.is_finite() {
                progress.abandon();
                return Err(stopped(
                    &cfg.output_dir,
                    step + 1,
                    &format!("the loss became {value} (nothing of this step was applied)"),
                    "lower --learning-rate, or keep --max-grad-norm on",
                ));
            }
            step_loss += value;
            let store = crate::model::checkpoint::backward(&loss)?;
            grads.add(&store, &vars)?;
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
        }
        let mut grads = grads.finish(&vars)?;
        let grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
        guard
            .check_grads(&cfg.output_dir, step + 1, grad_norm)
            .inspect_err(|_| progress.abandon())?;
        let lr = cfg.learning_rate * lr_factor(&cfg.lr_scheduler_type, step, warmup, total);
        opt.step(&vars, &grads, lr)?;
        guard
            .check_weights(&vars, &cfg.output_dir, step + 1)
            .inspect_err(|_| progress.abandon())?;
        state.global_step = step + 1;
        acc.add_one("loss", step_loss);
        acc.add_one("grad_norm", grad_norm);
        acc.add_one("time/sampling_s", sampling_s);
        acc.add_one("time/training_s", t1.elapsed().as_secs_f64());
        progress.inc(1);

        let done = state.global_step == total;
        if state.global_step.is_multiple_of(cfg.logging_steps) || done {
            let mut record = Map::new();
            record.insert("step".into(), state.global_step.into());
            record.insert(
                "epoch".into(),
                (state.global_step as f64 / (gens_per_epoch * mu) as f64).into(),
            );
            record.insert("learning_rate".into(), lr.into());
            record.insert("num_tokens".into(), (state.total_tokens as f64).into());
            record.extend(acc.take());
            if done {
                // Not a TRL metric: the run's peak resident memory, in its last log line.
                record.insert("peak_rss_mib".into(), crate::runtime::peak_rss_mib().into());
            }
            last_loss = record.get("loss").and_then(Value::as_f64);
            progress.println(human_line(&record));
            log.write(&record)?;
        }
        checkpoint_or_stop(cfg, &save_final, &vars, &opt, &state, done, &progress)?;
    }
    progress.finish();
    save_final(&cfg.output_dir)?;
    Ok(TrainSummary {
        steps: state.global_step,
        final_loss: last_loss,
        output_dir: cfg.output_dir.clone(),
    })
}

//! The one training loop, for every method. Reads top to bottom:
//! load → prepare data → (reference cache) → for each optimizer step: micro-batches →
//! backward → clip → AdamW → log / eval / checkpoint → final save.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::{Map, Value};

use super::checkpoint::{load_checkpoint, save_checkpoint, TrainerState};
use super::config::{Method, TrainConfig};
use super::examples::{prepare_split, to_sequence, Prepared, TrainExample};
use super::grads::GradAccumulator;
use super::metrics::{human_line, Accumulator, MetricsLog, Monitor};
use super::optimizer::{clip_grad_norm, AdamW, AdamWSettings};
use super::policy::{build_policy, save_weights, Policy};
use super::reference::reference_cache;
use super::schedule::{lr_factor, warmup_steps};
use super::step::{micro_batch, RefLogps, Reference, StepContext};
use crate::error::{LeashError, Result};
use crate::model::Decoder;
use crate::scoring::load_model;

type RefCache = HashMap<usize, RefLogps>;

/// What a finished run reports.
pub struct TrainSummary {
    pub steps: usize,
    pub final_loss: Option<f64>,
    pub output_dir: std::path::PathBuf,
}

pub(crate) static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub(crate) fn install_ctrl_c() {
    // Errors only if a handler is already installed (e.g. a second run in one process).
    let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst));
}

/// Saves a checkpoint every `save_steps`, at the end, and on Ctrl-C; after Ctrl-C returns
/// the error that ends the run with a hint to resume. Shared by the offline and GRPO loops.
pub(crate) fn checkpoint_or_stop(
    cfg: &TrainConfig,
    save: &dyn Fn(&std::path::Path) -> Result<()>,
    vars: &[(String, candle_core::Var)],
    opt: &AdamW,
    state: &TrainerState,
    done: bool,
    bar: &ProgressBar,
) -> Result<()> {
    let interrupted = INTERRUPTED.load(Ordering::SeqCst);
    if state.global_step.is_multiple_of(cfg.save_steps) || done || interrupted {
        let dir = save_checkpoint(&cfg.output_dir, save, vars, opt, state)?;
        crate::report::run_report::refresh(cfg, bar);
        bar.set_message(format!("saved {}", dir.display()));
    }
    if interrupted {
        bar.abandon();
        return Err(LeashError::Stopped {
            message: format!(
                "interrupted at step {}; checkpoint saved",
                state.global_step
            ),
            hint: format!(
                "continue with --resume-from-checkpoint {}",
                cfg.output_dir
                    .join(format!("checkpoint-{}", state.global_step))
                    .display()
            ),
        });
    }
    Ok(())
}

/// Batches of example positions for optimizer step `step`: epochs are (seeded-shuffled or
/// sequential) orders cut into batches; each step takes `accumulation` consecutive batches
/// of one epoch (fewer at an epoch's end, as transformers does).
pub fn step_batches(cfg: &TrainConfig, n: usize, step: usize) -> Vec<Vec<usize>> {
    let bs = cfg.per_device_train_batch_size;
    let batches_per_epoch = n.div_ceil(bs);
    let steps_per_epoch = batches_per_epoch.div_ceil(cfg.gradient_accumulation_steps);
    let epoch = step / steps_per_epoch;
    let within = step % steps_per_epoch;
    let mut order: Vec<usize> = (0..n).collect();
    if cfg.shuffle {
        let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed.wrapping_add(epoch as u64));
        order.shuffle(&mut rng);
    }
    let first = within * cfg.gradient_accumulation_steps;
    let last = (first + cfg.gradient_accumulation_steps).min(batches_per_epoch);
    (first..last)
        .map(|b| order[b * bs..((b + 1) * bs).min(n)].to_vec())
        .collect()
}

pub fn steps_per_epoch(cfg: &TrainConfig, n: usize) -> usize {
    n.div_ceil(cfg.per_device_train_batch_size)
        .div_ceil(cfg.gradient_accumulation_steps)
}

pub(crate) fn check_output_dir(cfg: &TrainConfig) -> Result<()> {
    let dir = &cfg.output_dir;
    let holds_run = dir.join("metrics.jsonl").exists() || dir.join("leash_config.json").exists();
    if holds_run && !cfg.overwrite_output_dir && cfg.resume_from_checkpoint.is_none() {
        return Err(LeashError::usage(
            format!("output folder {} already holds a run", dir.display()),
            "pass --overwrite-output-dir to replace it, --resume-from-checkpoint to continue it, or choose another --output-dir",
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| LeashError::io(dir, e, "check the path is writable"))
}

fn sft_token_count(prepared: &Prepared, batches: &[Vec<usize>], max_length: usize) -> f64 {
    batches
        .iter()
        .flatten()
        .map(|&i| match &prepared.examples[i].1 {
            TrainExample::Sft(pc) => to_sequence(pc, max_length).scored_tokens(),
            _ => 0,
        })
        .sum::<usize>() as f64
}

/// Runs training as configured. Progress and human lines go to stderr.
pub fn train(cfg: &TrainConfig) -> Result<TrainSummary> {
    check_output_dir(cfg)?;
    install_ctrl_c();
    let device = Device::Cpu;
    let (base, tokenizer) = load_model(&cfg.model, &device)?;
    let bs = cfg.per_device_train_batch_size;
    let (train_split, test_split) = (
        Some(&*cfg.dataset_train_split),
        Some(&*cfg.dataset_test_split),
    );
    let train_data = prepare_split(
        cfg.method,
        &cfg.dataset,
        train_split,
        &tokenizer,
        cfg.max_length,
        bs,
    )?;
    let eval_data = match &cfg.eval_dataset {
        Some(path) => Some(prepare_split(
            cfg.method,
            path,
            test_split,
            &tokenizer,
            cfg.max_length,
            bs,
        )?),
        None => None,
    };
    if train_data.dropped > 0 {
        eprintln!(
            "note: dropped {} rows whose prompt is at least max_length ({}) tokens",
            train_data.dropped, cfg.max_length
        );
    }
    let config_path = cfg.output_dir.join("leash_config.json");
    std::fs::write(
        &config_path,
        serde_json::to_string_pretty(cfg).unwrap_or_default(),
    )
    .map_err(|e| LeashError::io(&config_path, e, "check the output folder is writable"))?;

    let total_params = base.num_parameters();
    let built = build_policy(cfg, base, &device)?;
    let trainable = built.trainable_parameters();
    let all = total_params
        + if built.adapter_config.is_some() {
            trainable
        } else {
            0
        };
    eprintln!(
        "trainable params: {trainable} || all params: {all} || trainable%: {:.4}; {} training examples ({})",
        100.0 * trainable as f64 / all as f64,
        train_data.examples.len(),
        cfg.method.name(),
    );
    let Policy {
        model: policy,
        frozen,
        vars,
        reference: reference_model,
        adapter_config,
    } = built;
    let needs_reference = matches!(cfg.method, Method::Dpo | Method::Kto);
    let caches: Option<(RefCache, RefCache)> = if needs_reference && cfg.precompute_ref_log_probs {
        let train_cache = reference_cache(
            cfg,
            &reference_model,
            &train_data,
            "train",
            tokenizer.pad_id,
        )?;
        let eval_cache = match &eval_data {
            Some(d) => reference_cache(cfg, &reference_model, d, "eval", tokenizer.pad_id)?,
            None => HashMap::new(),
        };
        Some((train_cache, eval_cache))
    } else {
        None
    };
    // With a cache (or no reference at all) a full run releases the reference copy here.
    let base = if needs_reference && caches.is_none() {
        Some(reference_model)
    } else {
        None
    };
    let save =
        |dir: &std::path::Path| save_weights(dir, &cfg.model, &vars, adapter_config.as_ref());
    let reference = |eval: bool| match (&caches, &base) {
        (Some((t, e)), _) => Reference::Cached(if eval { e } else { t }),
        (None, Some(b)) => Reference::Model(b),
        _ => Reference::None,
    };

    let mut opt = AdamW::new(
        &vars,
        AdamWSettings {
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_epsilon,
            weight_decay: cfg.weight_decay,
        },
    );
    let mut state = TrainerState {
        global_step: 0,
        total_tokens: 0,
        seed: cfg.seed,
        monitor_start_logps: None,
        monitor_warned: false,
    };
    if let Some(dir) = &cfg.resume_from_checkpoint {
        state = load_checkpoint(dir, &vars, &mut opt)?;
        eprintln!(
            "resumed from {} at step {}",
            dir.display(),
            state.global_step
        );
    }
    let n = train_data.examples.len();
    let per_epoch = steps_per_epoch(cfg, n);
    let total = cfg
        .max_steps
        .unwrap_or_else(|| (cfg.num_train_epochs * per_epoch as f64).ceil() as usize);
    let warmup = warmup_steps(cfg.warmup_steps, cfg.warmup_ratio, total);
    let mut log =
        MetricsLog::open(&cfg.output_dir, cfg.resume_from_checkpoint.is_some())?.report_to(cfg)?;
    let mut monitor = Monitor::new(state.monitor_start_logps, state.monitor_warned);
    let mut acc = Accumulator::default();
    let (mut loss_sum, mut loss_steps) = (0.0f64, 0usize);
    let mut last_loss = None;
    let bar = ProgressBar::new(total as u64).with_position(state.global_step as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {per_sec}  ETA {eta}  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );

    for step in state.global_step..total {
        let batches = step_batches(cfg, n, step);
        let micro = batches.len() as f64;
        let sft_tokens = sft_token_count(&train_data, &batches, cfg.max_length);
        let ctx = StepContext {
            cfg,
            policy: &policy,
            policy_frozen: &frozen,
            reference: reference(false),
            pad_id: tokenizer.pad_id,
            device: &device,
        };
        let mut grads = GradAccumulator::new(vars.len());
        let mut step_loss = 0.0f64;
        for positions in &batches {
            let examples: Vec<(usize, &TrainExample)> = positions
                .iter()
                .map(|&i| (i, &train_data.examples[i].1))
                .collect();
            let out = micro_batch(&ctx, &examples, 1.0 / micro, sft_tokens)?;
            let value = out.loss.to_scalar::<f32>()? as f64;
            if !value.is_finite() {
                bar.abandon();
                return Err(LeashError::Stopped {
                    message: format!("loss became {value} at step {} (nothing of this step was applied)", step + 1),
                    hint: "the last checkpoint in the output folder is intact; lower --learning-rate or --beta, or keep --max-grad-norm on, and resume from it".into(),
                });
            }
            step_loss += value;
            let store = out.loss.backward()?;
            grads.add(&store, &vars)?;
            acc.add(&out.metrics);
            state.total_tokens += out.tokens;
        }
        let mut grads = grads.finish(&vars)?;
        let grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
        let lr = cfg.learning_rate * lr_factor(&cfg.lr_scheduler_type, step, warmup, total);
        opt.step(&vars, &grads, lr)?;
        state.global_step = step + 1;
        loss_sum += step_loss;
        loss_steps += 1;
        bar.inc(1);

        let done = state.global_step == total;
        if state.global_step.is_multiple_of(cfg.logging_steps) || done {
            let mut record = Map::new();
            record.insert("step".into(), state.global_step.into());
            record.insert(
                "epoch".into(),
                (state.global_step as f64 / per_epoch as f64).into(),
            );
            record.insert("loss".into(), (loss_sum / loss_steps as f64).into());
            record.insert("grad_norm".into(), grad_norm.into());
            record.insert("learning_rate".into(), lr.into());
            if cfg.method != Method::Orpo {
                record.insert("num_tokens".into(), (state.total_tokens as f64).into());
            }
            record.extend(acc.take());
            last_loss = Some(loss_sum / loss_steps as f64);
            (loss_sum, loss_steps) = (0.0, 0);
            if cfg.method == Method::Dpo {
                let get = |k: &str| record.get(k).and_then(Value::as_f64);
                if let Some(warning) = monitor.check(get("logps/chosen"), get("rewards/margins")) {
                    bar.println(format!("warning: {warning}"));
                    record.insert("warning".into(), "chosen_logps_falling".into());
                }
                state.monitor_start_logps = monitor.start_logps;
                state.monitor_warned = monitor.warned;
            }
            bar.println(human_line(&record));
            log.write(&record)?;
        }
        if let Some(eval) = &eval_data {
            if cfg
                .eval_steps
                .is_some_and(|e| state.global_step.is_multiple_of(e))
                || done
            {
                let record = evaluate(
                    cfg,
                    &frozen,
                    eval,
                    reference(true),
                    tokenizer.pad_id,
                    state.global_step,
                )?;
                bar.println(human_line(&record));
                log.write(&record)?;
            }
        }
        checkpoint_or_stop(cfg, &save, &vars, &opt, &state, done, &bar)?;
    }
    bar.finish_and_clear();
    save(&cfg.output_dir)?;
    Ok(TrainSummary {
        steps: state.global_step,
        final_loss: last_loss,
        output_dir: cfg.output_dir.clone(),
    })
}

/// Metrics over the whole eval set (averaged over batches), prefixed `eval_`.
pub fn evaluate(
    cfg: &TrainConfig,
    policy: &Decoder,
    data: &Prepared,
    reference: Reference,
    pad_id: u32,
    step: usize,
) -> Result<Map<String, Value>> {
    let device = Device::Cpu;
    let ctx = StepContext {
        cfg,
        policy,
        policy_frozen: policy,
        reference,
        pad_id,
        device: &device,
    };
    let mut acc = Accumulator::default();
    let mut losses = Vec::new();
    let positions: Vec<usize> = (0..data.examples.len()).collect();
    for chunk in positions.chunks(cfg.per_device_eval_batch_size) {
        let examples: Vec<(usize, &TrainExample)> =
            chunk.iter().map(|&i| (i, &data.examples[i].1)).collect();
        let tokens = sft_token_count(data, &[chunk.to_vec()], cfg.max_length);
        let out = micro_batch(&ctx, &examples, 1.0, tokens)?;
        losses.push(out.loss.to_scalar::<f32>()? as f64);
        acc.add(&out.metrics);
    }
    let mut record = Map::new();
    record.insert("step".into(), step.into());
    record.insert(
        "eval_loss".into(),
        (losses.iter().sum::<f64>() / losses.len().max(1) as f64).into(),
    );
    for (k, v) in acc.take() {
        record.insert(format!("eval_{k}"), v);
    }
    Ok(record)
}

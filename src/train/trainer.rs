//! The one training loop, for every method. Reads top to bottom:
//! load → prepare data → (reference cache) → for each optimizer step: micro-batches →
//! backward → clip → AdamW → log / eval / checkpoint → final save.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Device;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::{Map, Value};

use super::checkpoint::{load_checkpoint, save_checkpoint, TrainerState};
use super::config::{Method, TrainConfig};
use super::divergence::DivergenceGuard;
use super::examples::{prepare_with, Prepared, TrainExample};
use super::method_options::LossType;
use super::metrics::{human_line, Accumulator, MetricsLog, Monitor};
use super::optimizer::AdamW;
use super::policy::{build_policy, Policy};
use super::reference::reference_cache;
use super::resume_check::{check_resume, RunIdentity};
use super::run_dir::{prepare_output_dir, prune_checkpoints, trim_metrics};
use super::schedule::{lr_factor, warmup_steps};
use super::step::{micro_batch, RefLogps, Reference, StepContext};
use super::update::{adamw, optimizer_step, sft_token_count};
use crate::error::{LeashError, Result};
use crate::loss::dpo::DpoLossType;
use crate::model::frozen_dtype::FrozenDtype;
use crate::model::Decoder;
use crate::model_io::load_model_as;
use crate::model_io::save_weights;
use crate::progress::Progress;

type RefCache = HashMap<usize, RefLogps>;

/// What a finished run reports.
pub struct TrainSummary {
    pub steps: usize,
    pub final_loss: Option<f64>,
    pub output_dir: std::path::PathBuf,
}

pub(crate) static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub fn install_ctrl_c() {
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
    progress: &Progress,
) -> Result<()> {
    let interrupted = INTERRUPTED.load(Ordering::SeqCst);
    if state.global_step.is_multiple_of(cfg.save_steps) || done || interrupted {
        let dir = save_checkpoint(&cfg.output_dir, save, vars, opt, state)?;
        crate::report::run_report::refresh(cfg, progress);
        progress.println(format!("saved checkpoint {}", dir.display()));
        for old in prune_checkpoints(&cfg.output_dir, cfg.save_total_limit)? {
            progress.println(format!(
                "removed {} (save_total_limit {})",
                old.display(),
                cfg.save_total_limit.unwrap_or_default()
            ));
        }
    }
    if interrupted {
        progress.abandon();
        return Err(LeashError::Interrupted {
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

/// Refuses or clears the output folder (see [`super::run_dir`]) and opens the run's log
/// (`train.log`, appended to on resume).
fn check_output_dir(cfg: &TrainConfig) -> Result<Progress> {
    prepare_output_dir(cfg)?;
    Progress::new("train", "step", 0).log_to(
        &cfg.output_dir.join("train.log"),
        cfg.resume_from_checkpoint.is_some(),
    )
}

/// The start of every run: the device first (one that cannot be had stops the run before its
/// output folder is touched), then the folder and log, whose first line names the device.
/// Shared by the offline and GRPO loops.
pub(crate) fn open_run(cfg: &TrainConfig) -> Result<(Device, Progress)> {
    let device = crate::device::resolve(cfg.device)?;
    let progress = check_output_dir(cfg)?;
    progress.println(crate::device::describe(&device));
    Ok((device, progress))
}

/// Writes the resolved configuration to `output_dir/leash_config.json`, recording the device
/// the run actually uses (`cpu`, `cuda:0`), not `auto`.
pub(crate) fn write_config(cfg: &TrainConfig, device: &Device) -> Result<()> {
    let mut resolved = cfg.clone();
    resolved.device = crate::device::DeviceChoice::of(device);
    let path = cfg.output_dir.join("leash_config.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&resolved).unwrap_or_default(),
    )
    .map_err(|e| LeashError::io(&path, e, "check the output folder is writable"))
}

/// The state a run starts from: fresh, or restored from `--resume-from-checkpoint` after
/// checking the checkpoint belongs to a compatible run. Shared by the offline and GRPO loops.
pub(crate) fn initial_state(
    cfg: &TrainConfig,
    vars: &[(String, candle_core::Var)],
    opt: &mut AdamW,
    progress: &Progress,
) -> Result<TrainerState> {
    let run = RunIdentity::of(cfg)?;
    let device = vars
        .first()
        .map(|(_, v)| crate::device::DeviceChoice::of(v.device()).to_string());
    let Some(dir) = &cfg.resume_from_checkpoint else {
        return Ok(TrainerState {
            global_step: 0,
            total_tokens: 0,
            seed: cfg.seed,
            monitor_start_logps: None,
            monitor_warned: false,
            run: Some(run),
            device,
        });
    };
    let saved = super::checkpoint::read_state(dir)?;
    for warning in check_resume(dir, saved.run.as_ref(), &run)? {
        progress.println(warning);
    }
    // Another device is no reason to refuse: weights and moments are read onto this one.
    if let (Some(was), Some(now)) = (&saved.device, &device) {
        if was != now {
            progress.println(format!(
                "note: the checkpoint was trained on {was}, this run continues on {now} (same trajectory, up to the two devices' floating-point rounding)"
            ));
        }
    }
    let mut state = load_checkpoint(dir, vars, opt)?;
    state.run = Some(run);
    state.device = device;
    // A resume into the folder that logged steps past the checkpoint logs them again.
    trim_metrics(&cfg.output_dir, state.global_step)?;
    progress.println(format!(
        "resumed from {} at step {}",
        dir.display(),
        state.global_step
    ));
    Ok(state)
}

/// Runs training as configured. Progress and human lines go to stderr.
pub fn train(cfg: &TrainConfig) -> Result<TrainSummary> {
    let (device, mut progress) = open_run(cfg)?;
    install_ctrl_c();
    let frozen = FrozenDtype::parse(&cfg.frozen_dtype)?;
    let (base, tokenizer) = load_model_as(&cfg.model, &device, frozen)?;
    let bs = cfg.per_device_train_batch_size;
    let aol = cfg.assistant_only_loss;
    let train_data = prepare_with(
        cfg.method,
        &cfg.dataset,
        Some(&*cfg.dataset_train_split),
        &tokenizer,
        cfg.max_length,
        bs,
        aol,
    )?;
    let eval_data = match &cfg.eval_dataset {
        Some(path) => Some(prepare_with(
            cfg.method,
            path,
            Some(&*cfg.dataset_test_split),
            &tokenizer,
            cfg.max_length,
            bs,
            aol,
        )?),
        None => None,
    };
    if train_data.dropped > 0 {
        progress.println(format!(
            "note: dropped {} rows whose prompt is at least max_length ({}) tokens",
            train_data.dropped, cfg.max_length
        ));
    }
    write_config(cfg, &device)?;

    let total_params = base.num_parameters();
    let built = build_policy(cfg, base, &device)?;
    let trainable = built.trainable_parameters();
    let all = total_params
        + if built.adapter_config.is_some() {
            trainable
        } else {
            0
        };
    progress.println(format!(
        "trainable params: {trainable} || all params: {all} || trainable%: {:.4}; {} training examples ({})",
        100.0 * trainable as f64 / all as f64,
        train_data.examples.len(),
        cfg.method.name(),
    ));
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

    let mut opt = adamw(cfg, &vars);
    let mut state = initial_state(cfg, &vars, &mut opt, &progress)?;
    let n = train_data.examples.len();
    let per_epoch = steps_per_epoch(cfg, n);
    let total = cfg
        .max_steps
        .unwrap_or_else(|| (cfg.num_train_epochs * per_epoch as f64).ceil() as usize);
    let warmup = warmup_steps(cfg.warmup_steps, cfg.warmup_ratio, total);
    let mut log =
        MetricsLog::open(&cfg.output_dir, cfg.resume_from_checkpoint.is_some())?.report_to(cfg)?;
    let mut monitor = Monitor::new(cfg.beta, state.monitor_warned);
    // The hinge loss has exactly zero gradients once every margin is met.
    let mut guard = DivergenceGuard::new(
        &vars,
        cfg.loss_type == Some(LossType::Dpo(DpoLossType::Hinge)),
    )?;
    let mut acc = Accumulator::default();
    let (mut loss_sum, mut loss_steps) = (0.0f64, 0usize);
    let mut last_loss = None;
    progress.set_total(total as u64, state.global_step as u64);

    for step in state.global_step..total {
        let batches = step_batches(cfg, n, step);
        let ctx = StepContext {
            cfg,
            policy: &policy,
            policy_frozen: &frozen,
            reference: reference(false),
            pad_id: tokenizer.pad_id,
            device: &device,
        };
        let micro: Vec<Vec<(usize, &TrainExample)>> = batches
            .iter()
            .map(|b| b.iter().map(|&i| (i, &train_data.examples[i].1)).collect())
            .collect();
        let lr = cfg.learning_rate * lr_factor(&cfg.lr_scheduler_type, step, warmup, total);
        let outcome = optimizer_step(&ctx, &vars, &mut opt, &micro, lr, step, &mut acc)
            .inspect_err(|_| progress.abandon())?;
        let (step_loss, grad_norm) = (outcome.loss, outcome.grad_norm);
        state.total_tokens += outcome.tokens;
        let checked = guard
            .check_grads(&cfg.output_dir, step + 1, grad_norm)
            .inspect_err(|_| progress.abandon())?;
        if let Some(warning) = checked {
            progress.println(warning);
        }
        guard
            .check_weights(&vars, &cfg.output_dir, step + 1)
            .inspect_err(|_| progress.abandon())?;
        state.global_step = step + 1;
        loss_sum += step_loss;
        loss_steps += 1;
        progress.inc(1);

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
            if done {
                // Not a TRL metric: the run's peak resident memory, in its last log line.
                record.insert("peak_rss_mib".into(), crate::runtime::peak_rss_mib().into());
            }
            last_loss = Some(loss_sum / loss_steps as f64);
            (loss_sum, loss_steps) = (0.0, 0);
            if cfg.method == Method::Dpo {
                let get = |k: &str| record.get(k).and_then(Value::as_f64);
                if let Some(warning) = monitor.check(
                    get("rewards/chosen"),
                    get("rewards/margins"),
                    get("logps/chosen"),
                ) {
                    progress.println(format!("warning: {warning}"));
                    record.insert("warning".into(), "chosen_logps_falling".into());
                }
                state.monitor_warned = monitor.warned;
            }
            progress.println(human_line(&record));
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
                progress.println(human_line(&record));
                log.write(&record)?;
            }
        }
        checkpoint_or_stop(cfg, &save, &vars, &opt, &state, done, &progress)?;
    }
    progress.finish();
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
    let ctx = StepContext {
        cfg,
        policy,
        policy_frozen: policy,
        reference,
        pad_id,
        device: policy.device(),
    };
    let mut acc = Accumulator::default();
    let mut losses = Vec::new();
    let positions: Vec<usize> = (0..data.examples.len()).collect();
    for chunk in positions.chunks(cfg.per_device_eval_batch_size) {
        let examples: Vec<(usize, &TrainExample)> =
            chunk.iter().map(|&i| (i, &data.examples[i].1)).collect();
        let tokens = sft_token_count(std::slice::from_ref(&examples), cfg.max_length);
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

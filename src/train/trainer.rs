//! The offline training loop (SFT, DPO and its loss types, KTO, ORPO), top to bottom:
//! load → prepare data → policy (and reference) → [`Engine`] start → (reference cache) → for
//! each optimizer step: its micro-batches' losses ([`offline_losses`]) through
//! [`Engine::update`] → log / eval / checkpoint → final save.

use std::collections::HashMap;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::{Map, Value};

use super::config::{Method, TrainConfig};
use super::engine::{self, Engine, Plan};
use super::examples::{prepare_with, Prepared, TrainExample};
use super::method_options::LossType;
use super::metrics::{Accumulator, Monitor};
use super::policy::{build_policy, Policy};
use super::reference::reference_cache;
use super::step::{micro_batch, offline_losses, sft_token_count, RefLogps, Reference, StepContext};
use crate::error::Result;
use crate::loss::dpo::DpoLossType;
use crate::model::frozen_dtype::FrozenDtype;
use crate::model::Decoder;
use crate::model_io::load_model_as;

pub use super::engine::TrainSummary;

type RefCache = HashMap<usize, RefLogps>;

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

/// Runs training as configured. Progress and human lines go to stderr.
pub fn train(cfg: &TrainConfig) -> Result<TrainSummary> {
    let (device, progress) = engine::open(cfg)?;
    let frozen = FrozenDtype::parse(&cfg.frozen_dtype)?;
    let (base, tokenizer) = load_model_as(&cfg.model, &device, frozen)?;
    let prepare = |path, split: &str| {
        prepare_with(
            cfg.method,
            path,
            Some(split),
            &tokenizer,
            cfg.max_length,
            cfg.per_device_train_batch_size,
            cfg.assistant_only_loss,
        )
    };
    let train_data = prepare(&cfg.dataset, &cfg.dataset_train_split)?;
    let eval_data = match &cfg.eval_dataset {
        Some(path) => Some(prepare(path, &cfg.dataset_test_split)?),
        None => None,
    };
    if train_data.dropped > 0 {
        progress.println(format!(
            "note: dropped {} rows whose prompt is at least max_length ({}) tokens",
            train_data.dropped, cfg.max_length
        ));
    }

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
    let n = train_data.examples.len();
    let per_epoch = steps_per_epoch(cfg, n);
    let plan = Plan {
        vars,
        adapter_config,
        total: cfg
            .max_steps
            .unwrap_or_else(|| (cfg.num_train_epochs * per_epoch as f64).ceil() as usize),
        steps_per_epoch: per_epoch,
        // The hinge loss has exactly zero gradients once every margin is met.
        zero_grads_ok: cfg.loss_type == Some(LossType::Dpo(DpoLossType::Hinge)),
    };
    let mut engine = Engine::start(cfg, device, progress, plan)?;

    let needs_reference = matches!(cfg.method, Method::Dpo | Method::Kto);
    let pad_id = tokenizer.pad_id;
    let caches: Option<(RefCache, RefCache)> = if needs_reference && cfg.precompute_ref_log_probs {
        let train_cache = reference_cache(cfg, &reference_model, &train_data, "train", pad_id)?;
        let eval_cache = match &eval_data {
            Some(d) => reference_cache(cfg, &reference_model, d, "eval", pad_id)?,
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
    let reference = |eval: bool| match (&caches, &base) {
        (Some((t, e)), _) => Reference::Cached(if eval { e } else { t }),
        (None, Some(b)) => Reference::Model(b),
        _ => Reference::None,
    };
    let mut monitor = Monitor::new(cfg.beta, engine.state.monitor_warned);
    let device = engine.device.clone();

    for step in engine.steps() {
        let micro: Vec<Vec<(usize, &TrainExample)>> = step_batches(cfg, n, step)
            .iter()
            .map(|b| b.iter().map(|&i| (i, &train_data.examples[i].1)).collect())
            .collect();
        let ctx = StepContext {
            cfg,
            policy: &policy,
            policy_frozen: &frozen,
            reference: reference(false),
            pad_id,
            device: &device,
        };
        let outcome = engine.update(step, micro.len(), offline_losses(&ctx, &micro))?;
        if let Some(mut record) = engine.log_record(&outcome) {
            if cfg.method == Method::Dpo {
                let get = |k: &str| record.get(k).and_then(Value::as_f64);
                if let Some(warning) = monitor.check(
                    get("rewards/chosen"),
                    get("rewards/margins"),
                    get("logps/chosen"),
                ) {
                    engine.progress.println(format!("warning: {warning}"));
                    record.insert("warning".into(), "chosen_logps_falling".into());
                }
                engine.state.monitor_warned = monitor.warned;
            }
            engine.write(&record)?;
        }
        if let Some(eval) = &eval_data {
            let step = engine.state.global_step;
            if cfg.eval_steps.is_some_and(|e| step.is_multiple_of(e)) || engine.done() {
                let record = evaluate(cfg, &frozen, eval, reference(true), pad_id, step)?;
                engine.write(&record)?;
            }
        }
        engine.end_step()?;
    }
    engine.finish()
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

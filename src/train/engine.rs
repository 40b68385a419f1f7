//! The run around every method's steps: start (device, output folder and log, Ctrl-C, the
//! resolved config, optimizer, resume), [`Engine::update`] (one optimizer step through
//! [`super::update::update`]: backward → accumulate → non-finite guard → clip → schedule →
//! AdamW → divergence guard), [`Engine::log_record`] / [`Engine::write`] (TRL's metrics),
//! [`Engine::end_step`] (checkpoint, Ctrl-C) and [`Engine::finish`] (final save). The offline
//! loop ([`super::trainer`]) and GRPO's ([`super::grpo`]) are this engine around their own
//! micro-batch losses.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Var};
use serde_json::{Map, Value};

use super::checkpoint::{load_checkpoint, save_checkpoint, TrainerState};
use super::config::{Method, TrainConfig};
use super::divergence::DivergenceGuard;
use super::metrics::{human_line, Accumulator, MetricsLog};
use super::optimizer::AdamW;
use super::resume_check::{check_resume, RunIdentity};
use super::run_dir::{prepare_output_dir, prune_checkpoints, trim_metrics};
use super::schedule::{lr_factor, warmup_steps};
use super::update::{adamw, update, MicroLoss, StepOutcome};
use crate::error::{LeashError, Result};
use crate::kernels::autocast::{autocast, Autocast};
use crate::model::lora::AdapterConfig;
use crate::model_io::save_weights;
use crate::progress::Progress;

/// What a finished run reports.
pub struct TrainSummary {
    pub steps: usize,
    pub final_loss: Option<f64>,
    pub output_dir: PathBuf,
}

pub(crate) static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub fn install_ctrl_c() {
    // Errors only if a handler is already installed (e.g. a second run in one process).
    let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst));
}

/// The start of every run: the device first (one that cannot be had stops the run before its
/// output folder is touched), then the folder (refused or cleared, see [`super::run_dir`])
/// and its log (`train.log`, appended to on resume), whose first line names the device.
pub fn open(cfg: &TrainConfig) -> Result<(Device, Progress)> {
    let device = crate::device::resolve(cfg.device)?;
    prepare_output_dir(cfg)?;
    let progress = Progress::new("train", "step", 0).log_to(
        &cfg.output_dir.join("train.log"),
        cfg.resume_from_checkpoint.is_some(),
    )?;
    progress.println(crate::device::describe(&device));
    install_ctrl_c();
    Ok((device, progress))
}

/// Writes the resolved configuration to `output_dir/leash_config.json`: the options of this
/// run's method only (as TRL's per-method config classes save theirs), and the device the run
/// actually uses (`cpu`, `cuda:0`), not `auto`.
pub fn write_config(cfg: &TrainConfig, device: &Device) -> Result<()> {
    let mut resolved = cfg.clone();
    resolved.device = crate::device::DeviceChoice::of(device);
    resolved.bf16 = Some(bf16(cfg, device));
    let json = resolved.method_json();
    let path = cfg.output_dir.join("leash_config.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&json).unwrap_or_default(),
    )
    .map_err(|e| LeashError::io(&path, e, "check the output folder is writable"))
}

/// Whether the run trains in mixed precision: `--bf16` as given, else on for a GPU (TRL's
/// default) and off on the CPU.
pub fn bf16(cfg: &TrainConfig, device: &Device) -> bool {
    cfg.bf16.unwrap_or(!device.is_cpu())
}

/// What the engine trains and how long.
pub struct Plan {
    pub vars: Vec<(String, Var)>,
    /// `Some` for a LoRA run: checkpoints are PEFT adapters.
    pub adapter_config: Option<AdapterConfig>,
    /// Optimizer steps in the run.
    pub total: usize,
    /// Optimizer steps per epoch (the logged `epoch` is step ÷ this).
    pub steps_per_epoch: usize,
    /// The method can produce exactly zero gradients on a healthy step (DPO's hinge loss
    /// once every margin is met; GRPO's groups whose completions all score the same).
    pub zero_grads_ok: bool,
}

/// One training run in progress.
pub struct Engine<'c> {
    cfg: &'c TrainConfig,
    pub device: Device,
    pub progress: Progress,
    pub vars: Vec<(String, Var)>,
    adapter_config: Option<AdapterConfig>,
    opt: AdamW,
    pub state: TrainerState,
    guard: DivergenceGuard,
    log: MetricsLog,
    /// Metrics averaged between log steps (the methods add theirs).
    pub metrics: Accumulator,
    total: usize,
    warmup: usize,
    steps_per_epoch: usize,
    /// Losses since the last log (TRL logs their mean).
    window: (f64, usize),
    last_loss: Option<f64>,
    last_lr: f64,
    /// Mixed precision for everything the run computes on this thread, while it lasts.
    _autocast: Autocast,
}

impl<'c> Engine<'c> {
    /// Writes the resolved config, builds AdamW and restores `--resume-from-checkpoint`
    /// (weights, moments, step) after checking the checkpoint belongs to a compatible run.
    pub fn start(
        cfg: &'c TrainConfig,
        device: Device,
        mut progress: Progress,
        plan: Plan,
    ) -> Result<Self> {
        write_config(cfg, &device)?;
        let precision = bf16(cfg, &device).then_some(DType::BF16);
        if precision.is_some() {
            progress
                .println("mixed precision: bf16 matrix products, f32 weights and losses (--bf16)");
        }
        let mut opt = adamw(cfg, &plan.vars);
        let state = initial_state(cfg, &device, &plan.vars, &mut opt, &progress)?;
        let guard = DivergenceGuard::new(&plan.vars, plan.zero_grads_ok)?;
        let log = MetricsLog::open(&cfg.output_dir, cfg.resume_from_checkpoint.is_some())?
            .report_to(cfg)?;
        progress.set_total(plan.total as u64, state.global_step as u64);
        Ok(Engine {
            cfg,
            device,
            progress,
            vars: plan.vars,
            adapter_config: plan.adapter_config,
            opt,
            state,
            guard,
            log,
            metrics: Accumulator::default(),
            total: plan.total,
            warmup: warmup_steps(cfg.warmup_steps, cfg.warmup_ratio, plan.total),
            steps_per_epoch: plan.steps_per_epoch,
            window: (0.0, 0),
            last_loss: None,
            last_lr: cfg.learning_rate,
            _autocast: autocast(precision),
        })
    }

    /// The optimizer steps still to run (all of them, or those after the resumed one).
    pub fn steps(&self) -> Range<usize> {
        self.state.global_step..self.total
    }

    /// Optimizer step `step` (0-based) over `n_micro` micro-batches, `micro(i, metrics)`
    /// giving each one's loss; the learning rate follows the schedule.
    pub fn update(
        &mut self,
        step: usize,
        n_micro: usize,
        micro: impl FnMut(usize, &mut Accumulator) -> Result<MicroLoss>,
    ) -> Result<StepOutcome> {
        let cfg = self.cfg;
        let lr =
            cfg.learning_rate * lr_factor(&cfg.lr_scheduler_type, step, self.warmup, self.total);
        let outcome = update(
            cfg,
            &self.vars,
            &mut self.opt,
            Some(&mut self.guard),
            step,
            lr,
            n_micro,
            &mut self.metrics,
            micro,
        )
        .inspect_err(|_| self.progress.abandon())?;
        if let Some(warning) = &outcome.warning {
            self.progress.println(warning);
        }
        self.last_lr = lr;
        self.state.total_tokens += outcome.tokens;
        self.state.global_step = step + 1;
        self.window.0 += outcome.loss;
        self.window.1 += 1;
        self.progress.inc(1);
        Ok(outcome)
    }

    /// Whether the step just run is the last.
    pub fn done(&self) -> bool {
        self.state.global_step == self.total
    }

    /// At a logging step (every `logging_steps`, and the last): TRL's record — step, epoch,
    /// the loss averaged since the last log, this step's gradient norm, learning rate, tokens
    /// seen, the methods' averaged metrics — and the peak memory in the last one.
    pub fn log_record(&mut self, outcome: &StepOutcome) -> Option<Map<String, Value>> {
        let step = self.state.global_step;
        if !(step.is_multiple_of(self.cfg.logging_steps) || self.done()) {
            return None;
        }
        let mut record = Map::new();
        record.insert("step".into(), step.into());
        record.insert(
            "epoch".into(),
            (step as f64 / self.steps_per_epoch.max(1) as f64).into(),
        );
        let loss = self.window.0 / self.window.1.max(1) as f64;
        record.insert("loss".into(), loss.into());
        record.insert("grad_norm".into(), outcome.grad_norm.into());
        record.insert("learning_rate".into(), self.last_lr.into());
        // TRL's ORPO trainer does not count tokens.
        if self.cfg.method != Method::Orpo {
            record.insert("num_tokens".into(), (self.state.total_tokens as f64).into());
        }
        record.extend(self.metrics.take());
        if self.done() {
            // Not a TRL metric: the run's peak resident memory, in its last log line.
            record.insert("peak_rss_mib".into(), crate::runtime::peak_rss_mib().into());
        }
        self.last_loss = Some(loss);
        self.window = (0.0, 0);
        Some(record)
    }

    /// Prints `record` as one human line and appends it to the run's metrics.
    pub fn write(&mut self, record: &Map<String, Value>) -> Result<()> {
        self.progress.println(human_line(record));
        self.log.write(record)
    }

    /// Saves the run's weights (model or adapter) into `dir`.
    pub fn save_weights(&self, dir: &Path) -> Result<()> {
        save_weights(
            dir,
            &self.cfg.model,
            &self.vars,
            self.adapter_config.as_ref(),
        )
    }

    /// Writes `checkpoint-<step>` now (for a run that must stop, e.g. a failing reward).
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        save_checkpoint(
            &self.cfg.output_dir,
            &|dir| self.save_weights(dir),
            &self.vars,
            &self.opt,
            &self.state,
        )
    }

    /// After each step: a checkpoint every `save_steps`, at the end and on Ctrl-C (pruned to
    /// `save_total_limit`); after Ctrl-C the error that ends the run with a hint to resume.
    pub fn end_step(&mut self) -> Result<()> {
        let cfg = self.cfg;
        let interrupted = INTERRUPTED.load(Ordering::SeqCst);
        let step = self.state.global_step;
        if step.is_multiple_of(cfg.save_steps) || self.done() || interrupted {
            let dir = self.save_checkpoint()?;
            crate::report::run_report::refresh(cfg, &self.progress);
            self.progress
                .println(format!("saved checkpoint {}", dir.display()));
            for old in prune_checkpoints(&cfg.output_dir, cfg.save_total_limit)? {
                self.progress.println(format!(
                    "removed {} (save_total_limit {})",
                    old.display(),
                    cfg.save_total_limit.unwrap_or_default()
                ));
            }
        }
        if interrupted {
            self.progress.abandon();
            return Err(LeashError::Interrupted {
                message: format!("interrupted at step {step}; checkpoint saved"),
                hint: format!(
                    "continue with --resume-from-checkpoint {}",
                    cfg.output_dir.join(format!("checkpoint-{step}")).display()
                ),
            });
        }
        Ok(())
    }

    /// The final save into the output folder itself.
    pub fn finish(self) -> Result<TrainSummary> {
        self.progress.finish();
        self.save_weights(&self.cfg.output_dir)?;
        Ok(TrainSummary {
            steps: self.state.global_step,
            final_loss: self.last_loss,
            output_dir: self.cfg.output_dir.clone(),
        })
    }
}

/// The state a run starts from: fresh, or restored from `--resume-from-checkpoint` after
/// checking the checkpoint belongs to a compatible run.
fn initial_state(
    cfg: &TrainConfig,
    device: &Device,
    vars: &[(String, Var)],
    opt: &mut AdamW,
    progress: &Progress,
) -> Result<TrainerState> {
    let mut run = RunIdentity::of(cfg)?;
    run.bf16 = Some(bf16(cfg, device));
    let device = Some(crate::device::DeviceChoice::of(device).to_string());
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

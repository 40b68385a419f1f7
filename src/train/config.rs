//! Training options under TRL's names. Resolution order: method defaults < `--config run.toml`
//! (TRL's snake_case keys; unknown keys are an error) < command-line flags (kebab-case).
//! Each method takes only its own options, as TRL's per-method config classes
//! ([`super::method_options`]); `loss_type` is parsed there once, per method.
//! The resolved [`TrainConfig`] is written to the output folder before the first step.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::method_options::{self, LossType, Source};
use crate::device::DeviceChoice;
use crate::error::{read_text, LeashError, Result};
use crate::loss::grpo::ScaleRewards;

/// The training method (one trainer each, as in TRL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Sft,
    Dpo,
    Kto,
    Orpo,
    Grpo,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Sft => "sft",
            Method::Dpo => "dpo",
            Method::Kto => "kto",
            Method::Orpo => "orpo",
            Method::Grpo => "grpo",
        }
    }
}

/// Every option as given by a flag or a TOML key; `None` = not given.
#[derive(Debug, Clone, Default, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainArgs {
    /// TOML file with any of these options under TRL's snake_case names; flags override it.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Hugging Face checkpoint folder to start from (and, for DPO/IPO/KTO, the frozen reference).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training data: a .jsonl or .parquet file, a folder of shards, or a Hugging Face dataset
    /// folder (data/<split>-00000-of-0000N.parquet or <split>/*.parquet).
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Held-out data evaluated every --eval-steps and at the end (metrics prefixed `eval_`);
    /// same forms as --dataset (a dataset folder gives its --dataset-test-split).
    #[arg(long)]
    pub eval_dataset: Option<PathBuf>,
    /// Split of a dataset folder to train on. Default train.
    #[arg(long)]
    pub dataset_train_split: Option<String>,
    /// Split of an --eval-dataset folder to evaluate on. Default test.
    #[arg(long)]
    pub dataset_test_split: Option<String>,
    /// Where else to log metrics: none, or tensorboard (event files in <output-dir>/runs). Default none.
    #[arg(long)]
    pub report_to: Option<String>,
    /// Folder for metrics.jsonl, checkpoints and the final model.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Allow writing into an output folder that already holds another run.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub overwrite_output_dir: Option<bool>,
    /// Continue from a checkpoint-N folder of an earlier run (same trajectory).
    #[arg(long)]
    pub resume_from_checkpoint: Option<PathBuf>,
    /// β: strength of the pull towards the reference (DPO/IPO/KTO), the odds-ratio weight (ORPO),
    /// or the KL coefficient (GRPO; 0 loads no reference). Default 0.1 (GRPO: 0.0, as TRL).
    #[arg(long)]
    pub beta: Option<f64>,
    /// DPO loss: sigmoid (DPO), hinge (SLiC), ipo (IPO); default sigmoid. GRPO aggregation:
    /// grpo, dapo, dr_grpo; default dapo.
    #[arg(long)]
    pub loss_type: Option<String>,
    /// Conservative DPO: assumed probability that a preference label is flipped (sigmoid loss). Default 0.
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// Weight of an NLL term on chosen completions added to the DPO loss (RPO; TRL ≥ 1.0 spells it loss_type [sigmoid, sft]). Default 0 (off).
    #[arg(long)]
    pub rpo_alpha: Option<f64>,
    /// Peak learning rate. Defaults: 1e-6 (DPO/KTO/ORPO), 2e-5 (SFT), as TRL.
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// Rows (pairs, for preference data) per micro-batch; for GRPO, completions (prompts ×
    /// num_generations), as TRL. Default 8.
    #[arg(long)]
    pub per_device_train_batch_size: Option<usize>,
    /// Rows per evaluation batch. Default 8.
    #[arg(long)]
    pub per_device_eval_batch_size: Option<usize>,
    /// Micro-batches per optimizer step. Default 1.
    #[arg(long)]
    pub gradient_accumulation_steps: Option<usize>,
    /// Stop after this many optimizer steps (overrides --num-train-epochs); -1 = no limit, as
    /// TRL. Default -1.
    #[arg(long)]
    pub max_steps: Option<i64>,
    /// Passes over the training data. Default 3.
    #[arg(long)]
    pub num_train_epochs: Option<f64>,
    /// Truncate prompt+completion to this many tokens, keeping the start. Default 1024.
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Clip the global gradient norm to this (0 = off). Default 1.0.
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// constant, linear or cosine (after warm-up). Default linear, as TRL.
    #[arg(long)]
    pub lr_scheduler_type: Option<String>,
    /// Steps of linear warm-up from 0. Default 0.
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Warm-up as a fraction of all steps (used when --warmup-steps is 0). Default 0.
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// AdamW decoupled weight decay (never applied to norms and biases). Default 0.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// AdamW β1, the decay of the gradient's running mean. Default 0.9.
    #[arg(long)]
    pub adam_beta1: Option<f64>,
    /// AdamW β2, the decay of the squared gradient's running mean. Default 0.999.
    #[arg(long)]
    pub adam_beta2: Option<f64>,
    /// AdamW ε, added to the denominator for numerical stability. Default 1e-8.
    #[arg(long)]
    pub adam_epsilon: Option<f64>,
    /// Seed for shuffling. Default 42.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Shuffle rows each epoch (seeded). Default true (false for KTO, as TRL).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub shuffle: Option<bool>,
    /// Log metrics every N optimizer steps. Default 10.
    #[arg(long)]
    pub logging_steps: Option<usize>,
    /// Evaluate every N steps (needs --eval-dataset). Default: only at the end.
    #[arg(long)]
    pub eval_steps: Option<usize>,
    /// Save a checkpoint every N steps. Default 500.
    #[arg(long)]
    pub save_steps: Option<usize>,
    /// Keep only the newest N checkpoint-* folders, deleting older ones (TRL/transformers).
    /// Default: keep all.
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// KTO: loss weight of desirable (thumbs-up) rows. Default 1.
    #[arg(long)]
    pub desirable_weight: Option<f64>,
    /// KTO: loss weight of undesirable (thumbs-down) rows. Default 1.
    #[arg(long)]
    pub undesirable_weight: Option<f64>,
    /// Score the reference once before training and cache it in the output folder, so training
    /// needs no reference model in memory. Default false.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub precompute_ref_log_probs: Option<bool>,
    /// Score without padding: a pair's shared prompt is encoded once and sequences are packed
    /// into rows that never see each other (exact: same log-probs). ORPO always pads.
    /// Default true (TRL's default is false; there it changes results, here it does not).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub padding_free: Option<bool>,
    /// Keep only each decoder layer's input for backward and recompute the layer there: far
    /// less activation memory for a second forward of the layers (exact: same gradients).
    /// Default false (TRL's default is true; see the README on why leash differs).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub gradient_checkpointing: Option<bool>,
    /// Storage dtype of frozen weights (the reference model; the LoRA base): f32 (default)
    /// holds them in f32; auto keeps a bf16/f16 checkpoint's matrices in that dtype, upcast per
    /// use (exact, half the frozen memory, but slower: see BENCHMARKS.md); bf16 also rounds an
    /// f32 checkpoint (not exact). No TRL equivalent. Trainable weights and optimizer state are
    /// always f32.
    #[arg(long, value_parser = ["auto", "f32", "bf16"])]
    pub frozen_dtype: Option<String>,
    /// Where the model trains: auto (the GPU when this binary is built with `--features cuda`
    /// and a GPU is present, else the CPU), cpu, cuda (the first GPU) or cuda:N. Default auto;
    /// the run's leash_config.json records the device used.
    #[arg(long, value_parser = DeviceChoice::from_str)]
    pub device: Option<DeviceChoice>,
    /// SFT on conversations: train only on the assistant's tokens, those the chat template
    /// wraps in {% generation %} … {% endgeneration %} (TRL's swap to its training template
    /// included). Default false.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub assistant_only_loss: Option<bool>,
    /// Train a LoRA adapter instead of all weights; the frozen base (adapter off) is the reference.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub use_peft: Option<bool>,
    /// LoRA rank r. Default 16 (TRL).
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// LoRA α (the update is scaled by α/r). Default 32 (TRL).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Dropout on the adapter input while training. Default 0.05 (TRL).
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Comma-separated module names (e.g. q_proj,v_proj), all-linear, or a regular expression
    /// matching whole module paths (PEFT's string form, e.g. `.*\.(q|v)_proj`). Default: PEFT's per
    /// architecture (q_proj,v_proj for Llama/Qwen2; c_attn for GPT-2).
    #[arg(long)]
    pub lora_target_modules: Option<String>,
    /// Continue training an existing PEFT/leash adapter; the reference is the model with this
    /// adapter as it was at the start.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// GRPO: completions sampled per prompt (the group; ≥ 2). Default 8.
    #[arg(long)]
    pub num_generations: Option<usize>,
    /// GRPO: most tokens sampled per completion. Default 256.
    #[arg(long)]
    pub max_completion_length: Option<usize>,
    /// GRPO: sampling temperature (> 0). Default 1.0.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// GRPO: nucleus sampling mass (1 = off). Default 1.0.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// GRPO: lower clipping ε of the ratio π/π_old. Default 0.2.
    #[arg(long)]
    pub epsilon: Option<f64>,
    /// GRPO: upper clipping ε (DAPO suggests 0.28). Default: --epsilon.
    #[arg(long)]
    pub epsilon_high: Option<f64>,
    /// GRPO: policy updates (μ) per batch of generations. Default 1.
    #[arg(long)]
    pub num_iterations: Option<usize>,
    /// GRPO: divide advantages by the std of the group, of the batch, or none. Default group.
    #[arg(long)]
    pub scale_rewards: Option<String>,
    /// GRPO: leave completions that hit max_completion_length without EOS out of the loss.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub mask_truncated_completions: Option<bool>,
    /// GRPO: built-in rewards, comma-separated: correct, format, polite, length, arithmetic.
    #[arg(long, value_delimiter = ',')]
    pub reward_funcs: Option<Vec<String>>,
    /// GRPO: external reward command (repeatable): JSONL {prompt, completion, ...dataset columns}
    /// on stdin, one number per line on stdout.
    #[arg(long)]
    pub reward_cmd: Option<Vec<String>>,
    /// GRPO: one weight per reward (built-ins first, then commands). Default: all 1.
    #[arg(long, value_delimiter = ',')]
    pub reward_weights: Option<Vec<f64>>,
    /// GRPO: seconds before a reward command counts as hung. Default 300.
    #[arg(long)]
    pub reward_timeout: Option<u64>,
}

/// The resolved settings a run uses (written to `output_dir/leash_config.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub method: Method,
    pub model: PathBuf,
    pub dataset: PathBuf,
    pub eval_dataset: Option<PathBuf>,
    // Defaults so a leash_config.json written before these options existed still reads.
    #[serde(default = "default_train_split")]
    pub dataset_train_split: String,
    #[serde(default = "default_test_split")]
    pub dataset_test_split: String,
    #[serde(default = "default_report_to")]
    pub report_to: String,
    pub output_dir: PathBuf,
    pub overwrite_output_dir: bool,
    pub resume_from_checkpoint: Option<PathBuf>,
    pub beta: f64,
    /// DPO and GRPO only (typed per method, written under TRL's names); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_type: Option<LossType>,
    pub label_smoothing: f64,
    pub rpo_alpha: f64,
    pub learning_rate: f64,
    pub per_device_train_batch_size: usize,
    pub per_device_eval_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub max_steps: Option<usize>,
    pub num_train_epochs: f64,
    pub max_length: usize,
    pub max_grad_norm: f64,
    pub lr_scheduler_type: String,
    pub warmup_steps: usize,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub seed: u64,
    pub shuffle: bool,
    pub logging_steps: usize,
    pub eval_steps: Option<usize>,
    pub save_steps: usize,
    pub save_total_limit: Option<usize>,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
    pub precompute_ref_log_probs: bool,
    pub padding_free: bool,
    pub gradient_checkpointing: bool,
    /// auto, f32 or bf16 (see [`crate::model::frozen_dtype`]); absent from older configs.
    #[serde(default = "default_frozen_dtype")]
    pub frozen_dtype: String,
    /// As asked (`auto`) when resolved; the run's leash_config.json records the device used.
    /// Absent from configs written before it existed.
    #[serde(default)]
    pub device: DeviceChoice,
    /// Absent from configs written before it existed.
    #[serde(default)]
    pub assistant_only_loss: bool,
    pub use_peft: bool,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub lora_target_modules: Option<String>,
    pub adapter: Option<PathBuf>,
    pub num_generations: usize,
    pub max_completion_length: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub epsilon: f64,
    pub epsilon_high: Option<f64>,
    pub num_iterations: usize,
    pub scale_rewards: ScaleRewards,
    pub mask_truncated_completions: bool,
    pub reward_funcs: Vec<String>,
    pub reward_cmd: Vec<String>,
    pub reward_weights: Option<Vec<f64>>,
    pub reward_timeout: u64,
}

fn default_train_split() -> String {
    "train".into()
}

fn default_test_split() -> String {
    "test".into()
}

fn default_report_to() -> String {
    "none".into()
}

/// `--report-to` values (TRL's names).
pub const REPORT_TO: &[&str] = &["none", "tensorboard"];

fn defaults(method: Method) -> Value {
    let mut base = serde_json::json!({
        "method": method,
        "eval_dataset": null,
        "overwrite_output_dir": false,
        "resume_from_checkpoint": null,
        "beta": if method == Method::Grpo { 0.0 } else { 0.1 },
        "loss_type": match method {
            Method::Grpo => Value::from("dapo"),
            Method::Dpo => Value::from("sigmoid"),
            _ => Value::Null,
        },
        "label_smoothing": 0.0,
        "rpo_alpha": 0.0,
        "learning_rate": if method == Method::Sft { 2e-5 } else { 1e-6 },
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "max_steps": null,
        "num_train_epochs": 3.0,
        "max_length": 1024,
        "max_grad_norm": 1.0,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "warmup_ratio": 0.0,
        "weight_decay": 0.0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1e-8,
        "seed": 42,
        "shuffle": method != Method::Kto,
        "logging_steps": 10,
        "eval_steps": null,
        "save_steps": 500,
        "save_total_limit": null,
        "desirable_weight": 1.0,
        "undesirable_weight": 1.0,
        "precompute_ref_log_probs": false,
        "padding_free": true,
        "gradient_checkpointing": false,
        "assistant_only_loss": false,
        "use_peft": false,
        "lora_r": 16,
        "lora_alpha": 32.0,
        "lora_dropout": 0.05,
        "lora_target_modules": null,
        "adapter": null,
    });
    // GRPO's options (a second literal: one would exceed serde_json's macro recursion limit).
    let grpo = serde_json::json!({
        "num_generations": 8,
        "max_completion_length": 256,
        "temperature": 1.0,
        "top_p": 1.0,
        "epsilon": 0.2,
        "epsilon_high": null,
        "num_iterations": 1,
        "scale_rewards": "group",
        "mask_truncated_completions": false,
        "reward_funcs": [],
        "reward_cmd": [],
        "reward_weights": null,
        "reward_timeout": 300,
    });
    let io = serde_json::json!({
        "dataset_train_split": default_train_split(),
        "dataset_test_split": default_test_split(),
        "report_to": default_report_to(),
        "frozen_dtype": default_frozen_dtype(),
        "device": DeviceChoice::Auto,
    });
    for extra in [grpo, io] {
        if let (Value::Object(m), Value::Object(g)) = (&mut base, extra) {
            m.extend(g);
        }
    }
    base
}

fn given(args: &TrainArgs) -> Map<String, Value> {
    match serde_json::to_value(args) {
        Ok(Value::Object(m)) => m.into_iter().filter(|(_, v)| !v.is_null()).collect(),
        _ => Map::new(),
    }
}

/// Reads a TOML file of options.
pub fn read_toml(path: &Path) -> Result<TrainArgs> {
    let text = read_text(path)?;
    toml::from_str(&text).map_err(|e| {
        LeashError::file(
            path,
            format!("invalid config: {}", e.message()),
            "keys are TRL's snake_case option names (e.g. learning_rate, per_device_train_batch_size); see `leash dpo --help`",
        )
    })
}

fn default_frozen_dtype() -> String {
    // `auto` is exact and saves memory but upcasts every frozen matrix per product, which
    // made a release LoRA DPO step 2.2x slower (BENCHMARKS.md): memory is the user's choice.
    "f32".into()
}

pub const SCHEDULERS: &[&str] = &["constant", "linear", "cosine"];

/// Merges defaults < TOML < flags and checks every value and combination.
pub fn resolve(method: Method, flags: &TrainArgs) -> Result<TrainConfig> {
    let mut merged = match defaults(method) {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    if let Some(path) = &flags.config {
        let from_file = given(&read_toml(path)?);
        method_options::check(method, &from_file, Source::File(path, &read_text(path)?))?;
        merged.extend(from_file);
    }
    let from_flags = given(flags);
    method_options::check(method, &from_flags, Source::Flags)?;
    merged.extend(from_flags);
    let loss_type = match merged.remove("loss_type") {
        Some(Value::String(name)) => method_options::parse_loss_type(method, Some(name.as_str()))?,
        _ => None,
    };
    resolve_max_steps(&mut merged)?;
    for key in ["model", "dataset", "output_dir"] {
        if !merged.contains_key(key) {
            return Err(LeashError::usage(
                format!("missing --{}", key.replace('_', "-")),
                format!("pass --{} or set {key} in --config", key.replace('_', "-")),
            ));
        }
    }
    // Parsed here for its own message; serde then reads the same name into the enum.
    if let Some(Value::String(name)) = merged.get("scale_rewards") {
        ScaleRewards::parse(name)?;
    }
    let mut cfg: TrainConfig = serde_json::from_value(Value::Object(merged)).map_err(|e| {
        LeashError::usage(format!("invalid option: {e}"), "check the option's type")
    })?;
    cfg.loss_type = loss_type;
    validate(&cfg)?;
    Ok(cfg)
}

/// TRL's `max_steps`: −1 (its default) means no limit, i.e. `num_train_epochs` decides; 0
/// would train nothing and write the untouched model as the result, so it is refused.
fn resolve_max_steps(merged: &mut Map<String, Value>) -> Result<()> {
    let Some(v) = merged.get("max_steps").filter(|v| !v.is_null()) else {
        return Ok(());
    };
    match v.as_i64() {
        Some(-1) => {
            merged.insert("max_steps".into(), Value::Null);
            Ok(())
        }
        Some(n) if n >= 1 => Ok(()),
        _ => Err(LeashError::usage(
            format!("max_steps must be ≥ 1 or -1 (got {v})"),
            "--max-steps 0 would train nothing; pass the number of optimizer steps, or -1 (the default) to train for --num-train-epochs",
        )),
    }
}

fn validate(cfg: &TrainConfig) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> TrainArgs {
        TrainArgs {
            model: Some("m".into()),
            dataset: Some("d".into()),
            output_dir: Some("o".into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_follow_trl() {
        let dpo = resolve(Method::Dpo, &args()).unwrap();
        assert_eq!(
            (dpo.learning_rate, dpo.beta, dpo.shuffle),
            (1e-6, 0.1, true)
        );
        let sft = resolve(Method::Sft, &args()).unwrap();
        assert_eq!(sft.learning_rate, 2e-5);
        assert!(!resolve(Method::Kto, &args()).unwrap().shuffle);
        let mut a = args();
        a.reward_funcs = Some(vec!["length".into()]);
        let grpo = resolve(Method::Grpo, &a).unwrap();
        assert_eq!(
            (grpo.beta, grpo.loss_type, grpo.num_generations),
            (
                0.0,
                Some(LossType::Grpo(crate::loss::grpo::GrpoLossType::Dapo)),
                8
            )
        );
        assert_eq!(
            (grpo.epsilon, grpo.scale_rewards),
            (0.2, ScaleRewards::Group)
        );
    }

    #[test]
    fn grpo_rejects_groups_of_one_and_missing_rewards() {
        let mut a = args();
        a.reward_funcs = Some(vec!["length".into()]);
        a.num_generations = Some(1);
        let err = resolve(Method::Grpo, &a).unwrap_err().to_string();
        assert!(
            err.contains("num_generations must be ≥ 2") && err.contains("hint:"),
            "{err}"
        );
        let err = resolve(Method::Grpo, &args()).unwrap_err().to_string();
        assert!(err.contains("needs a reward"), "{err}");
        let mut a = args();
        a.reward_funcs = Some(vec!["length".into()]);
        a.reward_weights = Some(vec![1.0, 2.0]);
        let err = resolve(Method::Grpo, &a).unwrap_err().to_string();
        assert!(err.contains("2 reward weights for 1"), "{err}");
    }

    #[test]
    fn flags_override_toml_and_unknown_keys_fail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, "beta = 0.3\nlearning_rate = 1e-4\n").unwrap();
        let mut a = args();
        a.config = Some(path.clone());
        a.beta = Some(0.5);
        let cfg = resolve(Method::Dpo, &a).unwrap();
        assert_eq!((cfg.beta, cfg.learning_rate), (0.5, 1e-4));
        std::fs::write(&path, "betta = 0.3\n").unwrap();
        let err = resolve(Method::Dpo, &a).unwrap_err().to_string();
        assert!(err.contains("unknown field `betta`"), "{err}");
    }

    #[test]
    fn max_steps_minus_one_is_no_limit_and_zero_is_refused() {
        let mut a = args();
        a.max_steps = Some(-1);
        assert_eq!(resolve(Method::Sft, &a).unwrap().max_steps, None);
        a.max_steps = Some(7);
        assert_eq!(resolve(Method::Sft, &a).unwrap().max_steps, Some(7));
        for bad in [0, -2] {
            a.max_steps = Some(bad);
            let err = resolve(Method::Sft, &a).unwrap_err().to_string();
            assert!(
                err.contains("max_steps must be ≥ 1 or -1") && err.contains("hint:"),
                "{err}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, "max_steps = -1\nsave_total_limit = 2\n").unwrap();
        let mut a = args();
        a.config = Some(path);
        let cfg = resolve(Method::Sft, &a).unwrap();
        assert_eq!((cfg.max_steps, cfg.save_total_limit), (None, Some(2)));
    }

    #[test]
    fn device_defaults_to_auto_and_comes_from_toml_or_flags() {
        assert_eq!(
            resolve(Method::Dpo, &args()).unwrap().device,
            DeviceChoice::Auto
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, "device = \"cuda:1\"\n").unwrap();
        let mut a = args();
        a.config = Some(path.clone());
        assert_eq!(
            resolve(Method::Sft, &a).unwrap().device,
            DeviceChoice::Cuda(1)
        );
        a.device = Some(DeviceChoice::Cpu);
        assert_eq!(resolve(Method::Sft, &a).unwrap().device, DeviceChoice::Cpu);
        std::fs::write(&path, "device = \"gpu\"\n").unwrap();
        let err = resolve(Method::Sft, &a).unwrap_err().to_string();
        assert!(
            err.contains("`gpu` is not a device")
                && err.contains("cuda:N")
                && err.contains("hint:"),
            "{err}"
        );
    }

    #[test]
    fn invalid_values_are_rejected_with_the_valid_ones() {
        let mut a = args();
        a.beta = Some(0.0);
        assert!(resolve(Method::Dpo, &a)
            .unwrap_err()
            .to_string()
            .contains("beta must be > 0"));
        let mut a = args();
        a.loss_type = Some("nope".into());
        assert!(resolve(Method::Dpo, &a)
            .unwrap_err()
            .to_string()
            .contains("sigmoid, hinge, ipo"));
        let mut a = args();
        a.per_device_train_batch_size = Some(1);
        assert!(resolve(Method::Kto, &a)
            .unwrap_err()
            .to_string()
            .contains("≥ 2"));
    }
}

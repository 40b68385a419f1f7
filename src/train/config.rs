//! Training options under TRL's names. Resolution order: method defaults < `--config run.toml`
//! (TRL's snake_case keys; unknown keys are an error) < command-line flags (kebab-case).
//! Each method takes only its own options, as TRL's per-method config classes
//! ([`super::method_options`]); `loss_type` is parsed there once, per method.
//! The options as given are [`super::args::TrainArgs`]; the resolved [`TrainConfig`] is checked
//! by [`super::validate`] and written to the output folder before the first step.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use super::args::TrainArgs;
use super::method_options::{self, LossType, Source};
use super::validate::validate;
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
    /// Mixed precision; `None` (the default, so absent from the defaults above): on for a GPU,
    /// off on the CPU. The run's leash_config.json records what it used.
    #[serde(default)]
    pub bf16: Option<bool>,
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
        let hint = "keys are TRL's snake_case option names (e.g. learning_rate, per_device_train_batch_size) with their types; see `leash dpo --help`";
        match e.span() {
            // The line the parser stopped at, quoted, so a wrong value names its key.
            Some(span) => {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                let quoted = text.lines().nth(line - 1).unwrap_or_default().trim();
                let message = format!("invalid config `{quoted}`: {}", e.message());
                LeashError::row(path, line, message, hint)
            }
            None => LeashError::file(path, format!("invalid config: {}", e.message()), hint),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_value_of_the_wrong_type_names_its_file_line_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, "beta = 0.1\nbf16 = \"yes\"\n").unwrap();
        let err = read_toml(&path).unwrap_err().to_string();
        assert!(
            err.contains("run.toml:2")
                && err.contains("`bf16 = \"yes\"`")
                && err.contains("boolean"),
            "{err}"
        );
        assert!(err.contains("hint:"), "{err}");
    }

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

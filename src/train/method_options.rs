//! Which options each method takes, mirroring TRL 1.16's one config class per method
//! (`SFTConfig`, `DPOConfig`, `KTOConfig`, `trl.experimental` `ORPOConfig`, `GRPOConfig`;
//! `TrainingArguments`' options go to every method). Passing a method an option it does not
//! have is a `TypeError` in TRL; here it is an error naming the option, the method and the
//! methods that take it (before this table, `leash dpo --num-generations 4` ran and ignored
//! it). Only options the user set count: a flag or a `--config` key, never a default.
//!
//! Also `loss_type`, which names different losses per method, parsed once into [`LossType`].

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::config::Method;
use crate::error::{LeashError, Result};
use crate::loss::dpo::DpoLossType;
use crate::loss::grpo::GrpoLossType;
use Method::{Dpo, Grpo, Kto, Orpo, Sft};

const ALL: &[Method] = &[Sft, Dpo, Kto, Orpo, Grpo];
/// β: the pull towards the reference (DPO, KTO), ORPO's odds-ratio weight, GRPO's KL weight.
const BETA: &[Method] = &[Dpo, Kto, Orpo, Grpo];
/// Methods that train on a data set of fixed completions (GRPO samples its own).
const OFFLINE: &[Method] = &[Sft, Dpo, Kto, Orpo];
const GRPO: &[Method] = &[Grpo];

/// Every field of `TrainArgs` (its snake_case name: the `--config` key) and the methods that
/// take it. A test walks `TrainArgs`' flags, so a new option missing here fails it. Rows
/// that differ from TRL say why.
pub const OPTIONS: &[(&str, &[Method])] = &[
    ("config", ALL),
    ("model", ALL),
    ("dataset", ALL),
    // leash's GRPO trainer does not evaluate (TRL's does): its eval options would be ignored.
    ("eval_dataset", OFFLINE),
    ("dataset_train_split", ALL),
    ("dataset_test_split", OFFLINE),
    ("report_to", ALL),
    ("output_dir", ALL),
    ("overwrite_output_dir", ALL),
    ("resume_from_checkpoint", ALL),
    ("beta", BETA),
    // TRL's SFTConfig (`nll`, `dft`) and KTOConfig (`kto`, `apo_zero_unpaired`) have a
    // loss_type too; leash implements only their defaults, so they take none.
    ("loss_type", &[Dpo, Grpo]),
    ("label_smoothing", &[Dpo]),
    // TRL < 1.0's DPOConfig.rpo_alpha.
    ("rpo_alpha", &[Dpo]),
    ("learning_rate", ALL),
    ("per_device_train_batch_size", ALL),
    ("per_device_eval_batch_size", OFFLINE),
    ("gradient_accumulation_steps", ALL),
    ("max_steps", ALL),
    ("num_train_epochs", ALL),
    // GRPO bounds completions by max_completion_length (TRL's GRPOConfig has no max_length).
    ("max_length", OFFLINE),
    ("max_grad_norm", ALL),
    ("lr_scheduler_type", ALL),
    ("warmup_steps", ALL),
    ("warmup_ratio", ALL),
    ("weight_decay", ALL),
    ("adam_beta1", ALL),
    ("adam_beta2", ALL),
    ("adam_epsilon", ALL),
    ("seed", ALL),
    // TRL: shuffle_dataset (SFT, GRPO) or the Trainer's sampler; every leash trainer reads it.
    ("shuffle", ALL),
    ("logging_steps", ALL),
    ("eval_steps", OFFLINE),
    ("save_steps", ALL),
    ("save_total_limit", ALL),
    ("desirable_weight", &[Kto]),
    ("undesirable_weight", &[Kto]),
    ("precompute_ref_log_probs", &[Dpo, Kto]),
    // TRL: SFT and DPO. leash's packing is exact, so KTO and GRPO use it too; ORPO always pads.
    ("padding_free", &[Sft, Dpo, Kto, Grpo]),
    ("gradient_checkpointing", ALL),
    ("bf16", ALL),
    // leash's (no TRL counterpart): the reference, and the LoRA base under any method.
    ("frozen_dtype", ALL),
    // TRL/transformers place the model through accelerate (`use_cpu`, CUDA_VISIBLE_DEVICES).
    ("device", ALL),
    ("assistant_only_loss", &[Sft]),
    ("use_peft", ALL),
    ("lora_r", ALL),
    ("lora_alpha", ALL),
    ("lora_dropout", ALL),
    ("lora_target_modules", ALL),
    ("adapter", ALL),
    ("num_generations", GRPO),
    // TRL's ORPOConfig has one, for encoder-decoder truncation only; leash's ORPO has none.
    ("max_completion_length", GRPO),
    ("temperature", GRPO),
    ("top_p", GRPO),
    ("epsilon", GRPO),
    ("epsilon_high", GRPO),
    ("num_iterations", GRPO),
    ("scale_rewards", GRPO),
    ("mask_truncated_completions", GRPO),
    ("reward_funcs", GRPO),
    ("reward_cmd", GRPO),
    ("reward_weights", GRPO),
    ("reward_timeout", GRPO),
];

/// The methods that take `option`, or `None` for a name not in the table.
pub fn methods_of(option: &str) -> Option<&'static [Method]> {
    OPTIONS
        .iter()
        .find(|(name, _)| *name == option)
        .map(|(_, methods)| *methods)
}

impl super::config::TrainConfig {
    /// The resolved options of this run's method only, as TRL's per-method config classes
    /// save theirs (`leash_config.json`, TensorBoard's `args`): a DPO run's record lists no
    /// GRPO sampling options.
    pub fn method_json(&self) -> Value {
        let mut json = serde_json::to_value(self).unwrap_or_default();
        if let Value::Object(fields) = &mut json {
            fields.retain(|key, _| methods_of(key).is_none_or(|m| m.contains(&self.method)));
        }
        json
    }
}

/// The method as TRL's class names spell it (DPO, GRPO, …).
fn upper(method: Method) -> String {
    method.name().to_uppercase()
}

/// "GRPO", "DPO and KTO", "DPO, KTO, ORPO and GRPO".
fn join_and(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

fn join_or(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// Where a set option came from, for the error's hint.
pub enum Source<'a> {
    Flags,
    /// A `--config` file and its text (to find the key's line).
    File(&'a std::path::Path, &'a str),
}

/// Refuses the first option in `given` (options set explicitly) that `method` does not take.
pub fn check(method: Method, given: &Map<String, Value>, source: Source) -> Result<()> {
    for key in given.keys() {
        let Some(methods) = methods_of(key) else {
            return Err(LeashError::usage(
                format!("option `{key}` is missing from leash's table of per-method options"),
                "this is a bug in leash: add it to OPTIONS in src/train/method_options.rs",
            ));
        };
        if methods.contains(&method) {
            continue;
        }
        let owners: Vec<String> = methods.iter().map(|m| upper(*m)).collect();
        let message = format!(
            "`{key}` is a{} {} option; `leash {}` does not use it",
            if owners[0].starts_with(['A', 'E', 'I', 'O', 'U', 'S']) {
                "n"
            } else {
                ""
            },
            join_and(&owners),
            method.name()
        );
        let runs: Vec<String> = methods
            .iter()
            .map(|m| format!("`leash {}`", m.name()))
            .collect();
        return Err(match source {
            Source::Flags => LeashError::usage(
                message,
                format!(
                    "drop --{}, or run {}",
                    key.replace('_', "-"),
                    join_or(&runs)
                ),
            ),
            Source::File(path, text) => LeashError::row(
                path,
                key_line(text, key),
                message,
                format!(
                    "remove `{key}` from {}, or run {}",
                    path.display(),
                    join_or(&runs)
                ),
            ),
        });
    }
    Ok(())
}

/// 1-based line of `key = …` in a TOML text (1 if not found, e.g. an inline table).
fn key_line(text: &str, key: &str) -> usize {
    text.lines()
        .position(|line| {
            let l = line.trim_start();
            let rest = l
                .strip_prefix(key)
                .or_else(|| l.strip_prefix(&format!("\"{key}\"")))
                .or_else(|| l.strip_prefix(&format!("'{key}'")));
            rest.is_some_and(|r| r.trim_start().starts_with('='))
        })
        .map_or(1, |i| i + 1)
}

/// `loss_type` parsed at resolve time; DPO and GRPO name different losses. Serialized under
/// TRL's names (`sigmoid`, `dapo`, …); the two value sets are disjoint, so it reads back.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LossType {
    Dpo(DpoLossType),
    Grpo(GrpoLossType),
}

/// The typed `loss_type` for `method` from its resolved string (`None` for methods that take
/// none, see [`OPTIONS`]).
pub fn parse_loss_type(method: Method, name: Option<&str>) -> Result<Option<LossType>> {
    match (method, name) {
        (Dpo, Some(n)) => {
            if GrpoLossType::parse(n).is_ok() {
                return Err(LeashError::usage(
                    format!("loss_type `{n}` is a GRPO loss; `leash dpo` does not have it"),
                    format!(
                        "DPO's loss types: {}",
                        crate::loss::dpo::LOSS_TYPES.join(", ")
                    ),
                ));
            }
            Ok(Some(LossType::Dpo(DpoLossType::parse(n)?)))
        }
        (Grpo, Some(n)) => {
            if DpoLossType::parse(n).is_ok() {
                return Err(LeashError::usage(
                    format!("loss_type `{n}` is a DPO loss; `leash grpo` does not have it"),
                    format!(
                        "GRPO's loss types: {}",
                        crate::loss::grpo::LOSS_TYPES.join(", ")
                    ),
                ));
            }
            Ok(Some(LossType::Grpo(GrpoLossType::parse(n)?)))
        }
        _ => Ok(None),
    }
}

/// A DPO or GRPO trainer given a config resolved for another method (only a hand-built one).
fn wrong_method(want: &str, got: Option<LossType>) -> LeashError {
    LeashError::usage(
        format!("the resolved config has no {want} loss_type (got {got:?})"),
        "build the config with train::config::resolve for the method that is trained",
    )
}

impl LossType {
    pub fn dpo(this: Option<Self>) -> Result<DpoLossType> {
        match this {
            Some(LossType::Dpo(t)) => Ok(t),
            other => Err(wrong_method("DPO", other)),
        }
    }

    pub fn grpo(this: Option<Self>) -> Result<GrpoLossType> {
        match this {
            Some(LossType::Grpo(t)) => Ok(t),
            other => Err(wrong_method("GRPO", other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_train_arg_is_in_the_table_once() {
        let cmd =
            <super::super::config::TrainArgs as clap::Args>::augment_args(clap::Command::new("t"));
        let ids: Vec<String> = cmd
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .collect();
        for id in &ids {
            assert!(methods_of(id).is_some(), "`{id}` missing from OPTIONS");
        }
        assert_eq!(ids.len(), OPTIONS.len(), "OPTIONS has a row with no flag");
    }

    #[test]
    fn key_line_finds_plain_and_quoted_keys() {
        let text = "# c\nbeta = 0.1\n  \"top_p\"=1\nbetas = 2\n";
        assert_eq!(key_line(text, "beta"), 2);
        assert_eq!(key_line(text, "top_p"), 3);
        assert_eq!(key_line(text, "temperature"), 1);
    }

    #[test]
    fn loss_types_read_back_under_trls_names() {
        for (t, name) in [
            (LossType::Dpo(DpoLossType::Ipo), "\"ipo\""),
            (LossType::Grpo(GrpoLossType::DrGrpo), "\"dr_grpo\""),
        ] {
            assert_eq!(serde_json::to_string(&t).unwrap(), name);
            assert_eq!(serde_json::from_str::<LossType>(name).unwrap(), t);
        }
        let err = parse_loss_type(Dpo, Some("dapo")).unwrap_err().to_string();
        assert!(err.contains("GRPO loss") && err.contains("hint:"), "{err}");
        assert_eq!(parse_loss_type(Sft, None).unwrap(), None);
    }
}

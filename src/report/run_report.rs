//! Every training run's own report: `plots/*.png` of the curves its metrics.jsonl holds (loss,
//! implicit rewards, log-probs per sequence and per token, KL/entropy, GRPO rewards, learning
//! rate, eval curves) and `report.md` linking them under a table of the final metrics. Redrawn
//! at every checkpoint and at the end, so a long run can be looked at while it trains.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::plot::{line_plot, Series};
use crate::error::{read_text, LeashError, Result};
use crate::train::config::TrainConfig;

/// (file, title, y-axis label, keys). A plot is drawn when any of its keys was logged.
pub const PLOTS: &[(&str, &str, &str, &[&str])] = &[
    ("loss.png", "Loss", "loss", &["loss", "eval_loss"]),
    (
        "rewards.png",
        "Implicit rewards β·log(π/π_ref)",
        "reward (nats × β)",
        &["rewards/chosen", "rewards/rejected", "rewards/margins"],
    ),
    (
        "reward_accuracy.png",
        "Implicit-reward accuracy",
        "fraction of pairs",
        &["rewards/accuracies", "eval_rewards/accuracies"],
    ),
    (
        "logps.png",
        "Sequence log-probs (policy)",
        "log p (nats)",
        &["logps/chosen", "logps/rejected"],
    ),
    (
        "logps_per_token.png",
        "Per-token log-probs (policy)",
        "log p per token (nats)",
        &["logps/chosen_per_token", "logps/rejected_per_token"],
    ),
    ("kl.png", "KL and entropy", "nats", &["kl", "entropy"]),
    (
        "grpo_reward.png",
        "GRPO reward",
        "reward",
        &["reward", "reward_std"],
    ),
    (
        "sft.png",
        "Token accuracy",
        "fraction of tokens",
        &["mean_token_accuracy", "eval_mean_token_accuracy"],
    ),
    (
        "grad_norm.png",
        "Gradient norm (before clipping)",
        "‖∇‖",
        &["grad_norm"],
    ),
    (
        "learning_rate.png",
        "Learning rate",
        "learning rate",
        &["learning_rate"],
    ),
    (
        "eval_rewards.png",
        "Eval implicit rewards",
        "reward (nats × β)",
        &[
            "eval_rewards/chosen",
            "eval_rewards/rejected",
            "eval_rewards/margins",
        ],
    ),
    (
        "eval_logps.png",
        "Eval sequence log-probs",
        "log p (nats)",
        &["eval_logps/chosen", "eval_logps/rejected"],
    ),
];

/// Metric rows of a metrics.jsonl (unparseable lines are skipped: a run killed mid-write).
pub fn read_records(metrics: &Path) -> Result<Vec<Map<String, Value>>> {
    Ok(read_text(metrics)?
        .lines()
        .filter_map(|l| match serde_json::from_str(l) {
            Ok(Value::Object(m)) => Some(m),
            _ => None,
        })
        .collect())
}

fn series(records: &[Map<String, Value>], key: &str) -> Series {
    Series {
        name: key.to_string(),
        points: records
            .iter()
            .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(key)?.as_f64()?)))
            .collect(),
    }
}

/// The last value of every numeric key, train and eval apart.
fn final_metrics(records: &[Map<String, Value>]) -> (Map<String, Value>, Map<String, Value>) {
    let (mut train, mut eval) = (Map::new(), Map::new());
    for r in records {
        let target = if r.keys().any(|k| k.starts_with("eval_")) {
            &mut eval
        } else {
            &mut train
        };
        for (k, v) in r {
            if v.is_number() {
                target.insert(k.clone(), v.clone());
            }
        }
    }
    (train, eval)
}

fn fmt_value(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if v.is_i64() || v.is_u64() => format!("{x:.0}"),
        Some(x) if x != 0.0 && (x.abs() < 1e-3 || x.abs() >= 1e5) => format!("{x:.4e}"),
        Some(x) => format!("{x:.4}"),
        None => v.to_string(),
    }
}

/// Draws `dir/plots/*.png` from `dir/metrics.jsonl` and writes `dir/report.md`.
pub fn write_run_report(dir: &Path, cfg: &TrainConfig) -> Result<PathBuf> {
    let records = read_records(&dir.join("metrics.jsonl"))?;
    let plots = dir.join("plots");
    std::fs::create_dir_all(&plots)
        .map_err(|e| LeashError::io(&plots, e, "check the output folder is writable"))?;
    let mut md = String::new();
    let _ = writeln!(md, "# leash {} run\n", cfg.method.name());
    let _ = writeln!(
        md,
        "Model `{}`, data `{}`{}. Options: `leash_config.json`; every logged number: `metrics.jsonl`.\n",
        cfg.model.display(),
        cfg.dataset.display(),
        cfg.eval_dataset
            .as_ref()
            .map(|e| format!(", eval data `{}`", e.display()))
            .unwrap_or_default()
    );
    let (train, eval) = final_metrics(&records);
    for (heading, table) in [
        ("Final training metrics", &train),
        ("Final eval metrics", &eval),
    ] {
        if table.is_empty() {
            continue;
        }
        let _ = writeln!(md, "## {heading}\n\n| metric | value |\n|---|---|");
        for (k, v) in table {
            let _ = writeln!(md, "| {k} | {} |", fmt_value(v));
        }
        md.push('\n');
    }
    let _ = writeln!(md, "## Curves\n");
    let mut failures = Vec::new();
    for (file, title, y_label, keys) in PLOTS {
        let lines: Vec<Series> = keys
            .iter()
            .map(|k| series(&records, k))
            .filter(|s| !s.points.is_empty())
            .collect();
        if lines.is_empty() {
            continue;
        }
        match line_plot(&plots.join(file), title, "step", y_label, &lines) {
            Ok(()) => {
                let _ = writeln!(md, "![{title}](plots/{file})\n");
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    if !failures.is_empty() {
        let _ = writeln!(md, "Plots not drawn:\n\n```\n{}\n```", failures.join("\n"));
    }
    let path = dir.join("report.md");
    std::fs::write(&path, md)
        .map_err(|e| LeashError::io(&path, e, "check the output folder is writable"))?;
    Ok(path)
}

/// [`write_run_report`] for the trainers: a report that cannot be drawn is a warning, never
/// the end of a run whose weights are fine.
pub fn refresh(cfg: &TrainConfig, progress: &crate::progress::Progress) {
    if let Err(e) = write_run_report(&cfg.output_dir, cfg) {
        progress.println(format!("warning: report.md not updated: {e}"));
    }
}

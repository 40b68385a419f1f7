//! Metric bookkeeping: averages micro-batch values between log steps (as TRL does), writes
//! `metrics.jsonl` (one object per logged step, TRL's names), prints one human line, and runs
//! the failure-mode monitor.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::config::TrainConfig;
use super::step::Metrics;
use crate::error::{LeashError, Result};
use crate::report::tensorboard::EventWriter;

/// Sums and counts of each metric since the last log.
#[derive(Default)]
pub struct Accumulator {
    sums: BTreeMap<String, (f64, usize)>,
}

impl Accumulator {
    pub fn add(&mut self, metrics: &Metrics) {
        for (k, v) in metrics {
            self.add_one(k, *v);
        }
    }

    /// One value under a name built at run time (e.g. `rewards/<name>/mean`).
    pub fn add_one(&mut self, key: &str, value: f64) {
        let e = self.sums.entry(key.to_string()).or_insert((0.0, 0));
        e.0 += value;
        e.1 += 1;
    }

    /// Averages and clears.
    pub fn take(&mut self) -> Map<String, Value> {
        let out = self
            .sums
            .iter()
            .map(|(k, (s, n))| (k.clone(), Value::from(s / *n as f64)))
            .collect();
        self.sums.clear();
        out
    }
}

/// Appends JSON lines to `output_dir/metrics.jsonl` (and, with `--report-to tensorboard`,
/// the same numbers to an event file).
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
    tensorboard: Option<EventWriter>,
}

impl MetricsLog {
    pub fn open(output_dir: &Path, append: bool) -> Result<Self> {
        let path = output_dir.join("metrics.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(&path)
            .map_err(|e| LeashError::io(&path, e, "check the output folder is writable"))?;
        Ok(MetricsLog {
            path,
            file,
            tensorboard: None,
        })
    }

    /// Also writes to the places `cfg.report_to` names: TensorBoard event files under
    /// `output_dir/runs` (transformers' default logging_dir), starting with the config as text.
    pub fn report_to(mut self, cfg: &TrainConfig) -> Result<Self> {
        if cfg.report_to == "tensorboard" {
            let mut w = EventWriter::create(&cfg.output_dir.join("runs"))?;
            let config = serde_json::to_string_pretty(cfg).unwrap_or_default();
            // Indented four spaces: TensorBoard renders text as Markdown, this keeps it a code block.
            w.text(
                "args",
                &config
                    .lines()
                    .map(|l| format!("    {l}\n"))
                    .collect::<String>(),
            )?;
            self.tensorboard = Some(w);
        }
        Ok(self)
    }

    pub fn write(&mut self, record: &Map<String, Value>) -> Result<()> {
        writeln!(self.file, "{}", Value::Object(record.clone()))
            .and_then(|_| self.file.flush())
            .map_err(|e| LeashError::io(&self.path, e, "check disk space"))?;
        match &mut self.tensorboard {
            Some(w) => w.log_record(record),
            None => Ok(()),
        }
    }
}

/// One readable line: step, loss and the method's headline numbers.
pub fn human_line(record: &Map<String, Value>) -> String {
    let keys = [
        "loss",
        "eval_loss",
        "reward",
        "reward_std",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "kl",
        "nll_loss",
        "mean_token_accuracy",
        "grad_norm",
        "learning_rate",
    ];
    let mut parts = vec![format!(
        "step {}",
        record.get("step").cloned().unwrap_or_default()
    )];
    for k in keys {
        if let Some(v) = record.get(k).and_then(Value::as_f64) {
            parts.push(format!("{k} {v:.4}"));
        }
    }
    parts.join(" | ")
}

/// DPO's failure mode: the margin grows because the rejected log-prob falls faster than the
/// chosen one — but the chosen log-prob falls too, so good answers get less likely.
pub struct Monitor {
    pub start_logps: Option<f64>,
    pub warned: bool,
    last_margin: Option<f64>,
}

pub const MONITOR_WARNING: &str = "chosen log-probs are falling while the reward margin grows: the policy is \
winning the preference by making the rejected answers unlikely faster than the chosen ones, and the \
chosen (good) answers are getting less likely too. Remedies: add an NLL term on chosen (--rpo-alpha 1.0), \
a larger --beta (stronger leash), --loss-type ipo (bounded margin), or fewer steps.";

impl Monitor {
    pub fn new(start_logps: Option<f64>, warned: bool) -> Self {
        Monitor {
            start_logps,
            warned,
            last_margin: None,
        }
    }

    /// Returns the warning when it fires (once per run).
    pub fn check(
        &mut self,
        logps_chosen: Option<f64>,
        margin: Option<f64>,
    ) -> Option<&'static str> {
        let (Some(lp), Some(margin)) = (logps_chosen, margin) else {
            return None;
        };
        let start = *self.start_logps.get_or_insert(lp);
        let growing = self.last_margin.is_none_or(|m| margin >= m) && margin > 0.0;
        self.last_margin = Some(margin);
        // "Clearly below": one nat per sequence and 5 % of the starting value.
        let fallen = lp < start - (0.05 * start.abs()).max(1.0);
        if fallen && growing && !self.warned {
            self.warned = true;
            return Some(MONITOR_WARNING);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitor_fires_once_when_chosen_falls_and_margin_grows() {
        let mut m = Monitor::new(None, false);
        assert!(m.check(Some(-50.0), Some(0.0)).is_none());
        assert!(m.check(Some(-50.5), Some(1.0)).is_none()); // not clearly below yet
        assert!(m.check(Some(-49.0), Some(2.0)).is_none()); // chosen rising: healthy
        assert!(m.check(Some(-55.0), Some(3.0)).is_some());
        assert!(m.check(Some(-60.0), Some(4.0)).is_none()); // only once
    }

    #[test]
    fn monitor_quiet_when_margin_shrinks() {
        let mut m = Monitor::new(Some(-50.0), false);
        assert!(m.check(Some(-50.0), Some(2.0)).is_none());
        assert!(m.check(Some(-60.0), Some(1.0)).is_none());
    }
}

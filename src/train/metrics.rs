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
            let config = serde_json::to_string_pretty(&cfg.method_json()).unwrap_or_default();
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
        "peak_rss_mib",
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
///
/// Like is compared with like: `rewards/chosen` = β·(log π(y_c|x) − log π_ref(y_c|x)) is the
/// change of the chosen log-prob on the *same rows* against the reference, so batches of
/// longer or shorter answers do not move it (comparing `logps/chosen` of step 1's batch with a
/// later batch's did, and fired on healthy runs). It is smoothed over the last
/// [`MONITOR_WINDOW`] logged steps, and "clearly below" means more than one nat per sequence
/// and more than 5 % of the reference's chosen log-prob.
pub struct Monitor {
    beta: f64,
    window: std::collections::VecDeque<(f64, f64, f64)>,
    pub warned: bool,
}

/// Logged steps the monitor averages over.
pub const MONITOR_WINDOW: usize = 3;

pub const MONITOR_WARNING: &str = "chosen log-probs are falling while the reward margin grows: the policy is \
winning the preference by making the rejected answers unlikely faster than the chosen ones, and the \
chosen (good) answers are getting less likely too. Remedies: add an NLL term on chosen (--rpo-alpha 1.0), \
a larger --beta (stronger leash), --loss-type ipo (bounded margin), or fewer steps.";

impl Monitor {
    pub fn new(beta: f64, warned: bool) -> Self {
        Monitor {
            beta,
            window: std::collections::VecDeque::new(),
            warned,
        }
    }

    /// Feeds one logged step; returns the warning when it fires (once per run).
    pub fn check(
        &mut self,
        rewards_chosen: Option<f64>,
        margin: Option<f64>,
        logps_chosen: Option<f64>,
    ) -> Option<&'static str> {
        let (Some(rc), Some(margin), Some(lp)) = (rewards_chosen, margin, logps_chosen) else {
            return None;
        };
        if self.window.len() == MONITOR_WINDOW {
            self.window.pop_front();
        }
        self.window.push_back((rc / self.beta, margin, lp));
        if self.window.len() < 2 || self.warned {
            return None;
        }
        let n = self.window.len() as f64;
        let mean = |f: fn(&(f64, f64, f64)) -> f64| self.window.iter().map(f).sum::<f64>() / n;
        let (change, margin, policy) = (mean(|w| w.0), mean(|w| w.1), mean(|w| w.2));
        let reference = policy - change; // log π_ref(y_c|x) on the same rows
        let fallen = change < -(0.05 * reference.abs()).max(1.0);
        if fallen && margin > 0.0 {
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
    fn monitor_compares_the_same_rows_and_fires_once() {
        let mut m = Monitor::new(0.1, false);
        // Batches of very different lengths: logps/chosen swings, rewards/chosen does not.
        assert!(m.check(Some(0.01), Some(0.1), Some(-20.0)).is_none());
        assert!(m.check(Some(0.02), Some(0.3), Some(-80.0)).is_none());
        assert!(m.check(Some(0.01), Some(0.5), Some(-10.0)).is_none());
        // Chosen falls 3 nats below the reference on its own rows (rewards/chosen −0.3 at
        // β 0.1) over the window while the margin is positive.
        assert!(m.check(Some(-0.5), Some(1.0), Some(-25.0)).is_none()); // mean −1.6 nats: not yet
        assert!(m.check(Some(-0.5), Some(1.2), Some(-25.0)).is_some());
        assert!(m.check(Some(-0.6), Some(1.4), Some(-26.0)).is_none()); // only once
    }

    #[test]
    fn monitor_quiet_without_a_margin_or_on_long_answers() {
        let mut m = Monitor::new(0.1, false);
        assert!(m.check(Some(-0.3), Some(-0.1), Some(-30.0)).is_none());
        assert!(m.check(Some(-0.3), Some(-0.2), Some(-30.0)).is_none());
        // 3 nats below a 200-nat reference is under 5 %: not clearly below.
        let mut m = Monitor::new(0.1, false);
        assert!(m.check(Some(-0.3), Some(1.0), Some(-203.0)).is_none());
        assert!(m.check(Some(-0.3), Some(1.0), Some(-203.0)).is_none());
    }
}

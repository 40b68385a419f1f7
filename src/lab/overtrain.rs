//! `leash lab overtrain`: Train DPO far too long: the rejected log-prob plummets, the chosen one
//! falls too, the margin still grows, and the monitor warns.

use std::path::Path;

use super::{first_metric, last_metric, plot, Lab};
use crate::error::{read_text, Result};
use crate::report::plot::metric_series;

impl Lab {
    pub(super) fn overtrain(&self) -> Result<(String, bool, String)> {
        let run = self.dpo_run(
            "run",
            0.1,
            "sigmoid",
            self.cfg.dpo_steps * 4,
            self.cfg.dpo_lr * 4.0,
        )?;
        let m = run.join("metrics.jsonl");
        let get =
            |f: fn(&Path, &str) -> Result<Option<f64>>, k| f(&m, k).map(|v| v.unwrap_or(f64::NAN));
        let (c0, c1) = (
            get(first_metric, "logps/chosen")?,
            get(last_metric, "logps/chosen")?,
        );
        let (r0, r1) = (
            get(first_metric, "logps/rejected")?,
            get(last_metric, "logps/rejected")?,
        );
        let (m0, m1) = (
            get(first_metric, "rewards/margins")?,
            get(last_metric, "rewards/margins")?,
        );
        let warned = read_text(&m)?.contains("chosen_logps_falling");
        let ok = c1 < c0 && r1 < r0 && (r0 - r1) > (c0 - c1) && m1 > m0 && warned;
        let verdict = format!("chosen log-prob {c0:.1} → {c1:.1}, rejected {r0:.1} → {r1:.1}, margin {m0:.2} → {m1:.2}; monitor warned: {warned} — {}", if ok { "reproduced" } else { "NOT reproduced" });
        let mut body = plot(
            &self.dir.join("logps.png"),
            "overtrained DPO: sequence log-probs",
            "step",
            "log p (nats)",
            &metric_series(&m, &["logps/chosen", "logps/rejected"])?,
        );
        body += &plot(
            &self.dir.join("margins.png"),
            "overtrained DPO: reward margin",
            "step",
            "reward margin",
            &metric_series(&m, &["rewards/margins"])?,
        );
        Ok((verdict, ok, body))
    }
}

//! `leash lab ipo-vs-dpo`: Overtrain DPO and IPO alike: IPO's squared loss pulls the margin to a
//! target, DPO's keeps pushing it up.

use super::{last_metric, plot, Lab};
use crate::error::Result;
use crate::report::plot::metric_series;

impl Lab {
    pub(super) fn ipo_vs_dpo(&self) -> Result<(String, bool, String)> {
        let steps = self.cfg.dpo_steps * 4;
        let dpo = self.dpo_run("dpo", 0.1, "sigmoid", steps, self.cfg.dpo_lr * 4.0)?;
        let ipo = self.dpo_run("ipo", 0.1, "ipo", steps, self.cfg.dpo_lr * 4.0)?;
        let (d, i) = (
            last_metric(&dpo.join("metrics.jsonl"), "rewards/margins")?.unwrap_or(f64::NAN),
            last_metric(&ipo.join("metrics.jsonl"), "rewards/margins")?.unwrap_or(f64::NAN),
        );
        let ok = i < d;
        let verdict = format!(
            "final reward margin: DPO {d:.2}, IPO {i:.2} — {}",
            if ok {
                "reproduced: IPO's margin is bounded, DPO's runs away"
            } else {
                "NOT reproduced"
            }
        );
        let mut series = metric_series(&dpo.join("metrics.jsonl"), &["rewards/margins"])?;
        series.iter_mut().for_each(|s| s.name = "DPO margin".into());
        let mut ipo_s = metric_series(&ipo.join("metrics.jsonl"), &["rewards/margins"])?;
        ipo_s.iter_mut().for_each(|s| s.name = "IPO margin".into());
        series.extend(ipo_s);
        let body = plot(
            &self.dir.join("margins.png"),
            "reward margin: DPO vs IPO (β = 0.1)",
            "step",
            "reward margin",
            &series,
        );
        Ok((verdict, ok, body))
    }
}

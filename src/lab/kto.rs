//! `leash lab kto`: KTO learns from unpaired thumbs-up/down rows (the pairs split apart) and still
//! improves the judge score over the reference.

use super::{plot, Lab};
use crate::demo::run_args;
use crate::error::Result;
use crate::report::plot::metric_series;
use crate::train::config::{resolve, Method};
use crate::train::trainer::train;

impl Lab {
    pub(super) fn kto(&self) -> Result<(String, bool, String)> {
        let out = self.dir.join("run");
        let mut a = run_args(
            &self.cfg,
            &self.reference,
            self.data.join("pref_train.jsonl"),
            &out,
            self.cfg.dpo_steps * 2,
            self.cfg.dpo_lr * 2.0,
        );
        a.beta = Some(0.1);
        a.shuffle = Some(true);
        a.logging_steps = Some(5);
        train(&resolve(Method::Kto, &a)?)?;
        let r = self.evaluate(&out, &out.join("eval"))?;
        let (p, q) = (
            r["policy/judge_score"].as_f64().unwrap_or(f64::NAN),
            r["reference/judge_score"].as_f64().unwrap_or(f64::NAN),
        );
        let ok = p > q;
        let verdict = format!(
            "judge score after KTO {p:.2} vs reference {q:.2} (win {:.0} %, loss {:.0} %) — {}",
            100.0 * r["win_rate"].as_f64().unwrap_or(0.0),
            100.0 * r["loss_rate"].as_f64().unwrap_or(0.0),
            if ok {
                "reproduced: no pairs needed"
            } else {
                "NOT reproduced"
            }
        );
        let body = plot(
            &self.dir.join("rewards.png"),
            "KTO implicit rewards",
            "step",
            "reward (nats × β)",
            &metric_series(
                &out.join("metrics.jsonl"),
                &["rewards/chosen", "rewards/rejected", "kl"],
            )?,
        );
        Ok((verdict, ok, body))
    }
}

//! `leash lab dpo-vs-grpo`: The same reference aligned offline (DPO on the preference pairs) and
//! online (GRPO sampling from the policy, scored by the arithmetic judge as reward), compared on
//! held-out prompts with wall time for each.

use std::fmt::Write as _;
use std::time::Instant;

use super::{last_metric, plot, Lab};
use crate::demo::run_args;
use crate::error::Result;
use crate::report::plot::metric_series;
use crate::train::config::{resolve, Method};

impl Lab {
    pub(super) fn dpo_vs_grpo(&self) -> Result<(String, bool, String)> {
        let t0 = Instant::now();
        let dpo = self.dpo_run("dpo", 0.1, "sigmoid", self.cfg.dpo_steps, self.cfg.dpo_lr)?;
        let dpo_s = t0.elapsed().as_secs_f64();
        let grpo = self.dir.join("grpo");
        let mut a = run_args(
            &self.cfg,
            &self.reference,
            self.data.join("pref_train.jsonl"),
            &grpo,
            self.cfg.dpo_steps,
            self.cfg.dpo_lr * 2.0,
        );
        // GRPO bounds completions by max_completion_length; it takes no max_length.
        a.max_length = None;
        a.num_generations = Some(4);
        a.max_completion_length = Some(24);
        a.reward_funcs = Some(vec!["arithmetic".into()]);
        a.per_device_train_batch_size = Some(16);
        a.logging_steps = Some(5);
        let t1 = Instant::now();
        crate::train::grpo::train(&resolve(Method::Grpo, &a)?)?;
        let grpo_s = t1.elapsed().as_secs_f64();
        let mut rows = String::from("| method | judge score | reference judge | win | loss | KL | wall time | training tokens |\n|---|---|---|---|---|---|---|---|\n");
        let mut scores = Vec::new();
        for (name, dir, secs) in [
            ("DPO (offline pairs)", &dpo, dpo_s),
            ("GRPO (online, judge as reward)", &grpo, grpo_s),
        ] {
            let r = self.evaluate(dir, &dir.join("eval"))?;
            let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
            scores.push((f("policy/judge_score"), f("reference/judge_score")));
            let tokens = last_metric(&dir.join("metrics.jsonl"), "num_tokens")?.unwrap_or(f64::NAN);
            let _ = writeln!(
                rows,
                "| {name} | {:.2} | {:.2} | {:.0} % | {:.0} % | {:.2} | {secs:.0} s | {tokens:.0} |",
                f("policy/judge_score"),
                f("reference/judge_score"),
                100.0 * f("win_rate"),
                100.0 * f("loss_rate"),
                f("kl")
            );
        }
        let ok = scores.iter().all(|(p, r)| p > r);
        let verdict = format!(
            "judge score vs reference {:.2}: DPO {:.2} in {dpo_s:.0} s, GRPO {:.2} in {grpo_s:.0} s — {}",
            scores[0].1, scores[0].0, scores[1].0,
            if ok { "reproduced: both align the model; GRPO pays for sampling" } else { "NOT reproduced: one method did not beat the reference" }
        );
        let mut body = rows;
        body += &plot(
            &self.dir.join("grpo_reward.png"),
            "GRPO mean reward (arithmetic judge)",
            "step",
            "mean reward",
            &metric_series(&grpo.join("metrics.jsonl"), &["reward"])?,
        );
        Ok((verdict, ok, body))
    }
}

//! `leash lab beta-sweep`: β is the leash: the same DPO run at several β; measured KL(π‖π_ref)
//! falls as β grows.

use std::fmt::Write as _;

use super::{plot, Lab};
use crate::error::Result;
use crate::report::plot::Series;

impl Lab {
    pub(super) fn beta_sweep(&self) -> Result<(String, bool, String)> {
        let betas = [0.05, 0.2, 1.0];
        let mut rows = String::from(
            "| β | KL(π‖π_ref) | ± | judge score | win rate |\n|---|---|---|---|---|\n",
        );
        let (mut kl, mut judge) = (Vec::new(), Vec::new());
        for &b in &betas {
            let run = self.dpo_run(
                &format!("beta-{b}"),
                b,
                "sigmoid",
                self.cfg.dpo_steps * 2,
                self.cfg.dpo_lr * 2.0,
            )?;
            let r = self.evaluate(&run, &run.join("eval"))?;
            let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
            let _ = writeln!(
                rows,
                "| {b} | {:.2} | {:.2} | {:.2} | {:.0} % |",
                f("kl"),
                f("kl_se"),
                f("policy/judge_score"),
                100.0 * f("win_rate")
            );
            kl.push((b.ln(), f("kl")));
            judge.push((b.ln(), f("policy/judge_score")));
        }
        let ok = kl.first().map(|x| x.1) > kl.last().map(|x| x.1);
        let verdict = format!(
            "KL at β = {} is {:.2} nats, at β = {} it is {:.2} — {}",
            betas[0],
            kl[0].1,
            betas[2],
            kl[2].1,
            if ok {
                "reproduced: a larger β keeps the policy closer to the reference"
            } else {
                "NOT reproduced"
            }
        );
        let mut body = rows;
        body += &plot(
            &self.dir.join("kl_vs_beta.png"),
            "KL(π‖π_ref) vs ln β",
            "ln β",
            "KL (nats)",
            &[Series {
                name: "KL".into(),
                points: kl,
            }],
        );
        body += &plot(
            &self.dir.join("judge_vs_beta.png"),
            "judge score vs ln β",
            "ln β",
            "judge score",
            &[Series {
                name: "judge".into(),
                points: judge,
            }],
        );
        Ok((verdict, ok, body))
    }
}

//! The demo's report: headline numbers, plots of the training curves, and greedy completions
//! of reference vs aligned model on held-out prompts.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use serde_json::Value;

use super::DemoConfig;
use crate::error::{LeashError, Result};
use crate::eval::evaluate::{load_policy, prompts};
use crate::eval::generate::{generate, SamplingOptions};
use crate::eval::judge::{builtin_score, Item};
use crate::report::plot::{line_plot, metric_series};

/// (file name, title, y-axis label, metrics file, keys)
const PLOTS: &[(&str, &str, &str, &str, &[&str])] = &[
    (
        "sft_loss.png",
        "SFT loss (completion tokens)",
        "loss (nats per token)",
        "sft",
        &["loss"],
    ),
    (
        "dpo_loss.png",
        "DPO loss",
        "loss",
        "dpo",
        &["loss", "eval_loss"],
    ),
    (
        "dpo_rewards.png",
        "DPO implicit rewards β·log(π/π_ref)",
        "reward (nats × β)",
        "dpo",
        &["rewards/chosen", "rewards/rejected", "rewards/margins"],
    ),
    (
        "dpo_logps.png",
        "DPO sequence log-probs",
        "log p (nats)",
        "dpo",
        &["logps/chosen", "logps/rejected"],
    ),
];

fn num(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

/// Counts of one aspect of the answers: (reference, aligned, out of).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Aspect {
    pub reference: usize,
    pub aligned: usize,
    pub total: usize,
}

/// Correct, polite and rude answers, counted apart (the judge's sum hides a trade between them).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Aspects {
    pub correct: Aspect,
    pub polite: Aspect,
    pub rude: Aspect,
}

impl Aspects {
    fn add(&mut self, prompt: &str, reference: &str, aligned: &str) -> Result<()> {
        let score =
            |judge: &str, completion: &str| builtin_score(judge, &Item { prompt, completion });
        for (aspect, judge, want) in [
            (&mut self.correct, "correct", 1.0),
            (&mut self.polite, "polite", 1.0),
            (&mut self.rude, "polite", -1.0),
        ] {
            aspect.reference += (score(judge, reference)? == want) as usize;
            aspect.aligned += (score(judge, aligned)? == want) as usize;
            aspect.total += 1;
        }
        Ok(())
    }
}

/// Aspects over every sampled completion of `leash eval` (samples.jsonl).
fn sampled_aspects(samples: &Path) -> Result<Aspects> {
    let mut a = Aspects::default();
    for line in crate::error::read_text(samples)?.lines() {
        let v: Value = serde_json::from_str(line).map_err(|e| {
            LeashError::file(samples, format!("malformed line: {e}"), "re-run the demo")
        })?;
        let s = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        a.add(&s("prompt"), &s("reference"), &s("policy"))?;
    }
    Ok(a)
}

/// "What got better, what got worse": each aspect on its own, so a gain in politeness cannot
/// hide a loss in correctness behind a higher total score.
pub fn changes_section(sampled: &Aspects, greedy: &Aspects) -> String {
    let mut md = String::from("\n## What got better, what got worse\n\n| aspect (aligned vs reference) | sampled answers | greedy answers (table below) |\n|---|---|---|\n");
    let pct = |n: usize, t: usize| 100.0 * n as f64 / t.max(1) as f64;
    let (mut better, mut worse, mut same) = (Vec::new(), Vec::new(), Vec::new());
    for (name, higher_is_better, s, g) in [
        ("correct answers", true, sampled.correct, greedy.correct),
        ("polite answers", true, sampled.polite, greedy.polite),
        ("rude answers", false, sampled.rude, greedy.rude),
    ] {
        let _ = writeln!(
            md,
            "| {name} | {:.0} % → {:.0} % ({}/{} → {}/{}) | {}/{} → {}/{} |",
            pct(s.reference, s.total),
            pct(s.aligned, s.total),
            s.reference,
            s.total,
            s.aligned,
            s.total,
            g.reference,
            g.total,
            g.aligned,
            g.total
        );
        let delta = pct(s.aligned, s.total) - pct(s.reference, s.total);
        let greedy_delta = g.aligned as f64 - g.reference as f64;
        let text = format!(
            "{name}: {:.0} % → {:.0} % of sampled answers, {} → {} of {} greedy ones",
            pct(s.reference, s.total),
            pct(s.aligned, s.total),
            g.reference,
            g.aligned,
            g.total
        );
        let sign = |d: f64| if higher_is_better { d } else { -d };
        // Worse in either view is reported as worse: a regression must not be averaged away.
        if sign(delta) < 0.0 || sign(greedy_delta) < 0.0 {
            worse.push(text);
        } else if sign(delta) > 0.0 || sign(greedy_delta) > 0.0 {
            better.push(text);
        } else {
            same.push(text);
        }
    }
    let list = |items: &[String]| {
        if items.is_empty() {
            "nothing".to_string()
        } else {
            items.join("; ")
        }
    };
    let _ = writeln!(md, "\n**Better:** {}.\n", list(&better));
    let _ = writeln!(md, "**Worse:** {}.\n", list(&worse));
    if !same.is_empty() {
        let _ = writeln!(md, "**Unchanged:** {}.", list(&same));
    }
    md
}

/// Greedy completions of reference and aligned model on the first held-out prompts: the
/// Markdown table and the aspects counted over it.
fn greedy_table(out: &Path, cfg: &DemoConfig) -> Result<(String, Aspects)> {
    let device = crate::device::resolve(cfg.device)?;
    let mut md = String::from("\n## Greedy completions on held-out prompts\n\n| prompt | reference (SFT) | aligned (DPO) |\n|---|---|---|\n");
    let (reference, tok) = load_policy(&out.join("sft"), None, &device)?;
    let (aligned, _) = load_policy(&out.join("dpo"), None, &device)?;
    let greedy = SamplingOptions {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        max_new_tokens: 32,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut aspects = Aspects::default();
    for (text, ids) in prompts(&out.join("data/pref_test.jsonl"), &tok)?
        .iter()
        .take(8)
    {
        let mut complete = |m| -> Result<String> {
            let c = generate(m, ids, 1, &greedy, &[tok.eos_id], &mut rng, true)?;
            tok.decode(&c[0], true)
        };
        let (r, a) = (complete(&reference)?, complete(&aligned)?);
        aspects.add(text, &r, &a)?;
        let cell = |s: &str| -> Result<String> {
            let score = builtin_score(
                "arithmetic",
                &Item {
                    prompt: text,
                    completion: s,
                },
            )?;
            Ok(format!("{} *({score:+})*", s.trim().replace('|', "\\|")))
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} |",
            text.replace('|', "\\|"),
            cell(&r)?,
            cell(&a)?
        );
    }
    Ok((md, aspects))
}

pub fn write_report(out: &Path, report: &Value, cfg: &DemoConfig, seconds: f64) -> Result<PathBuf> {
    let mut md = String::new();
    let _ = writeln!(md, "# leash demo: DPO on a synthetic arithmetic world\n");
    let _ = writeln!(
        md,
        "A {}-layer, {}-wide Llama trained from scratch in this run: SFT on a mix of good and bad answers \
         (the reference), then DPO on {} preference pairs (β = {}). Held-out prompts: {}. Total time {:.0} s.\n",
        cfg.layers, cfg.hidden, cfg.n_pref, cfg.beta, cfg.n_test, seconds
    );
    let _ = writeln!(md, "| held-out metric | value |\n|---|---|");
    let rows = [
        (
            "judge win rate, aligned vs reference",
            format!(
                "{:.0} % (ties {:.0} %, losses {:.0} %)",
                100.0 * num(report, "win_rate"),
                100.0 * num(report, "tie_rate"),
                100.0 * num(report, "loss_rate")
            ),
        ),
        (
            "judge score (correct + polite − rude), aligned",
            format!("{:.2}", num(report, "policy/judge_score")),
        ),
        (
            "judge score, reference",
            format!("{:.2}", num(report, "reference/judge_score")),
        ),
        (
            "KL(π‖π_ref) per completion, nats",
            format!("{:.2} ± {:.2}", num(report, "kl"), num(report, "kl_se")),
        ),
        (
            "mean completion length (tokens), aligned / reference",
            format!(
                "{:.1} / {:.1}",
                num(report, "policy/mean_length"),
                num(report, "reference/mean_length")
            ),
        ),
    ];
    for (k, v) in rows {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    if let Some(p) = report.get("pairs") {
        let _ = writeln!(
            md,
            "| implicit-reward accuracy on held-out pairs | {:.0} % |",
            100.0 * num(p, "rewards/accuracies")
        );
    }
    let (table, greedy) = greedy_table(out, cfg)?;
    let sampled = sampled_aspects(&out.join("eval/samples.jsonl"))?;
    md += &changes_section(&sampled, &greedy);
    let _ = writeln!(md, "\n## Training curves\n");
    for (file, title, y_label, run, keys) in PLOTS {
        let series = metric_series(&out.join(run).join("metrics.jsonl"), keys)?;
        match line_plot(&out.join(file), title, "step", y_label, &series) {
            Ok(()) => {
                let _ = writeln!(md, "![{title}]({file})\n");
            }
            Err(e) => eprintln!("warning: {e}"),
        }
    }
    md += &table;
    let _ = writeln!(
        md,
        "\nScores in italics are the built-in `arithmetic` judge: +1 correct, +1 polite, −1 rude."
    );
    let _ = writeln!(md, "Raw numbers: `eval/report.json`, `eval/samples.jsonl`, `sft/metrics.jsonl`, `dpo/metrics.jsonl`.");
    let path = out.join("report.md");
    std::fs::write(&path, md)
        .map_err(|e| LeashError::io(&path, e, "check the output folder is writable"))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_correctness_loss_is_reported_even_when_politeness_wins() {
        // The demo's own table once read: reference 5/8 correct, aligned 4/8, but far politer.
        let a = |reference, aligned| Aspect {
            reference,
            aligned,
            total: 8,
        };
        let greedy = Aspects {
            correct: a(5, 4),
            polite: a(2, 7),
            rude: a(1, 0),
        };
        let sampled = Aspects {
            correct: a(4, 4),
            polite: a(3, 6),
            rude: a(2, 2),
        };
        let md = changes_section(&sampled, &greedy);
        let line = |tag: &str| md.lines().find(|l| l.starts_with(tag)).unwrap().to_string();
        let (better, worse) = (line("**Better:**"), line("**Worse:**"));
        assert!(
            worse.contains(
                "correct answers: 50 % → 50 % of sampled answers, 5 → 4 of 8 greedy ones"
            ),
            "{md}"
        );
        assert!(
            better.contains("polite answers") && better.contains("rude answers"),
            "{md}"
        );
        assert!(!better.contains("correct"), "{md}");
        assert!(
            md.contains("| correct answers | 50 % → 50 % (4/8 → 4/8) | 5/8 → 4/8 |"),
            "{md}"
        );
    }
}

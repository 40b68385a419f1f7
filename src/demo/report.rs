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

/// (file name, title, metrics file, keys)
const PLOTS: &[(&str, &str, &str, &[&str])] = &[
    (
        "sft_loss.png",
        "SFT loss (completion tokens)",
        "sft",
        &["loss"],
    ),
    ("dpo_loss.png", "DPO loss", "dpo", &["loss", "eval_loss"]),
    (
        "dpo_rewards.png",
        "DPO implicit rewards β·log(π/π_ref)",
        "dpo",
        &["rewards/chosen", "rewards/rejected", "rewards/margins"],
    ),
    (
        "dpo_logps.png",
        "DPO sequence log-probs",
        "dpo",
        &["logps/chosen", "logps/rejected"],
    ),
];

fn num(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN)
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
    let _ = writeln!(md, "\n## Training curves\n");
    for (file, title, run, keys) in PLOTS {
        let series = metric_series(&out.join(run).join("metrics.jsonl"), keys)?;
        match line_plot(&out.join(file), title, "step", &series) {
            Ok(()) => {
                let _ = writeln!(md, "![{title}]({file})\n");
            }
            Err(e) => eprintln!("warning: {e}"),
        }
    }
    let _ = writeln!(md, "## Greedy completions on held-out prompts\n\n| prompt | reference (SFT) | aligned (DPO) |\n|---|---|---|");
    let (reference, tok) = load_policy(&out.join("sft"), None)?;
    let (aligned, _) = load_policy(&out.join("dpo"), None)?;
    let greedy = SamplingOptions {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        max_new_tokens: 32,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    for (text, ids) in prompts(&out.join("data/pref_test.jsonl"), &tok)?
        .iter()
        .take(8)
    {
        let mut cell = |m| -> Result<String> {
            let c = generate(m, ids, 1, &greedy, &[tok.eos_id], &mut rng, true)?;
            let s = tok.decode(&c[0], true)?;
            let score = builtin_score(
                "arithmetic",
                &Item {
                    prompt: text,
                    completion: &s,
                },
            )?;
            Ok(format!("{} *({score:+})*", s.trim().replace('|', "\\|")))
        };
        let (r, a) = (cell(&reference)?, cell(&aligned)?);
        let _ = writeln!(md, "| {} | {r} | {a} |", text.replace('|', "\\|"));
    }
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

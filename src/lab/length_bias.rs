//! Lab `length-bias`: when the chosen answers of a preference set are systematically longer,
//! DPO learns length as a shortcut and the policy grows verbose; the same data balanced by
//! `leash data balance-length` (as many chosen-shorter pairs as chosen-longer) shrinks the
//! effect. Follows Singhal et al. 2023, "A Long Way to Go: Investigating Length Correlations
//! in RLHF", and Park et al. 2024, "Disentangling Length from Quality in Direct Preference
//! Optimization".
//!
//! Verbosity here is a padding phrase ([`PADDING`]) that adds nothing to the answer. The
//! lab's reference is the shared SFT reference fine-tuned on answers that carry the padding
//! a quarter of the time whatever their quality, so it emits the padding sometimes and DPO
//! can move that rate. Then the same reference is aligned twice, for the same steps on the
//! same number of pairs: once on pairs whose chosen answer mostly carries the padding
//! (chosen is longer in most pairs), once on their length-balanced subset.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::{plot, Lab};
use crate::data::length::{balance_length, length_report};
use crate::demo::run_args;
use crate::demo::world::Question;
use crate::error::{LeashError, Result};
use crate::eval::evaluate::{eos_ids, load_policy, prompts};
use crate::eval::generate::{generate, SamplingOptions};
use crate::eval::judge::{builtin_score, Item};
use crate::report::plot::Series;
use crate::train::config::{resolve, Method};
use crate::train::trainer::train;

/// Appended to an answer to make it verbose; built from words the demo's tokenizer knows, so
/// it costs few tokens, and free of the judge's polite/rude words, so it does not change the
/// judge score.
const PADDING: &str = " What a quick one, what a question!";
/// Fragments of [`PADDING`]: a sample counts as padded if it holds any of them (the small
/// models often emit the phrase garbled or in part).
const PADDING_MARKERS: &[&str] = &["quick one", "a question"];
/// Share of the lab's SFT answers (good and bad alike) that carry the padding.
const SFT_PADDED: f64 = 0.25;
/// Share of preference pairs with the padding on the chosen answer, and on the rejected one.
const CHOSEN_PADDED: f64 = 0.7;
const REJECTED_PADDED: f64 = 0.2;
/// Held-out prompts per demo test prompt, samples per prompt, and sampling length.
const PROMPTS_PER_TEST: usize = 4;
const SAMPLES: usize = 8;
const MAX_NEW_TOKENS: usize = 40;
/// The verdict's margins: the biased policy must be this much longer (tokens) and this much
/// more often padded than the reference; balancing must keep at most this share of the growth.
const MIN_GROWTH_TOKENS: f64 = 2.0;
const MIN_PADDING_RISE: f64 = 0.2;
const MAX_BALANCED_SHARE: f64 = 0.5;

/// How verbose one model is on the held-out prompts (means over all samples).
struct Verbosity {
    tokens: f64,
    chars: f64,
    padded: f64,
    judge: f64,
}

fn write_lines(path: &Path, lines: &[String]) -> Result<()> {
    let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, body)
        .map_err(|e| LeashError::io(path, e, "check the lab folder is writable"))
}

fn is_padded(completion: &str) -> bool {
    PADDING_MARKERS.iter().any(|m| completion.contains(m))
}

/// Files of the lab's data set, all in the lab folder.
struct LengthData {
    sft: PathBuf,
    biased: PathBuf,
    balanced: PathBuf,
    prompts: PathBuf,
}

/// Writes the lab's SFT rows, a length-biased pool of pairs, its balanced subset (by the code
/// of `leash data balance-length`), the pool's first rows as many as the balanced set holds
/// (the biased set), and held-out prompts.
fn build_data(
    dir: &Path,
    seed: u64,
    n_sft: usize,
    n_pref: usize,
    n_prompts: usize,
) -> Result<LengthData> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x1e47_b1a5);
    let pad = |mut s: String, p: bool| {
        if p {
            s.push_str(PADDING);
        }
        s
    };
    let sft: Vec<String> = (0..n_sft)
        .map(|_| {
            let q = Question::random(&mut rng);
            let answer = if rng.gen_bool(0.5) {
                q.polite(&mut rng)
            } else {
                q.bad(&mut rng)
            };
            let completion = pad(answer, rng.gen_bool(SFT_PADDED));
            json!({"prompt": q.prompt, "completion": completion}).to_string()
        })
        .collect();
    let pool: Vec<String> = (0..n_pref * 3)
        .map(|_| {
            let q = Question::random(&mut rng);
            let (chosen, rejected) = (q.polite(&mut rng), q.bad(&mut rng));
            let u: f64 = rng.gen();
            let chosen = pad(chosen, u < CHOSEN_PADDED);
            let rejected = pad(
                rejected,
                (CHOSEN_PADDED..CHOSEN_PADDED + REJECTED_PADDED).contains(&u),
            );
            json!({"prompt": q.prompt, "chosen": chosen, "rejected": rejected}).to_string()
        })
        .collect();
    let held_out: Vec<String> = (0..n_prompts)
        .map(|_| json!({"prompt": Question::random(&mut rng).prompt}).to_string())
        .collect();
    let files = LengthData {
        sft: dir.join("sft_padded.jsonl"),
        biased: dir.join("pref_biased.jsonl"),
        balanced: dir.join("pref_balanced.jsonl"),
        prompts: dir.join("prompts.jsonl"),
    };
    let pool_path = dir.join("pref_biased_pool.jsonl");
    write_lines(&files.sft, &sft)?;
    write_lines(&pool_path, &pool)?;
    write_lines(&files.prompts, &held_out)?;
    let balanced = balance_length(&pool_path, &files.balanced)?;
    let n = balanced["pairs"].as_u64().unwrap_or(0) as usize;
    if n == 0 {
        return Err(LeashError::file(
            &files.balanced,
            "balancing left no pairs",
            "the pool needs pairs whose chosen answer is shorter; raise REJECTED_PADDED",
        ));
    }
    write_lines(&files.biased, &pool[..n.min(pool.len())])?;
    Ok(files)
}

/// Samples [`SAMPLES`] completions per held-out prompt from `model` (the same seeds for every
/// model), writes them to `samples`, and measures them.
fn verbosity(
    model: &Path,
    prompts_path: &Path,
    seed: u64,
    samples: &Path,
    device: &candle_core::Device,
) -> Result<Verbosity> {
    let (m, tok) = load_policy(model, None, device)?;
    let eos = eos_ids(&m, &tok);
    let opts = SamplingOptions {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        max_new_tokens: MAX_NEW_TOKENS,
    };
    let (mut tokens, mut chars, mut padded, mut judge) = (0.0, 0.0, 0.0, 0.0);
    let mut lines = Vec::new();
    for (i, (prompt, ids)) in prompts(prompts_path, &tok)?.iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(i as u64));
        for c in generate(&m, ids, SAMPLES, &opts, &eos, &mut rng, true)? {
            let text = tok.decode(&c, true)?;
            tokens += c.len() as f64;
            chars += text.chars().count() as f64;
            padded += is_padded(&text) as u8 as f64;
            judge += builtin_score(
                "arithmetic",
                &Item {
                    prompt,
                    completion: &text,
                },
            )?;
            lines.push(json!({"prompt": prompt, "completion": text, "tokens": c.len(), "padded": is_padded(&text)}).to_string());
        }
    }
    write_lines(samples, &lines)?;
    let n = lines.len().max(1) as f64;
    Ok(Verbosity {
        tokens: tokens / n,
        chars: chars / n,
        padded: padded / n,
        judge: judge / n,
    })
}

/// `checkpoint-N` folders of a run, by step.
fn checkpoints(run: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let entries = std::fs::read_dir(run)
        .map_err(|e| LeashError::io(run, e, "the DPO run should have written checkpoints here"))?;
    let mut out: Vec<(usize, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let step = e
                .file_name()
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()?;
            Some((step, e.path()))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The last (step, verbosity) of a non-empty curve.
fn final_of(curve: &[(usize, Verbosity)]) -> &Verbosity {
    &curve[curve.len() - 1].1
}

fn stats_row(name: &str, r: &Value) -> String {
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    format!(
        "| {name} | {} | {:.1} | {:.1} | {:.0} % | {:.0} % | {:+.2} |\n",
        r["pairs"],
        f("chosen_mean_chars"),
        f("rejected_mean_chars"),
        100.0 * f("chosen_longer_fraction"),
        100.0 * f("chosen_shorter_fraction"),
        f("length_bias")
    )
}

impl Lab {
    /// DPO on length-biased pairs makes the policy verbose; the length-balanced subset, same
    /// size and steps, shrinks the effect.
    pub(super) fn length_bias(&self) -> Result<(String, bool, String)> {
        let cfg = &self.cfg;
        let data = build_data(
            &self.dir,
            cfg.seed,
            cfg.n_sft,
            cfg.n_pref,
            cfg.n_test * PROMPTS_PER_TEST,
        )?;
        // The lab's reference: the shared one, fine-tuned to pad a quarter of its answers.
        let reference = self.dir.join("reference");
        let mut a = run_args(
            cfg,
            &self.reference,
            data.sft.clone(),
            &reference,
            cfg.sft_steps / 3,
            cfg.sft_lr * 0.75,
        );
        a.lr_scheduler_type = Some("constant".into());
        train(&resolve(Method::Sft, &a)?)?;
        let (steps, lr, beta) = (cfg.dpo_steps, cfg.dpo_lr * 0.5, 0.1);
        let mut runs = Vec::new();
        for (name, dataset) in [("biased", &data.biased), ("balanced", &data.balanced)] {
            let out = self.dir.join(format!("dpo-{name}"));
            let mut a = run_args(cfg, &reference, dataset.clone(), &out, steps, lr);
            a.beta = Some(beta);
            a.lr_scheduler_type = Some("constant".into());
            a.logging_steps = Some(5);
            a.save_steps = Some((steps / 3).max(1));
            train(&resolve(Method::Dpo, &a)?)?;
            runs.push(out);
        }
        // Verbosity of the reference (step 0) and of every checkpoint of both runs.
        let measure = |model: &Path, tag: &str| {
            verbosity(
                model,
                &data.prompts,
                cfg.seed,
                &self.dir.join(format!("samples-{tag}.jsonl")),
                &self.device,
            )
        };
        let at_ref = measure(&reference, "reference")?;
        let mut curves: Vec<Vec<(usize, Verbosity)>> = Vec::new();
        for (run, name) in runs.iter().zip(["biased", "balanced"]) {
            let mut curve = Vec::new();
            for (step, dir) in checkpoints(run)? {
                curve.push((step, measure(&dir, &format!("{name}-{step}"))?));
            }
            if curve.is_empty() {
                return Err(LeashError::file(
                    run,
                    "the DPO run wrote no checkpoint-N folder",
                    "check save_steps and the run's log",
                ));
            }
            curves.push(curve);
        }
        let (biased, balanced) = (final_of(&curves[0]), final_of(&curves[1]));
        let growth = biased.tokens - at_ref.tokens;
        let rise = biased.padded - at_ref.padded;
        let (bal_growth, bal_rise) = (
            balanced.tokens - at_ref.tokens,
            balanced.padded - at_ref.padded,
        );
        let verbose = growth >= MIN_GROWTH_TOKENS && rise >= MIN_PADDING_RISE;
        let shrunk =
            bal_growth <= MAX_BALANCED_SHARE * growth && bal_rise <= MAX_BALANCED_SHARE * rise;
        let ok = verbose && shrunk;
        let verdict = format!(
            "mean completion length: reference {:.1} tokens ({:.0} % padded), DPO on length-biased pairs {:.1} ({:.0} %), on length-balanced pairs {:.1} ({:.0} %) — {}",
            at_ref.tokens, 100.0 * at_ref.padded, biased.tokens, 100.0 * biased.padded, balanced.tokens, 100.0 * balanced.padded,
            if ok {
                "reproduced: length-biased preferences make the policy verbose; balancing removes most of it"
            } else if !verbose {
                "NOT reproduced: DPO on the biased pairs did not make the policy clearly more verbose"
            } else {
                "NOT reproduced: the length-balanced pairs made the policy about as verbose"
            }
        );

        let mut body = format!(
            "Padding phrase: \"{PADDING}\" (a sample counts as padded if it holds {}). The lab's reference is the shared SFT reference fine-tuned for {} steps on {} answers, {:.0} % of them padded whatever their quality. Preference pool: {} pairs, padding on the chosen answer in {:.0} % of them and on the rejected one in {:.0} %; `leash data balance-length` keeps its length-balanced subset, and the biased set is the pool's first rows, as many. Both DPO runs: {steps} steps, lr {lr:.0e}, β = {beta}, from the lab's reference. Held-out: {} prompts × {SAMPLES} samples at temperature 1, up to {MAX_NEW_TOKENS} tokens, the same seeds for every model.\n\n",
            PADDING_MARKERS.iter().map(|m| format!("\"{m}\"")).collect::<Vec<_>>().join(" or "),
            cfg.sft_steps / 3, cfg.n_sft, 100.0 * SFT_PADDED, cfg.n_pref * 3, 100.0 * CHOSEN_PADDED, 100.0 * REJECTED_PADDED,
            cfg.n_test * PROMPTS_PER_TEST
        );
        body += "`leash data report` of the two training sets:\n\n| file | pairs | chosen mean chars | rejected mean chars | chosen longer | chosen shorter | length bias |\n|---|---|---|---|---|---|---|\n";
        body += &stats_row("pref_biased.jsonl", &length_report(&data.biased)?);
        body += &stats_row("pref_balanced.jsonl", &length_report(&data.balanced)?);
        body += "\nOn held-out prompts:\n\n| model | mean length (tokens) | mean length (chars) | padded | judge score |\n|---|---|---|---|---|\n";
        for (name, v) in [
            ("reference", &at_ref),
            ("DPO, length-biased pairs", biased),
            ("DPO, length-balanced pairs", balanced),
        ] {
            let _ = writeln!(
                body,
                "| {name} | {:.2} | {:.1} | {:.0} % | {:.2} |",
                v.tokens,
                v.chars,
                100.0 * v.padded,
                v.judge
            );
        }
        let _ = writeln!(
            body,
            "\nGrowth over the reference: biased {growth:+.2} tokens, {:+.0} points padded; balanced {bal_growth:+.2} tokens, {:+.0} points. Reproduced when the biased policy grows by ≥ {MIN_GROWTH_TOKENS} tokens and ≥ {:.0} points padded and the balanced one keeps at most {:.0} % of both.\n",
            100.0 * rise, 100.0 * bal_rise, 100.0 * MIN_PADDING_RISE, 100.0 * MAX_BALANCED_SHARE
        );
        let series = |f: fn(&Verbosity) -> f64| -> Vec<Series> {
            curves
                .iter()
                .zip(["length-biased pairs", "length-balanced pairs"])
                .map(|(c, name)| Series {
                    name: name.into(),
                    points: std::iter::once((0.0, f(&at_ref)))
                        .chain(c.iter().map(|(s, v)| (*s as f64, f(v))))
                        .collect(),
                })
                .collect()
        };
        body += &plot(
            &self.dir.join("length.png"),
            "mean completion length (tokens) on held-out prompts",
            "DPO step",
            "tokens",
            &series(|v| v.tokens),
        );
        body += &plot(
            &self.dir.join("padded.png"),
            "share of padded completions on held-out prompts",
            "DPO step",
            "share of completions",
            &series(|v| v.padded),
        );
        body += "\nEvery sample is in `samples-<model>.jsonl` beside this report.\n";
        Ok((verdict, ok, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::read_text;

    #[test]
    fn biased_and_balanced_sets_have_equal_size_and_opposite_bias() {
        let dir = tempfile::tempdir().unwrap();
        let files = build_data(dir.path(), 7, 20, 200, 8).unwrap();
        let (biased, balanced) = (
            length_report(&files.biased).unwrap(),
            length_report(&files.balanced).unwrap(),
        );
        assert_eq!(biased["pairs"], balanced["pairs"]);
        assert!(biased["length_bias"].as_f64().unwrap() > 0.4, "{biased}");
        assert_eq!(balanced["length_bias"], 0.0);
        let prompts = read_text(&files.prompts).unwrap();
        assert_eq!(prompts.lines().count(), 8);
        assert!(is_padded(PADDING) && !is_padded(" Sure! 1 + 2 = 3."));
    }
}

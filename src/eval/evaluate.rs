//! `leash generate` and `leash eval`.
//!
//! eval reports, on held-out data: implicit-reward accuracy and margin on preference pairs;
//! and for completions sampled from policy and reference on the same prompts, a Monte-Carlo
//! KL(π‖π_ref) = E_{y∼π}[log π(y|x) − log π_ref(y|x)] (summed over completion tokens) with its
//! standard error, mean completion length, the judge's mean score, and the judge's win rate of
//! policy over reference with ties counted apart. Samples are written as they are produced,
//! so a failing judge loses nothing already computed.
//!
//! Beside the plain KL estimate (k1, the mean log-ratio, which is unbiased but can come out
//! negative) the report gives k3 = E[(r − 1) − log r] with r = π_ref(y|x)/π(y|x), which is
//! unbiased too and never negative (Schulman 2020, "Approximating KL divergence"), and
//! `kl_note`, which says what `kl_unbiased` means.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use candle_core::Device;
use rand::SeedableRng;
use serde_json::{json, Value};

use super::generate::{generate, SamplingOptions};
use super::judge::{Item, Judge};
use crate::data::collate::collate;
use crate::data::dataset::read_rows;
use crate::data::encode::{Encoded, Encoder, Sequence, Style};
use crate::data::read::Example;
use crate::data::tokenizer::TextTokenizer;
use crate::error::{LeashError, Result};
use crate::loss::logps::score;
use crate::model::Decoder;
use crate::model_io::load_adapter;
use crate::model_io::load_model;
use crate::progress::Progress;
use crate::scoring::score_dataset;

/// What `kl`, `kl_k3` and `kl_unbiased` in eval's report mean (written into the report).
pub const KL_NOTE: &str = "kl is the mean over samples y ~ π of log π(y|x) − log π_ref(y|x), summed over \
completion tokens (estimator k1), with its standard error kl_se. kl_unbiased: true means the samples were \
drawn from π itself (temperature 1, no top-k, no top-p), so kl is an unbiased estimate of KL(π‖π_ref): \
unbiased, not non-negative — with few samples, or π close to π_ref, it can come out below 0 by chance \
(compare it with kl_se). kl_k3 is the mean of (r − 1) − log r with r = π_ref(y|x)/π(y|x): unbiased \
under the same condition, never negative, usually with less variance (Schulman 2020). When kl_unbiased \
is false the samples come from a modified distribution and both are biased.";

/// Schulman's k3 term for one sample with log-ratio `d` = log π(y|x) − log π_ref(y|x):
/// (r − 1) − log r with r = e^(−d). Never negative (x − 1 ≥ log x); its mean over y ~ π is
/// KL(π‖π_ref) because E_π[r] = 1.
pub fn kl_k3(d: f64) -> f64 {
    (-d).exp_m1() + d
}

fn interrupted(what: &str) -> LeashError {
    LeashError::Interrupted {
        message: format!("interrupted during {what}"),
        hint: "rerun the command; samples.jsonl holds the samples written so far".into(),
    }
}

/// A model folder plus an optional adapter, loaded onto `device`.
pub fn load_policy(
    model: &Path,
    adapter: Option<&Path>,
    device: &Device,
) -> Result<(Decoder, TextTokenizer)> {
    let (base, tok) = load_model(model, device)?;
    match adapter {
        Some(dir) => {
            let (_, adapters) = load_adapter(dir, base.linear_modules(), device)?;
            Ok((base.with_adapters(&adapters)?, tok))
        }
        None => Ok((base, tok)),
    }
}

/// (prompt text, prompt ids) of every row that has a prompt.
pub fn prompts(path: &Path, tok: &TextTokenizer) -> Result<Vec<(String, Vec<u32>)>> {
    prompts_of_split(path, None, tok)
}

/// [`prompts`] of one split of a dataset folder.
pub fn prompts_of_split(
    path: &Path,
    split: Option<&str>,
    tok: &TextTokenizer,
) -> Result<Vec<(String, Vec<u32>)>> {
    let rows = read_rows(path, split)?;
    let enc = Encoder {
        tokenizer: tok,
        style: Style::Trl,
        path,
        assistant_only_loss: false,
    };
    let mut out = Vec::new();
    for row in &rows {
        let prompt = match &row.example {
            Example::Pair { prompt, .. }
            | Example::Unpaired { prompt, .. }
            | Example::PromptOnly { prompt }
            | Example::Completion { prompt, .. } => prompt,
            _ => {
                return Err(LeashError::row(
                    path,
                    row.line,
                    format!("a {} row has no prompt", row.example.kind()),
                    "use rows with a `prompt` field",
                ));
            }
        };
        let text = enc.render_prompt(prompt)?;
        let ids = match enc.encode(&crate::data::read::Row {
            example: Example::PromptOnly {
                prompt: prompt.clone(),
            },
            ..row.clone()
        })? {
            Encoded::Prompt { prompt, .. } => prompt,
            _ => Vec::new(),
        };
        out.push((text, ids));
    }
    Ok(out)
}

/// Summed log-prob of each completion after `prompt` under `model`.
pub fn completion_logps(
    model: &Decoder,
    prompt: &[u32],
    completions: &[Vec<u32>],
    pad: u32,
) -> Result<Vec<f32>> {
    let seqs: Vec<Sequence> = completions
        .iter()
        .map(|c| Sequence {
            ids: prompt.iter().chain(c).copied().collect(),
            loss_start: prompt.len(),
        })
        .collect();
    let refs: Vec<&Sequence> = seqs.iter().collect();
    let batch = collate(&refs, pad, model.config.sliding_window, &[], model.device())?;
    Ok(score(model, &batch)?.seq_logps.to_vec1()?)
}

pub struct GenerateArgs<'a> {
    pub model: &'a Path,
    pub adapter: Option<&'a Path>,
    pub prompts: &'a Path,
    pub sampling: SamplingOptions,
    pub num_return_sequences: usize,
    pub seed: u64,
    /// Where the model runs (see [`crate::device`]).
    pub device: Device,
}

/// `leash generate`: one JSON object per completion.
pub fn generate_command(a: &GenerateArgs, mut emit: impl FnMut(Value) -> Result<()>) -> Result<()> {
    a.sampling.validate()?;
    if a.num_return_sequences == 0 {
        return Err(LeashError::usage(
            "num_return_sequences must be ≥ 1".to_string(),
            "e.g. --num-return-sequences 4",
        ));
    }
    let (model, tok) = load_policy(a.model, a.adapter, &a.device)?;
    let eos = eos_ids(&model, &tok);
    let rows = prompts(a.prompts, &tok)?;
    let progress = Progress::new("generate", "prompt", rows.len() as u64);
    for (i, (text, ids)) in rows.iter().enumerate() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed.wrapping_add(i as u64));
        let outs = generate(
            &model,
            ids,
            a.num_return_sequences,
            &a.sampling,
            &eos,
            &mut rng,
            true,
        )?;
        for (k, c) in outs.iter().enumerate() {
            emit(json!({
                "index": i, "sample": k, "prompt": text,
                "completion": tok.decode(c, true)?, "tokens": c.len(),
                "finished": c.last().is_some_and(|t| eos.contains(t)),
            }))?;
        }
        progress.inc(1);
    }
    progress.finish();
    Ok(())
}

pub fn eos_ids(model: &Decoder, tok: &TextTokenizer) -> Vec<u32> {
    let mut eos = model.config.eos_token_ids.clone();
    if !eos.contains(&tok.eos_id) {
        eos.push(tok.eos_id);
    }
    eos
}

pub struct EvalArgs<'a> {
    pub model: &'a Path,
    pub adapter: Option<&'a Path>,
    pub reference: &'a Path,
    pub dataset: &'a Path,
    pub beta: f64,
    pub max_length: usize,
    pub num_samples: usize,
    pub sampling: SamplingOptions,
    pub seed: u64,
    pub judge: Judge,
    pub pairwise: bool,
    pub output_dir: PathBuf,
    /// Where policy and reference run (see [`crate::device`]).
    pub device: Device,
}

fn items<'a>(prompts: &[&'a str], completions: &[&'a str]) -> Vec<Item<'a>> {
    prompts
        .iter()
        .zip(completions)
        .map(|(p, c)| Item {
            prompt: p,
            completion: c,
        })
        .collect()
}

fn mean_se(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, (var / n).sqrt())
}

/// Implicit-reward accuracy and margin on the preference pairs of `dataset`, if it has any.
fn pair_metrics(
    a: &EvalArgs,
    policy: &Decoder,
    reference: &Decoder,
    tok: &TextTokenizer,
) -> Result<Option<Value>> {
    let has_pairs = read_rows(a.dataset, None)?
        .iter()
        .any(|r| matches!(r.example, Example::Pair { .. }));
    if !has_pairs {
        return Ok(None);
    }
    let collect = |m: &Decoder| -> Result<Vec<Value>> {
        let mut rows = Vec::new();
        score_dataset(m, tok, a.dataset, Some(a.max_length), |o| {
            rows.push(o);
            Ok(())
        })?;
        Ok(rows)
    };
    let (pol, refs) = (collect(policy)?, collect(reference)?);
    let (mut correct, mut margins) = (0usize, Vec::new());
    for (p, r) in pol.iter().zip(&refs) {
        let get = |v: &Value, k: &str| v[k].as_f64();
        if let (Some(pc), Some(pr), Some(rc), Some(rr)) = (
            get(p, "chosen_logp"),
            get(p, "rejected_logp"),
            get(r, "chosen_logp"),
            get(r, "rejected_logp"),
        ) {
            let margin = a.beta * ((pc - rc) - (pr - rr));
            correct += (margin > 0.0) as usize;
            margins.push(margin);
        }
    }
    let (m, se) = mean_se(&margins);
    Ok(Some(
        json!({"pairs": margins.len(), "rewards/accuracies": correct as f64 / margins.len().max(1) as f64, "rewards/margins": m, "rewards/margins_se": se}),
    ))
}

/// `leash eval`: writes `samples.jsonl` and `report.json` in the output folder; returns the report.
pub fn eval_command(a: &EvalArgs) -> Result<Value> {
    a.sampling.validate()?;
    if a.num_samples == 0 {
        return Err(LeashError::usage(
            "num_samples must be ≥ 1".to_string(),
            "e.g. --num-samples 4",
        ));
    }
    // Ctrl-C ends the loop below (and any judge command's process group) cleanly.
    crate::train::engine::install_ctrl_c();
    std::fs::create_dir_all(&a.output_dir)
        .map_err(|e| LeashError::io(&a.output_dir, e, "check the path is writable"))?;
    let (policy, tok) = load_policy(a.model, a.adapter, &a.device)?;
    let (reference, _) = load_model(a.reference, &a.device)?;
    let eos = eos_ids(&policy, &tok);
    let pairs = pair_metrics(a, &policy, &reference, &tok)?;
    let samples_path = a.output_dir.join("samples.jsonl");
    let mut samples = std::fs::File::create(&samples_path)
        .map_err(|e| LeashError::io(&samples_path, e, "check the path is writable"))?;
    let (mut kl, mut lens_p, mut lens_r) = (Vec::new(), Vec::new(), Vec::new());
    let mut texts: Vec<(String, String, String)> = Vec::new(); // (prompt, policy, reference)
    let rows = prompts(a.dataset, &tok)?;
    let progress = Progress::new("eval", "prompt", rows.len() as u64);
    for (i, (text, ids)) in rows.iter().enumerate() {
        if crate::train::engine::INTERRUPTED.load(Ordering::SeqCst) {
            progress.abandon();
            return Err(interrupted("sampling"));
        }
        let seed = a.seed.wrapping_add(i as u64);
        let pol = generate(
            &policy,
            ids,
            a.num_samples,
            &a.sampling,
            &eos,
            &mut rand::rngs::StdRng::seed_from_u64(seed),
            true,
        )?;
        let refs = generate(
            &reference,
            ids,
            a.num_samples,
            &a.sampling,
            &eos,
            &mut rand::rngs::StdRng::seed_from_u64(seed),
            true,
        )?;
        let lp = completion_logps(&policy, ids, &pol, tok.pad_id)?;
        let lr = completion_logps(&reference, ids, &pol, tok.pad_id)?;
        for k in 0..a.num_samples {
            let d = lp[k] as f64 - lr[k] as f64;
            kl.push(d);
            lens_p.push(pol[k].len() as f64);
            lens_r.push(refs[k].len() as f64);
            let (cp, cr) = (tok.decode(&pol[k], true)?, tok.decode(&refs[k], true)?);
            let line = json!({"index": i, "sample": k, "prompt": text, "policy": cp, "reference": cr,
                "logp_policy": lp[k], "logp_reference": lr[k], "policy_tokens": pol[k].len(), "reference_tokens": refs[k].len()});
            writeln!(samples, "{line}")
                .map_err(|e| LeashError::io(&samples_path, e, "check disk space"))?;
            texts.push((text.clone(), cp, cr));
        }
        progress.inc(1);
    }
    progress.finish();
    let (kl_mean, kl_se) = mean_se(&kl);
    let (k3_mean, k3_se) = mean_se(&kl.iter().map(|&d| kl_k3(d)).collect::<Vec<_>>());
    let mut report = json!({
        "kl": kl_mean, "kl_se": kl_se, "kl_samples": kl.len(),
        "kl_k3": k3_mean, "kl_k3_se": k3_se,
        "kl_unbiased": a.sampling.is_pure(),
        "kl_note": KL_NOTE,
        "policy/mean_length": mean_se(&lens_p).0, "reference/mean_length": mean_se(&lens_r).0,
        "samples": samples_path.display().to_string(),
    });
    if let Some(p) = pairs {
        report["pairs"] = p;
    }
    // Judge last: if it fails, the samples above are already on disk.
    let prompts_v: Vec<&str> = texts.iter().map(|t| t.0.as_str()).collect();
    let pol_v: Vec<&str> = texts.iter().map(|t| t.1.as_str()).collect();
    let ref_v: Vec<&str> = texts.iter().map(|t| t.2.as_str()).collect();
    progress.println(format!("eval: judging {} samples", texts.len()));
    let outcome = if a.pairwise {
        a.judge.compare(&prompts_v, &pol_v, &ref_v)?
    } else {
        let (pi, ri) = (items(&prompts_v, &pol_v), items(&prompts_v, &ref_v));
        let (sp, sr) = (a.judge.score(&pi)?, a.judge.score(&ri)?);
        report["policy/judge_score"] = json!(mean_se(&sp).0);
        report["reference/judge_score"] = json!(mean_se(&sr).0);
        sp.iter()
            .zip(&sr)
            .map(|(x, y)| (x > y) as i8 - (x < y) as i8)
            .collect()
    };
    let n = outcome.len().max(1) as f64;
    report["win_rate"] = json!(outcome.iter().filter(|&&o| o > 0).count() as f64 / n);
    report["tie_rate"] = json!(outcome.iter().filter(|&&o| o == 0).count() as f64 / n);
    report["loss_rate"] = json!(outcome.iter().filter(|&&o| o < 0).count() as f64 / n);
    let path = a.output_dir.join("report.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&report).unwrap_or_default(),
    )
    .map_err(|e| LeashError::io(&path, e, "check disk space"))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k3_is_non_negative_and_its_mean_under_pi_is_the_exact_kl() {
        // By hand: d = ln 2 (π twice π_ref) gives r = 1/2 and k3 = −1/2 + ln 2.
        assert!((kl_k3(2f64.ln()) - (2f64.ln() - 0.5)).abs() < 1e-15);
        assert_eq!(kl_k3(0.0), 0.0);
        for d in [-30.0, -1.0, -1e-9, 1e-9, 0.5, 40.0] {
            assert!(kl_k3(d) >= 0.0, "k3({d}) = {}", kl_k3(d));
        }
        // Two categorical distributions: Σ π·k3 equals Σ π log(π/ρ) exactly (E_π[r] = 1).
        let (pi, rho): ([f64; 3], [f64; 3]) = ([0.5, 0.3, 0.2], [0.2, 0.3, 0.5]);
        let exact: f64 = pi.iter().zip(&rho).map(|(p, q)| p * (p / q).ln()).sum();
        let k3: f64 = pi
            .iter()
            .zip(&rho)
            .map(|(p, q)| p * kl_k3((p / q).ln()))
            .sum();
        assert!((exact - k3).abs() < 1e-12, "{exact} vs {k3}");
        assert!((exact - 0.2748872196).abs() < 1e-9, "{exact}");
    }
}

//! `leash lab <experiment>`: the lessons of preference optimization, each reproduced on real
//! training runs in the demo's synthetic world, with a report, a plot and a computed verdict.
//! Every lab starts from the same SFT reference (built once per output folder and reused).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::data::collate::collate;
use crate::data::encode::Sequence;
use crate::demo::{run_args, world_and_reference, DemoConfig};
use crate::error::{read_text, LeashError, Result};
use crate::eval::evaluate::{eval_command, load_policy, EvalArgs};
use crate::eval::generate::SamplingOptions;
use crate::eval::judge::Judge;
use crate::loss::dpo::{dpo_loss, DpoLossType, DpoOptions, PairLogps};
use crate::loss::logps::score;
use crate::model::frozen_dtype::upcast;
use crate::model::ForwardInput;
use crate::report::plot::{line_plot, metric_series, Series};
use crate::train::config::{resolve, Method};
use crate::train::grads::GradAccumulator;
use crate::train::trainer::train;

mod length_bias;
mod lora;

pub const EXPERIMENTS: &[&str] = &[
    "logps",
    "grad",
    "overtrain",
    "beta-sweep",
    "ipo-vs-dpo",
    "kto",
    "dpo-vs-grpo",
    "length-bias",
    "lora",
];

/// A lab's result: the one-line verdict, whether the lesson reproduced, and its report.
pub struct Outcome {
    pub verdict: String,
    pub reproduced: bool,
    pub report: PathBuf,
}

struct Lab {
    dir: PathBuf,
    data: PathBuf,
    reference: PathBuf,
    cfg: DemoConfig,
    /// Where the lab's own computations run (its training runs resolve `cfg.device`).
    device: Device,
}

/// Runs `name` under `root` (the shared reference lives in `root/reference`).
pub fn run_lab(name: &str, root: &Path, cfg: &DemoConfig) -> Result<Outcome> {
    if !EXPERIMENTS.contains(&name) {
        return Err(LeashError::usage(
            format!("unknown experiment `{name}`"),
            format!("experiments: {}", EXPERIMENTS.join(", ")),
        ));
    }
    let device = crate::device::resolve(cfg.device)?;
    let shared = root.join("reference");
    let (data, reference) = if shared.join("sft/model.safetensors").exists() {
        (shared.join("data"), shared.join("sft"))
    } else {
        world_and_reference(&shared, cfg, &Instant::now())?
    };
    let dir = root.join(name);
    std::fs::create_dir_all(&dir)
        .map_err(|e| LeashError::io(&dir, e, "check the folder is writable"))?;
    let lab = Lab {
        dir,
        data,
        reference,
        cfg: cfg.clone(),
        device,
    };
    let (verdict, reproduced, body) = match name {
        "logps" => lab.logps()?,
        "grad" => lab.grad()?,
        "overtrain" => lab.overtrain()?,
        "beta-sweep" => lab.beta_sweep()?,
        "ipo-vs-dpo" => lab.ipo_vs_dpo()?,
        "kto" => lab.kto()?,
        "length-bias" => lab.length_bias()?,
        "lora" => lab.lora()?,
        _ => lab.dpo_vs_grpo()?,
    };
    let report = lab.dir.join("report.md");
    let text = format!("# lab: {name}\n\n**Verdict:** {verdict}\n\n{body}\n");
    std::fs::write(&report, text)
        .map_err(|e| LeashError::io(&report, e, "check the folder is writable"))?;
    Ok(Outcome {
        verdict,
        reproduced,
        report,
    })
}

fn last_metric(metrics: &Path, key: &str) -> Result<Option<f64>> {
    let text = read_text(metrics)?;
    Ok(text
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v.get(key)?.as_f64()))
}

fn first_metric(metrics: &Path, key: &str) -> Result<Option<f64>> {
    let text = read_text(metrics)?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v.get(key)?.as_f64()))
}

fn plot(path: &Path, title: &str, x: &str, y: &str, series: &[Series]) -> String {
    match line_plot(path, title, x, y, series) {
        Ok(()) => format!(
            "![{title}]({})\n",
            path.file_name()
                .map(|f| f.to_string_lossy().to_string())
                .unwrap_or_default()
        ),
        Err(e) => format!("(plot skipped: {e})\n"),
    }
}

impl Lab {
    fn dpo_run(
        &self,
        name: &str,
        beta: f64,
        loss_type: &str,
        steps: usize,
        lr: f64,
    ) -> Result<PathBuf> {
        let out = self.dir.join(name);
        let mut a = run_args(
            &self.cfg,
            &self.reference,
            self.data.join("pref_train.jsonl"),
            &out,
            steps,
            lr,
        );
        a.beta = Some(beta);
        a.loss_type = Some(loss_type.into());
        a.lr_scheduler_type = Some("constant".into());
        a.logging_steps = Some(5);
        train(&resolve(Method::Dpo, &a)?)?;
        Ok(out)
    }

    fn evaluate(&self, model: &Path, out: &Path) -> Result<Value> {
        eval_command(&EvalArgs {
            model,
            adapter: None,
            reference: &self.reference,
            dataset: &self.data.join("pref_test.jsonl"),
            beta: 0.1,
            max_length: 64,
            num_samples: self.cfg.eval_samples,
            sampling: SamplingOptions {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                max_new_tokens: 32,
            },
            seed: self.cfg.seed,
            judge: Judge::Builtin("arithmetic".into()),
            pairwise: false,
            output_dir: out.to_path_buf(),
            device: self.device.clone(),
        })
    }

    /// A sequence log-prob from leash's scorer vs a hand computation in f64 from raw logits.
    fn logps(&self) -> Result<(String, bool, String)> {
        let (model, tok) = load_policy(&self.reference, None, &self.device)?;
        let prompt = tok.encode("Q: what is 3 + 4?", true)?;
        let full = tok.encode(
            &format!("Q: what is 3 + 4? Sure! 3 + 4 = 7.{}", tok.eos_token),
            true,
        )?;
        let seq = Sequence {
            loss_start: prompt.len(),
            ids: full.clone(),
        };
        let batch = collate(&[&seq], tok.pad_id, None, &[], &self.device)?;
        let leash_lp = score(&model, &batch)?.seq_logps.to_vec1::<f32>()?[0] as f64;
        // By hand: logits at every position, log-softmax in f64, sum over completion tokens.
        let input = ForwardInput {
            ids: batch.input.ids.clone(),
            positions: (0..full.len() as u32).collect(),
            mask: batch.input.mask.clone(),
        };
        let logits = model
            .forward_hidden(&input)?
            .squeeze(0)?
            .matmul(&upcast(model.lm_head())?.t()?)?
            .to_vec2::<f32>()?;
        let mut by_hand = 0.0f64;
        let mut per_token = Vec::new();
        let mut lines = String::from("| t | token | log p |\n|---|---|---|\n");
        for t in prompt.len()..full.len() {
            let row = &logits[t - 1];
            let max = row.iter().map(|&x| x as f64).fold(f64::MIN, f64::max);
            let lse = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            let lp = row[full[t] as usize] as f64 - lse;
            by_hand += lp;
            per_token.push(((t - prompt.len() + 1) as f64, lp));
            let _ = writeln!(
                lines,
                "| {t} | {:?} | {lp:.5} |",
                tok.decode(&[full[t]], false)?
            );
        }
        let diff = (leash_lp - by_hand).abs();
        let ok = diff < 1e-4;
        let body_plot = plot(
            &self.dir.join("token_logps.png"),
            "sequence log-prob = sum of per-token log-probs",
            "completion token",
            "log p (nats)",
            &[
                Series {
                    name: "log p(token | prefix)".into(),
                    points: per_token.clone(),
                },
                Series {
                    name: "running sum".into(),
                    points: per_token
                        .iter()
                        .scan(0.0, |acc, &(t, lp)| {
                            *acc += lp;
                            Some((t, *acc))
                        })
                        .collect(),
                },
                Series {
                    name: "leash's sequence log-prob".into(),
                    points: per_token.iter().map(|&(t, _)| (t, leash_lp)).collect(),
                },
            ],
        );
        lines += &format!("\n{body_plot}");
        let verdict = format!("leash's sequence log-prob {leash_lp:.5} equals the hand computation {by_hand:.5} (|Δ| = {diff:.1e}) — {}", if ok { "reproduced" } else { "MISMATCH" });
        Ok((verdict, ok, format!("Completion \" Sure! 3 + 4 = 7.\" after \"Q: what is 3 + 4?\": the sum over completion tokens of log p(token | prefix), token t scored by the logits at t−1.\n\n{lines}")))
    }

    /// One gradient step on the DPO loss raises chosen and lowers rejected log-probs; the
    /// gradient matches a central finite difference along its own direction.
    fn grad(&self) -> Result<(String, bool, String)> {
        let (base, tok) = load_policy(&self.reference, None, &self.device)?;
        let prepared = crate::train::examples::prepare(
            Method::Dpo,
            &self.data.join("pref_train.jsonl"),
            &tok,
            64,
            8,
        )?;
        let (policy, vars) = base.to_trainable()?;
        let pairs: Vec<_> = prepared.examples.iter().take(8).collect();
        let mut seqs = Vec::new();
        for part in 0..2 {
            for (_, ex) in &pairs {
                if let crate::train::examples::TrainExample::Pair { chosen, rejected } = ex {
                    seqs.push(crate::train::examples::to_sequence(
                        if part == 0 { chosen } else { rejected },
                        64,
                    ));
                }
            }
        }
        let refs: Vec<&Sequence> = seqs.iter().collect();
        let batch = collate(&refs, tok.pad_id, None, &[], &self.device)?;
        let p = pairs.len();
        let reference = score(&base, &batch)?.seq_logps;
        let loss_at = |m: &crate::model::Decoder| -> Result<(Tensor, Vec<f32>)> {
            let lp = score(m, &batch)?.seq_logps;
            let n = Tensor::ones(p, candle_core::DType::F32, &self.device)?;
            let out = dpo_loss(
                &PairLogps {
                    chosen: &lp.narrow(0, 0, p)?,
                    rejected: &lp.narrow(0, p, p)?,
                    ref_chosen: &reference.narrow(0, 0, p)?,
                    ref_rejected: &reference.narrow(0, p, p)?,
                    chosen_tokens: &n,
                    rejected_tokens: &n,
                },
                &DpoOptions {
                    beta: 0.1,
                    loss_type: DpoLossType::Sigmoid,
                    label_smoothing: 0.0,
                },
            )?;
            Ok((out.loss, lp.detach().to_vec1()?))
        };
        let (loss, before) = loss_at(&policy)?;
        let grads = loss.backward()?;
        let g = GradAccumulator::of(&grads, &vars)?;
        let norm2: f64 = g
            .iter()
            .map(|t| {
                t.sqr()
                    .and_then(|s| s.sum_all())
                    .and_then(|s| s.to_scalar::<f32>())
                    .unwrap_or(0.0) as f64
            })
            .sum();
        let originals: Vec<Tensor> = vars
            .iter()
            .map(|(_, v)| v.as_tensor().copy())
            .collect::<candle_core::Result<_>>()?;
        let shift = |scale: f64| -> Result<()> {
            for ((_, v), (o, gi)) in vars.iter().zip(originals.iter().zip(&g)) {
                v.set(&(o + (gi * scale)?)?)?;
            }
            Ok(())
        };
        let eps = 1e-3 / norm2.sqrt();
        shift(eps)?;
        let plus = loss_at(&policy)?.0.to_scalar::<f32>()? as f64;
        shift(-eps)?;
        let minus = loss_at(&policy)?.0.to_scalar::<f32>()? as f64;
        let numeric = (plus - minus) / (2.0 * eps); // directional derivative along g = |g|²
        let rel = (numeric - norm2).abs() / norm2.max(1e-12);
        let lr = 1e-3 / norm2.sqrt();
        shift(-lr)?;
        let after = loss_at(&policy)?.1;
        let mean =
            |v: &[f32], a: usize| v[a..a + p].iter().map(|&x| x as f64).sum::<f64>() / p as f64;
        let (dc, dr) = (
            mean(&after, 0) - mean(&before, 0),
            mean(&after, p) - mean(&before, p),
        );
        let ok = dc > 0.0 && dr < 0.0 && rel < 5e-2;
        // The picture of the lesson: mean chosen and rejected log-probs along the line
        // θ − t·∇L/|∇L|, from a step against the gradient to several steps along it.
        let (mut chosen_line, mut rejected_line) = (Vec::new(), Vec::new());
        for t in [-2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0] {
            shift(-t * 1e-3 / norm2.sqrt())?;
            let lp = loss_at(&policy)?.1;
            chosen_line.push((t, mean(&lp, 0)));
            rejected_line.push((t, mean(&lp, p)));
        }
        shift(0.0)?;
        let body_plot = plot(
            &self.dir.join("logps_vs_step.png"),
            "DPO: log-probs along the gradient step",
            "step length along −∇L (×1e-3)",
            "mean sequence log p (nats)",
            &[
                Series {
                    name: "chosen".into(),
                    points: chosen_line,
                },
                Series {
                    name: "rejected".into(),
                    points: rejected_line,
                },
            ],
        );
        let verdict = format!("one DPO gradient step moved chosen log-probs by {dc:+.3} and rejected by {dr:+.3}; analytic vs finite-difference directional derivative differ by {:.1} % — {}", rel * 100.0, if ok { "reproduced" } else { "NOT reproduced" });
        Ok((verdict, ok, format!("8 pairs from the training set; step of length 1e-3 along −∇L; finite difference in f32 with ε·|∇L| = 1e-3.\n\n| | mean before | mean after |\n|---|---|---|\n| chosen log-prob | {:.3} | {:.3} |\n| rejected log-prob | {:.3} | {:.3} |\n\n{body_plot}", mean(&before, 0), mean(&after, 0), mean(&before, p), mean(&after, p))))
    }

    /// Train DPO far too long: the rejected log-prob plummets, the chosen one falls too, the
    /// margin still grows, and the monitor warns.
    fn overtrain(&self) -> Result<(String, bool, String)> {
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

    /// β is the leash: the same DPO run at several β; measured KL(π‖π_ref) falls as β grows.
    fn beta_sweep(&self) -> Result<(String, bool, String)> {
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

    /// Overtrain DPO and IPO alike: IPO's squared loss pulls the margin to a target, DPO's
    /// keeps pushing it up.
    fn ipo_vs_dpo(&self) -> Result<(String, bool, String)> {
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

    /// The same reference aligned offline (DPO on the preference pairs) and online (GRPO
    /// sampling from the policy, scored by the arithmetic judge as reward), compared on
    /// held-out prompts with wall time for each.
    fn dpo_vs_grpo(&self) -> Result<(String, bool, String)> {
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

    /// KTO learns from unpaired thumbs-up/down rows (the pairs split apart) and still improves
    /// the judge score over the reference.
    fn kto(&self) -> Result<(String, bool, String)> {
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

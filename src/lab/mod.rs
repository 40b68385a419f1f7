//! `leash lab <experiment>`: the lessons of preference optimization, each reproduced on real
//! training runs in the demo's synthetic world, with a report, a plot and a computed verdict.
//! Every lab starts from the same SFT reference (built once per output folder and reused).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use serde_json::Value;

use crate::demo::{run_args, world_and_reference, DemoConfig};
use crate::error::{read_text, LeashError, Result};
use crate::eval::evaluate::{eval_command, EvalArgs};
use crate::eval::generate::SamplingOptions;
use crate::eval::judge::Judge;
use crate::report::plot::{line_plot, Series};
use crate::train::config::{resolve, Method};
use crate::train::trainer::train;

mod beta_sweep;
mod dpo_vs_grpo;
mod grad;
mod ipo_vs_dpo;
mod kto;
mod length_bias;
mod logps;
mod lora;
mod overtrain;

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
}

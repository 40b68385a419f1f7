//! `leash demo`: alignment happening, end to end, with nothing but the binary. Builds a
//! synthetic arithmetic world (polite + correct answers preferred over rude, terse or wrong
//! ones), trains its own tokenizer, trains a tiny Llama from scratch with SFT on a mix of
//! good and bad answers (the reference), aligns it with DPO, then compares reference and
//! aligned model on held-out prompts: judge win rate, KL(π‖π_ref), samples, and plots in
//! `report.md`.

pub mod report;
pub mod tokenizer_train;
pub mod world;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::device::DeviceChoice;
use crate::error::{LeashError, Result};
use crate::eval::evaluate::{eval_command, EvalArgs};
use crate::eval::generate::SamplingOptions;
use crate::eval::judge::Judge;
use crate::model::weights::{RandomInit, Weights};
use crate::model::{Decoder, ModelConfig};
use crate::train::config::{resolve, Method, TrainArgs};
use crate::train::trainer::train;

/// Sizes and schedules of the demo (the test uses a smaller one).
#[derive(Clone, Debug)]
pub struct DemoConfig {
    pub seed: u64,
    pub n_sft: usize,
    pub n_pref: usize,
    pub n_test: usize,
    pub vocab_size: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub sft_steps: usize,
    pub sft_lr: f64,
    pub dpo_steps: usize,
    pub dpo_lr: f64,
    pub beta: f64,
    pub batch: usize,
    pub eval_samples: usize,
    /// Where every run trains and samples (`--device`).
    pub device: DeviceChoice,
}

impl DemoConfig {
    /// The README's demo: about a minute or two on 2 CPU cores (release build).
    pub fn standard() -> Self {
        DemoConfig {
            seed: 7,
            n_sft: 3000,
            n_pref: 1000,
            n_test: 32,
            vocab_size: 400,
            hidden: 96,
            layers: 3,
            heads: 4,
            intermediate: 256,
            sft_steps: 300,
            sft_lr: 4e-3,
            dpo_steps: 60,
            dpo_lr: 2e-4,
            beta: 0.2,
            batch: 32,
            eval_samples: 4,
            device: DeviceChoice::Auto,
        }
    }

    /// A few seconds in a debug build, for tests.
    pub fn small() -> Self {
        DemoConfig {
            n_sft: 600,
            n_pref: 200,
            n_test: 8,
            hidden: 48,
            layers: 2,
            intermediate: 128,
            sft_steps: 120,
            dpo_steps: 30,
            batch: 16,
            eval_samples: 2,
            ..Self::standard()
        }
    }
}

pub struct DemoSummary {
    pub report: Value,
    pub report_path: PathBuf,
}

fn write_jsonl(path: &Path, rows: &[Value]) -> Result<()> {
    let body: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, body)
        .map_err(|e| LeashError::io(path, e, "check the output folder is writable"))
}

/// A randomly initialised Llama checkpoint (config.json + model.safetensors) in `dir`.
fn init_model(dir: &Path, cfg: &DemoConfig, vocab: usize) -> Result<()> {
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": cfg.hidden, "intermediate_size": cfg.intermediate, "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.heads, "head_dim": cfg.hidden / cfg.heads,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 256, "hidden_act": "silu",
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32",
    });
    let path = dir.join("config.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&config).unwrap_or_default(),
    )
    .map_err(|e| LeashError::io(&path, e, "check the folder is writable"))?;
    let model_cfg = ModelConfig::from_json_str(&config.to_string(), &path)?;
    let init = RandomInit {
        seed: cfg.seed,
        std: 0.02,
        norm_jitter: 0.0,
        bias_std: 0.0,
        dtype: DType::F32,
    };
    // Drawn and written on the host: a file, not a run.
    let model = Decoder::from_weights(model_cfg, &Weights::random(init, &Device::Cpu))?;
    let tensors: HashMap<String, Tensor> = model.params().iter().cloned().collect();
    let weights = dir.join("model.safetensors");
    crate::files::save_safetensors(&tensors, &weights)
}

fn stage(name: &str, start: &Instant) {
    eprintln!("\n== [{:.0} s] {name}", start.elapsed().as_secs_f64());
}

/// Training options shared by the demo's and the labs' runs.
pub fn run_args(
    cfg: &DemoConfig,
    model: &Path,
    dataset: PathBuf,
    output: &Path,
    steps: usize,
    lr: f64,
) -> TrainArgs {
    TrainArgs {
        model: Some(model.to_path_buf()),
        dataset: Some(dataset),
        output_dir: Some(output.to_path_buf()),
        overwrite_output_dir: Some(true),
        max_steps: Some(steps as i64),
        learning_rate: Some(lr),
        per_device_train_batch_size: Some(cfg.batch),
        max_length: Some(64),
        logging_steps: Some(10),
        save_steps: Some(100_000),
        seed: Some(cfg.seed),
        device: Some(cfg.device),
        ..Default::default()
    }
}

/// Stages 1–2 of the demo: the synthetic world in `out/data`, a tokenizer and random model in
/// `out/base`, and the SFT reference in `out/sft`. Returns (data dir, sft dir).
pub fn world_and_reference(
    out: &Path,
    cfg: &DemoConfig,
    start: &Instant,
) -> Result<(PathBuf, PathBuf)> {
    let (data, base, sft) = (out.join("data"), out.join("base"), out.join("sft"));
    for d in [&data, &base] {
        std::fs::create_dir_all(d)
            .map_err(|e| LeashError::io(d, e, "check the output folder is writable"))?;
    }
    stage(
        "1/5 building the synthetic world and training a tokenizer",
        start,
    );
    let world = world::build(cfg.seed, cfg.n_sft, cfg.n_pref, cfg.n_test);
    write_jsonl(&data.join("sft.jsonl"), &world.sft)?;
    write_jsonl(&data.join("pref_train.jsonl"), &world.pref_train)?;
    write_jsonl(&data.join("pref_test.jsonl"), &world.pref_test)?;
    let vocab = tokenizer_train::train_tokenizer(&world.corpus, cfg.vocab_size, &base)?;
    init_model(&base, cfg, vocab)?;
    eprintln!(
        "{} SFT rows, {} preference pairs, {} held-out; tokenizer of {vocab} tokens",
        world.sft.len(),
        world.pref_train.len(),
        world.pref_test.len()
    );
    stage(
        "2/5 SFT from scratch on a mix of good and bad answers (this model becomes the reference)",
        start,
    );
    let mut sft_args = run_args(
        cfg,
        &base,
        data.join("sft.jsonl"),
        &sft,
        cfg.sft_steps,
        cfg.sft_lr,
    );
    sft_args.lr_scheduler_type = Some("cosine".into());
    sft_args.warmup_steps = Some(cfg.sft_steps / 20);
    train(&resolve(Method::Sft, &sft_args)?)?;
    Ok((data, sft))
}

/// Runs the whole demo into `out` and writes `out/report.md`.
pub fn run_demo(out: &Path, cfg: &DemoConfig) -> Result<DemoSummary> {
    // First: a device that cannot be had stops the demo before it writes anything.
    let device = crate::device::resolve(cfg.device)?;
    let start = Instant::now();
    let (data, sft) = world_and_reference(out, cfg, &start)?;
    let (dpo, eval) = (out.join("dpo"), out.join("eval"));
    stage("3/5 DPO: prefer polite, correct answers", &start);
    let mut dpo_args = run_args(
        cfg,
        &sft,
        data.join("pref_train.jsonl"),
        &dpo,
        cfg.dpo_steps,
        cfg.dpo_lr,
    );
    dpo_args.beta = Some(cfg.beta);
    dpo_args.eval_dataset = Some(data.join("pref_test.jsonl"));
    dpo_args.eval_steps = Some((cfg.dpo_steps / 3).max(1));
    dpo_args.logging_steps = Some(5);
    train(&resolve(Method::Dpo, &dpo_args)?)?;

    stage(
        "4/5 evaluating aligned vs reference on held-out prompts",
        &start,
    );
    let eval_args = EvalArgs {
        model: &dpo,
        adapter: None,
        reference: &sft,
        dataset: &data.join("pref_test.jsonl"),
        beta: cfg.beta,
        max_length: 64,
        num_samples: cfg.eval_samples,
        sampling: SamplingOptions {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 32,
        },
        seed: cfg.seed,
        judge: Judge::Builtin("arithmetic".into()),
        pairwise: false,
        output_dir: eval.clone(),
        device,
    };
    let report = eval_command(&eval_args)?;

    stage("5/5 writing the report", &start);
    let report_path = report::write_report(out, &report, cfg, start.elapsed().as_secs_f64())?;
    Ok(DemoSummary {
        report,
        report_path,
    })
}

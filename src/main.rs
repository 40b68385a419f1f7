//! The `leash` command line: parses flags, resolves settings, calls the library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use leash::train::config::{resolve, Method, TrainArgs};

#[derive(Parser)]
#[command(
    name = "leash",
    version,
    about = "Align language models to human preferences"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Score each row of a data set: summed completion log-probs, one JSON object per row.
    Logps {
        /// Hugging Face checkpoint folder (config.json, model.safetensors, tokenizer.json).
        #[arg(long)]
        model: PathBuf,
        /// JSONL data set (preference, unpaired, or SFT rows).
        #[arg(long)]
        dataset: PathBuf,
        /// Truncate prompt+completion to this many tokens, keeping the start (TRL's default: 1024).
        #[arg(long, default_value_t = 1024)]
        max_length: usize,
    },
    /// Fold a LoRA adapter into its base model and write a plain Hugging Face checkpoint.
    Merge {
        /// Base model folder.
        #[arg(long)]
        model: PathBuf,
        /// PEFT/leash adapter folder (adapter_config.json + adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        /// Where to write the merged checkpoint.
        #[arg(long)]
        output_dir: PathBuf,
    },
    /// Measure throughput (tokens/s, GFLOP/s) of the hot paths on a random model.
    Bench {
        /// Model shape: bench (the notes' 5.3 M-parameter Llama) or smollm-135m.
        #[arg(long, default_value = "bench")]
        shape: String,
        /// What to time: forward, dpo, all, or dpo-lora (run dpo and dpo-lora as separate
        /// processes to compare their peak memory).
        #[arg(long, default_value = "all")]
        what: String,
        /// Timed steps (after one warm-up); the median is reported.
        #[arg(long, default_value_t = 5)]
        steps: usize,
    },
    /// Supervised fine-tuning with the loss on completion tokens only (TRL SFTTrainer).
    Sft(TrainArgs),
    /// Direct Preference Optimization against a frozen reference (TRL DPOTrainer);
    /// `--loss-type ipo` for IPO, `hinge` for SLiC.
    Dpo(TrainArgs),
    /// Kahneman-Tversky Optimization on unpaired thumbs-up/down data (TRL KTOTrainer).
    Kto(TrainArgs),
    /// Odds-Ratio Preference Optimization: SFT + odds-ratio term, no reference (TRL ORPOTrainer).
    Orpo(TrainArgs),
}

fn train(method: Method, args: &TrainArgs) -> anyhow::Result<()> {
    let cfg = resolve(method, args)?;
    let summary = leash::train::trainer::train(&cfg)?;
    eprintln!(
        "done: {} steps, final loss {}; model and metrics.jsonl in {}",
        summary.steps,
        summary
            .final_loss
            .map_or("n/a".to_string(), |l| format!("{l:.4}")),
        summary.output_dir.display()
    );
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Merge {
            model,
            adapter,
            output_dir,
        } => {
            leash::merge::merge(&model, &adapter, &output_dir)?;
            eprintln!("merged checkpoint written to {}", output_dir.display());
        }
        Command::Bench { shape, what, steps } => {
            leash::bench::run(&shape, &what, steps, |obj| {
                eprintln!(
                    "{:<22} {:>8.0} tokens/s  {:>6.1} GFLOP/s  ({} threads)",
                    obj["bench"].as_str().unwrap_or(""),
                    obj["tokens_per_s"].as_f64().unwrap_or(0.0),
                    obj["gflops_per_s"].as_f64().unwrap_or(0.0),
                    obj["threads"]
                );
                println!("{obj}");
            })?;
        }
        Command::Sft(a) => train(Method::Sft, &a)?,
        Command::Dpo(a) => train(Method::Dpo, &a)?,
        Command::Kto(a) => train(Method::Kto, &a)?,
        Command::Orpo(a) => train(Method::Orpo, &a)?,
        Command::Logps {
            model,
            dataset,
            max_length,
        } => {
            let device = candle_core::Device::Cpu;
            let (decoder, tokenizer) = leash::scoring::load_model(&model, &device)?;
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            leash::scoring::score_dataset(
                &decoder,
                &tokenizer,
                &dataset,
                Some(max_length),
                |obj| {
                    writeln!(out, "{obj}").map_err(|e| {
                        leash::LeashError::io(
                            std::path::Path::new("<stdout>"),
                            e,
                            "is the output pipe closed?",
                        )
                    })
                },
            )?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

//! The `leash` command line: parses flags, resolves settings, calls the library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
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

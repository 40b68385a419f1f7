//! The `leash` command line: parses flags, resolves settings, calls the library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use leash::eval::evaluate::{eval_command, generate_command, EvalArgs, GenerateArgs};
use leash::eval::generate::SamplingOptions;
use leash::eval::judge::Judge;
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
    /// The demo: build a synthetic world, train a tiny model from scratch (SFT), align it with
    /// DPO, and compare aligned vs reference on held-out prompts. Writes runs/demo/report.md.
    Demo {
        /// Output folder.
        #[arg(long, default_value = "runs/demo")]
        output_dir: PathBuf,
        /// The small configuration used by the tests (seconds instead of minutes).
        #[arg(long)]
        small: bool,
    },
    /// Reproduce one lesson of preference optimization on real runs, with report, plot and a
    /// computed verdict: logps, grad, overtrain, beta-sweep, ipo-vs-dpo, kto, dpo-vs-grpo,
    /// length-bias, lora.
    Lab {
        experiment: String,
        #[arg(long, default_value = "runs/lab")]
        output_dir: PathBuf,
        /// The small configuration used by the tests.
        #[arg(long)]
        small: bool,
    },
    /// Inspect or fix preference data: `report` (length statistics), `balance-length`.
    Data {
        #[command(subcommand)]
        action: DataAction,
    },
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
    /// Sample completions for prompts (JSONL `prompt` strings or conversations).
    Generate {
        #[arg(long)]
        model: PathBuf,
        /// LoRA adapter to apply (PEFT layout).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// JSONL with a `prompt` per row.
        #[arg(long)]
        prompts: PathBuf,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Completions per prompt.
        #[arg(long, default_value_t = 1)]
        num_return_sequences: usize,
    },
    /// Evaluate a policy against its reference on held-out data: reward accuracy on pairs,
    /// KL(π‖π_ref) on samples, lengths, judge scores and win rate. Writes report.json.
    Eval {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// The reference model folder (usually the model training started from).
        #[arg(long)]
        reference: PathBuf,
        /// Held-out JSONL (preference pairs or prompts).
        #[arg(long)]
        dataset: PathBuf,
        /// β for implicit rewards on pairs.
        #[arg(long, default_value_t = 0.1)]
        beta: f64,
        #[arg(long, default_value_t = 1024)]
        max_length: usize,
        /// Samples per prompt for each of policy and reference.
        #[arg(long, default_value_t = 4)]
        num_samples: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Built-in judge: arithmetic, correct, polite, length.
        #[arg(long, default_value = "arithmetic")]
        judge: String,
        /// External judge: reads JSONL {prompt, completion} on stdin, prints one score per line.
        #[arg(long)]
        judge_cmd: Option<String>,
        /// With --judge-cmd: the command gets {prompt, completion_a, completion_b} and prints a, b or tie.
        #[arg(long)]
        pairwise: bool,
        /// Seconds before a judge command is considered hung.
        #[arg(long, default_value_t = 300)]
        judge_timeout: u64,
        #[arg(long)]
        output_dir: PathBuf,
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
        /// Model shape: bench (the notes' 5.3 M-parameter Llama), smollm-135m or qwen2.5-0.5b.
        #[arg(long, default_value = "bench")]
        shape: String,
        /// What to time: matmul (the ceiling), forward, train (forward+backward, SFT step), dpo
        /// (padded vs shared prompt, reference cached vs live), generate, grpo (sampling vs
        /// learning split), all, or dpo-lora (run dpo and dpo-lora as separate processes to
        /// compare their peak memory).
        #[arg(long, default_value = "all")]
        what: String,
        /// Timed steps (after one warm-up); the median is reported.
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Preference pairs per DPO step (dpo, dpo-lora); each pair is 2 × 256 tokens.
        #[arg(long, default_value_t = 8)]
        pairs: usize,
        /// Train with gradient checkpointing (train, dpo, dpo-lora), as `--gradient-checkpointing`.
        #[arg(long)]
        gradient_checkpointing: bool,
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
    /// Group Relative Policy Optimization, online: sample --num-generations completions per
    /// prompt, score them with --reward-funcs / --reward-cmd, and push up the better-than-group
    /// ones (TRL GRPOTrainer). Batch sizes count completions.
    Grpo(TrainArgs),
}

#[derive(Subcommand)]
enum DataAction {
    /// Length statistics of chosen vs rejected completions (chars); `length_bias` is the
    /// fraction of pairs with a longer chosen minus the fraction with a shorter one.
    Report {
        #[arg(long)]
        dataset: PathBuf,
    },
    /// Subsample so chosen is longer in as many pairs as it is shorter.
    BalanceLength {
        #[arg(long)]
        dataset: PathBuf,
        #[arg(long)]
        output: PathBuf,
    },
}

#[derive(clap::Args)]
struct SamplingArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

impl SamplingArgs {
    fn options(&self) -> SamplingOptions {
        SamplingOptions {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            max_new_tokens: self.max_new_tokens,
        }
    }
}

fn train(method: Method, args: &TrainArgs) -> anyhow::Result<()> {
    let cfg = resolve(method, args)?;
    let summary = if method == Method::Grpo {
        leash::train::grpo::train(&cfg)?
    } else {
        leash::train::trainer::train(&cfg)?
    };
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
        Command::Lab {
            experiment,
            output_dir,
            small,
        } => {
            let cfg = if small {
                leash::demo::DemoConfig::small()
            } else {
                leash::demo::DemoConfig::standard()
            };
            let outcome = leash::lab::run_lab(&experiment, &output_dir, &cfg)?;
            println!("{}\nreport: {}", outcome.verdict, outcome.report.display());
        }
        Command::Data { action } => {
            let report = match action {
                DataAction::Report { dataset } => leash::data::length::length_report(&dataset)?,
                DataAction::BalanceLength { dataset, output } => {
                    leash::data::length::balance_length(&dataset, &output)?
                }
            };
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Demo { output_dir, small } => {
            let cfg = if small {
                leash::demo::DemoConfig::small()
            } else {
                leash::demo::DemoConfig::standard()
            };
            let summary = leash::demo::run_demo(&output_dir, &cfg)?;
            let r = &summary.report;
            let f = |k: &str| r.get(k).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
            println!(
                "aligned vs reference on held-out prompts: win {:.0}% / tie {:.0}% / loss {:.0}%; judge {:.2} vs {:.2}; KL {:.2} ± {:.2} nats\nreport: {}",
                100.0 * f("win_rate"), 100.0 * f("tie_rate"), 100.0 * f("loss_rate"),
                f("policy/judge_score"), f("reference/judge_score"), f("kl"), f("kl_se"),
                summary.report_path.display()
            );
        }
        Command::Generate {
            model,
            adapter,
            prompts,
            sampling,
            num_return_sequences,
        } => {
            let args = GenerateArgs {
                model: &model,
                adapter: adapter.as_deref(),
                prompts: &prompts,
                sampling: sampling.options(),
                num_return_sequences,
                seed: sampling.seed,
            };
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            generate_command(&args, |obj| {
                writeln!(out, "{obj}").map_err(|e| {
                    leash::LeashError::io(
                        std::path::Path::new("<stdout>"),
                        e,
                        "is the output pipe closed?",
                    )
                })
            })?;
        }
        Command::Eval {
            model,
            adapter,
            reference,
            dataset,
            beta,
            max_length,
            num_samples,
            sampling,
            judge,
            judge_cmd,
            pairwise,
            judge_timeout,
            output_dir,
        } => {
            let judge = match judge_cmd {
                Some(cmd) => Judge::Command {
                    cmd,
                    timeout: std::time::Duration::from_secs(judge_timeout),
                },
                None => {
                    if !leash::eval::judge::BUILTIN_JUDGES.contains(&judge.as_str()) {
                        anyhow::bail!(leash::LeashError::usage(
                            format!("unknown judge `{judge}`"),
                            format!(
                                "built-in judges: {}; or pass --judge-cmd",
                                leash::eval::judge::BUILTIN_JUDGES.join(", ")
                            )
                        ));
                    }
                    Judge::Builtin(judge)
                }
            };
            let args = EvalArgs {
                model: &model,
                adapter: adapter.as_deref(),
                reference: &reference,
                dataset: &dataset,
                beta,
                max_length,
                num_samples,
                sampling: sampling.options(),
                seed: sampling.seed,
                judge,
                pairwise,
                output_dir,
            };
            let report = eval_command(&args)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Merge {
            model,
            adapter,
            output_dir,
        } => {
            leash::merge::merge(&model, &adapter, &output_dir)?;
            eprintln!("merged checkpoint written to {}", output_dir.display());
        }
        Command::Bench {
            shape,
            what,
            steps,
            pairs,
            gradient_checkpointing,
        } => {
            if pairs == 0 {
                return Err(leash::LeashError::usage(
                    "--pairs must be ≥ 1".to_string(),
                    "pass the number of preference pairs per DPO step, e.g. --pairs 2",
                )
                .into());
            }
            leash::bench::run(&shape, &what, steps, pairs, gradient_checkpointing, |obj| {
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
        Command::Grpo(a) => train(Method::Grpo, &a)?,
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
    leash::runtime::configure_process();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`leash logps ... | head`) is the reader's choice, not an error.
        Err(e) if format!("{e}").contains("Broken pipe") => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

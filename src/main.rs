//! The `leash` command line: parses flags, resolves settings, calls the library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use leash::device::{DeviceArg, DeviceChoice};
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
        #[command(flatten)]
        device: DeviceArg,
    },
    /// Reproduce one lesson of preference optimization on real runs, with report, plot and a
    /// computed verdict: logps, grad, overtrain, beta-sweep, ipo-vs-dpo, kto, dpo-vs-grpo,
    /// length-bias, lora.
    Lab {
        /// The experiment to run: logps, grad, overtrain, beta-sweep, ipo-vs-dpo, kto,
        /// dpo-vs-grpo, length-bias or lora.
        experiment: String,
        /// Output folder (the shared SFT reference lives in its `reference/` subfolder).
        #[arg(long, default_value = "runs/lab")]
        output_dir: PathBuf,
        /// The small configuration used by the tests.
        #[arg(long)]
        small: bool,
        #[command(flatten)]
        device: DeviceArg,
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
        #[command(flatten)]
        device: DeviceArg,
    },
    /// Sample completions for prompts (JSONL `prompt` strings or conversations).
    Generate {
        /// Hugging Face checkpoint folder (config.json, model.safetensors, tokenizer.json).
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
        #[command(flatten)]
        device: DeviceArg,
    },
    /// Evaluate a policy against its reference on held-out data: reward accuracy on pairs,
    /// KL(π‖π_ref) on samples, lengths, judge scores and win rate. Writes report.json.
    Eval {
        /// The policy: a Hugging Face checkpoint folder (e.g. a training run's output folder).
        #[arg(long)]
        model: PathBuf,
        /// LoRA adapter to apply to --model (PEFT layout).
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
        /// Truncate prompt+completion to this many tokens when scoring pairs.
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
        /// Folder for samples.jsonl (every sample as it is produced) and report.json.
        #[arg(long)]
        output_dir: PathBuf,
        #[command(flatten)]
        device: DeviceArg,
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
        /// Allow writing into a folder that already holds a model or a training run.
        #[arg(long)]
        overwrite_output_dir: bool,
        #[command(flatten)]
        device: DeviceArg,
    },
    /// Measure throughput (tokens/s, GFLOP/s) of the hot paths on a random model.
    Bench {
        /// Model shape: bench (the notes' 5.3 M-parameter Llama), smollm-135m, qwen2.5-0.5b or
        /// llama3.2-1b.
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
        /// Time every step in mixed precision (bf16 matrix products, f32 weights and losses),
        /// as the trainers' `--bf16`; the ceiling is then bf16's.
        #[arg(long)]
        bf16: bool,
        #[command(flatten)]
        device: DeviceArg,
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
        /// JSONL preference data (prompt/chosen/rejected rows).
        #[arg(long)]
        dataset: PathBuf,
    },
    /// Subsample so chosen is longer in as many pairs as it is shorter; says how many pairs
    /// were kept and dropped.
    BalanceLength {
        /// JSONL preference data (prompt/chosen/rejected rows).
        #[arg(long)]
        dataset: PathBuf,
        /// Where to write the balanced JSONL (the kept rows, unchanged, in file order).
        #[arg(long)]
        output: PathBuf,
    },
}

#[derive(clap::Args)]
struct SamplingArgs {
    /// Sampling temperature, ≥ 0; 0 = greedy, 1 = the model's own distribution.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Keep only the k most likely tokens before sampling; 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass, in (0, 1];
    /// 1 = off.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Most tokens generated per completion (generation also stops at EOS).
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Seed of the sampler (prompt i uses seed + i, so runs are reproducible).
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
    let summary = leash::train::run(&resolve(method, args)?)?;
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

/// Writes one JSON line to stdout; a closed pipe becomes an I/O error `main` recognises.
fn print_line(out: &mut impl Write, obj: &serde_json::Value) -> leash::Result<()> {
    writeln!(out, "{obj}").map_err(|e| {
        leash::LeashError::io(
            std::path::Path::new("<stdout>"),
            e,
            "is the output pipe closed?",
        )
    })
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Lab {
            experiment,
            output_dir,
            small,
            device,
        } => {
            let mut cfg = if small {
                leash::demo::DemoConfig::small()
            } else {
                leash::demo::DemoConfig::standard()
            };
            cfg.device = DeviceChoice::of(&device.open()?);
            let outcome = leash::lab::run_lab(&experiment, &output_dir, &cfg)?;
            println!("{}\nreport: {}", outcome.verdict, outcome.report.display());
        }
        Command::Data { action } => {
            let report = match action {
                DataAction::Report { dataset } => leash::data::length::length_report(&dataset)?,
                DataAction::BalanceLength { dataset, output } => {
                    let report = leash::data::length::balance_length(&dataset, &output)?;
                    if let Some(note) = report["note"].as_str() {
                        eprintln!("{note}");
                    }
                    report
                }
            };
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Demo {
            output_dir,
            small,
            device,
        } => {
            let mut cfg = if small {
                leash::demo::DemoConfig::small()
            } else {
                leash::demo::DemoConfig::standard()
            };
            cfg.device = DeviceChoice::of(&device.open()?);
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
            device,
        } => {
            let args = GenerateArgs {
                device: device.open()?,
                model: &model,
                adapter: adapter.as_deref(),
                prompts: &prompts,
                sampling: sampling.options(),
                num_return_sequences,
                seed: sampling.seed,
            };
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            generate_command(&args, |obj| print_line(&mut out, &obj))?;
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
            device,
        } => {
            let device = device.open()?;
            let timeout = std::time::Duration::from_secs(judge_timeout);
            let judge = Judge::from_options(&judge, judge_cmd, timeout)?;
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
                device,
            };
            let report = eval_command(&args)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Merge {
            model,
            adapter,
            output_dir,
            overwrite_output_dir,
            device,
        } => {
            let device = device.open()?;
            leash::merge::merge_with(&model, &adapter, &output_dir, overwrite_output_dir, &device)?;
            eprintln!("merged checkpoint written to {}", output_dir.display());
        }
        Command::Bench {
            shape,
            what,
            steps,
            pairs,
            gradient_checkpointing,
            bf16,
            device,
        } => {
            if pairs == 0 {
                return Err(leash::LeashError::usage(
                    "--pairs must be ≥ 1".to_string(),
                    "pass the number of preference pairs per DPO step, e.g. --pairs 2",
                )
                .into());
            }
            let device = device.open()?;
            let (g, d) = ((gradient_checkpointing, bf16), &device);
            leash::bench::run(&shape, &what, steps, pairs, g, d, |obj| {
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
            device,
        } => {
            let device = device.open()?;
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            leash::scoring::logps_command(&model, &dataset, max_length, &device, |obj| {
                print_line(&mut out, &obj)
            })?;
        }
    }
    Ok(())
}

/// The parser, with every option accepting values that start with `-`: `--learning-rate -1`
/// must reach validation (and be refused with a reason), not read as an unknown flag.
fn command() -> clap::Command {
    fn negatives(cmd: clap::Command) -> clap::Command {
        cmd.mut_args(|a| {
            if a.get_action().takes_values() {
                a.allow_negative_numbers(true)
            } else {
                a
            }
        })
        .mut_subcommands(negatives)
    }
    own_options_only(negatives(Cli::command()))
}

/// Each training command's `--help` lists only its method's options (TRL's per-method config
/// classes); a foreign one still parses, so that resolving refuses it by name with a hint
/// rather than clap's bare "unexpected argument".
fn own_options_only(cmd: clap::Command) -> clap::Command {
    use leash::train::method_options::methods_of;
    let methods = [
        Method::Sft,
        Method::Dpo,
        Method::Kto,
        Method::Orpo,
        Method::Grpo,
    ];
    methods.into_iter().fold(cmd, |cmd, m| {
        cmd.mut_subcommand(m.name(), |sc| {
            sc.mut_args(|a| match methods_of(a.get_id().as_str()) {
                Some(owners) if !owners.contains(&m) => a.hide(true),
                _ => a,
            })
        })
    })
}

fn main() -> ExitCode {
    leash::runtime::configure_process();
    let cli = Cli::from_arg_matches(&command().get_matches()).unwrap_or_else(|e| e.exit());
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`leash logps ... | head`) is the reader's choice, not an error.
        Err(e)
            if e.downcast_ref::<leash::LeashError>()
                .is_some_and(leash::LeashError::is_broken_pipe) =>
        {
            ExitCode::SUCCESS
        }
        // Ctrl-C: the shell convention (128 + SIGINT), a plain message and the resume hint.
        Err(e) => match e.downcast_ref::<leash::LeashError>() {
            Some(leash::LeashError::Interrupted { message, hint }) => {
                eprintln!("{message}\nhint: {hint}");
                ExitCode::from(130)
            }
            Some(leash::LeashError::OutOfMemory { .. }) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
            // The GPU running out of memory inside another error's text (a file being read
            // onto the GPU): the same message and hint as when it comes alone.
            _ if leash::device::is_out_of_memory(&format!("{e:#}")) => {
                eprintln!("error: {}", leash::device::out_of_memory(&format!("{e:#}")));
                ExitCode::from(2)
            }
            _ => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every argument of every subcommand has help text (`--help` says what it is).
    #[test]
    fn every_argument_says_what_it_is() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                if help.trim().len() < 8 || help.trim().starts_with("Default") {
                    missing.push(format!("{path} --{id}: {help:?}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {}: no about", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let cmd = command();
        cmd.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cmd, "leash", &mut missing);
        assert!(
            missing.is_empty(),
            "arguments without help:\n{}",
            missing.join("\n")
        );
    }

    /// Negative numbers are values, for every numeric option of every command.
    #[test]
    fn negative_numbers_parse_as_values() {
        for argv in [
            &["leash", "dpo", "--learning-rate", "-1"][..],
            &["leash", "sft", "--max-steps", "-1"],
            &[
                "leash",
                "generate",
                "--model",
                "m",
                "--prompts",
                "p",
                "--temperature",
                "-1",
            ],
            &[
                "leash",
                "eval",
                "--model",
                "m",
                "--reference",
                "r",
                "--dataset",
                "d",
                "--output-dir",
                "o",
                "--beta",
                "-0.1",
            ],
        ] {
            let m = command().try_get_matches_from(argv);
            assert!(
                m.is_ok(),
                "{argv:?}: {}",
                m.err().map(|e| e.to_string()).unwrap_or_default()
            );
        }
    }
}

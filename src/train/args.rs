//! The training options as given: one `Option` per flag (kebab-case) or `--config` TOML key
//! (TRL's snake_case names); [`super::config::resolve`] turns them into a [`super::config::TrainConfig`].

use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::device::DeviceChoice;

/// Every option as given by a flag or a TOML key; `None` = not given.
#[derive(Debug, Clone, Default, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainArgs {
    /// TOML file with any of these options under TRL's snake_case names; flags override it.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Hugging Face checkpoint folder to start from (and, for DPO/IPO/KTO, the frozen reference).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training data: a .jsonl or .parquet file, a folder of shards, or a Hugging Face dataset
    /// folder (data/<split>-00000-of-0000N.parquet or <split>/*.parquet).
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Held-out data evaluated every --eval-steps and at the end (metrics prefixed `eval_`);
    /// same forms as --dataset (a dataset folder gives its --dataset-test-split).
    #[arg(long)]
    pub eval_dataset: Option<PathBuf>,
    /// Split of a dataset folder to train on. Default train.
    #[arg(long)]
    pub dataset_train_split: Option<String>,
    /// Split of an --eval-dataset folder to evaluate on. Default test.
    #[arg(long)]
    pub dataset_test_split: Option<String>,
    /// Where else to log metrics: none, or tensorboard (event files in <output-dir>/runs). Default none.
    #[arg(long)]
    pub report_to: Option<String>,
    /// Folder for metrics.jsonl, checkpoints and the final model.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Allow writing into an output folder that already holds another run.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub overwrite_output_dir: Option<bool>,
    /// Continue from a checkpoint-N folder of an earlier run (same trajectory).
    #[arg(long)]
    pub resume_from_checkpoint: Option<PathBuf>,
    /// β: strength of the pull towards the reference (DPO/IPO/KTO), the odds-ratio weight (ORPO),
    /// or the KL coefficient (GRPO; 0 loads no reference). Default 0.1 (GRPO: 0.0, as TRL).
    #[arg(long)]
    pub beta: Option<f64>,
    /// DPO loss: sigmoid (DPO), hinge (SLiC), ipo (IPO); default sigmoid. GRPO aggregation:
    /// grpo, dapo, dr_grpo; default dapo.
    #[arg(long)]
    pub loss_type: Option<String>,
    /// Conservative DPO: assumed probability that a preference label is flipped (sigmoid loss). Default 0.
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// Weight of an NLL term on chosen completions added to the DPO loss (RPO; TRL ≥ 1.0 spells it loss_type [sigmoid, sft]). Default 0 (off).
    #[arg(long)]
    pub rpo_alpha: Option<f64>,
    /// Peak learning rate. Defaults: 1e-6 (DPO/KTO/ORPO), 2e-5 (SFT), as TRL.
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// Rows (pairs, for preference data) per micro-batch; for GRPO, completions (prompts ×
    /// num_generations), as TRL. Default 8.
    #[arg(long)]
    pub per_device_train_batch_size: Option<usize>,
    /// Rows per evaluation batch. Default 8.
    #[arg(long)]
    pub per_device_eval_batch_size: Option<usize>,
    /// Micro-batches per optimizer step. Default 1.
    #[arg(long)]
    pub gradient_accumulation_steps: Option<usize>,
    /// Stop after this many optimizer steps (overrides --num-train-epochs); -1 = no limit, as
    /// TRL. Default -1.
    #[arg(long)]
    pub max_steps: Option<i64>,
    /// Passes over the training data. Default 3.
    #[arg(long)]
    pub num_train_epochs: Option<f64>,
    /// Truncate prompt+completion to this many tokens, keeping the start. Default 1024.
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Clip the global gradient norm to this (0 = off). Default 1.0.
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// constant, linear or cosine (after warm-up). Default linear, as TRL.
    #[arg(long)]
    pub lr_scheduler_type: Option<String>,
    /// Steps of linear warm-up from 0. Default 0.
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Warm-up as a fraction of all steps (used when --warmup-steps is 0). Default 0.
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// AdamW decoupled weight decay (never applied to norms and biases). Default 0.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// AdamW β1, the decay of the gradient's running mean. Default 0.9.
    #[arg(long)]
    pub adam_beta1: Option<f64>,
    /// AdamW β2, the decay of the squared gradient's running mean. Default 0.999.
    #[arg(long)]
    pub adam_beta2: Option<f64>,
    /// AdamW ε, added to the denominator for numerical stability. Default 1e-8.
    #[arg(long)]
    pub adam_epsilon: Option<f64>,
    /// Seed for shuffling. Default 42.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Shuffle rows each epoch (seeded). Default true (false for KTO, as TRL).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub shuffle: Option<bool>,
    /// Log metrics every N optimizer steps. Default 10.
    #[arg(long)]
    pub logging_steps: Option<usize>,
    /// Evaluate every N steps (needs --eval-dataset). Default: only at the end.
    #[arg(long)]
    pub eval_steps: Option<usize>,
    /// Save a checkpoint every N steps. Default 500.
    #[arg(long)]
    pub save_steps: Option<usize>,
    /// Keep only the newest N checkpoint-* folders, deleting older ones (TRL/transformers).
    /// Default: keep all.
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// KTO: loss weight of desirable (thumbs-up) rows. Default 1.
    #[arg(long)]
    pub desirable_weight: Option<f64>,
    /// KTO: loss weight of undesirable (thumbs-down) rows. Default 1.
    #[arg(long)]
    pub undesirable_weight: Option<f64>,
    /// Score the reference once before training and cache it in the output folder, so training
    /// needs no reference model in memory. Default false.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub precompute_ref_log_probs: Option<bool>,
    /// Score without padding: a pair's shared prompt is encoded once and sequences are packed
    /// into rows that never see each other (exact: same log-probs). ORPO always pads.
    /// Default true (TRL's default is false; there it changes results, here it does not).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub padding_free: Option<bool>,
    /// Keep only each decoder layer's input for backward and recompute the layer there: far
    /// less activation memory for a second forward of the layers (exact: same gradients).
    /// Default false (TRL's default is true; see the README on why leash differs).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub gradient_checkpointing: Option<bool>,
    /// Mixed precision (TRL's name): the matrix products of the linear layers, LoRA adapters
    /// and lm_head in bf16; master weights, AdamW, norms, attention's softmax, the log-softmax
    /// and the losses in f32. Default: on for a GPU (as TRL), off on the CPU, whose products
    /// are no faster in bf16 here.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub bf16: Option<bool>,
    /// Storage dtype of frozen weights (the reference model; the LoRA base): f32 (default)
    /// holds them in f32; auto keeps a bf16/f16 checkpoint's matrices in that dtype, upcast per
    /// use (exact, half the frozen memory, but slower: see BENCHMARKS.md); bf16 also rounds an
    /// f32 checkpoint (not exact). No TRL equivalent. Trainable weights and optimizer state are
    /// always f32.
    #[arg(long, value_parser = ["auto", "f32", "bf16"])]
    pub frozen_dtype: Option<String>,
    /// Where the model trains: auto (the GPU when this binary is built with `--features cuda`
    /// and a GPU is present, else the CPU), cpu, cuda (the first GPU) or cuda:N. Default auto;
    /// the run's leash_config.json records the device used.
    #[arg(long, value_parser = DeviceChoice::from_str)]
    pub device: Option<DeviceChoice>,
    /// SFT on conversations: train only on the assistant's tokens, those the chat template
    /// wraps in {% generation %} … {% endgeneration %} (TRL's swap to its training template
    /// included). Default false.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub assistant_only_loss: Option<bool>,
    /// Train a LoRA adapter instead of all weights; the frozen base (adapter off) is the reference.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub use_peft: Option<bool>,
    /// LoRA rank r. Default 16 (TRL).
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// LoRA α (the update is scaled by α/r). Default 32 (TRL).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Dropout on the adapter input while training. Default 0.05 (TRL).
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Comma-separated module names (e.g. q_proj,v_proj), all-linear, or a regular expression
    /// matching whole module paths (PEFT's string form, e.g. `.*\.(q|v)_proj`). Default: PEFT's per
    /// architecture (q_proj,v_proj for Llama/Qwen2; c_attn for GPT-2).
    #[arg(long)]
    pub lora_target_modules: Option<String>,
    /// Continue training an existing PEFT/leash adapter; the reference is the model with this
    /// adapter as it was at the start.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// GRPO: completions sampled per prompt (the group; ≥ 2). Default 8.
    #[arg(long)]
    pub num_generations: Option<usize>,
    /// GRPO: most tokens sampled per completion. Default 256.
    #[arg(long)]
    pub max_completion_length: Option<usize>,
    /// GRPO: sampling temperature (> 0). Default 1.0.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// GRPO: nucleus sampling mass (1 = off). Default 1.0.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// GRPO: lower clipping ε of the ratio π/π_old. Default 0.2.
    #[arg(long)]
    pub epsilon: Option<f64>,
    /// GRPO: upper clipping ε (DAPO suggests 0.28). Default: --epsilon.
    #[arg(long)]
    pub epsilon_high: Option<f64>,
    /// GRPO: policy updates (μ) per batch of generations. Default 1.
    #[arg(long)]
    pub num_iterations: Option<usize>,
    /// GRPO: divide advantages by the std of the group, of the batch, or none. Default group.
    #[arg(long)]
    pub scale_rewards: Option<String>,
    /// GRPO: leave completions that hit max_completion_length without EOS out of the loss.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub mask_truncated_completions: Option<bool>,
    /// GRPO: built-in rewards, comma-separated: correct, format, polite, length, arithmetic.
    #[arg(long, value_delimiter = ',')]
    pub reward_funcs: Option<Vec<String>>,
    /// GRPO: external reward command (repeatable): JSONL {prompt, completion, ...dataset columns}
    /// on stdin, one number per line on stdout.
    #[arg(long)]
    pub reward_cmd: Option<Vec<String>>,
    /// GRPO: one weight per reward (built-ins first, then commands). Default: all 1.
    #[arg(long, value_delimiter = ',')]
    pub reward_weights: Option<Vec<f64>>,
    /// GRPO: seconds before a reward command counts as hung. Default 300.
    #[arg(long)]
    pub reward_timeout: Option<u64>,
}

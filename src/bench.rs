//! `leash bench`: throughput of the hot paths on a random model of a named shape, timed with
//! a warm-up step and the median of the timed steps. Prints one JSON object per measurement
//! (and a human line on stderr). FLOPs: 2·N·tokens per forward over the matmul parameters N
//! (lm_head included) plus attention 4·t²·d per layer and sequence; a training step is 3×.

mod ceiling;
mod grpo_step;
mod steps;

use std::time::Instant;

use candle_core::{DType, Device};
use serde_json::json;

use crate::data::collate::collate;
use crate::data::encode::Sequence;
use crate::error::Result;
use crate::loss::logps::score;
use crate::model::lora::{init_adapters, select_targets, TargetModules};
use crate::model::weights::{RandomInit, Weights};
use crate::model::{Decoder, ModelConfig};
use crate::train::config::Method;

/// The bench config of ../shared/notes/candle-training.md, and SmolLM-135M-, Qwen2.5-0.5B- and
/// Llama-3.2-1B-shaped models (the shapes TRL was timed on in ../shared/notes/cuda.md).
pub fn shape(name: &str) -> Result<ModelConfig> {
    let json = match name {
        "bench" => {
            r#"{"model_type":"llama","vocab_size":4096,"hidden_size":256,"intermediate_size":688,"num_hidden_layers":4,"num_attention_heads":4,"num_key_value_heads":4,"tie_word_embeddings":false}"#
        }
        "smollm-135m" => {
            r#"{"model_type":"llama","vocab_size":49152,"hidden_size":576,"intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,"tie_word_embeddings":true}"#
        }
        "qwen2.5-0.5b" => {
            r#"{"model_type":"qwen2","vocab_size":151936,"hidden_size":896,"intermediate_size":4864,"num_hidden_layers":24,"num_attention_heads":14,"num_key_value_heads":2,"tie_word_embeddings":true,"rope_theta":1000000.0}"#
        }
        "llama3.2-1b" => {
            r#"{"model_type":"llama","vocab_size":128256,"hidden_size":2048,"intermediate_size":8192,"num_hidden_layers":16,"num_attention_heads":32,"num_key_value_heads":8,"head_dim":64,"tie_word_embeddings":true,"rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":32.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192},"max_position_embeddings":131072,"rms_norm_eps":1e-5}"#
        }
        other => {
            return Err(crate::LeashError::usage(
                format!("unknown bench shape `{other}`"),
                "valid shapes: bench, smollm-135m, qwen2.5-0.5b, llama3.2-1b",
            ))
        }
    };
    ModelConfig::from_json_str(json, std::path::Path::new("<bench shape>"))
}

fn random_model(cfg: &ModelConfig, device: &Device) -> Result<Decoder> {
    let init = RandomInit {
        seed: 1,
        std: 0.02,
        norm_jitter: 0.0,
        bias_std: 0.0,
        dtype: DType::F32,
    };
    Decoder::from_weights(cfg.clone(), &Weights::random(init, device))
}

fn flops_forward(cfg: &ModelConfig, seqs: usize, t: usize) -> f64 {
    let tokens = (seqs * t) as f64;
    let attn = 4.0
        * (t * t) as f64
        * (cfg.num_attention_heads * cfg.head_dim) as f64
        * cfg.num_hidden_layers as f64;
    2.0 * cfg.matmul_params() as f64 * tokens + attn * seqs as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Times `f` once to warm up, then `steps` times; returns the median seconds. Each run waits
/// for `device` to finish its queued work (a GPU runs asynchronously), so the time is the work's.
fn time(steps: usize, device: &Device, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    device.synchronize()?;
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let start = Instant::now();
        f()?;
        device.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

fn token_sequences(
    vocab: usize,
    n: usize,
    prompt: usize,
    completion: usize,
    salt: usize,
) -> Vec<Sequence> {
    (0..n)
        .map(|i| Sequence {
            ids: (0..prompt + completion)
                .map(|j| ((i * 7919 + j * 104_729 + salt) % vocab) as u32)
                .collect(),
            loss_start: prompt,
        })
        .collect()
}

/// Runs the measurements of `what` (matmul, forward, train, dpo, generate, grpo, all,
/// dpo-lora) on `shape_name`; the DPO steps (dpo, dpo-lora) use `pairs` preference pairs, and
/// the trained policies checkpoint their layers if `checkpointing`. Training figures carry
/// the matmul ceiling measured first. Everything runs on `device`.
pub fn run(
    shape_name: &str,
    what: &str,
    steps: usize,
    pairs: usize,
    (checkpointing, bf16): (bool, bool),
    device: &Device,
    mut emit: impl FnMut(serde_json::Value),
) -> Result<()> {
    const WHATS: &[&str] = &[
        "matmul", "forward", "train", "dpo", "generate", "grpo", "all", "dpo-lora",
    ];
    if !WHATS.contains(&what) {
        return Err(crate::LeashError::usage(
            format!("unknown bench `{what}`"),
            format!("valid: {}", WHATS.join(", ")),
        ));
    }
    let cfg = shape(shape_name)?;
    // `--bf16`: every timed step in mixed precision, as `leash <method> --bf16` runs it.
    let precision = if bf16 { DType::BF16 } else { DType::F32 };
    let _autocast = crate::kernels::autocast::autocast(bf16.then_some(precision));
    let threads = candle_core::utils::get_num_threads();
    let where_ = crate::device::DeviceChoice::of(device).to_string();
    let is = |w: &str| what == w || what == "all";
    let ceiling = if what == "generate" || what == "grpo" {
        None
    } else {
        let c = ceiling::matmul_ceiling(&cfg, precision, device)?;
        emit(
            json!({"bench": "matmul ceiling", "shape": shape_name, "threads": threads,
            "device": where_, "bf16": bf16, "tokens_per_s": 0.0, "gflops_per_s": c}),
        );
        Some(c)
    };
    if what == "matmul" {
        return Ok(());
    }
    let base = random_model(&cfg, device)?;
    let report = |name: &str, secs: f64, tokens: usize, flops: f64| {
        let gflops = flops / secs / 1e9;
        json!({
            "bench": name, "shape": shape_name, "threads": threads, "device": where_,
            "bf16": bf16, "seconds_per_step": secs,
            "tokens_per_step": tokens, "tokens_per_s": tokens as f64 / secs,
            "gflops_per_s": gflops, "matmul_ceiling_gflops": ceiling,
            "fraction_of_ceiling": ceiling.map(|c| gflops / c),
        })
    };
    if is("forward") {
        // 8 sequences × 256 tokens, every token scored (log-softmax + gather included).
        let seqs = token_sequences(cfg.vocab_size, 8, 1, 255, 0);
        let refs: Vec<&Sequence> = seqs.iter().collect();
        let batch = collate(&refs, 0, None, &[], device)?;
        let secs = time(steps, device, || {
            score(&base, &batch)?.seq_logps.to_vec1::<f32>()?;
            Ok(())
        })?;
        let flops = steps::forward_flops(&cfg, &batch);
        emit(report("forward+logps", secs, 8 * 256, flops));
    }
    if is("train") {
        let (mut policy, vars) = base.to_trainable()?;
        policy.set_gradient_checkpointing(checkpointing);
        // forward + backward of the same 8 × 256 fully scored tokens, no optimizer.
        let seqs = token_sequences(cfg.vocab_size, 8, 1, 255, 0);
        let batch = steps::layout(&seqs, false, device)?;
        let secs = steps::time_forward_backward(&policy, &batch, steps)?;
        let flops = 3.0 * steps::forward_flops(&cfg, &batch);
        emit(with_rss(report("forward+backward", secs, 8 * 256, flops)));
        // SFT: 8 × (128-token prompt + 128-token completion), prompt masked, clip + AdamW.
        let seqs = token_sequences(cfg.vocab_size, 8, 128, 128, 0);
        let sft = steps::config(Method::Sft, true)?;
        let batch = steps::layout(&seqs, true, device)?;
        let examples = steps::examples(&seqs, true);
        let secs = steps::time_train_step(&sft, &policy, &vars, None, &examples, steps)?;
        let flops = 3.0 * steps::forward_flops(&cfg, &batch);
        emit(with_rss(report("sft_step", secs, 8 * 256, flops)));
    }
    if is("dpo") {
        // TRL's timed workload: 8 pairs (default), 128-token prompts, 128-token completions;
        // tokens counted as TRL counts them (chosen + rejected sequences).
        let (mut policy, vars) = base.to_trainable()?;
        policy.set_gradient_checkpointing(checkpointing);
        let seqs = steps::pair_sequences(cfg.vocab_size, pairs, 128, 128);
        let examples = steps::examples(&seqs, false);
        for padding_free in [false, true] {
            let dpo = steps::config(Method::Dpo, padding_free)?;
            let batch = steps::layout(&seqs, padding_free, device)?;
            let fwd = steps::forward_flops(&cfg, &batch);
            for live in [false, true] {
                let reference = if live { Some(&base) } else { None };
                let secs =
                    steps::time_train_step(&dpo, &policy, &vars, reference, &examples, steps)?;
                let name = format!(
                    "dpo_step({}, ref {})",
                    if padding_free {
                        "shared prompt"
                    } else {
                        "padded"
                    },
                    if live { "model" } else { "cached" }
                );
                let flops = 3.0 * fwd + if live { fwd } else { 0.0 };
                let mut v = report(&name, secs, 2 * pairs * 256, flops);
                v["pairs"] = json!(pairs);
                emit(with_rss(v));
            }
        }
    }
    if is("generate") {
        // 4 samples of 128 new tokens after a 32-token prompt, with and without the KV cache.
        use crate::eval::generate::{generate, SamplingOptions};
        use rand::SeedableRng;
        let prompt: Vec<u32> = (0..32)
            .map(|j| (j * 104_729 % cfg.vocab_size) as u32)
            .collect();
        let opt = SamplingOptions {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 128,
        };
        for (name, cached) in [("generate(kv cache)", true), ("generate(recompute)", false)] {
            let secs = time(steps.min(2), device, || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(0);
                generate(&base, &prompt, 4, &opt, &[], &mut rng, cached)?;
                Ok(())
            })?;
            emit(report(name, secs, 4 * 128, 0.0));
        }
    }
    if is("grpo") {
        let (sampling, training, tokens) = grpo_step::time_grpo_step(&base, steps)?;
        let secs = sampling + training;
        let mut v = report(
            "grpo_step(2 prompts x 8)",
            secs,
            tokens,
            3.0 * flops_forward(&cfg, 16, 96),
        );
        v["sampling_s"] = json!(sampling);
        v["training_s"] = json!(training);
        v["sampling_fraction"] = json!(sampling / secs);
        emit(with_rss(v));
    }
    if what == "dpo-lora" {
        // Same workload with a rank-16 adapter on every linear layer; the reference is the
        // base model with the adapter off (one copy of the weights in memory).
        let modules = base.linear_modules().to_vec();
        let targets = select_targets(&modules, &TargetModules::from_cli("all-linear"))?;
        let (vars, adapters) = init_adapters(&targets, 16, 32.0, 0.0, 1, device)?;
        let mut policy = base.with_adapters(&adapters)?;
        policy.set_gradient_checkpointing(checkpointing);
        let seqs = steps::pair_sequences(cfg.vocab_size, pairs, 128, 128);
        let batch = steps::layout(&seqs, true, device)?;
        let dpo = steps::config(Method::Dpo, true)?;
        let examples = steps::examples(&seqs, false);
        let secs = steps::time_train_step(&dpo, &policy, &vars, Some(&base), &examples, steps)?;
        let fwd = steps::forward_flops(&cfg, &batch);
        let mut v = report(
            "dpo_step(lora r16, shared prompt, ref = adapter off)",
            secs,
            2 * pairs * 256,
            // Reference forward + policy forward + a backward with no base-weight gradients.
            3.0 * fwd,
        );
        v["pairs"] = json!(pairs);
        emit(with_rss(v));
    }
    Ok(())
}

pub use crate::runtime::peak_rss_mib;

fn with_rss(mut v: serde_json::Value) -> serde_json::Value {
    v["peak_rss_mib"] = json!(peak_rss_mib());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_2_1b_shape_has_the_real_models_matrices() {
        // Llama-3.2-1B by hand: 16 layers × (q 2048² + k, v 2048·512 + o 2048² + 3 · 2048·8192)
        // plus the tied head 128,256 · 2048 = 1,235,746,816 (the model card's 1.24 B, less
        // the norms).
        let cfg = shape("llama3.2-1b").unwrap();
        assert_eq!(cfg.matmul_params(), 1_235_746_816);
        assert_eq!(cfg.head_dim, 64);
        assert!(cfg.tie_word_embeddings);
        // Qwen2.5-0.5B: 24 × (896² · 2 + 2 · 896·128 + 3 · 896·4864) + 151,936 · 896.
        assert_eq!(shape("qwen2.5-0.5b").unwrap().matmul_params(), 493_961_216);
        assert!(shape("llama-7b").is_err());
    }
}

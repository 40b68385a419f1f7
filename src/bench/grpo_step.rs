//! The timed GRPO step: `leash grpo`'s own rollout (sampling with the KV cache, rewards,
//! advantages, collation) and its own learning step (the engine's update over
//! [`crate::train::grpo::grpo_losses`]), with `leash grpo`'s defaults on a random model.

use std::collections::HashMap;
use std::time::Instant;

use serde_json::Map;

use super::median;
use crate::data::tokenizer::TextTokenizer;
use crate::error::{LeashError, Result};
use crate::model::Decoder;
use crate::train::config::{resolve, Method, TrainArgs};
use crate::train::grpo::{grpo_losses, loss_options, rollout, Models, PromptRow, Rewards};
use crate::train::metrics::Accumulator;
use crate::train::update::{adamw, update};

const PROMPTS: usize = 2;
const PROMPT_TOKENS: usize = 32;
const GENERATIONS: usize = 8;
const COMPLETION_TOKENS: usize = 64;

/// A word-level tokenizer over the model's vocabulary: even ids decode to one word, odd ids
/// to two, so the built-in `length` reward varies with the sampled tokens (a random model
/// never samples an EOS, so every completion has the same number of tokens).
fn synthetic_tokenizer(vocab: usize) -> Result<TextTokenizer> {
    let words: HashMap<String, u32> = (0..vocab as u32)
        .map(|i| {
            let word = if i % 2 == 0 {
                format!("w{i}")
            } else {
                format!("w{i} x")
            };
            (word, i)
        })
        .collect();
    let model = tokenizers::models::wordlevel::WordLevel::builder()
        .vocab(words.into_iter().collect())
        .unk_token("w0".into())
        .build()
        .map_err(|e| LeashError::usage(format!("bench tokenizer: {e}"), "a leash bug"))?;
    Ok(TextTokenizer::from_parts(
        tokenizers::Tokenizer::new(model),
        None,
        0,
        0,
    ))
}

/// Median (sampling, learning) seconds of one GRPO step and its tokens: 2 prompts of 32
/// tokens × 8 completions of 64, the `length` reward, then one optimizer step over the 16
/// sequences (one micro-batch, β = 0 so no reference, as `leash grpo`'s defaults).
pub fn time_grpo_step(base: &Decoder, steps: usize) -> Result<(f64, f64, usize)> {
    let none = std::path::PathBuf::from("<bench>");
    let cfg = resolve(
        Method::Grpo,
        &TrainArgs {
            model: Some(none.clone()),
            dataset: Some(none.clone()),
            output_dir: Some(none),
            num_generations: Some(GENERATIONS),
            per_device_train_batch_size: Some(PROMPTS * GENERATIONS),
            max_completion_length: Some(COMPLETION_TOKENS),
            reward_funcs: Some(vec!["length".into()]),
            ..TrainArgs::default()
        },
    )?;
    let vocab = base.config.vocab_size;
    let tok = synthetic_tokenizer(vocab)?;
    let rows: Vec<PromptRow> = (0..PROMPTS)
        .map(|p| {
            let ids: Vec<u32> = (0..PROMPT_TOKENS)
                .map(|j| ((j * 104_729 + p * 31) % vocab) as u32)
                .collect();
            Ok(PromptRow {
                text: tok.decode(&ids, false)?,
                ids,
                columns: Map::new(),
            })
        })
        .collect::<Result<_>>()?;
    let rewards = Rewards::from_config(&cfg);
    let (policy, vars) = base.to_trainable()?;
    let frozen = Decoder::frozen_view(&policy.config, &vars)?;
    let models = Models {
        sampler: &frozen,
        reference: None,
        tok: &tok,
        eos: &[],
    };
    let options = loss_options(&cfg)?;
    let mut opt = adamw(&cfg, &vars);
    let mut metrics = Accumulator::default();
    let (mut ts, mut tl) = (Vec::new(), Vec::new());
    let mut tokens = 0;
    for i in 0..=steps {
        let start = Instant::now();
        let batch = rollout(&cfg, &models, &rows, &rewards, i)?;
        let sampled = start.elapsed().as_secs_f64();
        let start = Instant::now();
        tokens = batch.tokens;
        update(
            &cfg,
            &vars,
            &mut opt,
            None,
            i,
            cfg.learning_rate,
            batch.micro.len(),
            &mut metrics,
            grpo_losses(&cfg, &policy, &batch, &options),
        )?;
        metrics.take();
        // The first step warms up (allocations, caches) and is not counted.
        if i > 0 {
            ts.push(sampled);
            tl.push(start.elapsed().as_secs_f64());
        }
    }
    Ok((median(ts), median(tl), tokens))
}

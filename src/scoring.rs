//! `leash logps`: score every row of a data set under a model, in input order, as JSON.
//! Preference rows get chosen/rejected log-probs, unpaired and SFT rows a completion
//! log-prob; rows whose prompt alone fills `max_length` are reported as dropped.

use std::path::Path;

use candle_core::Device;
use serde_json::{json, Value};

use crate::data::collate::collate;
use crate::data::dataset::read_rows;
use crate::data::encode::{Encoded, EncodedRow, Encoder, PromptCompletion, Sequence, Style};
use crate::data::tokenizer::TextTokenizer;
use crate::error::{LeashError, Result};
use crate::loss::logps::score;
use crate::model::frozen_dtype::FrozenDtype;
use crate::model::Decoder;

/// Sequences scored per forward pass.
const SCORE_BATCH: usize = 16;

/// Loads a model folder (config, weights, tokenizer).
pub fn load_model(dir: &Path, device: &Device) -> Result<(Decoder, TextTokenizer)> {
    load_model_as(dir, device, FrozenDtype::F32)
}

/// As [`load_model`], holding the weight matrices as `frozen` says (a training run's base:
/// the reference, the LoRA backbone, or the source of the trainable f32 copy).
pub fn load_model_as(
    dir: &Path,
    device: &Device,
    frozen: FrozenDtype,
) -> Result<(Decoder, TextTokenizer)> {
    if !dir.is_dir() {
        return Err(LeashError::file(
            dir,
            "model folder not found",
            "pass --model a folder holding config.json, model.safetensors and tokenizer.json",
        ));
    }
    let model = Decoder::load_as(dir, device, frozen)?;
    let tokenizer = TextTokenizer::from_dir(dir, &model.config)?;
    check_vocab_fits(dir, &tokenizer, model.config.vocab_size)?;
    Ok((model, tokenizer))
}

/// Every id the tokenizer can produce must index a row of the embedding; a larger tokenizer
/// (e.g. tokens added without resizing the model) would fail deep inside the forward pass.
fn check_vocab_fits(dir: &Path, tokenizer: &TextTokenizer, embedding_rows: usize) -> Result<()> {
    let vocab = tokenizer.inner().get_vocab(true);
    let Some((token, &max_id)) = vocab.iter().max_by_key(|(_, id)| **id) else {
        return Ok(());
    };
    if (max_id as usize) < embedding_rows {
        return Ok(());
    }
    Err(LeashError::file(
        &dir.join("tokenizer.json"),
        format!(
            "the tokenizer has {} token ids (up to {max_id}, `{token}`) but the model's embedding has only {embedding_rows} rows (config.json vocab_size)",
            max_id as usize + 1
        ),
        "the tokenizer belongs to another model, or tokens were added without resizing the \
         embeddings; use the tokenizer saved with this model",
    ))
}

/// Scores each row of `dataset`, calling `emit` with one JSON object per row, in order.
pub fn score_dataset(
    model: &Decoder,
    tokenizer: &TextTokenizer,
    dataset: &Path,
    max_length: Option<usize>,
    mut emit: impl FnMut(Value) -> Result<()>,
) -> Result<()> {
    let rows = read_rows(dataset, None)?;
    let encoder = Encoder {
        tokenizer,
        style: Style::Trl,
        path: dataset,
        assistant_only_loss: false,
    };
    let encoded = encoder.encode_rows(&rows)?;
    for chunk in encoded.chunks(SCORE_BATCH / 2) {
        for obj in score_chunk(model, tokenizer, chunk, max_length)? {
            emit(obj)?;
        }
    }
    Ok(())
}

fn completions(item: &Encoded) -> Vec<(&'static str, &PromptCompletion)> {
    match item {
        Encoded::Pair { chosen, rejected } => vec![("chosen", chosen), ("rejected", rejected)],
        Encoded::Unpaired { seq, .. } | Encoded::Sft(seq) => vec![("completion", seq)],
        Encoded::Prompt { .. } => vec![],
    }
}

fn score_chunk(
    model: &Decoder,
    tokenizer: &TextTokenizer,
    chunk: &[EncodedRow],
    max_length: Option<usize>,
) -> Result<Vec<Value>> {
    // Every sequence of the chunk goes into one padded batch.
    let mut seqs = Vec::new();
    let mut owners = Vec::new();
    for (i, row) in chunk.iter().enumerate() {
        let parts = completions(&row.item);
        let built: Vec<Option<Sequence>> = parts
            .iter()
            .map(|(_, pc)| Sequence::new(pc, max_length))
            .collect();
        if built.iter().all(Option::is_some) {
            for (k, s) in built.into_iter().flatten().enumerate() {
                owners.push((i, parts[k].0));
                seqs.push(s);
            }
        }
    }
    let logps: Vec<f32> = if seqs.is_empty() {
        Vec::new()
    } else {
        let refs: Vec<&Sequence> = seqs.iter().collect();
        let batch = collate(
            &refs,
            tokenizer.pad_id,
            model.config.sliding_window,
            &[],
            model.device(),
        )?;
        score(model, &batch)?.seq_logps.to_vec1()?
    };
    let mut out = Vec::with_capacity(chunk.len());
    for (i, row) in chunk.iter().enumerate() {
        let mut obj = json!({ "index": row.index });
        let parts = completions(&row.item);
        let Some(first) = parts.first() else {
            obj["dropped"] = json!("prompt-only row: nothing to score");
            out.push(obj);
            continue;
        };
        obj["prompt_ids"] = json!(first.1.prompt);
        let scored: Vec<(usize, &&str)> = owners
            .iter()
            .enumerate()
            .filter(|(_, (o, _))| *o == i)
            .map(|(k, (_, name))| (k, name))
            .collect();
        if scored.is_empty() {
            obj["dropped"] = json!(format!(
                "prompt is {} tokens, not shorter than max_length {}",
                first.1.prompt.len(),
                max_length.unwrap_or(0)
            ));
        }
        for (name, pc) in &parts {
            obj[format!("{name}_ids")] = json!(pc.completion);
        }
        for (k, name) in scored {
            obj[format!("{name}_logp")] = json!(logps[k]);
            obj[format!("{name}_scored_tokens")] = json!(seqs[k].scored_tokens());
        }
        out.push(obj);
    }
    Ok(out)
}

//! Loading a Hugging Face model folder: config, weights (strictly: src/model/params.rs) and
//! tokenizer, checked against each other.

use std::path::Path;

use candle_core::Device;

use crate::data::tokenizer::TextTokenizer;
use crate::error::{LeashError, Result};
use crate::model::frozen_dtype::FrozenDtype;
use crate::model::Decoder;

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

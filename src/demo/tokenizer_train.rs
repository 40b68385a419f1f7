//! Trains the demo's own byte-level BPE tokenizer (the `tokenizers` crate's trainer) and
//! writes it in Hugging Face layout: `<pad>`=0, `<bos>`=1, `<eos>`=2, BOS prepended by the
//! post-processor, as the test fixture's tokenizer does.

use std::path::Path;

use serde_json::json;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{LeashError, Result};

pub fn train_tokenizer(corpus: &[String], vocab_size: usize, dir: &Path) -> Result<usize> {
    let fail = |e: String| {
        LeashError::file(
            dir,
            format!("tokenizer training failed: {e}"),
            "check the folder is writable",
        )
    };
    let corpus_path = dir.join("corpus.txt");
    std::fs::write(&corpus_path, corpus.join("\n"))
        .map_err(|e| LeashError::io(&corpus_path, e, "check the folder is writable"))?;
    let specials: Vec<AddedToken> = ["<pad>", "<bos>", "<eos>"]
        .iter()
        .map(|t| AddedToken::from(t.to_string(), true))
        .collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tok = Tokenizer::new(BPE::default());
    let byte_level = ByteLevel::new(false, true, true);
    tok.with_pre_tokenizer(Some(byte_level));
    tok.with_decoder(Some(byte_level));
    let files = vec![corpus_path.to_string_lossy().to_string()];
    tok.train_from_files(&mut trainer, files)
        .map_err(|e| fail(e.to_string()))?;
    let template = TemplateProcessing::builder()
        .try_single("<bos> $A")
        .map_err(|e| fail(e.to_string()))?
        .special_tokens(vec![("<bos>", 1)])
        .build()
        .map_err(|e| fail(e.to_string()))?;
    tok.with_post_processor(Some(template));
    let path = dir.join("tokenizer.json");
    tok.save(&path, false).map_err(|e| fail(e.to_string()))?;
    let config = json!({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "model_max_length": 512, "tokenizer_class": "PreTrainedTokenizerFast"});
    let cfg_path = dir.join("tokenizer_config.json");
    std::fs::write(&cfg_path, config.to_string())
        .map_err(|e| LeashError::io(&cfg_path, e, "check the folder is writable"))?;
    let _ = std::fs::remove_file(&corpus_path);
    Ok(tok.get_vocab_size(true))
}

//! The checkpoint's tokenizer (`tokenizer.json` through the `tokenizers` crate), its special
//! tokens from tokenizer_config.json (falling back to config.json ids), and its chat template.

use std::path::Path;

use serde_json::Value;

use super::read::Message;
use super::template::ChatTemplate;
use crate::error::{read_text, LeashError, Result};
use crate::model::ModelConfig;

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub bos_id: Option<u32>,
    pub eos_token: String,
    pub eos_id: u32,
    pub pad_id: u32,
    chat_template: Option<ChatTemplate>,
}

fn special_token(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    /// Reads tokenizer.json, tokenizer_config.json (optional) and chat_template.jinja (optional).
    pub fn from_dir(dir: &Path, model: &ModelConfig) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(LeashError::file(
                &path,
                "file not found",
                "leash needs the fast tokenizer file tokenizer.json beside config.json \
                 (save it with tokenizer.save_pretrained)",
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| {
            LeashError::file(
                &path,
                format!("cannot load tokenizer: {e}"),
                "re-save tokenizer.json",
            )
        })?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = if config_path.exists() {
            serde_json::from_str(&read_text(&config_path)?).map_err(|e| {
                LeashError::file(&config_path, format!("malformed JSON: {e}"), "re-save it")
            })?
        } else {
            Value::Null
        };
        let by_name = |key: &str| special_token(&config, key);
        let id_of = |tok: &Option<String>| tok.as_ref().and_then(|t| inner.token_to_id(t));
        let name_of = |id: Option<u32>| id.and_then(|i| inner.id_to_token(i));

        let mut bos_token = by_name("bos_token");
        let bos_id = id_of(&bos_token).or(model.bos_token_id);
        if bos_token.is_none() {
            bos_token = name_of(bos_id);
        }
        let eos_token =
            by_name("eos_token").or_else(|| name_of(model.eos_token_ids.first().copied()));
        let (eos_token, eos_id) = match (eos_token.clone(), id_of(&eos_token)) {
            (Some(t), Some(id)) => (t, id),
            _ => {
                return Err(LeashError::file(
                    &config_path,
                    "no end-of-sequence token: `eos_token` is missing or not in the vocabulary",
                    "set eos_token in tokenizer_config.json or eos_token_id in config.json",
                ))
            }
        };
        // As TRL does: a tokenizer without a pad token pads with EOS (padding is masked anyway).
        let pad_id = id_of(&by_name("pad_token"))
            .or(model.pad_token_id)
            .unwrap_or(eos_id);

        let template_file = dir.join("chat_template.jinja");
        let chat_template = if template_file.exists() {
            Some(ChatTemplate::new(
                read_text(&template_file)?,
                &template_file,
            )?)
        } else {
            match config.get("chat_template") {
                Some(Value::String(s)) => Some(ChatTemplate::new(s.clone(), &config_path)?),
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .or(list.first())
                    .and_then(|t| t.get("template").and_then(Value::as_str))
                    .map(|s| ChatTemplate::new(s.to_string(), &config_path))
                    .transpose()?,
                _ => None,
            }
        };
        Ok(TextTokenizer {
            inner,
            bos_token,
            bos_id,
            eos_token,
            eos_id,
            pad_id,
            chat_template,
        })
    }

    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        bos_id: Option<u32>,
        eos_id: u32,
        pad_id: u32,
    ) -> Self {
        TextTokenizer {
            bos_token: bos_id.and_then(|i| inner.id_to_token(i)),
            eos_token: inner.id_to_token(eos_id).unwrap_or_default(),
            inner,
            bos_id,
            eos_id,
            pad_id,
            chat_template: None,
        }
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor
    /// (e.g. prepending BOS), as transformers' default does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| {
            LeashError::usage(
                format!("tokenizer failed on {text:?}: {e}"),
                "check the text is valid",
            )
        })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| {
            LeashError::usage(
                format!("tokenizer could not decode: {e}"),
                "check the token ids",
            )
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders a conversation with the checkpoint's chat template.
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            LeashError::usage(
                "the data holds conversations but the tokenizer has no chat_template",
                "add chat_template to tokenizer_config.json (or chat_template.jinja), or use plain-text prompts",
            )
        })?;
        template.render(
            messages,
            add_generation_prompt,
            self.bos_token.as_deref().unwrap_or(""),
            &self.eos_token,
        )
    }
}

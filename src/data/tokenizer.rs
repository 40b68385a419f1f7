//! The checkpoint's tokenizer (`tokenizer.json` through the `tokenizers` crate), its special
//! tokens from tokenizer_config.json (falling back to config.json ids), and its chat template.
//! The chat template sees only the named special tokens tokenizer_config.json (or
//! special_tokens_map.json) sets, as transformers' `special_tokens_map`.

use std::path::Path;

use serde_json::Value;

use super::template::{has_generation_markers, ChatTemplate};
use super::training_templates::training_template_for;
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
    /// For SFT's assistant_only_loss: the template itself when it marks assistant output,
    /// else TRL's training variant of a template TRL knows (None: neither).
    training_template: Option<ChatTemplate>,
    /// (name, text) of each named special token that is set, for the chat template.
    template_tokens: Vec<(String, String)>,
}

/// transformers' `SPECIAL_TOKENS_ATTRIBUTES`, in order.
const NAMED_TOKENS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

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

        let map_path = dir.join("special_tokens_map.json");
        let map: Value = if map_path.exists() {
            serde_json::from_str(&read_text(&map_path)?).map_err(|e| {
                LeashError::file(&map_path, format!("malformed JSON: {e}"), "re-save it")
            })?
        } else {
            Value::Null
        };
        let template_tokens = NAMED_TOKENS
            .iter()
            .filter_map(|name| {
                let value = match config.get(*name) {
                    Some(_) => special_token(&config, name),
                    None => special_token(&map, name),
                };
                value.map(|v| (name.to_string(), v))
            })
            .collect();

        let template_file = dir.join("chat_template.jinja");
        let source = if template_file.exists() {
            Some((read_text(&template_file)?, template_file))
        } else {
            match config.get("chat_template") {
                Some(Value::String(s)) => Some((s.clone(), config_path.clone())),
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .or(list.first())
                    .and_then(|t| t.get("template").and_then(Value::as_str))
                    .map(|s| (s.to_string(), config_path.clone())),
                _ => None,
            }
        };
        let (chat_template, training_template) = match source {
            None => (None, None),
            Some((text, path)) => {
                let training = if has_generation_markers(&text) {
                    Some(ChatTemplate::new(text.clone(), &path)?)
                } else {
                    training_template_for(&text)
                        .map(|(name, t)| {
                            ChatTemplate::new(
                                t.to_string(),
                                Path::new(&format!("trl/chat_templates/{name}_training.jinja")),
                            )
                        })
                        .transpose()?
                };
                (Some(ChatTemplate::new(text, &path)?), training)
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
            training_template,
            template_tokens,
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
            training_template: None,
            template_tokens: Vec::new(),
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

    /// The named special tokens the chat template sees.
    pub fn template_tokens(&self) -> &[(String, String)] {
        &self.template_tokens
    }

    /// The checkpoint's chat template; an error when it has none.
    pub fn chat_template(&self) -> Result<&ChatTemplate> {
        self.chat_template.as_ref().ok_or_else(|| {
            LeashError::usage(
                "the data holds conversations but the tokenizer has no chat_template",
                "add chat_template to tokenizer_config.json (or chat_template.jinja), or use plain-text prompts",
            )
        })
    }

    /// The template SFT's assistant_only_loss renders with (TRL's rule): the chat template when
    /// it has `{% generation %}` markers, else TRL's training variant of a template it knows;
    /// an error otherwise.
    pub fn training_template(&self) -> Result<&ChatTemplate> {
        let template = self.chat_template()?;
        self.training_template.as_ref().ok_or_else(|| {
            LeashError::file(
                template.source(),
                "assistant_only_loss needs a chat template that marks assistant output with \
                 {% generation %} ... {% endgeneration %}, and this one has no such markers",
                "wrap each assistant message (and its end-of-turn token) in {% generation %} ... \
                 {% endgeneration %} in chat_template.jinja, or train without --assistant-only-loss",
            )
        })
    }

    /// Token ids of `text` without special tokens, with each token's byte range in `text`.
    // (ids, byte offsets of each token in `text`)
    #[allow(clippy::type_complexity)]
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<(usize, usize)>)> {
        let enc = self.inner.encode(text, false).map_err(|e| {
            LeashError::usage(
                format!("tokenizer failed on {text:?}: {e}"),
                "check the text is valid",
            )
        })?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }
}

//! Conversational rows tokenized as TRL 1.16 does (DPOTrainer, KTOTrainer and SFTTrainer
//! `_prepare_dataset`, GRPOTrainer `_tokenize_prompts`; all through `data_utils._tokenize`):
//! - each message list is rendered by the chat template and tokenized with
//!   `add_special_tokens=False`, so the only BOS is the one the template writes;
//! - no EOS is appended: the template closes the assistant turn itself;
//! - the prompt is rendered alone with `add_generation_prompt=True`, the prompt followed by
//!   its completion without; the completion starts where the two id lists diverge (for a
//!   pair, the earlier of the two divergences);
//! - the row's `tools` (a list, or a JSON string) and `chat_template_kwargs` reach the template.
//!
//! SFT's `assistant_only_loss` marks the tokens that overlap a `{% generation %}` span, as
//! transformers' `return_assistant_tokens_mask` does.

use std::path::Path;

use serde_json::{Map, Value};

use super::encode::PromptCompletion;
use super::read::{Message, Row};
use super::template::{ChatTemplate, RenderOptions, Rendered};
use super::tokenizer::TextTokenizer;
use crate::error::{LeashError, Result};

/// Number of leading ids `a` and `b` share (TRL's `common_prefix_length`).
pub fn common_prefix_length(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// One row's conversations, rendered with one template and the row's tools and kwargs.
pub struct Chat<'a> {
    tokenizer: &'a TextTokenizer,
    template: &'a ChatTemplate,
    path: &'a Path,
    line: usize,
    tools: Option<Value>,
    kwargs: Option<Map<String, Value>>,
}

impl<'a> Chat<'a> {
    pub fn new(
        tokenizer: &'a TextTokenizer,
        template: &'a ChatTemplate,
        path: &'a Path,
        row: &Row,
    ) -> Result<Chat<'a>> {
        let field_err = |field: &str, what: &str| {
            LeashError::row(
                path,
                row.line,
                format!("field `{field}` {what}"),
                format!("fix `{field}` on this line (as TRL reads it)"),
            )
        };
        let tools =
            match row.extra.get("tools") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(serde_json::from_str(s).map_err(|e| {
                    field_err("tools", &format!("is a string that is not JSON: {e}"))
                })?),
                Some(v @ Value::Array(_)) => Some(v.clone()),
                Some(_) => {
                    return Err(field_err(
                        "tools",
                        "must be a list of tool schemas or a JSON string",
                    ))
                }
            };
        let kwargs = match row.extra.get("chat_template_kwargs") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => Some(m.clone()),
            Some(_) => {
                return Err(field_err(
                    "chat_template_kwargs",
                    "must be an object of template variables",
                ))
            }
        };
        Ok(Chat {
            tokenizer,
            template,
            path,
            line: row.line,
            tools,
            kwargs,
        })
    }

    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=…)`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Rendered> {
        let opts = RenderOptions {
            add_generation_prompt,
            special_tokens: self.tokenizer.template_tokens(),
            tools: self.tools.as_ref(),
            kwargs: self.kwargs.as_ref(),
        };
        self.template
            .render(messages, &opts)
            .map_err(|f| f.at_row(self.path, self.line))
    }

    /// `apply_chat_template(messages, tokenize=True)`: no special tokens beyond the template's.
    pub fn ids(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Vec<u32>> {
        let text = self.render(messages, add_generation_prompt)?.text;
        self.tokenizer.encode(&text, false)
    }

    fn joined(prompt: &[Message], completion: &[Message]) -> Vec<Message> {
        prompt.iter().chain(completion).cloned().collect()
    }

    /// KTO's and SFT's split: prompt ids up to where they diverge from prompt+completion.
    pub fn prompt_completion(
        &self,
        prompt: &[Message],
        completion: &[Message],
    ) -> Result<PromptCompletion> {
        let prompt_ids = self.ids(prompt, true)?;
        let mut full = self.ids(&Self::joined(prompt, completion), false)?;
        let split = common_prefix_length(&prompt_ids, &full);
        let completion = full.split_off(split);
        Ok(PromptCompletion {
            prompt: prompt_ids[..split].to_vec(),
            completion,
            loss_mask: None,
        })
    }

    /// DPO's split: one shared prompt, up to the earlier divergence of the two completions.
    pub fn pair(
        &self,
        prompt: &[Message],
        chosen: &[Message],
        rejected: &[Message],
    ) -> Result<(PromptCompletion, PromptCompletion)> {
        let prompt_ids = self.ids(prompt, true)?;
        let c = self.ids(&Self::joined(prompt, chosen), false)?;
        let r = self.ids(&Self::joined(prompt, rejected), false)?;
        let split =
            common_prefix_length(&prompt_ids, &c).min(common_prefix_length(&prompt_ids, &r));
        let part = |ids: &[u32]| PromptCompletion {
            prompt: prompt_ids[..split].to_vec(),
            completion: ids[split..].to_vec(),
            loss_mask: None,
        };
        Ok((part(&c), part(&r)))
    }

    /// SFT with assistant_only_loss: ids of `messages` and which of them are assistant output
    /// (`return_assistant_tokens_mask`: a token is in when it overlaps a generation span).
    pub fn assistant_tokens(&self, messages: &[Message]) -> Result<(Vec<u32>, Vec<bool>)> {
        let rendered = self.render(messages, false)?;
        let (ids, offsets) = self.tokenizer.encode_with_offsets(&rendered.text)?;
        let spans = &rendered.generation_spans;
        let mut mask = vec![false; ids.len()];
        let mut span = 0;
        for (m, &(start, end)) in mask.iter_mut().zip(&offsets) {
            while span < spans.len() && start >= spans[span].1 {
                span += 1;
            }
            if span == spans.len() {
                break;
            }
            if end > spans[span].0 {
                *m = true;
            }
        }
        if !mask.contains(&true) {
            return Err(LeashError::row(
                self.path,
                self.line,
                "assistant_only_loss: this row has no assistant tokens (the chat template marks \
                 nothing of it with {% generation %})",
                "give the conversation an assistant message, or check the template's \
                 {% generation %} blocks",
            ));
        }
        Ok((ids, mask))
    }

    /// SFT with assistant_only_loss: the ids of `prompt` + `completion` split as
    /// [`Chat::prompt_completion`] does, with the assistant mask over all of them.
    pub fn masked_prompt_completion(
        &self,
        prompt: &[Message],
        completion: &[Message],
    ) -> Result<PromptCompletion> {
        let prompt_ids = self.ids(prompt, true)?;
        let (mut full, mask) = self.assistant_tokens(&Self::joined(prompt, completion))?;
        let split = common_prefix_length(&prompt_ids, &full);
        let completion = full.split_off(split);
        Ok(PromptCompletion {
            prompt: full,
            completion,
            loss_mask: Some(mask),
        })
    }
}

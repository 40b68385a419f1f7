//! Turns rows into token ids exactly as TRL does (see tests/fixtures/tiny-llama/golden).
//! Plain text: EOS appended to each completion as text unless already there; prompt and
//! prompt+completion tokenized separately with the tokenizer's own special tokens; the
//! completion is the ids after their longest common prefix. Conversations: see
//! [`super::conversation`] (the template's special tokens only, no EOS appended).
//! Truncation keeps the start and happens at batching time ([`Sequence::new`]), so the full
//! ids stay available for reporting.
//!
//! ORPO (TRL's `trl.experimental` ORPOTrainer) renders conversations to text first, tokenizes
//! without special tokens and adds the BOS/EOS ids itself: [`Style::Orpo`].

use super::conversation::Chat;
use super::read::{Content, Example, Message, Row};
use super::template::ChatTemplate;
use super::tokenizer::TextTokenizer;
use crate::error::{LeashError, Result};
use std::path::Path;

/// How special tokens are placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// SFT/DPO/IPO/KTO: the tokenizer's post-processor adds them; EOS appended as text.
    Trl,
    /// ORPO: no post-processor; BOS id prepended and EOS id appended when missing.
    Orpo,
}

/// A prompt and one completion, as ids (before truncation).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptCompletion {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
    /// SFT's assistant_only_loss: which of prompt+completion's ids are assistant output
    /// (only those completion tokens are trained on). None: every completion token.
    pub loss_mask: Option<Vec<bool>>,
}

impl PromptCompletion {
    /// Whether the token at `position` of prompt+completion is trained on (given it is past
    /// the prompt).
    pub fn in_loss(&self, position: usize) -> bool {
        self.loss_mask
            .as_ref()
            .is_none_or(|m| m.get(position).copied().unwrap_or(false))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Encoded {
    Pair {
        chosen: PromptCompletion,
        rejected: PromptCompletion,
    },
    Unpaired {
        seq: PromptCompletion,
        label: bool,
    },
    /// SFT: prompt-masked (prompt-completion) or whole-text (prompt empty except BOS).
    Sft(PromptCompletion),
    Prompt {
        prompt: Vec<u32>,
        text: String,
    },
}

/// One encoded row with where it came from.
#[derive(Debug, Clone)]
pub struct EncodedRow {
    pub index: usize,
    pub line: usize,
    pub item: Encoded,
}

/// Tokenized ids of prompt + completion, truncated to `max_length` keeping the start;
/// `loss_start` is where the scored (completion) tokens begin.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    pub loss_start: usize,
}

impl Sequence {
    /// None when the prompt alone fills `max_length` (TRL drops such rows).
    pub fn new(pc: &PromptCompletion, max_length: Option<usize>) -> Option<Sequence> {
        let max = max_length.unwrap_or(usize::MAX);
        if pc.prompt.len() >= max {
            return None;
        }
        let keep = pc.completion.len().min(max - pc.prompt.len());
        let mut ids = pc.prompt.clone();
        ids.extend_from_slice(&pc.completion[..keep]);
        Some(Sequence {
            loss_start: pc.prompt.len().max(1),
            ids,
        })
    }

    pub fn scored_tokens(&self) -> usize {
        self.ids.len().saturating_sub(self.loss_start)
    }
}

pub struct Encoder<'a> {
    pub tokenizer: &'a TextTokenizer,
    pub style: Style,
    pub path: &'a Path,
    /// SFT's assistant_only_loss: render with the training template and mark assistant tokens.
    pub assistant_only_loss: bool,
}

/// The message lists of `parts` when all are conversations, None when all are text.
fn conversations<'c>(parts: &[&'c Content]) -> Option<Option<Vec<&'c [Message]>>> {
    let lists: Vec<&[Message]> = parts
        .iter()
        .filter_map(|c| match c {
            Content::Messages(m) => Some(m.as_slice()),
            Content::Text(_) => None,
        })
        .collect();
    match lists.len() {
        0 => Some(None),
        n if n == parts.len() => Some(Some(lists)),
        _ => None,
    }
}

impl Encoder<'_> {
    pub fn encode_rows(&self, rows: &[Row]) -> Result<Vec<EncodedRow>> {
        rows.iter()
            .enumerate()
            .map(|(index, row)| {
                Ok(EncodedRow {
                    index,
                    line: row.line,
                    item: self.encode(row)?,
                })
            })
            .collect()
    }

    fn template(&self) -> Result<&ChatTemplate> {
        if self.assistant_only_loss {
            self.tokenizer.training_template()
        } else {
            self.tokenizer.chat_template()
        }
    }

    /// The row's conversations (TRL's tokenization of them) when `parts` are message lists;
    /// None for plain text, or for ORPO, which renders conversations to text first.
    #[allow(clippy::type_complexity)]
    fn chat<'c>(
        &'c self,
        row: &Row,
        parts: &[&'c Content],
    ) -> Result<Option<(Chat<'c>, Vec<&'c [Message]>)>> {
        let lists = conversations(parts).ok_or_else(|| {
            LeashError::row(
                self.path,
                row.line,
                "the row mixes plain text and conversation",
                "make its fields all strings or all message lists",
            )
        })?;
        match lists {
            Some(lists) if self.style == Style::Trl => {
                if let Some(empty) = lists.iter().position(|l| l.is_empty()) {
                    return Err(LeashError::row(
                        self.path,
                        row.line,
                        format!(
                            "conversation field {} of this row is an empty list",
                            empty + 1
                        ),
                        "every conversation needs at least one message",
                    ));
                }
                let chat = Chat::new(self.tokenizer, self.template()?, self.path, row)?;
                Ok(Some((chat, lists)))
            }
            _ => {
                self.plain_text_allowed(row)?;
                Ok(None)
            }
        }
    }

    /// TRL refuses assistant_only_loss on plain text (there is no assistant to find).
    fn plain_text_allowed(&self, row: &Row) -> Result<()> {
        if self.assistant_only_loss {
            return Err(LeashError::row(
                self.path,
                row.line,
                "assistant_only_loss needs conversational rows, and this row is plain text",
                "use `messages` (or prompt/completion message lists), or train without --assistant-only-loss",
            ));
        }
        Ok(())
    }

    pub fn encode(&self, row: &Row) -> Result<Encoded> {
        let err = |field: &str, msg: &str| {
            LeashError::row(
                self.path,
                row.line,
                format!("field `{field}` {msg}"),
                "every completion needs some text",
            )
        };
        match &row.example {
            Example::Pair {
                prompt,
                chosen,
                rejected,
            } => {
                if let Some((chat, l)) = self.chat(row, &[prompt, chosen, rejected])? {
                    let (chosen, rejected) = chat.pair(l[0], l[1], l[2])?;
                    return Ok(Encoded::Pair { chosen, rejected });
                }
                let (p1, c) = self.render_pair(prompt, chosen, row.line)?;
                let (p2, r) = self.render_pair(prompt, rejected, row.line)?;
                if c.is_empty() {
                    return Err(err("chosen", "is empty"));
                }
                if r.is_empty() {
                    return Err(err("rejected", "is empty"));
                }
                let mut chosen = self.prompt_completion(&p1, &c)?;
                let mut rejected = self.prompt_completion(&p2, &r)?;
                // TRL splits both at the shorter common prefix so the pair shares one prompt.
                let shared = chosen.prompt.len().min(rejected.prompt.len());
                for pc in [&mut chosen, &mut rejected] {
                    let tail = pc.prompt.split_off(shared);
                    pc.completion.splice(0..0, tail);
                }
                Ok(Encoded::Pair { chosen, rejected })
            }
            Example::Unpaired {
                prompt,
                completion,
                label,
            } => {
                if let Some((chat, l)) = self.chat(row, &[prompt, completion])? {
                    return Ok(Encoded::Unpaired {
                        seq: chat.prompt_completion(l[0], l[1])?,
                        label: *label,
                    });
                }
                let (p, c) = self.render_pair(prompt, completion, row.line)?;
                if c.is_empty() {
                    return Err(err("completion", "is empty"));
                }
                Ok(Encoded::Unpaired {
                    seq: self.prompt_completion(&p, &c)?,
                    label: *label,
                })
            }
            Example::Completion { prompt, completion } => {
                if let Some((chat, l)) = self.chat(row, &[prompt, completion])? {
                    return Ok(Encoded::Sft(if self.assistant_only_loss {
                        chat.masked_prompt_completion(l[0], l[1])?
                    } else {
                        chat.prompt_completion(l[0], l[1])?
                    }));
                }
                let (p, c) = self.render_pair(prompt, completion, row.line)?;
                if c.is_empty() {
                    return Err(err("completion", "is empty"));
                }
                Ok(Encoded::Sft(self.prompt_completion(&p, &c)?))
            }
            Example::Text { text } => {
                self.plain_text_allowed(row)?;
                if text.is_empty() {
                    return Err(err("text", "is empty"));
                }
                Ok(Encoded::Sft(self.prompt_completion("", text)?))
            }
            Example::Conversation { messages } => {
                let content = Content::Messages(messages.clone());
                match self.chat(row, &[&content])? {
                    Some((chat, l)) => {
                        let (ids, mask) = if self.assistant_only_loss {
                            let (ids, mask) = chat.assistant_tokens(l[0])?;
                            (ids, Some(mask))
                        } else {
                            (chat.ids(l[0], false)?, None)
                        };
                        Ok(Encoded::Sft(PromptCompletion {
                            prompt: Vec::new(),
                            completion: ids,
                            loss_mask: mask,
                        }))
                    }
                    // ORPO never reads `messages` rows; rendered text as a fallback.
                    None => {
                        let text = self.render_text(messages, false, row.line)?;
                        Ok(Encoded::Sft(self.prompt_completion("", &text)?))
                    }
                }
            }
            Example::PromptOnly { prompt } => {
                if let Some((chat, l)) = self.chat(row, &[prompt])? {
                    return Ok(Encoded::Prompt {
                        prompt: chat.ids(l[0], true)?,
                        text: chat.render(l[0], true)?.text,
                    });
                }
                let text = self.render_prompt(prompt)?;
                Ok(Encoded::Prompt {
                    prompt: self.tokenize(&text)?,
                    text,
                })
            }
        }
    }

    /// Renders `messages` to text (ORPO's `maybe_apply_chat_template` path).
    fn render_text(&self, messages: &[Message], gen: bool, line: usize) -> Result<String> {
        let template = self.tokenizer.chat_template()?;
        let opts = super::template::RenderOptions {
            add_generation_prompt: gen,
            special_tokens: self.tokenizer.template_tokens(),
            ..Default::default()
        };
        template
            .render(messages, &opts)
            .map(|r| r.text)
            .map_err(|f| f.at_row(self.path, line))
    }

    /// The prompt as text; conversations with the generation prompt, as GRPO renders them.
    pub fn render_prompt(&self, prompt: &Content) -> Result<String> {
        match prompt {
            Content::Text(t) => Ok(t.clone()),
            Content::Messages(m) => self.render_text(m, true, 0),
        }
    }

    /// (prompt text, completion text) for ORPO and plain text. Conversations: render prompt
    /// and prompt+completion and take the completion as the text after their common prefix
    /// (TRL's `apply_chat_template` does the same, since some templates insert tokens with
    /// `add_generation_prompt`).
    fn render_pair(
        &self,
        prompt: &Content,
        completion: &Content,
        line: usize,
    ) -> Result<(String, String)> {
        match (prompt, completion) {
            (Content::Text(p), Content::Text(c)) => Ok((p.clone(), c.clone())),
            (Content::Messages(p), Content::Messages(c)) => {
                let opens_assistant = p.last().is_none_or(|last| last.role != "assistant");
                let prompt_text = self.render_text(p, opens_assistant, line)?;
                let all: Vec<Message> = p.iter().chain(c.iter()).cloned().collect();
                let full = self.render_text(&all, false, line)?;
                let common: usize = prompt_text
                    .char_indices()
                    .zip(full.chars())
                    .take_while(|((_, a), b)| a == b)
                    .map(|((_, a), _)| a.len_utf8())
                    .sum();
                Ok((full[..common].to_string(), full[common..].to_string()))
            }
            _ => Err(LeashError::row(
                self.path,
                line,
                "the prompt and completion mix plain text and conversation",
                "make both strings or both message lists",
            )),
        }
    }

    fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let tok = self.tokenizer;
        match self.style {
            // Plain text: `processing_class(text=...)`, special tokens included.
            Style::Trl => tok.encode(text, true),
            Style::Orpo => {
                let mut ids = tok.encode(text, false)?;
                if let Some(bos) = tok.bos_id {
                    if ids.first() != Some(&bos) {
                        ids.insert(0, bos);
                    }
                }
                Ok(ids)
            }
        }
    }

    fn prompt_completion(&self, prompt: &str, completion: &str) -> Result<PromptCompletion> {
        let tok = self.tokenizer;
        let mut completion = completion.to_string();
        if self.style == Style::Trl && !completion.ends_with(&tok.eos_token) {
            completion.push_str(&tok.eos_token);
        }
        let prompt_ids = self.tokenize(prompt)?;
        let full = self.tokenize(&format!("{prompt}{completion}"))?;
        let common = prompt_ids
            .iter()
            .zip(&full)
            .take_while(|(a, b)| a == b)
            .count();
        let mut completion_ids = full[common..].to_vec();
        if self.style == Style::Orpo && completion_ids.last() != Some(&tok.eos_id) {
            completion_ids.push(tok.eos_id);
        }
        Ok(PromptCompletion {
            prompt: prompt_ids[..common].to_vec(),
            completion: completion_ids,
            loss_mask: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_start_and_drops_long_prompts() {
        let pc = PromptCompletion {
            prompt: vec![1, 2, 3],
            completion: vec![4, 5, 6, 7],
            loss_mask: None,
        };
        assert_eq!(
            Sequence::new(&pc, Some(5)).unwrap().ids,
            vec![1, 2, 3, 4, 5]
        );
        assert_eq!(Sequence::new(&pc, Some(5)).unwrap().scored_tokens(), 2);
        assert!(Sequence::new(&pc, Some(3)).is_none());
        assert_eq!(Sequence::new(&pc, None).unwrap().ids.len(), 7);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Truncation keeps the start, never exceeds max_length, scores exactly the completion
        /// tokens that survive, and drops a row only when its prompt fills max_length.
        #[test]
        fn truncation_invariants(prompt in proptest::collection::vec(0u32..50, 1..20),
                                 completion in proptest::collection::vec(0u32..50, 1..20),
                                 max in 2usize..40) {
            let pc = PromptCompletion { prompt: prompt.clone(), completion: completion.clone(), loss_mask: None };
            match Sequence::new(&pc, Some(max)) {
                None => prop_assert!(prompt.len() >= max),
                Some(s) => {
                    prop_assert!(s.ids.len() <= max);
                    let full: Vec<u32> = prompt.iter().chain(&completion).copied().collect();
                    prop_assert_eq!(&s.ids[..], &full[..s.ids.len()]);
                    prop_assert_eq!(s.scored_tokens(), completion.len().min(max - prompt.len()));
                }
            }
        }
    }
}

//! Turns rows into token ids exactly as TRL does (see tests/fixtures/tiny-llama/golden):
//! EOS appended to each completion as text unless already there; prompt and prompt+completion
//! tokenized separately with the tokenizer's own special tokens; the completion is the ids
//! after their longest common prefix. Truncation keeps the start and happens at batching time
//! ([`Sequence::new`]), so the full ids stay available for reporting.
//!
//! ORPO (TRL's `trl.experimental` ORPOTrainer) tokenizes without special tokens and adds the
//! BOS/EOS ids itself: [`Style::Orpo`].

use super::read::{Content, Example, Message, Row};
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
                let (p, c) = self.render_pair(prompt, completion, row.line)?;
                if c.is_empty() {
                    return Err(err("completion", "is empty"));
                }
                Ok(Encoded::Sft(self.prompt_completion(&p, &c)?))
            }
            Example::Text { text } => {
                if text.is_empty() {
                    return Err(err("text", "is empty"));
                }
                Ok(Encoded::Sft(self.prompt_completion("", text)?))
            }
            Example::Conversation { messages } => {
                let text = self.tokenizer.render_chat(messages, false)?;
                Ok(Encoded::Sft(self.prompt_completion("", &text)?))
            }
            Example::PromptOnly { prompt } => {
                let text = self.render_prompt(prompt)?;
                Ok(Encoded::Prompt {
                    prompt: self.tokenize(&text)?,
                    text,
                })
            }
        }
    }

    /// The prompt as text, with the generation prompt opened for conversations.
    pub fn render_prompt(&self, prompt: &Content) -> Result<String> {
        match prompt {
            Content::Text(t) => Ok(t.clone()),
            Content::Messages(m) => {
                let opens_assistant = m.last().is_none_or(|last| last.role != "assistant");
                self.tokenizer.render_chat(m, opens_assistant)
            }
        }
    }

    /// (prompt text, completion text). Conversations: render prompt and prompt+completion
    /// and take the completion as the text after their common prefix (TRL does the same,
    /// since some templates insert tokens with `add_generation_prompt`).
    fn render_pair(
        &self,
        prompt: &Content,
        completion: &Content,
        line: usize,
    ) -> Result<(String, String)> {
        match (prompt, completion) {
            (Content::Text(p), Content::Text(c)) => Ok((p.clone(), c.clone())),
            (Content::Messages(p), Content::Messages(c)) => {
                let prompt_text = self.render_prompt(prompt)?;
                let all: Vec<Message> = p.iter().chain(c.iter()).cloned().collect();
                let full = self.tokenizer.render_chat(&all, false)?;
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
            Style::Trl => {
                // A rendered chat template usually already starts with the BOS text.
                let has_bos = tok
                    .bos_token
                    .as_deref()
                    .is_some_and(|b| !b.is_empty() && text.starts_with(b));
                tok.encode(text, !has_bos)
            }
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
            let pc = PromptCompletion { prompt: prompt.clone(), completion: completion.clone() };
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

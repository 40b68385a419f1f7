//! Training examples per method, built from encoded rows with TRL's rules: rows whose prompt
//! alone fills max_length are dropped (and counted); KTO's mismatched pairs for the KL
//! reference point rotate completions by one inside fixed chunks of the batch size, in file
//! order, after dropping (TRL's `add_kl_completion_ids`).

use std::path::Path;

use super::config::Method;
use crate::data::dataset::read_rows;
use crate::data::encode::{Encoded, Encoder, PromptCompletion, Sequence, Style};
use crate::data::read::Example;
use crate::data::tokenizer::TextTokenizer;
use crate::error::{LeashError, Result};

#[derive(Debug, Clone)]
pub enum TrainExample {
    Sft(PromptCompletion),
    Pair {
        chosen: PromptCompletion,
        rejected: PromptCompletion,
    },
    Unpaired {
        seq: PromptCompletion,
        /// This row's prompt with another row's completion (KTO's KL estimate).
        kl: PromptCompletion,
        desirable: bool,
    },
}

/// The truncated sequence of a kept example. `prepare` drops rows whose prompt fills
/// `max_length`, so the fallback (a prompt-only sequence with nothing scored) never
/// contributes a token; it exists so this function cannot panic.
pub fn to_sequence(pc: &PromptCompletion, max_length: usize) -> Sequence {
    Sequence::new(pc, Some(max_length)).unwrap_or_else(|| Sequence {
        ids: pc.prompt[..pc.prompt.len().min(max_length)].to_vec(),
        loss_start: max_length,
    })
}

/// A data set ready for one method.
pub struct Prepared {
    /// (row index in the file, example), rows kept, in file order.
    pub examples: Vec<(usize, TrainExample)>,
    pub dropped: usize,
}

fn accepted(method: Method) -> &'static str {
    match method {
        Method::Sft => "prompt/completion, text or messages rows",
        Method::Dpo | Method::Orpo => "preference rows: prompt/chosen/rejected (or implicit-prompt chosen/rejected)",
        Method::Grpo => "rows with a prompt",
        Method::Kto => "unpaired rows prompt/completion/label (preference rows are split into one desirable and one undesirable row)",
    }
}

pub fn prepare(
    method: Method,
    path: &Path,
    tokenizer: &TextTokenizer,
    max_length: usize,
    batch_size: usize,
) -> Result<Prepared> {
    prepare_with(method, path, None, tokenizer, max_length, batch_size, false)
}

/// Whether a truncated SFT example keeps a token in the loss (TRL drops fully masked rows).
fn sft_keeps_a_token(pc: &PromptCompletion, max_length: usize) -> bool {
    let end = (pc.prompt.len() + pc.completion.len()).min(max_length);
    pc.prompt.len() < max_length && (pc.prompt.len().max(1)..end).any(|p| pc.in_loss(p))
}

/// As [`prepare`], for one split of a dataset folder (`None`: its only split, or `train`),
/// with SFT's `assistant_only_loss`.
pub fn prepare_with(
    method: Method,
    path: &Path,
    split: Option<&str>,
    tokenizer: &TextTokenizer,
    max_length: usize,
    batch_size: usize,
    assistant_only_loss: bool,
) -> Result<Prepared> {
    let rows = read_rows(path, split)?;
    for row in &rows {
        let ok = matches!(
            (&row.example, method),
            (
                Example::Completion { .. } | Example::Text { .. } | Example::Conversation { .. },
                Method::Sft,
            ) | (
                Example::Pair { .. },
                Method::Dpo | Method::Orpo | Method::Kto
            ) | (Example::Unpaired { .. }, Method::Kto)
        );
        if !ok {
            return Err(LeashError::row(
                path,
                row.line,
                format!(
                    "a {} row cannot train `{}`",
                    row.example.kind(),
                    method.name()
                ),
                format!("`leash {}` takes {}", method.name(), accepted(method)),
            ));
        }
    }
    let style = if method == Method::Orpo {
        Style::Orpo
    } else {
        Style::Trl
    };
    let encoder = Encoder {
        tokenizer,
        style,
        path,
        assistant_only_loss,
    };
    let encoded = encoder.encode_rows(&rows)?;
    let fits = |pc: &PromptCompletion| pc.prompt.len() < max_length;
    let mut examples = Vec::new();
    let mut unpaired: Vec<(usize, PromptCompletion, bool)> = Vec::new();
    let mut dropped = 0;
    for row in encoded {
        match row.item {
            Encoded::Sft(pc) if pc.loss_mask.is_none() && fits(&pc) => {
                examples.push((row.index, TrainExample::Sft(pc)))
            }
            Encoded::Sft(pc) if sft_keeps_a_token(&pc, max_length) => {
                examples.push((row.index, TrainExample::Sft(pc)))
            }
            Encoded::Pair { chosen, rejected } if method == Method::Kto => {
                for (pc, label) in [(chosen, true), (rejected, false)] {
                    if fits(&pc) {
                        unpaired.push((row.index, pc, label));
                    } else {
                        dropped += 1;
                    }
                }
            }
            Encoded::Pair { chosen, rejected } if fits(&chosen) && fits(&rejected) => {
                examples.push((row.index, TrainExample::Pair { chosen, rejected }))
            }
            Encoded::Unpaired { seq, label } if fits(&seq) => {
                unpaired.push((row.index, seq, label))
            }
            _ => dropped += 1,
        }
    }
    for chunk in unpaired.chunks(batch_size) {
        let n = chunk.len();
        for (i, (index, seq, desirable)) in chunk.iter().enumerate() {
            let other = &chunk[(i + n - 1) % n].1;
            let kl = PromptCompletion {
                prompt: seq.prompt.clone(),
                completion: other.completion.clone(),
                loss_mask: None,
            };
            examples.push((
                *index,
                TrainExample::Unpaired {
                    seq: seq.clone(),
                    kl,
                    desirable: *desirable,
                },
            ));
        }
    }
    if examples.is_empty() {
        return Err(LeashError::file(
            path,
            format!("no usable rows: all {dropped} prompts are at least max_length ({max_length}) tokens"),
            "raise --max-length",
        ));
    }
    Ok(Prepared { examples, dropped })
}

//! `leash logps`: score every row of a data set under a model, in input order, as JSON.
//! Preference rows get chosen/rejected log-probs, unpaired and SFT rows a completion
//! log-prob; rows whose prompt alone fills `max_length` are reported as dropped.

use std::path::Path;

use serde_json::{json, Value};

use crate::data::collate::collate;
use crate::data::dataset::read_rows;
use crate::data::encode::{Encoded, EncodedRow, Encoder, PromptCompletion, Sequence, Style};
use crate::data::tokenizer::TextTokenizer;
use crate::error::Result;
use crate::loss::logps::score;
use crate::model::Decoder;

/// Sequences scored per forward pass.
const SCORE_BATCH: usize = 16;

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

//! `--precompute-ref-log-probs`: score the frozen reference once before training and cache
//! the numbers in the output folder (reused when resuming), so training needs no reference
//! model in memory and no reference forward pass per step.

use std::collections::HashMap;

use serde_json::json;

use super::config::TrainConfig;
use super::examples::{to_sequence, Prepared, TrainExample};
use super::step::RefLogps;
use crate::data::collate::collate;
use crate::data::encode::Sequence;
use crate::data::pack::collate_packed;
use crate::error::{read_text, LeashError, Result};
use crate::loss::logps::score;
use crate::model::Decoder;

/// Reference log-probs of every example, keyed by example position: (chosen, rejected) for
/// pairs, (completion, mismatched-pair KL completion) for KTO.
pub fn reference_cache(
    cfg: &TrainConfig,
    reference: &Decoder,
    data: &Prepared,
    split: &str,
    pad_id: u32,
) -> Result<HashMap<usize, RefLogps>> {
    let path = cfg.output_dir.join(format!("ref_logps_{split}.json"));
    let key = json!({
        "model": cfg.model, "max_length": cfg.max_length, "examples": data.examples.len(),
        "batch_size": cfg.per_device_train_batch_size,
    });
    if path.exists() {
        let cached: serde_json::Value = serde_json::from_str(&read_text(&path)?)
            .map_err(|e| LeashError::file(&path, e.to_string(), "delete it to recompute"))?;
        if cached["key"] == key {
            let mut map = HashMap::new();
            for e in cached["entries"].as_array().into_iter().flatten() {
                let v = |i: usize| e[i].as_f64().unwrap_or(f64::NAN);
                map.insert(v(0) as usize, (v(1) as f32, v(2) as f32));
            }
            eprintln!("reusing reference log-probs from {}", path.display());
            return Ok(map);
        }
    }
    let device = reference.device();
    let mut map = HashMap::new();
    let positions: Vec<usize> = (0..data.examples.len()).collect();
    for chunk in positions.chunks(cfg.per_device_train_batch_size) {
        let (mut first, mut second) = (Vec::new(), Vec::new());
        for &i in chunk {
            match &data.examples[i].1 {
                TrainExample::Pair { chosen, rejected } => {
                    first.push(to_sequence(chosen, cfg.max_length));
                    second.push(to_sequence(rejected, cfg.max_length));
                }
                TrainExample::Unpaired { seq: s, kl, .. } => {
                    first.push(to_sequence(s, cfg.max_length));
                    second.push(to_sequence(kl, cfg.max_length));
                }
                TrainExample::Sft(_) => {}
            }
        }
        let all: Vec<&Sequence> = first.iter().chain(&second).collect();
        let window = reference.config.sliding_window;
        let batch = if cfg.padding_free {
            collate_packed(&all, pad_id, window, true, device)?
        } else {
            collate(&all, pad_id, window, &[], device)?
        };
        let lp: Vec<f32> = score(reference, &batch)?.seq_logps.to_vec1()?;
        let p = chunk.len();
        for (k, &i) in chunk.iter().enumerate() {
            map.insert(i, (lp[k], lp[p + k]));
        }
    }
    let entries: Vec<_> = (0..data.examples.len())
        .map(|i| json!([i, map[&i].0, map[&i].1]))
        .collect();
    let body = json!({ "key": key, "entries": entries });
    std::fs::write(&path, body.to_string())
        .map_err(|e| LeashError::io(&path, e, "check the output folder is writable"))?;
    Ok(map)
}

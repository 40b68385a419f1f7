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
            let map = cached_entries(&path, &cached["entries"], data.examples.len())?;
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

/// A cache file's `entries`: `[position, first, second]` for every example position below `n`,
/// each exactly once, the log-probs numbers. Anything else is an error naming the entry (a
/// missing or unreadable one used to become NaN and surface later as a NaN loss).
fn cached_entries(
    path: &std::path::Path,
    entries: &serde_json::Value,
    n: usize,
) -> Result<HashMap<usize, RefLogps>> {
    let bad = |what: String| LeashError::file(path, what, "delete the file to recompute it");
    let list = entries
        .as_array()
        .ok_or_else(|| bad("`entries` is not a list".into()))?;
    let mut map = HashMap::with_capacity(n);
    for (k, e) in list.iter().enumerate() {
        let parsed = match e.as_array().map(Vec::as_slice) {
            Some([i, a, b]) => i
                .as_u64()
                .map(|i| i as usize)
                .filter(|&i| i < n)
                .zip(a.as_f64().zip(b.as_f64())),
            _ => None,
        };
        let Some((i, (a, b))) = parsed else {
            return Err(bad(format!(
                "entry {k} is {e}, not [example position below {n}, log-prob, log-prob]"
            )));
        };
        if map.insert(i, (a as f32, b as f32)).is_some() {
            return Err(bad(format!("entry {k} repeats example position {i}")));
        }
    }
    if let Some(missing) = (0..n).find(|i| !map.contains_key(i)) {
        return Err(bad(format!(
            "no entry for example position {missing} ({} of {n} present)",
            map.len()
        )));
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_entries_are_checked() {
        let path = std::path::Path::new("out/ref_logps_train.json");
        let ok = json!([[1, -3.5, -4.0], [0, -1.0, -2.25]]);
        let map = cached_entries(path, &ok, 2).unwrap();
        assert_eq!(map[&0], (-1.0, -2.25));
        assert_eq!(map[&1], (-3.5, -4.0));
        for (entries, says) in [
            (
                json!([[0, -1.0, null], [1, -3.5, -4.0]]),
                "entry 0 is [0,-1.0,null]",
            ),
            (
                json!([[0, -1.0, -2.0]]),
                "no entry for example position 1 (1 of 2 present)",
            ),
            (
                json!([[0, -1.0, -2.0], [0, -1.0, -2.0]]),
                "entry 1 repeats example position 0",
            ),
            (
                json!([[0, -1.0, -2.0], [2, -1.0, -2.0]]),
                "entry 1 is [2,-1.0,-2.0]",
            ),
            (json!({"0": [-1.0, -2.0]}), "`entries` is not a list"),
        ] {
            let err = cached_entries(path, &entries, 2).unwrap_err().to_string();
            assert!(err.contains(says), "{err}");
            assert!(err.contains("ref_logps_train.json"), "{err}");
        }
    }
}

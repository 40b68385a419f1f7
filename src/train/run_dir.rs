//! The output folder of a training run: refuse to write over another run, clear an old run
//! on `--overwrite-output-dir` (its `checkpoint-*` folders too), trim `metrics.jsonl` to the
//! resumed step so a resume into the same folder logs no step twice, keep only the newest
//! `save_total_limit` checkpoints, and name the real last checkpoint in messages.
//! Reference: transformers `Trainer` (`overwrite_output_dir`, `save_total_limit`,
//! `_rotate_checkpoints`).

use std::path::{Path, PathBuf};

use super::config::TrainConfig;
use crate::error::{read_text, LeashError, Result};

/// Files a run writes beside its checkpoints; removed when a run is overwritten.
const RUN_FILES: &[&str] = &[
    "metrics.jsonl",
    "train.log",
    "leash_config.json",
    "ref_logps_train.json",
    "ref_logps_eval.json",
];

fn io(path: &Path, e: std::io::Error) -> LeashError {
    LeashError::io(path, e, "check the output folder is writable")
}

/// `checkpoint-N` folders in `dir`, oldest (smallest N) first.
pub fn checkpoints(dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("checkpoint-")?.parse::<usize>().ok()?;
            e.path().is_dir().then(|| (step, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// The newest complete checkpoint in `dir`, if any.
pub fn last_checkpoint(dir: &Path) -> Option<PathBuf> {
    checkpoints(dir).pop().map(|(_, p)| p)
}

/// A sentence about the last good checkpoint, for messages of runs that stop early.
pub fn last_checkpoint_note(dir: &Path) -> String {
    match last_checkpoint(dir) {
        Some(p) => format!(
            "the last checkpoint, {}, is intact: resume from it with --resume-from-checkpoint {}",
            p.display(),
            p.display()
        ),
        None => "no checkpoint was saved before this step (see --save-steps)".to_string(),
    }
}

/// Refuses a folder that holds another run unless told to overwrite or resume; on overwrite
/// removes the old run's files and checkpoints so they cannot be mistaken for the new run's.
pub fn prepare_output_dir(cfg: &TrainConfig) -> Result<()> {
    let dir = &cfg.output_dir;
    let holds_run = dir.join("metrics.jsonl").exists()
        || dir.join("leash_config.json").exists()
        || !checkpoints(dir).is_empty();
    if holds_run && cfg.resume_from_checkpoint.is_none() {
        if !cfg.overwrite_output_dir {
            return Err(LeashError::usage(
                format!("output folder {} already holds a run", dir.display()),
                "pass --overwrite-output-dir to replace it, --resume-from-checkpoint to continue it, or choose another --output-dir",
            ));
        }
        for (_, ckpt) in checkpoints(dir) {
            std::fs::remove_dir_all(&ckpt).map_err(|e| io(&ckpt, e))?;
        }
        for name in RUN_FILES {
            let path = dir.join(name);
            if path.exists() {
                std::fs::remove_file(&path).map_err(|e| io(&path, e))?;
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))
}

/// Drops rows logged after `step` from `dir/metrics.jsonl`: a run resumed from checkpoint-N
/// into the folder that already logged steps past N would otherwise log them twice.
pub fn trim_metrics(dir: &Path, step: usize) -> Result<()> {
    let path = dir.join("metrics.jsonl");
    if !path.exists() {
        return Ok(());
    }
    let text = read_text(&path)?;
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step")?.as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&path, kept).map_err(|e| io(&path, e))
}

/// Deletes the oldest checkpoints beyond `limit` (TRL/transformers `save_total_limit`).
pub fn prune_checkpoints(dir: &Path, limit: Option<usize>) -> Result<Vec<PathBuf>> {
    let Some(limit) = limit else {
        return Ok(Vec::new());
    };
    let all = checkpoints(dir);
    let excess = all.len().saturating_sub(limit);
    let mut removed = Vec::new();
    for (_, path) in all.into_iter().take(excess) {
        std::fs::remove_dir_all(&path).map_err(|e| io(&path, e))?;
        removed.push(path);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_keeps_the_newest_and_trimming_drops_later_steps() {
        let dir = tempfile::tempdir().unwrap();
        for s in [10, 2, 30, 4] {
            std::fs::create_dir(dir.path().join(format!("checkpoint-{s}"))).unwrap();
        }
        std::fs::create_dir(dir.path().join("checkpoint-x")).unwrap();
        assert_eq!(
            last_checkpoint(dir.path()).unwrap(),
            dir.path().join("checkpoint-30")
        );
        let removed = prune_checkpoints(dir.path(), Some(2)).unwrap();
        assert_eq!(
            removed,
            vec![
                dir.path().join("checkpoint-2"),
                dir.path().join("checkpoint-4")
            ]
        );
        let left: Vec<usize> = checkpoints(dir.path()).iter().map(|c| c.0).collect();
        assert_eq!(left, vec![10, 30]);

        let m = dir.path().join("metrics.jsonl");
        std::fs::write(
            &m,
            "{\"step\":1}\n{\"step\":2}\n{\"step\":3}\n{\"step\":2,\"eval_loss\":1}\n",
        )
        .unwrap();
        trim_metrics(dir.path(), 2).unwrap();
        assert_eq!(
            std::fs::read_to_string(&m).unwrap(),
            "{\"step\":1}\n{\"step\":2}\n{\"step\":2,\"eval_loss\":1}\n"
        );
        let empty = tempfile::tempdir().unwrap();
        assert!(last_checkpoint_note(empty.path()).contains("no checkpoint was saved"));
        assert!(last_checkpoint_note(dir.path()).contains("checkpoint-30"));
    }
}

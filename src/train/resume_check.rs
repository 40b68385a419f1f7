//! What a checkpoint must share with the run that resumes it. A checkpoint records the
//! identity of its run (trainer, model, data set, batch layout, seed); `--resume-from-checkpoint`
//! compares it with the new run and refuses, naming the option, when the trajectory could not
//! continue: another trainer (a `dpo` checkpoint under `kto`), another model or data set, or
//! another batch size (step N would mean other rows). A changed seed only reorders later
//! epochs, so it is a warning. transformers checks none of this; its `TrainerState` records
//! the batch size and warns when it changed.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use crate::error::{LeashError, Result};

/// The parts of a run's configuration a resume must match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunIdentity {
    pub method: String,
    pub model: PathBuf,
    /// FNV-1a of the model's config.json and the names and sizes of its weight files: a
    /// moved or copied model matches, another model (or a re-saved one) does not.
    pub model_fingerprint: String,
    pub dataset: PathBuf,
    /// FNV-1a of the bytes of the data set's files (a folder's shards of the training split,
    /// in reading order).
    pub dataset_fingerprint: String,
    pub per_device_train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub use_peft: bool,
    pub seed: u64,
    /// Whether the run trains in mixed precision (`--bf16` as resolved for its device); absent
    /// in checkpoints of older versions. Another precision is warned about, not refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bf16: Option<bool>,
}

/// 64-bit FNV-1a: a stable content fingerprint (std's hasher may change between releases).
pub fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| LeashError::io(path, e, "check the path exists and is readable"))
}

fn model_fingerprint(dir: &Path) -> Result<String> {
    let mut h = fnv1a(&read(&dir.join("config.json"))?, FNV_OFFSET);
    let mut weights: Vec<(String, u64)> = std::fs::read_dir(dir)
        .map_err(|e| LeashError::io(dir, e, "check the model folder exists"))?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let len = e.metadata().ok()?.len();
            name.ends_with(".safetensors").then_some((name, len))
        })
        .collect();
    weights.sort();
    for (name, len) in weights {
        h = fnv1a(name.as_bytes(), h);
        h = fnv1a(&len.to_le_bytes(), h);
    }
    Ok(format!("{h:016x}"))
}

fn dataset_fingerprint(path: &Path, split: &str) -> Result<String> {
    let mut h = FNV_OFFSET;
    for file in crate::data::dataset::files(path, Some(split))? {
        h = fnv1a(&read(&file)?, h);
    }
    Ok(format!("{h:016x}"))
}

impl RunIdentity {
    pub fn of(cfg: &TrainConfig) -> Result<Self> {
        Ok(RunIdentity {
            method: cfg.method.name().to_string(),
            model: cfg.model.clone(),
            model_fingerprint: model_fingerprint(&cfg.model)?,
            dataset: cfg.dataset.clone(),
            dataset_fingerprint: dataset_fingerprint(&cfg.dataset, &cfg.dataset_train_split)?,
            per_device_train_batch_size: cfg.per_device_train_batch_size,
            gradient_accumulation_steps: cfg.gradient_accumulation_steps,
            use_peft: cfg.use_peft,
            seed: cfg.seed,
            // Resolved against the run's device by the engine.
            bf16: cfg.bf16,
        })
    }
}

/// Refuses a resume whose checkpoint came from an incompatible run; returns warnings to print.
pub fn check_resume(
    checkpoint: &Path,
    saved: Option<&RunIdentity>,
    now: &RunIdentity,
) -> Result<Vec<String>> {
    let Some(saved) = saved else {
        return Ok(vec![format!(
            "warning: {} records no run identity (written by an older leash): trainer, model, data and batch size are not checked",
            checkpoint.display()
        )]);
    };
    let refuse = |what: &str, was: String, is: String, hint: &str| {
        Err(LeashError::file(
            checkpoint,
            format!(
                "cannot resume: the checkpoint was written with {what} {was}, this run has {is}"
            ),
            hint.to_string(),
        ))
    };
    let same_trajectory = "resuming continues the same trajectory, so pass the options of the run that wrote the checkpoint; to start a new run from its weights use --model with the checkpoint folder instead";
    if saved.method != now.method {
        return refuse(
            "trainer",
            format!("`{}`", saved.method),
            format!("`{}`", now.method),
            format!("resume it with `leash {}`; {same_trajectory}", saved.method).as_str(),
        );
    }
    if saved.use_peft != now.use_peft {
        return refuse(
            "use_peft",
            saved.use_peft.to_string(),
            now.use_peft.to_string(),
            same_trajectory,
        );
    }
    if saved.model_fingerprint != now.model_fingerprint {
        return refuse(
            "model",
            saved.model.display().to_string(),
            format!("{} (a different model)", now.model.display()),
            same_trajectory,
        );
    }
    if saved.dataset_fingerprint != now.dataset_fingerprint {
        return refuse(
            "dataset",
            saved.dataset.display().to_string(),
            format!("{} (different contents)", now.dataset.display()),
            same_trajectory,
        );
    }
    for (name, was, is) in [
        (
            "per_device_train_batch_size",
            saved.per_device_train_batch_size,
            now.per_device_train_batch_size,
        ),
        (
            "gradient_accumulation_steps",
            saved.gradient_accumulation_steps,
            now.gradient_accumulation_steps,
        ),
    ] {
        if was != is {
            return refuse(name, was.to_string(), is.to_string(), same_trajectory);
        }
    }
    let mut warnings = Vec::new();
    if let (Some(was), Some(is)) = (saved.bf16, now.bf16) {
        if was != is {
            let name = |b: bool| if b { "bf16 mixed precision" } else { "f32" };
            warnings.push(format!(
                "warning: the checkpoint was trained in {}, this run continues in {}: the trajectory differs by the rounding of bf16 products (pass --bf16 {was} to keep it)",
                name(was),
                name(is)
            ));
        }
    }
    if saved.seed != now.seed {
        warnings.push(format!(
            "warning: the checkpoint was written with seed {}, this run has seed {}: epochs after the current one are shuffled differently",
            saved.seed, now.seed
        ));
    }
    Ok(warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_precision_is_warned_about_not_refused() {
        let run = |bf16| RunIdentity {
            method: "dpo".into(),
            model: "m".into(),
            model_fingerprint: "f".into(),
            dataset: "d".into(),
            dataset_fingerprint: "g".into(),
            per_device_train_batch_size: 8,
            gradient_accumulation_steps: 1,
            use_peft: false,
            seed: 42,
            bf16,
        };
        let dir = Path::new("out/checkpoint-3");
        let warned = check_resume(dir, Some(&run(Some(true))), &run(Some(false))).unwrap();
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert!(
            warned[0].contains("bf16 mixed precision") && warned[0].contains("--bf16 true"),
            "{warned:?}"
        );
        // Same precision, or a checkpoint that does not record it: nothing to say.
        assert!(check_resume(dir, Some(&run(Some(true))), &run(Some(true)))
            .unwrap()
            .is_empty());
        assert!(check_resume(dir, Some(&run(None)), &run(Some(false)))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        // From the FNV reference (http://www.isthe.com/chongo/tech/comp/fnv/): FNV-1a 64 of
        // "" and "a".
        assert_eq!(fnv1a(b"", FNV_OFFSET), 0xcbf29ce484222325);
        assert_eq!(fnv1a(b"a", FNV_OFFSET), 0xaf63dc4c8601ec8c);
    }
}

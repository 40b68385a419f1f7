//! Training checkpoints: the model in Hugging Face layout (src/model_io, loadable by transformers)
//! plus optimizer moments and trainer state for resuming.
//! Each checkpoint is written to a temporary folder and renamed into place, so a folder named
//! `checkpoint-N` is always complete.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::optimizer::AdamW;
use super::resume_check::RunIdentity;
use crate::error::{read_text, LeashError, Result};

/// Where training stands; enough to continue the same trajectory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub global_step: usize,
    /// Running count of non-padding training tokens (TRL's num_tokens).
    pub total_tokens: usize,
    /// Shuffling is a pure function of (seed, epoch), so the seed is the whole RNG state.
    pub seed: u64,
    /// logps/chosen at the first logged step and whether the monitor already warned.
    pub monitor_start_logps: Option<f64>,
    pub monitor_warned: bool,
    /// What a resume must match (absent in checkpoints of older versions).
    #[serde(default)]
    pub run: Option<RunIdentity>,
    /// The device that trained up to here (`cpu`, `cuda:0`). A resume may use another one:
    /// it is reported, never refused. Absent in checkpoints of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

fn io(path: &Path, e: std::io::Error) -> LeashError {
    LeashError::io(
        path,
        e,
        "check the output folder is writable and the disk has space",
    )
}

/// Writes `output_dir/checkpoint-{step}` atomically and returns its path.
pub fn save_checkpoint(
    output_dir: &Path,
    save_weights: &dyn Fn(&Path) -> Result<()>,
    vars: &[(String, Var)],
    opt: &AdamW,
    state: &TrainerState,
) -> Result<PathBuf> {
    let final_dir = output_dir.join(format!("checkpoint-{}", state.global_step));
    let tmp = output_dir.join(format!(".checkpoint-{}.tmp", state.global_step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    save_weights(&tmp)?;
    // Moments come to the host to be written, wherever training keeps them.
    let mut moments = HashMap::new();
    for ((name, var), mo) in vars.iter().zip(&opt.moments) {
        let shape = var.shape();
        let (m, v) = mo.to_host()?;
        moments.insert(
            format!("{name}.exp_avg"),
            Tensor::from_vec(m, shape, &Device::Cpu)?,
        );
        moments.insert(
            format!("{name}.exp_avg_sq"),
            Tensor::from_vec(v, shape, &Device::Cpu)?,
        );
    }
    let opt_path = tmp.join("optimizer.safetensors");
    crate::files::save_safetensors(&moments, &opt_path)?;
    let mut state_json = serde_json::to_value(state).unwrap_or_default();
    state_json["optimizer_step"] = opt.step.into();
    let state_path = tmp.join("trainer_state.json");
    std::fs::write(
        &state_path,
        serde_json::to_string_pretty(&state_json).unwrap_or_default(),
    )
    .map_err(|e| io(&state_path, e))?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| io(&final_dir, e))?;
    Ok(final_dir)
}

/// Reads `dir/trainer_state.json` only.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let state_path = dir.join("trainer_state.json");
    let hint = "pass a checkpoint-N folder written by leash (it holds trainer_state.json)";
    if !state_path.exists() {
        return Err(LeashError::file(
            dir,
            "not a leash checkpoint: no trainer_state.json",
            hint,
        ));
    }
    serde_json::from_str(&read_text(&state_path)?)
        .map_err(|e| LeashError::file(&state_path, e.to_string(), hint))
}

/// Restores weights, optimizer moments and trainer state from a checkpoint folder.
pub fn load_checkpoint(
    dir: &Path,
    vars: &[(String, Var)],
    opt: &mut AdamW,
) -> Result<TrainerState> {
    let state_path = dir.join("trainer_state.json");
    let hint = "pass a checkpoint-N folder written by leash (it holds trainer_state.json)";
    if !state_path.exists() {
        return Err(LeashError::file(
            dir,
            "not a leash checkpoint: no trainer_state.json",
            hint,
        ));
    }
    let text = read_text(&state_path)?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| LeashError::file(&state_path, e.to_string(), hint))?;
    let raw: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    // Full runs save model.safetensors; LoRA runs save the adapter under PEFT's names.
    let file = if dir.join("adapter_model.safetensors").exists() {
        "adapter_model.safetensors"
    } else {
        "model.safetensors"
    };
    // Read onto the device training runs on, whichever device wrote the checkpoint: a run
    // may resume on another device (the files hold plain host tensors).
    let device = vars
        .first()
        .map_or(Device::Cpu, |(_, v)| v.device().clone());
    let weights = candle_core::safetensors::load(dir.join(file), &device)
        .map_err(|e| LeashError::file(dir, format!("cannot read {file}: {e}"), hint))?;
    let moments = candle_core::safetensors::load(dir.join("optimizer.safetensors"), &Device::Cpu)
        .map_err(|e| {
        LeashError::file(dir, format!("cannot read optimizer.safetensors: {e}"), hint)
    })?;
    for (i, (name, var)) in vars.iter().enumerate() {
        let missing = |what: &str| {
            LeashError::file(
                dir,
                format!("checkpoint lacks `{what}`"),
                "the checkpoint belongs to another model",
            )
        };
        let w = weights.get(name).ok_or_else(|| missing(name))?;
        if w.dims() != var.dims() {
            return Err(LeashError::file(
                dir,
                format!(
                    "`{name}` has shape {:?}, the model {:?}",
                    w.dims(),
                    var.dims()
                ),
                "the checkpoint belongs to another model",
            ));
        }
        var.set(w)?;
        let m = moments
            .get(&format!("{name}.exp_avg"))
            .ok_or_else(|| missing("exp_avg"))?;
        let v = moments
            .get(&format!("{name}.exp_avg_sq"))
            .ok_or_else(|| missing("exp_avg_sq"))?;
        opt.moments[i].restore(m, v, var.device())?;
    }
    opt.step = raw
        .get("optimizer_step")
        .and_then(|v| v.as_u64())
        .unwrap_or(state.global_step as u64) as usize;
    Ok(state)
}

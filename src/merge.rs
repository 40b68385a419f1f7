//! `leash merge`: fold a LoRA adapter into its base model, W' = W + (α/r)·B·A, and write a
//! plain Hugging Face checkpoint. Like the trainers, it refuses to write over a folder that
//! already holds a model or a run unless told to (`--overwrite-output-dir`).

use std::path::Path;

use candle_core::{Device, Var};

use crate::error::{LeashError, Result};
use crate::model::Family;
use crate::model_io::load_adapter;
use crate::model_io::load_model;
use crate::model_io::save_model;
use crate::progress::Progress;

/// Files whose presence means `dir` holds a model or a training run.
const OCCUPIED_BY: &[&str] = &[
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
    "metrics.jsonl",
    "leash_config.json",
];

/// Refuses an output folder that holds a model or run (unless `overwrite`), and one that is
/// the base model or adapter folder itself (always: it would replace the inputs).
pub fn check_merge_output(
    model_dir: &Path,
    adapter_dir: &Path,
    output_dir: &Path,
    overwrite: bool,
) -> Result<()> {
    let same = |a: &Path| match (a.canonicalize(), output_dir.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    };
    if same(model_dir) || same(adapter_dir) {
        return Err(LeashError::usage(
            format!(
                "--output-dir {} is the base model or adapter folder",
                output_dir.display()
            ),
            "write the merged checkpoint to a new folder",
        ));
    }
    if let Some(found) = OCCUPIED_BY.iter().find(|f| output_dir.join(f).exists()) {
        if !overwrite {
            return Err(LeashError::usage(
                format!(
                    "output folder {} already holds a model ({found})",
                    output_dir.display()
                ),
                "choose another --output-dir, or pass --overwrite-output-dir to replace it",
            ));
        }
    }
    Ok(())
}

/// Merges into a fresh folder (refuses one that holds a model), on the CPU.
pub fn merge(model_dir: &Path, adapter_dir: &Path, output_dir: &Path) -> Result<()> {
    merge_with(model_dir, adapter_dir, output_dir, false, &Device::Cpu)
}

/// Merges on `device` (base, adapters and products there; the result is written from the
/// host), into `output_dir` unless it holds a model and `overwrite` is off.
pub fn merge_with(
    model_dir: &Path,
    adapter_dir: &Path,
    output_dir: &Path,
    overwrite: bool,
    device: &Device,
) -> Result<()> {
    check_merge_output(model_dir, adapter_dir, output_dir, overwrite)?;
    let (base, _) = load_model(model_dir, device)?;
    let (_, adapters) = load_adapter(adapter_dir, base.linear_modules(), device)?;
    let conv1d = base.config.family == Family::Gpt2;
    let progress = Progress::new("merge", "tensor", base.params().len() as u64);
    progress.println(format!(
        "merge: folding {} adapted modules of {} into {}",
        adapters.len(),
        adapter_dir.display(),
        model_dir.display()
    ));
    let mut vars = Vec::with_capacity(base.params().len());
    for (name, w) in base.params() {
        let module = name.strip_suffix(".weight").unwrap_or(name);
        let merged = match adapters.get(module) {
            Some(ad) => {
                let delta = (ad.b.matmul(&ad.a)? * ad.scale)?; // (out, in)
                let delta = if conv1d {
                    delta.t()?.contiguous()?
                } else {
                    delta
                };
                (w + delta)?
            }
            None => w.clone(),
        };
        vars.push((name.clone(), Var::from_tensor(&merged)?));
        progress.inc(1);
    }
    save_model(output_dir, model_dir, &vars)?;
    progress.finish();
    Ok(())
}

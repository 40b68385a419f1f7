//! `leash merge`: fold a LoRA adapter into its base model, W' = W + (α/r)·B·A, and write a
//! plain Hugging Face checkpoint.

use std::path::Path;

use candle_core::{Device, Var};

use crate::error::Result;
use crate::model::lora::load_adapter;
use crate::model::Family;
use crate::scoring::load_model;
use crate::train::checkpoint::save_model;

pub fn merge(model_dir: &Path, adapter_dir: &Path, output_dir: &Path) -> Result<()> {
    let device = Device::Cpu;
    let (base, _) = load_model(model_dir, &device)?;
    let (_, adapters) = load_adapter(adapter_dir, base.linear_modules(), &device)?;
    let conv1d = base.config.family == Family::Gpt2;
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
    }
    save_model(output_dir, model_dir, &vars)
}

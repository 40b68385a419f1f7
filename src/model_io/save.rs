//! Writing a trained model: a full checkpoint in Hugging Face layout (model.safetensors +
//! config.json + the source's tokenizer files, loadable by transformers) or a LoRA adapter
//! in PEFT's layout.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Tensor, Var};

use crate::error::{read_text, LeashError, Result};
use crate::model::lora::{save_adapter, AdapterConfig};

/// Files copied from the source model folder so the checkpoint loads on its own.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
];

fn io(path: &Path, e: std::io::Error) -> LeashError {
    LeashError::io(
        path,
        e,
        "check the output folder is writable and the disk has space",
    )
}

/// Writes the model's weights, config and tokenizer files into `dir` (created if needed).
pub fn save_model(dir: &Path, source_model: &Path, vars: &[(String, Var)]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let tensors: HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect();
    let path = dir.join("model.safetensors");
    crate::files::save_safetensors(&tensors, &path)?;
    let config_path = source_model.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&read_text(&config_path)?)
        .map_err(|e| LeashError::file(&config_path, e.to_string(), "re-save the model"))?;
    // We save f32 weights whatever the source dtype was.
    for key in ["torch_dtype", "dtype"] {
        if config.get(key).is_some() {
            config[key] = "float32".into();
        }
    }
    let out = dir.join("config.json");
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&config).unwrap_or_default(),
    )
    .map_err(|e| io(&out, e))?;
    for name in TOKENIZER_FILES {
        let src = source_model.join(name);
        if src.exists() {
            std::fs::copy(&src, dir.join(name)).map_err(|e| io(&src, e))?;
        }
    }
    Ok(())
}

/// Writes the trained weights: a full HF checkpoint, or (LoRA) the PEFT adapter.
pub fn save_weights(
    dir: &Path,
    source_model: &Path,
    vars: &[(String, Var)],
    adapter_config: Option<&AdapterConfig>,
) -> Result<()> {
    match adapter_config {
        Some(config) => save_adapter(dir, vars, config),
        None => save_model(dir, source_model, vars),
    }
}

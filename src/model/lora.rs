//! LoRA (Hu et al. 2021): y = x Wᵀ + (α/r)·(x Aᵀ) Bᵀ with the base W frozen, A (r, in) and
//! B (out, r) trainable, B = 0 at start. Adapters are saved and loaded in PEFT's layout
//! (`adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight`, and
//! `adapter_config.json`), so PEFT users can exchange them with leash.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{read_text, LeashError, Result};

/// One adapter on one linear module.
#[derive(Clone)]
pub struct Adapter {
    /// (r, in)
    pub a: Tensor,
    /// (out, r)
    pub b: Tensor,
    /// α / r
    pub scale: f64,
    /// Dropout on the adapter's input while training (PEFT's lora_dropout).
    pub dropout: f64,
}

/// Adapters by module path (e.g. `model.layers.0.self_attn.q_proj`).
pub type Adapters = HashMap<String, Adapter>;

/// PEFT's adapter_config.json (the fields leash reads and writes).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    /// PEFT's list (names or paths) or string (a regular expression) form.
    pub target_modules: TargetModules,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default)]
    pub use_rslora: bool,
}

fn default_bias() -> String {
    "none".into()
}

/// A linear module of the base model: its path and (in, out) sizes.
#[derive(Debug, Clone)]
pub struct LinearModule {
    pub path: String,
    pub inp: usize,
    pub out: usize,
}

pub fn peft_key(module: &str, which: &str) -> String {
    format!("base_model.model.{module}.lora_{which}.weight")
}

pub use super::lora_targets::{select_targets, TargetModules};

/// Fresh trainable adapters as PEFT initialises them: A ~ U(−1/√in, 1/√in) (Kaiming-uniform
/// with a = √5), B = 0. Returns the vars under PEFT's key names and the adapters.
pub fn init_adapters(
    targets: &[&LinearModule],
    r: usize,
    alpha: f64,
    dropout: f64,
    seed: u64,
    device: &Device,
) -> Result<(Vec<(String, Var)>, Adapters)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut vars = Vec::new();
    let mut adapters = HashMap::new();
    for m in targets {
        let bound = 1.0 / (m.inp as f32).sqrt();
        let a: Vec<f32> = (0..r * m.inp)
            .map(|_| rng.gen_range(-bound..bound))
            .collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (r, m.inp), device)?)?;
        let b = Var::from_tensor(&Tensor::zeros((m.out, r), DType::F32, device)?)?;
        adapters.insert(
            m.path.clone(),
            Adapter {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scale: alpha / r as f64,
                dropout,
            },
        );
        vars.push((peft_key(&m.path, "A"), a));
        vars.push((peft_key(&m.path, "B"), b));
    }
    Ok((vars, adapters))
}

/// Trainable adapters starting from loaded tensors (continuing an existing adapter).
pub fn vars_from_adapters(adapters: &Adapters) -> Result<(Vec<(String, Var)>, Adapters)> {
    let mut vars = Vec::new();
    let mut out = HashMap::new();
    let mut paths: Vec<&String> = adapters.keys().collect();
    paths.sort();
    for path in paths {
        let ad = &adapters[path];
        let a = Var::from_tensor(&ad.a)?;
        let b = Var::from_tensor(&ad.b)?;
        out.insert(
            path.clone(),
            Adapter {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                ..ad.clone()
            },
        );
        vars.push((peft_key(path, "A"), a));
        vars.push((peft_key(path, "B"), b));
    }
    Ok((vars, out))
}

/// The same adapters without gradient tracking (or dropout).
pub fn frozen(adapters: &Adapters) -> Adapters {
    adapters
        .iter()
        .map(|(k, a)| {
            (
                k.clone(),
                Adapter {
                    a: a.a.detach(),
                    b: a.b.detach(),
                    scale: a.scale,
                    dropout: 0.0,
                },
            )
        })
        .collect()
}

/// Reads a PEFT adapter folder, checking it fits `modules`.
pub fn load_adapter(
    dir: &Path,
    modules: &[LinearModule],
    device: &Device,
) -> Result<(AdapterConfig, Adapters)> {
    let cfg_path = dir.join("adapter_config.json");
    let config: AdapterConfig = serde_json::from_str(&read_text(&cfg_path)?).map_err(|e| {
        LeashError::file(&cfg_path, format!("not a PEFT LoRA config: {e}"), "pass a folder saved by PEFT or leash (adapter_config.json + adapter_model.safetensors)")
    })?;
    check_supported_fields(&cfg_path)?;
    if config.peft_type != "LORA" {
        return Err(LeashError::file(
            &cfg_path,
            format!("peft_type is {}, not LORA", config.peft_type),
            "only LoRA adapters are supported",
        ));
    }
    let weights_path = dir.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&weights_path, device).map_err(|e| {
        LeashError::file(
            &weights_path,
            format!("cannot read: {e}"),
            "re-save the adapter with safetensors",
        )
    })?;
    let scale = if config.use_rslora {
        config.lora_alpha / (config.r as f64).sqrt()
    } else {
        config.lora_alpha / config.r as f64
    };
    let mut adapters = HashMap::new();
    let mut used = std::collections::HashSet::new();
    for m in modules {
        let find = |which: &str| {
            let key = peft_key(&m.path, which);
            let alt = key.replace(
                &format!("lora_{which}.weight"),
                &format!("lora_{which}.default.weight"),
            );
            [key, alt]
                .into_iter()
                .find_map(|k| tensors.get(&k).map(|t| (k, t.clone())))
        };
        let (Some((key_a, a)), Some((key_b, b))) = (find("A"), find("B")) else {
            continue;
        };
        used.insert(key_a);
        used.insert(key_b);
        let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
        if a.dims() != [config.r, m.inp] || b.dims() != [m.out, config.r] {
            return Err(LeashError::file(
                &weights_path,
                format!("adapter for `{}` has shapes {:?} and {:?}; the model's layer is {} → {} with r = {}", m.path, a.dims(), b.dims(), m.inp, m.out, config.r),
                "this adapter was trained on a different base model; pass the matching --model",
            ));
        }
        adapters.insert(
            m.path.clone(),
            Adapter {
                a,
                b,
                scale,
                dropout: config.lora_dropout,
            },
        );
    }
    let mut unused: Vec<&String> = tensors.keys().filter(|k| !used.contains(*k)).collect();
    if !unused.is_empty() {
        unused.sort();
        return Err(LeashError::file(
            &weights_path,
            format!(
                "{} adapter tensor(s) fit no linear module of this model: {}",
                unused.len(),
                unused
                    .iter()
                    .take(8)
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "leash loads LoRA A/B matrices of linear modules only (no DoRA magnitudes, LoRA \
             biases, embedding adapters or modules_to_save), each with both A and B; \
             check the adapter was trained on this --model",
        ));
    }
    if adapters.is_empty() {
        return Err(LeashError::file(
            &weights_path,
            "no adapter tensor matches a module of this model",
            "this adapter was trained on a different base model",
        ));
    }
    Ok((config, adapters))
}

/// adapter_config.json options that change the math and that leash does not implement: each
/// must be absent or at its neutral value, or the load fails naming it.
fn check_supported_fields(cfg_path: &Path) -> Result<()> {
    let raw: serde_json::Value =
        serde_json::from_str(&read_text(cfg_path)?).unwrap_or(serde_json::Value::Null);
    let neutral = |v: &serde_json::Value| match v {
        serde_json::Value::Null | serde_json::Value::Bool(false) => true,
        serde_json::Value::Object(o) => o.is_empty(),
        serde_json::Value::Array(a) => a.is_empty(),
        serde_json::Value::String(s) => s == "none",
        _ => false,
    };
    for key in [
        "use_dora",
        "lora_bias",
        "bias",
        "rank_pattern",
        "alpha_pattern",
        "modules_to_save",
        "target_parameters",
        "trainable_token_indices",
        "layer_replication",
        "use_qalora",
        "use_bdlora",
        "alora_invocation_tokens",
    ] {
        if let Some(v) = raw.get(key).filter(|v| !neutral(v)) {
            return Err(LeashError::file(
                cfg_path,
                format!("adapter option `{key}` = {v} is not supported"),
                "leash loads plain LoRA adapters (A/B on linear modules, one r and lora_alpha); \
                 retrain without this option or merge the adapter with PEFT first",
            ));
        }
    }
    Ok(())
}

/// Writes `dir/adapter_model.safetensors` and `dir/adapter_config.json`.
pub fn save_adapter(dir: &Path, vars: &[(String, Var)], config: &AdapterConfig) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| LeashError::io(dir, e, "check the folder is writable"))?;
    let tensors: HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect();
    let path = dir.join("adapter_model.safetensors");
    crate::files::save_safetensors(&tensors, &path)?;
    let cfg_path = dir.join("adapter_config.json");
    std::fs::write(
        &cfg_path,
        serde_json::to_string_pretty(config).unwrap_or_default(),
    )
    .map_err(|e| LeashError::io(&cfg_path, e, "check the folder is writable"))
}

//! Model configuration from Hugging Face `config.json`.
//!
//! Field names are exactly Hugging Face's keys; `Option` and `#[serde(default)]` absorb the
//! differences between checkpoints (e.g. `rope_theta` at top level in older files, inside
//! `rope_parameters` in transformers ≥ 5). Each architecture family gets one resolved
//! [`ModelConfig`] that the decoder reads.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::config_keys::{check_keys, GPT2_NO_MATH_KEYS};
use crate::error::{read_text, LeashError, Result};

/// Architectures whose `model_type` we load, and the decoder family each one uses.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gpt2",
    "gemma3_text",
    "phi3",
];

/// Which block layout the decoder builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Family {
    /// Pre-RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention (Llama, Mistral,
    /// Qwen2, Qwen3).
    Llama,
    /// Pre-LayerNorm, learned positions, GELU MLP, fused qkv stored as Conv1D (GPT-2).
    Gpt2,
    /// Gemma 3 text: (1+w) RMSNorm around attention and MLP, q/k norm, local/global layers.
    Gemma3,
    /// Llama block with fused qkv and gate/up projections, partial rotary, LongRoPE.
    Phi3,
}

/// Settings only one family reads, kept out of the common fields.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum FamilyExtra {
    None,
    Gemma3(super::gemma3_config::Gemma3Params),
    Phi3(super::phi3::Phi3Params),
}

/// How rotary frequencies are scaled (`rope_scaling` / `rope_parameters.rope_type`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The resolved configuration every part of leash reads.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelConfig {
    pub model_type: String,
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2 always; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the attention output projection (Llama `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Mistral-style local attention window on every layer, if any.
    pub sliding_window: Option<usize>,
    /// Qwen3: RMSNorm over each head's queries and keys before rotary positions.
    pub qk_norm: bool,
    /// GPT-2 activation: tanh-approximated GELU (`gelu_new`) or exact (`gelu`).
    pub gelu_tanh: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub extra: FamilyExtra,
}

#[derive(Deserialize)]
struct LlamaJson {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    #[serde(default = "default_max_positions")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    hidden_act: Option<String>,
}

#[derive(Deserialize)]
struct Gpt2Json {
    vocab_size: usize,
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    #[serde(default = "default_gpt2_positions")]
    n_positions: usize,
    n_inner: Option<usize>,
    #[serde(default = "default_ln_eps")]
    layer_norm_epsilon: f64,
    #[serde(default = "default_gpt2_act")]
    activation_function: String,
    #[serde(default = "default_true")]
    tie_word_embeddings: bool,
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_max_positions() -> usize {
    2048
}
fn default_gpt2_positions() -> usize {
    1024
}
fn default_ln_eps() -> f64 {
    1e-5
}
fn default_gpt2_act() -> String {
    "gelu_new".to_string()
}
fn default_true() -> bool {
    true
}

impl ModelConfig {
    /// Reads `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = read_text(&path)?;
        Self::from_json_str(&text, &path)
    }

    /// Parses a config.json body; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| {
            LeashError::file(
                path,
                format!("malformed JSON at line {}: {e}", e.line()),
                "config.json must be the Hugging Face model config written by save_pretrained",
            )
        })?;
        let model_type = value
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                LeashError::file(
                    path,
                    "missing field `model_type`",
                    format!(
                        "add \"model_type\" (one of: {})",
                        SUPPORTED_MODEL_TYPES.join(", ")
                    ),
                )
            })?
            .to_string();
        let field_error = |e: serde_json::Error| {
            LeashError::file(
                path,
                format!("{e}"),
                "fix this key in config.json (keys are Hugging Face's, e.g. hidden_size)",
            )
        };
        let bos_token_id = token_id(&value, "bos_token_id");
        let pad_token_id = token_id(&value, "pad_token_id");
        let eos_token_ids = token_ids(&value, "eos_token_id");
        match model_type.as_str() {
            "llama" | "mistral" | "qwen2" | "qwen3" => {
                let (honoured, no_math) = llama_family_keys(&model_type);
                check_keys(&value, &model_type, &honoured, no_math, path)?;
                let c: LlamaJson = serde_json::from_value(value.clone()).map_err(field_error)?;
                if c.num_attention_heads == 0
                    || (!c.hidden_size.is_multiple_of(c.num_attention_heads)
                        && c.head_dim.is_none())
                {
                    return Err(LeashError::file(
                        path,
                        format!(
                            "hidden_size {} is not divisible by num_attention_heads {}",
                            c.hidden_size, c.num_attention_heads
                        ),
                        "set head_dim explicitly or fix the head count",
                    ));
                }
                let num_key_value_heads = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
                if num_key_value_heads == 0
                    || !c.num_attention_heads.is_multiple_of(num_key_value_heads)
                {
                    return Err(LeashError::file(
                        path,
                        format!(
                            "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                            c.num_attention_heads, num_key_value_heads
                        ),
                        "fix num_key_value_heads",
                    ));
                }
                if let Some(act) = &c.hidden_act {
                    if act != "silu" && act != "swish" {
                        return Err(LeashError::file(
                            path,
                            format!("hidden_act `{act}` is not supported for {model_type}"),
                            "leash's Llama-family decoder uses SiLU (hidden_act = \"silu\")",
                        ));
                    }
                }
                let (rope_theta, rope_scaling) = rope_settings(&c, path)?;
                let is_qwen2 = model_type == "qwen2";
                let is_qwen3 = model_type == "qwen3";
                let sliding_window = sliding_window(&model_type, &c, path)?;
                // transformers' Qwen3Config defaults head_dim to 128, not hidden / heads.
                let head_dim = match (c.head_dim, is_qwen3) {
                    (Some(d), _) => d,
                    (None, true) => 128,
                    (None, false) => c.hidden_size / c.num_attention_heads,
                };
                Ok(ModelConfig {
                    family: Family::Llama,
                    vocab_size: c.vocab_size,
                    hidden_size: c.hidden_size,
                    intermediate_size: c.intermediate_size,
                    num_hidden_layers: c.num_hidden_layers,
                    num_attention_heads: c.num_attention_heads,
                    num_key_value_heads,
                    head_dim,
                    norm_eps: c.rms_norm_eps,
                    rope_theta,
                    rope_scaling,
                    max_position_embeddings: c.max_position_embeddings,
                    tie_word_embeddings: c.tie_word_embeddings,
                    qkv_bias: is_qwen2 || c.attention_bias,
                    o_bias: !is_qwen2 && c.attention_bias,
                    mlp_bias: c.mlp_bias,
                    sliding_window,
                    qk_norm: is_qwen3,
                    gelu_tanh: false,
                    bos_token_id,
                    eos_token_ids,
                    pad_token_id,
                    model_type,
                    extra: FamilyExtra::None,
                })
            }
            "gpt2" => {
                check_keys(&value, &model_type, GPT2_HONOURED, GPT2_NO_MATH_KEYS, path)?;
                let c: Gpt2Json = serde_json::from_value(value.clone()).map_err(field_error)?;
                if c.n_head == 0 || !c.n_embd.is_multiple_of(c.n_head) {
                    return Err(LeashError::file(
                        path,
                        format!(
                            "n_embd {} is not divisible by n_head {}",
                            c.n_embd, c.n_head
                        ),
                        "fix n_head",
                    ));
                }
                let gelu_tanh = match c.activation_function.as_str() {
                    "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => true,
                    "gelu" => false,
                    other => {
                        return Err(LeashError::file(
                            path,
                            format!("activation_function `{other}` is not supported"),
                            "use gelu_new, gelu_pytorch_tanh or gelu",
                        ))
                    }
                };
                Ok(ModelConfig {
                    family: Family::Gpt2,
                    vocab_size: c.vocab_size,
                    hidden_size: c.n_embd,
                    intermediate_size: c.n_inner.unwrap_or(4 * c.n_embd),
                    num_hidden_layers: c.n_layer,
                    num_attention_heads: c.n_head,
                    num_key_value_heads: c.n_head,
                    head_dim: c.n_embd / c.n_head,
                    norm_eps: c.layer_norm_epsilon,
                    rope_theta: 0.0,
                    rope_scaling: RopeScaling::None,
                    max_position_embeddings: c.n_positions,
                    tie_word_embeddings: c.tie_word_embeddings,
                    qkv_bias: true,
                    o_bias: true,
                    mlp_bias: true,
                    sliding_window: None,
                    qk_norm: false,
                    gelu_tanh,
                    bos_token_id,
                    eos_token_ids,
                    pad_token_id,
                    model_type,
                    extra: FamilyExtra::None,
                })
            }
            "gemma3_text" => super::gemma3_config::parse_config(&value, path, model_type),
            "phi3" => super::phi3::parse_config(&value, path, model_type),
            other => Err(LeashError::file(
                path,
                format!("unsupported model_type `{other}`"),
                format!(
                    "leash supports model_type: {}",
                    SUPPORTED_MODEL_TYPES.join(", ")
                ),
            )),
        }
    }

    /// Parameters in the matrices (embeddings excluded), for FLOP counts.
    pub fn matmul_params(&self) -> usize {
        let d = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let attn = d * q + 2 * d * kv + q * d;
        let mlp_mats = if self.family == Family::Gpt2 { 2 } else { 3 };
        let mlp = mlp_mats * d * self.intermediate_size;
        self.num_hidden_layers * (attn + mlp) + d * self.vocab_size
    }
}

pub(super) fn token_id(value: &Value, key: &str) -> Option<u32> {
    match value.get(key)? {
        Value::Number(n) => n.as_u64().map(|v| v as u32),
        Value::Array(a) => a.first().and_then(Value::as_u64).map(|v| v as u32),
        _ => None,
    }
}

pub(super) fn token_ids(value: &Value, key: &str) -> Vec<u32> {
    match value.get(key) {
        Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|v| v as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// The config keys each Llama-family model type reads (honoured) and, beyond the generic
/// list, accepts without effect. A key transformers ignores for that architecture (e.g.
/// `attention_bias` for Mistral) is absent from both, so it is refused rather than misread.
fn llama_family_keys(model_type: &str) -> (Vec<&'static str>, &'static [&'static str]) {
    let mut honoured = vec![
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "max_position_embeddings",
        "tie_word_embeddings",
        "hidden_act",
    ];
    let qwen_window = [
        "sliding_window",
        "use_sliding_window",
        "max_window_layers",
        "layer_types",
    ];
    let no_math: &'static [&'static str] = match model_type {
        "llama" => {
            honoured.extend(["attention_bias", "mlp_bias"]);
            // Left by nanotron exports (SmolLM); transformers' Llama ignores them.
            &[
                "is_llama_config",
                "rope_interleaved",
                "transformers.js_config",
            ]
        }
        "mistral" => {
            honoured.push("sliding_window");
            &[]
        }
        "qwen2" => {
            honoured.extend(qwen_window);
            &[]
        }
        _ => {
            honoured.extend(qwen_window);
            honoured.push("attention_bias");
            &[]
        }
    };
    (honoured, no_math)
}

const GPT2_HONOURED: &[&str] = &[
    "vocab_size",
    "n_embd",
    "n_layer",
    "n_head",
    "n_positions",
    "n_inner",
    "layer_norm_epsilon",
    "activation_function",
    "tie_word_embeddings",
];

/// The one attention window all layers use, as transformers resolves it: Mistral's
/// `sliding_window` applies to every layer; Qwen2/Qwen3 use it only with
/// `use_sliding_window`, on the layers `layer_types` (or `max_window_layers`) mark sliding.
/// A mix of sliding and full layers is refused: leash builds one mask for all layers.
fn sliding_window(model_type: &str, c: &LlamaJson, path: &Path) -> Result<Option<usize>> {
    if model_type == "mistral" {
        return Ok(c.sliding_window);
    }
    let window = c
        .sliding_window
        .filter(|_| c.use_sliding_window == Some(true));
    let types: Vec<String> = match &c.layer_types {
        Some(t) => t.clone(),
        None => (0..c.num_hidden_layers)
            .map(|i| {
                let sliding = window.is_some() && i >= c.max_window_layers.unwrap_or(28);
                if sliding {
                    "sliding_attention"
                } else {
                    "full_attention"
                }
                .to_string()
            })
            .collect(),
    };
    if let Some(bad) = types
        .iter()
        .find(|t| *t != "full_attention" && *t != "sliding_attention")
    {
        return Err(LeashError::file(
            path,
            format!("layer_types holds `{bad}`"),
            "layer types are full_attention or sliding_attention",
        ));
    }
    let sliding = types.iter().filter(|t| *t == "sliding_attention").count();
    match (sliding, window) {
        (0, _) => Ok(None),
        (n, Some(w)) if n == types.len() => Ok(Some(w)),
        (_, None) => Err(LeashError::file(
            path,
            "layer_types marks sliding_attention layers but no window is set",
            "set use_sliding_window = true and sliding_window, or mark every layer full_attention",
        )),
        (n, Some(_)) => Err(LeashError::file(
            path,
            format!(
                "{n} of {} layers use sliding-window attention (layer_types / max_window_layers)",
                types.len()
            ),
            "leash applies one attention window to all layers; a mix of sliding and full \
             layers is not supported",
        )),
    }
}

/// Rope theta and scaling from either the legacy keys (`rope_theta`, `rope_scaling`) or
/// transformers ≥ 5's `rope_parameters`.
fn rope_settings(c: &LlamaJson, path: &Path) -> Result<(f64, RopeScaling)> {
    let kind_of = |p: &Value| {
        p.get("rope_type")
            .or_else(|| p.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string()
    };
    if let (Some(new), Some(old)) = (
        c.rope_parameters.as_ref().filter(|p| !p.is_null()),
        c.rope_scaling.as_ref().filter(|p| !p.is_null()),
    ) {
        if kind_of(new) != kind_of(old) {
            return Err(LeashError::file(
                path,
                format!(
                    "rope_parameters says rope type `{}` but rope_scaling says `{}`",
                    kind_of(new),
                    kind_of(old)
                ),
                "keep one of the two keys (transformers ≥ 5 writes rope_parameters)",
            ));
        }
    }
    let params = c.rope_parameters.as_ref().or(c.rope_scaling.as_ref());
    let theta = c
        .rope_theta
        .or_else(|| {
            c.rope_parameters
                .as_ref()
                .and_then(|p| p.get("rope_theta"))
                .and_then(Value::as_f64)
        })
        .unwrap_or(10_000.0);
    let Some(params) = params.filter(|p| !p.is_null()) else {
        return Ok((theta, RopeScaling::None));
    };
    let kind = params
        .get("rope_type")
        .or_else(|| params.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| params.get(key).and_then(Value::as_f64);
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: num("factor").unwrap_or(1.0),
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor").unwrap_or(8.0),
            low_freq_factor: num("low_freq_factor").unwrap_or(1.0),
            high_freq_factor: num("high_freq_factor").unwrap_or(4.0),
            original_max_position_embeddings: num("original_max_position_embeddings")
                .unwrap_or(8192.0),
        },
        other => {
            return Err(LeashError::file(
                path,
                format!("rope type `{other}` is not supported"),
                "supported rope types: default, linear, llama3",
            ))
        }
    };
    Ok((theta, scaling))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_str(text, Path::new("config.json"))
    }

    #[test]
    fn rope_theta_found_in_either_place() {
        let base = r#""model_type":"llama","vocab_size":8,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2"#;
        let legacy = parse(&format!("{{{base},\"rope_theta\":500000.0}}")).unwrap();
        let nested = parse(&format!(
            "{{{base},\"rope_parameters\":{{\"rope_theta\":500000.0,\"rope_type\":\"default\"}}}}"
        ))
        .unwrap();
        assert_eq!(legacy.rope_theta, 500000.0);
        assert_eq!(nested.rope_theta, 500000.0);
        assert_eq!(nested.num_key_value_heads, 2);
    }

    #[test]
    fn unsupported_model_type_lists_supported() {
        let err = parse(r#"{"model_type":"bert"}"#).unwrap_err().to_string();
        assert!(err.contains("unsupported model_type `bert`"), "{err}");
        assert!(err.contains("llama") && err.contains("qwen3"), "{err}");
    }

    #[test]
    fn missing_key_is_named() {
        let err = parse(r#"{"model_type":"llama","vocab_size":8}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field `hidden_size`"), "{err}");
        assert!(err.contains("hint:"), "{err}");
    }
}

//! Gemma 3 text config (`Gemma3TextConfig`, model_type `gemma3_text`): config.json keys and
//! defaults as transformers' `models/gemma3/configuration_gemma3.py` (5.24), resolved into a
//! [`ModelConfig`] plus what only Gemma 3 reads ([`Gemma3Params`]). Math-changing keys leash
//! does not implement (logit soft-capping, bidirectional attention) are refused by name. The
//! decoder is in gemma3.rs.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::config::{FamilyExtra, ModelConfig, RopeScaling};
use super::Family;
use crate::error::{LeashError, Result};

/// What only Gemma 3 reads; the global layers' RoPE is the config's `rope_theta`/`rope_scaling`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Gemma3Params {
    /// Attention scores are scaled by `query_pre_attn_scalar`^-½ (not head_dim^-½).
    pub query_pre_attn_scalar: f64,
    /// Keys a sliding layer sees: the query's own position and the `sliding_window − 1` before.
    pub sliding_window: usize,
    /// Per layer: true for `sliding_attention`, false for `full_attention`.
    pub sliding: Vec<bool>,
    pub local_rope_theta: f64,
    pub local_rope_scaling: RopeScaling,
}

/// Keys and defaults of transformers' `Gemma3TextConfig`.
#[derive(Deserialize)]
struct Gemma3Json {
    #[serde(default = "d_vocab")]
    vocab_size: usize,
    #[serde(default = "d_hidden")]
    hidden_size: usize,
    #[serde(default = "d_inter")]
    intermediate_size: usize,
    #[serde(default = "d_layers")]
    num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    num_attention_heads: usize,
    #[serde(default = "d_kv_heads")]
    num_key_value_heads: usize,
    #[serde(default = "d_head_dim")]
    head_dim: usize,
    #[serde(default = "d_act")]
    hidden_activation: String,
    #[serde(default = "d_positions")]
    max_position_embeddings: usize,
    #[serde(default = "d_eps")]
    rms_norm_eps: f64,
    #[serde(default = "d_true")]
    tie_word_embeddings: bool,
    rope_parameters: Option<Value>,
    rope_scaling: Option<Value>,
    rope_theta: Option<f64>,
    rope_local_base_freq: Option<f64>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default = "d_head_dim_f")]
    query_pre_attn_scalar: f64,
    #[serde(default = "d_window")]
    sliding_window: Option<usize>,
    layer_types: Option<Vec<String>>,
    #[serde(default = "d_pattern")]
    sliding_window_pattern: usize,
    final_logit_softcapping: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    #[serde(default)]
    use_bidirectional_attention: Option<bool>,
}

fn d_vocab() -> usize {
    262_208
}
fn d_hidden() -> usize {
    2304
}
fn d_inter() -> usize {
    9216
}
fn d_layers() -> usize {
    26
}
fn d_heads() -> usize {
    8
}
fn d_kv_heads() -> usize {
    4
}
fn d_head_dim() -> usize {
    256
}
fn d_head_dim_f() -> f64 {
    256.0
}
fn d_act() -> String {
    "gelu_pytorch_tanh".into()
}
fn d_positions() -> usize {
    131_072
}
fn d_eps() -> f64 {
    1e-6
}
fn d_true() -> bool {
    true
}
fn d_window() -> Option<usize> {
    Some(4096)
}
fn d_pattern() -> usize {
    6
}

/// Resolves a Gemma 3 text config.json (`value`, read from `path`).
pub fn parse_config(value: &Value, path: &Path, model_type: String) -> Result<ModelConfig> {
    let bad = |msg: String, hint: &str| LeashError::file(path, msg, hint.to_string());
    let c: Gemma3Json = serde_json::from_value(value.clone()).map_err(|e| {
        bad(
            e.to_string(),
            "fix this key in config.json (keys are Hugging Face's, e.g. hidden_size)",
        )
    })?;
    let heads_ok = c.num_attention_heads > 0
        && c.num_key_value_heads > 0
        && c.num_attention_heads.is_multiple_of(c.num_key_value_heads);
    if !heads_ok {
        return Err(bad(
            format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                c.num_attention_heads, c.num_key_value_heads
            ),
            "fix the head counts",
        ));
    }
    // Math-changing keys leash does not implement are refused by name, never ignored.
    if let Some(cap) = c.final_logit_softcapping {
        return Err(bad(
            format!("final_logit_softcapping = {cap} is not supported"),
            "Gemma 3 checkpoints set it to null; leash scores logits without soft-capping",
        ));
    }
    if let Some(cap) = c.attn_logit_softcapping {
        return Err(bad(
            format!("attn_logit_softcapping = {cap} is not supported"),
            "Gemma 3 checkpoints set it to null; leash's attention has no score soft-capping",
        ));
    }
    if c.use_bidirectional_attention == Some(true) {
        return Err(bad(
            "use_bidirectional_attention = true is not supported".into(),
            "leash trains causal decoders; use a causal Gemma 3 checkpoint",
        ));
    }
    let gelu_tanh = match c.hidden_activation.as_str() {
        "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => true,
        "gelu" => false,
        other => {
            return Err(bad(
                format!("hidden_activation `{other}` is not supported"),
                "use gelu_pytorch_tanh (Gemma 3's) or gelu",
            ))
        }
    };
    let sliding: Vec<bool> = match &c.layer_types {
        Some(types) => types
            .iter()
            .map(|t| match t.as_str() {
                "sliding_attention" => Ok(true),
                "full_attention" => Ok(false),
                other => Err(bad(
                    format!("layer_types has `{other}`"),
                    "each entry is sliding_attention or full_attention",
                )),
            })
            .collect::<Result<_>>()?,
        // Older configs: every `sliding_window_pattern`-th layer is global.
        None => (0..c.num_hidden_layers)
            .map(|i| c.sliding_window_pattern == 0 || (i + 1) % c.sliding_window_pattern != 0)
            .collect(),
    };
    if sliding.len() != c.num_hidden_layers {
        return Err(bad(
            format!(
                "layer_types has {} entries for {} layers",
                sliding.len(),
                c.num_hidden_layers
            ),
            "give one layer type per hidden layer",
        ));
    }
    let window = match c.sliding_window {
        Some(w) if w > 0 => w,
        _ if !sliding.contains(&true) => usize::MAX,
        _ => {
            return Err(bad(
                "sliding_window is null but layer_types has sliding_attention layers".into(),
                "set sliding_window (Gemma 3: 512 or 1024)",
            ))
        }
    };
    let (global_theta, global_scaling) = layer_rope(&c, "full_attention", path)?;
    let (local_theta, local_scaling) = layer_rope(&c, "sliding_attention", path)?;
    Ok(ModelConfig {
        family: Family::Gemma3,
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        num_hidden_layers: c.num_hidden_layers,
        num_attention_heads: c.num_attention_heads,
        num_key_value_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        norm_eps: c.rms_norm_eps,
        rope_theta: global_theta,
        rope_scaling: global_scaling,
        max_position_embeddings: c.max_position_embeddings,
        tie_word_embeddings: c.tie_word_embeddings,
        qkv_bias: c.attention_bias,
        o_bias: c.attention_bias,
        mlp_bias: false,
        // The Llama decoder's switch; Gemma 3's decoder always applies its own q/k norm.
        qk_norm: false,
        // The batch mask stays global; sliding layers narrow it themselves (see forward).
        sliding_window: None,
        gelu_tanh,
        bos_token_id: super::config::token_id(value, "bos_token_id"),
        eos_token_ids: super::config::token_ids(value, "eos_token_id"),
        pad_token_id: super::config::token_id(value, "pad_token_id"),
        model_type,
        extra: FamilyExtra::Gemma3(Gemma3Params {
            query_pre_attn_scalar: c.query_pre_attn_scalar,
            sliding_window: window,
            sliding,
            local_rope_theta: local_theta,
            local_rope_scaling: local_scaling,
        }),
    })
}

/// RoPE base and scaling of one layer type: transformers ≥ 5 nests them in
/// `rope_parameters[layer_type]`; older files have `rope_theta` (global), `rope_local_base_freq`
/// and `rope_scaling` (global layers only).
fn layer_rope(c: &Gemma3Json, layer_type: &str, path: &Path) -> Result<(f64, RopeScaling)> {
    let global = layer_type == "full_attention";
    let nested = c
        .rope_parameters
        .as_ref()
        .and_then(|p| p.get(layer_type))
        .filter(|p| !p.is_null());
    let legacy_theta = if global {
        c.rope_theta.unwrap_or(1_000_000.0)
    } else {
        c.rope_local_base_freq.unwrap_or(10_000.0)
    };
    let params = match nested {
        Some(p) => Some(p),
        None if global => c.rope_scaling.as_ref().filter(|p| !p.is_null()),
        None => None,
    };
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64)
        .unwrap_or(legacy_theta);
    let kind = params
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: params
                .and_then(|p| p.get("factor"))
                .and_then(Value::as_f64)
                .unwrap_or(1.0),
        },
        other => {
            return Err(LeashError::file(
                path,
                format!(
                    "rope type `{other}` ({layer_type} layers) is not supported for gemma3_text"
                ),
                "supported rope types here: default, linear",
            ))
        }
    };
    Ok((theta, scaling))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected values printed by transformers 5.24:
    /// `Gemma3TextConfig.from_dict({...same keys...})` → layer_types
    /// [s, s, full, s, s, full], rope_parameters {sliding: default θ 5000, full: linear ×8
    /// θ 200000}, head_dim 256, query_pre_attn_scalar 256, sliding_window 4096.
    #[test]
    fn legacy_keys_resolve_as_transformers_does() {
        let json = r#"{"model_type":"gemma3_text","num_hidden_layers":6,
            "sliding_window_pattern":3,"rope_local_base_freq":5000.0,"rope_theta":200000.0,
            "rope_scaling":{"rope_type":"linear","factor":8.0}}"#;
        let cfg = ModelConfig::from_json_str(json, Path::new("config.json")).unwrap();
        let FamilyExtra::Gemma3(g) = &cfg.extra else {
            panic!("not gemma3: {:?}", cfg.extra)
        };
        assert_eq!(g.sliding, [true, true, false, true, true, false]);
        assert_eq!(
            (g.local_rope_theta, &g.local_rope_scaling),
            (5000.0, &RopeScaling::None)
        );
        assert_eq!(cfg.rope_theta, 200000.0);
        assert_eq!(cfg.rope_scaling, RopeScaling::Linear { factor: 8.0 });
        assert_eq!((cfg.head_dim, g.query_pre_attn_scalar), (256, 256.0));
        assert_eq!((g.sliding_window, cfg.sliding_window), (4096, None));
        assert!(cfg.tie_word_embeddings && cfg.gelu_tanh);
    }
}

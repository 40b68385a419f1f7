//! Gemma 3 text decoder (`Gemma3ForCausalLM`, model_type `gemma3_text`). Mirrors transformers'
//! `models/gemma3/modeling_gemma3.py` (5.24): token embeddings scaled by √hidden; RMSNorm with
//! weight (1 + w); a norm before and after both attention and MLP; RMSNorm on each query and key
//! head; scores scaled by `query_pre_attn_scalar`^-½; local sliding-window layers and global
//! layers (`layer_types`) with their own RoPE bases; GELU-tanh gated MLP; lm_head tied.
//!
//! Legend: b batch, t time, s keys (cached + new), c hidden channels, h heads, d head dim,
//! i MLP width.

use std::path::Path;

use candle_core::{Module, Tensor};
use serde::Deserialize;
use serde_json::Value;

use super::cache::KvCache;
use super::config::{FamilyExtra, ModelConfig, RopeScaling};
use super::linear::Linear;
use super::ops::{apply_rope, attention_composed, rms_norm, rope_inv_freq, rope_tables, MASKED};
use super::params::ParamLoader;
use super::{fused, fused_attention, Family, ForwardInput};
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
        // Gemma 3 normalises q/k per head in its own decoder (gemma3.rs); the flag is informational.
        qk_norm: true,
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

struct Layer {
    input_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Tensor,
    k_norm: Tensor,
    post_attn_norm: Tensor,
    pre_ff_norm: Tensor,
    post_ff_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

pub struct Gemma3 {
    cfg: ModelConfig,
    params: Gemma3Params,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    global_inv_freq: Vec<f32>,
    local_inv_freq: Vec<f32>,
}

fn linear(p: &ParamLoader, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
    let w = p.get(&format!("{name}.weight"), &[out, inp])?;
    let b = if bias {
        Some(p.get(&format!("{name}.bias"), &[out])?)
    } else {
        None
    };
    Ok(p.linear_module(name, Linear::new(w, b), inp, out))
}

/// Gemma's RMSNorm: `x / sqrt(mean(x²) + eps) · (1 + w)`. The 1 is added at every call, not at
/// load, so that a trained `w` (updated in place) is always seen.
fn norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    rms_norm(x, &(w + 1.0)?, eps)
}

/// Attention with an explicit score scale (Gemma's is not head_dim^-½).
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    if [q, k, v, mask].iter().all(|t| fused::applies(t)) {
        return Ok(fused_attention::attention(q, k, v, mask, scale)?);
    }
    // The composed path scales by head_dim^-½; fold the rest of the scale into q.
    let d = q.dim(3)? as f64;
    Ok(attention_composed(&(q * (scale * d.sqrt()))?, k, v, mask)?)
}

/// Extra additive mask (b, 1, t, s) hiding keys `window` or more positions behind the query.
/// Distances are in positions, not indices: a packed row holds several sequences, and a
/// rejected completion sharing its prompt with the chosen one sits after it in the row but
/// continues the prompt's positions. Without a cache the keys are the queries (`positions`,
/// b·t row-major); with one, the cached keys are at positions 0.. (s − t) as decoding runs.
fn window_mask(
    positions: &[u32],
    b: usize,
    t: usize,
    s: usize,
    window: usize,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    let mut data = vec![0f32; b * t * s];
    for r in 0..b {
        let row = &positions[r * t..(r + 1) * t];
        for (i, &q) in row.iter().enumerate() {
            for j in 0..s {
                let k = if s == t { row[j] as usize } else { j };
                if (q as usize).saturating_sub(k) >= window {
                    data[(r * t + i) * s + j] = MASKED;
                }
            }
        }
    }
    Ok(Tensor::from_vec(data, (b, 1, t, s), dev)?)
}

impl Gemma3 {
    pub fn load(cfg: &ModelConfig, p: &ParamLoader) -> Result<Self> {
        let FamilyExtra::Gemma3(params) = &cfg.extra else {
            return Err(LeashError::usage(
                "a Gemma 3 model needs its Gemma 3 settings",
                "load the config with ModelConfig::from_dir",
            ));
        };
        let (c, v, i, d) = (
            cfg.hidden_size,
            cfg.vocab_size,
            cfg.intermediate_size,
            cfg.head_dim,
        );
        let q_dim = cfg.num_attention_heads * d;
        let kv_dim = cfg.num_key_value_heads * d;
        let bias = cfg.qkv_bias;
        let embed = p.get("model.embed_tokens.weight", &[v, c])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let pre = format!("model.layers.{l}");
            let attn = format!("{pre}.self_attn");
            let mlp = format!("{pre}.mlp");
            let w = |name: &str, n: usize| p.get(&format!("{pre}.{name}.weight"), &[n]);
            layers.push(Layer {
                input_norm: w("input_layernorm", c)?,
                q: linear(p, &format!("{attn}.q_proj"), q_dim, c, bias)?,
                k: linear(p, &format!("{attn}.k_proj"), kv_dim, c, bias)?,
                v: linear(p, &format!("{attn}.v_proj"), kv_dim, c, bias)?,
                o: linear(p, &format!("{attn}.o_proj"), c, q_dim, bias)?,
                q_norm: w("self_attn.q_norm", d)?,
                k_norm: w("self_attn.k_norm", d)?,
                post_attn_norm: w("post_attention_layernorm", c)?,
                pre_ff_norm: w("pre_feedforward_layernorm", c)?,
                post_ff_norm: w("post_feedforward_layernorm", c)?,
                gate: linear(p, &format!("{mlp}.gate_proj"), i, c, false)?,
                up: linear(p, &format!("{mlp}.up_proj"), i, c, false)?,
                down: linear(p, &format!("{mlp}.down_proj"), c, i, false)?,
            });
        }
        let norm = p.get("model.norm.weight", &[c])?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            p.get("lm_head.weight", &[v, c])?
        };
        Ok(Gemma3 {
            global_inv_freq: rope_inv_freq(d, cfg.rope_theta, &cfg.rope_scaling),
            local_inv_freq: rope_inv_freq(d, params.local_rope_theta, &params.local_rope_scaling),
            cfg: cfg.clone(),
            params: params.clone(),
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// Final-normed hidden states (b, t, c); see [`super::llama::Llama::forward_hidden`] for the
    /// cache. `input.mask` is the global (causal + padding) mask.
    pub fn forward_hidden(
        &self,
        input: &ForwardInput,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = input.ids.dims2()?;
        let cfg = &self.cfg;
        let (hq, hkv, d, c) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.hidden_size,
        );
        let eps = cfg.norm_eps;
        let dev = input.ids.device();
        let tables = |inv_freq: &[f32]| -> Result<(Tensor, Tensor)> {
            let (cos, sin) = rope_tables(&input.positions, inv_freq, dev)?;
            let dtype = self.embed.dtype();
            Ok((
                cos.reshape((b, 1, t, d))?.to_dtype(dtype)?,
                sin.reshape((b, 1, t, d))?.to_dtype(dtype)?,
            ))
        };
        let global_rope = tables(&self.global_inv_freq)?;
        let local_rope = tables(&self.local_inv_freq)?;
        let s = input.mask.dim(3)?;
        let local_mask = input.mask.broadcast_add(&window_mask(
            &input.positions,
            b,
            t,
            s,
            self.params.sliding_window,
            dev,
        )?)?;
        let scale = self.params.query_pre_attn_scalar.powf(-0.5);
        // transformers multiplies by √hidden cast to the embedding dtype (f32 here).
        let embed_scale = (c as f64).sqrt() as f32 as f64;
        let mut x = (self
            .embed
            .index_select(&input.ids.flatten_all()?, 0)?
            .reshape((b, t, c))?
            * embed_scale)?; // (b, t, c)
        for (l, layer) in self.layers.iter().enumerate() {
            let sliding = self.params.sliding[l];
            let (cos, sin) = if sliding { &local_rope } else { &global_rope };
            let h = norm(&x, &layer.input_norm, eps)?;
            let heads = |lin: &Linear, n: usize, w: Option<&Tensor>| -> Result<Tensor> {
                let y = lin.forward(&h)?.reshape((b, t, n, d))?;
                let y = match w {
                    Some(w) => norm(&y, w, eps)?, // per-head q/k norm over d
                    None => y,
                };
                Ok(y.transpose(1, 2)?) // (b, n, t, d)
            };
            let q = apply_rope(&heads(&layer.q, hq, Some(&layer.q_norm))?, cos, sin)?;
            let k = apply_rope(&heads(&layer.k, hkv, Some(&layer.k_norm))?, cos, sin)?;
            let v = heads(&layer.v, hkv, None)?;
            let (k, v) = match cache.as_deref_mut() {
                Some(cache) => cache.append(l, &k, &v)?, // (b, hkv, s, d)
                None => (k, v),
            };
            let mask = if sliding { &local_mask } else { &input.mask };
            let y = attention(&q, &k, &v, mask, scale)?; // (b, hq, t, d)
            let y = layer
                .o
                .forward(&y.transpose(1, 2)?.reshape((b, t, hq * d))?)?;
            x = (x + norm(&y, &layer.post_attn_norm, eps)?)?;
            let h = norm(&x, &layer.pre_ff_norm, eps)?;
            let gate = layer.gate.forward(&h)?; // (b, t, i)
            let gate = if cfg.gelu_tanh {
                gate.gelu()?
            } else {
                gate.gelu_erf()?
            };
            let m = layer.down.forward(&(gate * layer.up.forward(&h)?)?)?;
            x = (x + norm(&m, &layer.post_ff_norm, eps)?)?;
        }
        Ok(norm(&x, &self.norm, eps)?)
    }

    /// (v, c)
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }
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

    #[test]
    fn window_mask_hides_keys_a_window_behind() {
        // 2 new queries at positions 3 and 4 over 5 keys, window 2: each sees itself and one back.
        let m = window_mask(&[3, 4], 1, 2, 5, 2, &candle_core::Device::Cpu).unwrap();
        let rows: Vec<Vec<f32>> = m.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        let open = |r: &Vec<f32>| -> Vec<usize> { (0..5).filter(|&j| r[j] == 0.0).collect() };
        // Keys after the query are left to the causal mask.
        assert_eq!(open(&rows[0]), [2, 3, 4]);
        assert_eq!(open(&rows[1]), [3, 4]);
        // A packed row: prompt at positions 0-1, chosen 2-3, rejected again at 2-3 (indices
        // 4-5). The rejected token at position 3 is one position from the prompt's last token.
        let m = window_mask(&[0, 1, 2, 3, 2, 3], 1, 6, 6, 3, &candle_core::Device::Cpu).unwrap();
        let rows: Vec<Vec<f32>> = m.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        let open = |r: &Vec<f32>| -> Vec<usize> { (0..6).filter(|&j| r[j] == 0.0).collect() };
        assert_eq!(open(&rows[5]), [1, 2, 3, 4, 5]);
    }
}

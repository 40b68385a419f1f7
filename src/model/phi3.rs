//! Phi-3 decoder (`Phi3ForCausalLM`: Phi-3, Phi-3.5, Phi-4-mini): the Llama block with q, k and
//! v fused into one `qkv_proj` and gate and up fused into one `gate_up_proj`, optional partial
//! rotary embedding (`partial_rotary_factor`: only the first dims of each head rotate) and
//! LongRoPE frequency scaling. Mirrors transformers' `models/phi3/modeling_phi3.py` (5.24);
//! tensor names are the checkpoint's, so LoRA targets are PEFT's (`qkv_proj`, `gate_up_proj`,
//! `o_proj`, `down_proj`). Each layer runs through one [`layer_forward`], so gradient
//! checkpointing wraps it as for Llama ([`super::checkpoint`]).
//!
//! Legend: b batch, t time, c hidden channels, h heads, d head dim, r rotary dims, i MLP width.

use std::path::Path;
use std::sync::Arc;

use candle_core::{Module, Tensor, D};
use serde::Deserialize;
use serde_json::Value;

use super::cache::KvCache;
use super::checkpoint::{checkpoint, LayerFn};
use super::config::{FamilyExtra, ModelConfig, RopeScaling};
use super::frozen_dtype::{compute_dtype, upcast};
use super::linear::Linear;
use super::ops::{rope_inv_freq, rope_tables};
use super::params::ParamLoader;
use super::{Family, ForwardInput};
use crate::error::{LeashError, Result};
use crate::kernels::{apply_rope, attention, rms_norm, swiglu};

/// What only Phi-3 reads.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Phi3Params {
    /// Rotated dims per head: `head_dim · partial_rotary_factor`.
    pub rotary_dim: usize,
    /// LongRoPE (`rope_type` "longrope"), if set.
    pub longrope: Option<LongRope>,
}

/// LongRoPE (Ding et al. 2024) as transformers' `_compute_longrope_parameters`: per-frequency
/// divisors, `short_factor` while every position is within `original_max_position_embeddings`
/// and `long_factor` beyond, and cos/sin scaled by `attention_factor`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LongRope {
    pub short_factor: Vec<f64>,
    pub long_factor: Vec<f64>,
    pub original_max_position_embeddings: usize,
    pub attention_factor: f64,
}

#[derive(Deserialize)]
struct Phi3Json {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    partial_rotary_factor: Option<f64>,
    #[serde(default = "default_positions")]
    max_position_embeddings: usize,
    original_max_position_embeddings: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: bool,
    sliding_window: Option<usize>,
    hidden_act: Option<String>,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_positions() -> usize {
    4096
}

/// Resolves a Phi-3 config.json (`value`, read from `path`).
pub fn parse_config(value: &Value, path: &Path, model_type: String) -> Result<ModelConfig> {
    let bad = |msg: String, hint: &str| LeashError::file(path, msg, hint.to_string());
    let c: Phi3Json = serde_json::from_value(value.clone()).map_err(|e| {
        bad(
            e.to_string(),
            "fix this key in config.json (keys are Hugging Face's, e.g. hidden_size)",
        )
    })?;
    if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
        return Err(bad(
            format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                c.hidden_size, c.num_attention_heads
            ),
            "fix the head count",
        ));
    }
    let hkv = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
    if hkv == 0 || !c.num_attention_heads.is_multiple_of(hkv) {
        return Err(bad(
            format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {hkv}",
                c.num_attention_heads
            ),
            "fix num_key_value_heads",
        ));
    }
    if let Some(act) = c.hidden_act.as_deref().filter(|a| *a != "silu") {
        return Err(bad(
            format!("hidden_act `{act}` is not supported for phi3"),
            "Phi-3's MLP is SiLU-gated (hidden_act = \"silu\")",
        ));
    }
    let head_dim = c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads);
    // transformers ≥ 5 nests the rope settings in rope_parameters; older files use rope_scaling
    // (`null` for plain RoPE) beside top-level rope_theta and partial_rotary_factor.
    let rope = c
        .rope_parameters
        .as_ref()
        .or(c.rope_scaling.as_ref())
        .filter(|p| !p.is_null());
    let from_rope = |key: &str| rope.and_then(|p| p.get(key)).and_then(Value::as_f64);
    // As transformers' standardize_rope_params: values inside the rope dict win.
    let theta = from_rope("rope_theta").or(c.rope_theta).unwrap_or(10_000.0);
    let factor = from_rope("partial_rotary_factor")
        .or(c.partial_rotary_factor)
        .unwrap_or(1.0);
    let rotary_dim = (head_dim as f64 * factor) as usize;
    if rotary_dim == 0 || rotary_dim > head_dim || !rotary_dim.is_multiple_of(2) {
        return Err(bad(
            format!("partial_rotary_factor {factor} gives {rotary_dim} rotary dims of head_dim {head_dim}"),
            "the rotary part of a head must be an even number of dims, at most head_dim",
        ));
    }
    let kind = rope
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let longrope = match kind {
        "default" => None,
        // transformers renames the old names "su" and "yarn" of Phi-3 configs to longrope.
        "longrope" | "su" | "yarn" => Some(longrope_params(
            rope.unwrap_or(&Value::Null),
            &c,
            rotary_dim,
            path,
        )?),
        other => {
            return Err(bad(
                format!("rope type `{other}` is not supported for phi3"),
                "Phi-3 uses rope_type default or longrope",
            ))
        }
    };
    Ok(ModelConfig {
        family: Family::Phi3,
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        num_hidden_layers: c.num_hidden_layers,
        num_attention_heads: c.num_attention_heads,
        num_key_value_heads: hkv,
        head_dim,
        norm_eps: c.rms_norm_eps,
        rope_theta: theta,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: c.max_position_embeddings,
        tie_word_embeddings: c.tie_word_embeddings,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        qk_norm: false,
        // transformers builds a sliding-window mask whenever the key is set (Phi-3-mini: 2047).
        sliding_window: c.sliding_window,
        gelu_tanh: false,
        bos_token_id: super::config::token_id(value, "bos_token_id"),
        eos_token_ids: super::config::token_ids(value, "eos_token_id"),
        pad_token_id: super::config::token_id(value, "pad_token_id"),
        model_type,
        extra: FamilyExtra::Phi3(Phi3Params {
            rotary_dim,
            longrope,
        }),
    })
}

fn longrope_params(rope: &Value, c: &Phi3Json, rotary_dim: usize, path: &Path) -> Result<LongRope> {
    let list = |key: &str| -> Result<Vec<f64>> {
        let v: Option<Vec<f64>> = rope
            .get(key)
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_f64).collect());
        match v {
            Some(v) if v.len() == rotary_dim / 2 => Ok(v),
            _ => Err(LeashError::file(
                path,
                format!(
                    "longrope `{key}` must be a list of {} numbers",
                    rotary_dim / 2
                ),
                "one factor per rotary frequency (rotary dims / 2)",
            )),
        }
    };
    // Phi3Config always has the top-level key (default 4096), which transformers prefers.
    let original = c.original_max_position_embeddings.unwrap_or(4096);
    let factor = rope
        .get("factor")
        .and_then(Value::as_f64)
        .unwrap_or(c.max_position_embeddings as f64 / original as f64);
    let attention_factor = rope
        .get("attention_factor")
        .and_then(Value::as_f64)
        .unwrap_or(if factor <= 1.0 {
            1.0
        } else {
            (1.0 + factor.ln() / (original as f64).ln()).sqrt()
        });
    Ok(LongRope {
        short_factor: list("short_factor")?,
        long_factor: list("long_factor")?,
        original_max_position_embeddings: original,
        attention_factor,
    })
}

struct Layer {
    input_norm: Tensor,
    qkv: Linear,
    o: Linear,
    post_norm: Tensor,
    gate_up: Linear,
    down: Linear,
}

pub struct Phi3 {
    cfg: ModelConfig,
    params: Phi3Params,
    embed: Tensor,
    layers: Vec<Arc<Layer>>,
    norm: Tensor,
    lm_head: Tensor,
}

impl Phi3 {
    pub fn load(cfg: &ModelConfig, p: &ParamLoader) -> Result<Self> {
        let FamilyExtra::Phi3(params) = &cfg.extra else {
            return Err(LeashError::usage(
                "a Phi-3 model needs its Phi-3 settings",
                "load the config with ModelConfig::from_dir",
            ));
        };
        let (c, v, i) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let q_dim = cfg.num_attention_heads * cfg.head_dim;
        let qkv_dim = q_dim + 2 * cfg.num_key_value_heads * cfg.head_dim;
        let embed = p.get("model.embed_tokens.weight", &[v, c])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let pre = format!("model.layers.{l}");
            layers.push(Arc::new(Layer {
                input_norm: p.get(&format!("{pre}.input_layernorm.weight"), &[c])?,
                qkv: p.linear(&format!("{pre}.self_attn.qkv_proj"), qkv_dim, c, false)?,
                o: p.linear(&format!("{pre}.self_attn.o_proj"), c, q_dim, false)?,
                post_norm: p.get(&format!("{pre}.post_attention_layernorm.weight"), &[c])?,
                gate_up: p.linear(&format!("{pre}.mlp.gate_up_proj"), 2 * i, c, false)?,
                down: p.linear(&format!("{pre}.mlp.down_proj"), c, i, false)?,
            }));
        }
        let norm = p.get("model.norm.weight", &[c])?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            p.get("lm_head.weight", &[v, c])?
        };
        Ok(Phi3 {
            cfg: cfg.clone(),
            params: params.clone(),
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// cos and sin (b, 1, t, r) for this batch's positions. LongRoPE picks its factors from the
    /// largest position in the batch, as transformers' `longrope_frequency_update` does.
    fn rope(&self, input: &ForwardInput, b: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let r = self.params.rotary_dim;
        let (inv_freq, scale) = match &self.params.longrope {
            None => (
                rope_inv_freq(r, self.cfg.rope_theta, &RopeScaling::None),
                1.0,
            ),
            Some(lr) => {
                let longest = input.positions.iter().max().map_or(0, |&p| p as usize + 1);
                let factors = if longest > lr.original_max_position_embeddings {
                    &lr.long_factor
                } else {
                    &lr.short_factor
                };
                // transformers: 1 / (ext_factor · base^(2i/r)), in f32.
                let theta = self.cfg.rope_theta as f32;
                let inv = factors
                    .iter()
                    .enumerate()
                    .map(|(k, e)| 1.0 / (*e as f32 * theta.powf((2 * k) as f32 / r as f32)))
                    .collect();
                (inv, lr.attention_factor)
            }
        };
        let (cos, sin) = rope_tables(&input.positions, &inv_freq, input.ids.device())?;
        let (cos, sin) = if scale != 1.0 {
            ((cos * scale)?, (sin * scale)?)
        } else {
            (cos, sin)
        };
        let dtype = compute_dtype(self.embed.dtype());
        Ok((
            cos.reshape((b, 1, t, r))?.to_dtype(dtype)?,
            sin.reshape((b, 1, t, r))?.to_dtype(dtype)?,
        ))
    }

    /// Final-normed hidden states (b, t, c); see [`super::llama::Llama::forward_hidden`] for the
    /// cache and `checkpointed`.
    pub fn forward_hidden(
        &self,
        input: &ForwardInput,
        mut cache: Option<&mut KvCache>,
        checkpointed: bool,
    ) -> Result<Tensor> {
        let (b, t) = input.ids.dims2()?;
        let cfg = &self.cfg;
        let r = self.params.rotary_dim;
        let (cos, sin) = self.rope(input, b, t)?;
        let mut x = self
            .embed
            .index_select(&input.ids.flatten_all()?, 0)?
            .apply(&upcast)? // rows gathered from bf16 storage, then upcast (exact)
            .reshape((b, t, cfg.hidden_size))?; // (b, t, c)
        for (l, layer) in self.layers.iter().enumerate() {
            x = if checkpointed && cache.is_none() {
                let (layer2, cfg) = (layer.clone(), cfg.clone());
                let (cos, sin, mask) = (cos.clone(), sin.clone(), input.mask.clone());
                let f: LayerFn = Arc::new(move |x: &Tensor| {
                    layer_forward(&layer2, &cfg, x, &cos, &sin, r, &mask, None)
                });
                checkpoint(&x, layer.tensors(), f)?
            } else {
                let cache = cache.as_deref_mut().map(|c| (c, l));
                layer_forward(layer, cfg, &x, &cos, &sin, r, &input.mask, cache)?
            };
        }
        Ok(rms_norm(&x, &self.norm, cfg.norm_eps)?)
    }

    /// (v, c)
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }
}

impl Layer {
    fn tensors(&self) -> Vec<Tensor> {
        let mut out = vec![self.input_norm.clone(), self.post_norm.clone()];
        for lin in [&self.qkv, &self.o, &self.gate_up, &self.down] {
            out.extend(lin.tensors());
        }
        out
    }
}

/// Rotates the first `r` dims of each head of x (b, n, t, d); the rest pass through.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor, r: usize) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if r == d {
        return apply_rope(x, cos, sin);
    }
    let rot = apply_rope(&x.narrow(D::Minus1, 0, r)?.contiguous()?, cos, sin)?;
    Tensor::cat(&[&rot, &x.narrow(D::Minus1, r, d - r)?], D::Minus1)
}

/// One decoder layer: x (b, t, c) → x + attention, then + MLP, with `r` rotary dims per head.
/// With a cache, this layer's keys and values (layer `l`) are appended and attention spans them.
#[allow(clippy::too_many_arguments)]
fn layer_forward(
    layer: &Layer,
    cfg: &ModelConfig,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    r: usize,
    mask: &Tensor,
    cache: Option<(&mut KvCache, usize)>,
) -> candle_core::Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    let (hq, hkv, d) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let h = rms_norm(x, &layer.input_norm, cfg.norm_eps)?;
    let qkv = layer.qkv.forward(&h)?; // (b, t, (hq + 2 hkv) d)
    let heads = |from: usize, n: usize| -> candle_core::Result<Tensor> {
        qkv.narrow(D::Minus1, from * d, n * d)?
            .reshape((b, t, n, d))?
            .transpose(1, 2) // (b, n, t, d)
    };
    let q = rotate(&heads(0, hq)?, cos, sin, r)?;
    let k = rotate(&heads(hq, hkv)?, cos, sin, r)?;
    let v = heads(hq + hkv, hkv)?;
    let (k, v) = match cache {
        Some((c, l)) => c.append(l, &k, &v)?, // (b, hkv, s, d)
        None => (k, v),
    };
    let y = attention(&q, &k, &v, mask, 1.0 / (d as f64).sqrt())?; // (b, hq, t, d)
    let y = y.transpose(1, 2)?.reshape((b, t, hq * d))?;
    let x = (x + layer.o.forward(&y)?)?;
    let h = rms_norm(&x, &layer.post_norm, cfg.norm_eps)?;
    let gate_up = layer.gate_up.forward(&h)?; // (b, t, 2i): gate first, then up
    let i = cfg.intermediate_size;
    let gated = swiglu(
        &gate_up.narrow(D::Minus1, 0, i)?.contiguous()?,
        &gate_up.narrow(D::Minus1, i, i)?.contiguous()?,
    )?; // (b, t, i)
    x + layer.down.forward(&gated)?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> ModelConfig {
        ModelConfig::from_json_str(json, Path::new("config.json")).unwrap()
    }

    #[test]
    fn legacy_phi3_mini_layout() {
        // Phi-3-mini-4k-instruct's keys: top-level rope_theta, rope_scaling null, window 2047.
        let cfg = parse(
            r#"{"model_type":"phi3","vocab_size":32,"hidden_size":64,"intermediate_size":96,
            "num_hidden_layers":1,"num_attention_heads":4,"rope_theta":10000.0,
            "rope_scaling":null,"sliding_window":2047}"#,
        );
        let FamilyExtra::Phi3(p) = &cfg.extra else {
            panic!("{:?}", cfg.extra)
        };
        assert_eq!((p.rotary_dim, &p.longrope), (16, &None));
        assert_eq!(
            (cfg.num_key_value_heads, cfg.sliding_window),
            (4, Some(2047))
        );
        assert!(!cfg.tie_word_embeddings);
    }

    #[test]
    fn longrope_attention_factor_as_transformers() {
        // factor = 256 / 8 = 32; attention_factor = sqrt(1 + ln 32 / ln 8) = sqrt(8/3).
        let cfg = ModelConfig::from_dir(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-phi3"),
        )
        .unwrap();
        let FamilyExtra::Phi3(p) = &cfg.extra else {
            panic!("{:?}", cfg.extra)
        };
        let lr = p.longrope.as_ref().unwrap();
        assert_eq!(p.rotary_dim, 8);
        assert_eq!(lr.original_max_position_embeddings, 8);
        assert!((lr.attention_factor - (8.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(lr.long_factor, [1.5, 4.0, 9.0, 20.0]);
    }
}

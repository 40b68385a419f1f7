//! Gemma 3 text decoder (`Gemma3ForCausalLM`, model_type `gemma3_text`). Mirrors transformers'
//! `models/gemma3/modeling_gemma3.py` (5.24): token embeddings scaled by √hidden; RMSNorm with
//! weight (1 + w); a norm before and after both attention and MLP; RMSNorm on each query and key
//! head; scores scaled by `query_pre_attn_scalar`^-½; local sliding-window layers and global
//! layers (`layer_types`) with their own RoPE bases; GELU-tanh gated MLP; lm_head tied.
//! Config parsing is in gemma3_config.rs. Each layer runs through one [`layer_forward`], so
//! gradient checkpointing wraps it as for Llama ([`super::checkpoint`]).
//!
//! Legend: b batch, t time, s keys (cached + new), c hidden channels, h heads, d head dim,
//! i MLP width.

use std::sync::Arc;

use candle_core::{Module, Tensor};

use super::cache::KvCache;
use super::checkpoint::{checkpoint, LayerFn};
use super::config::{FamilyExtra, ModelConfig};
use super::frozen_dtype::{compute_dtype, upcast};
use super::gemma3_config::Gemma3Params;
use super::linear::Linear;
use super::ops::{rope_inv_freq, rope_tables, MASKED};
use super::params::ParamLoader;
use super::ForwardInput;
use crate::error::{LeashError, Result};
use crate::kernels::{apply_rope, attention, rms_norm};

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
    layers: Vec<Arc<Layer>>,
    norm: Tensor,
    lm_head: Tensor,
    global_inv_freq: Vec<f32>,
    local_inv_freq: Vec<f32>,
}

/// Gemma's RMSNorm: `x / sqrt(mean(x²) + eps) · (1 + w)`. The 1 is added at every call, not at
/// load, so that a trained `w` (updated in place) is always seen.
fn norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    rms_norm(x, &(w + 1.0)?, eps)
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
            layers.push(Arc::new(Layer {
                input_norm: w("input_layernorm", c)?,
                q: p.linear(&format!("{attn}.q_proj"), q_dim, c, bias)?,
                k: p.linear(&format!("{attn}.k_proj"), kv_dim, c, bias)?,
                v: p.linear(&format!("{attn}.v_proj"), kv_dim, c, bias)?,
                o: p.linear(&format!("{attn}.o_proj"), c, q_dim, bias)?,
                q_norm: w("self_attn.q_norm", d)?,
                k_norm: w("self_attn.k_norm", d)?,
                post_attn_norm: w("post_attention_layernorm", c)?,
                pre_ff_norm: w("pre_feedforward_layernorm", c)?,
                post_ff_norm: w("post_feedforward_layernorm", c)?,
                gate: p.linear(&format!("{mlp}.gate_proj"), i, c, false)?,
                up: p.linear(&format!("{mlp}.up_proj"), i, c, false)?,
                down: p.linear(&format!("{mlp}.down_proj"), c, i, false)?,
            }));
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
    /// cache and `checkpointed`. `input.mask` is the global (causal + padding) mask.
    pub fn forward_hidden(
        &self,
        input: &ForwardInput,
        mut cache: Option<&mut KvCache>,
        checkpointed: bool,
    ) -> Result<Tensor> {
        let (b, t) = input.ids.dims2()?;
        let cfg = &self.cfg;
        let (d, c) = (cfg.head_dim, cfg.hidden_size);
        let dev = input.ids.device();
        let tables = |inv_freq: &[f32]| -> Result<(Tensor, Tensor)> {
            let (cos, sin) = rope_tables(&input.positions, inv_freq, dev)?;
            let dtype = compute_dtype(self.embed.dtype());
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
            .apply(&upcast)? // rows gathered from bf16 storage, then upcast (exact)
            .reshape((b, t, c))?
            * embed_scale)?; // (b, t, c)
        for (l, layer) in self.layers.iter().enumerate() {
            // Sliding layers use the local RoPE base and the windowed mask.
            let ((cos, sin), mask) = if self.params.sliding[l] {
                (&local_rope, &local_mask)
            } else {
                (&global_rope, &input.mask)
            };
            x = if checkpointed && cache.is_none() {
                let (layer2, cfg) = (layer.clone(), cfg.clone());
                let (cos, sin, mask) = (cos.clone(), sin.clone(), mask.clone());
                let f: LayerFn = Arc::new(move |x: &Tensor| {
                    layer_forward(&layer2, &cfg, x, &cos, &sin, &mask, scale, None)
                });
                checkpoint(&x, layer.tensors(), f)?
            } else {
                let cache = cache.as_deref_mut().map(|c| (c, l));
                layer_forward(layer, cfg, &x, cos, sin, mask, scale, cache)?
            };
        }
        Ok(norm(&x, &self.norm, cfg.norm_eps)?)
    }

    /// (v, c)
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }
}

impl Layer {
    fn tensors(&self) -> Vec<Tensor> {
        let mut out: Vec<Tensor> = [
            &self.input_norm,
            &self.q_norm,
            &self.k_norm,
            &self.post_attn_norm,
            &self.pre_ff_norm,
            &self.post_ff_norm,
        ]
        .into_iter()
        .cloned()
        .collect();
        for lin in [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ] {
            out.extend(lin.tensors());
        }
        out
    }
}

/// One decoder layer: x (b, t, c) → x + norm(attention), then + norm(MLP). `cos`/`sin` and
/// `mask` are this layer's (local or global); `scale` is the score scale. With a cache, this
/// layer's keys and values (layer `l`) are appended and attention spans them.
#[allow(clippy::too_many_arguments)]
fn layer_forward(
    layer: &Layer,
    cfg: &ModelConfig,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    mask: &Tensor,
    scale: f64,
    cache: Option<(&mut KvCache, usize)>,
) -> candle_core::Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    let (hq, hkv, d) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let eps = cfg.norm_eps;
    let h = norm(x, &layer.input_norm, eps)?;
    let heads = |lin: &Linear, n: usize, w: Option<&Tensor>| -> candle_core::Result<Tensor> {
        let y = lin.forward(&h)?.reshape((b, t, n, d))?;
        let y = match w {
            Some(w) => norm(&y, w, eps)?, // per-head q/k norm over d
            None => y,
        };
        y.transpose(1, 2) // (b, n, t, d)
    };
    let q = apply_rope(&heads(&layer.q, hq, Some(&layer.q_norm))?, cos, sin)?;
    let k = apply_rope(&heads(&layer.k, hkv, Some(&layer.k_norm))?, cos, sin)?;
    let v = heads(&layer.v, hkv, None)?;
    let (k, v) = match cache {
        Some((c, l)) => c.append(l, &k, &v)?, // (b, hkv, s, d)
        None => (k, v),
    };
    let y = attention(&q, &k, &v, mask, scale)?; // (b, hq, t, d)
    let y = layer
        .o
        .forward(&y.transpose(1, 2)?.reshape((b, t, hq * d))?)?;
    let x = (x + norm(&y, &layer.post_attn_norm, eps)?)?;
    let h = norm(&x, &layer.pre_ff_norm, eps)?;
    let gate = layer.gate.forward(&h)?; // (b, t, i)
    let gate = if cfg.gelu_tanh {
        gate.gelu()?
    } else {
        gate.gelu_erf()?
    };
    let m = layer.down.forward(&(gate * layer.up.forward(&h)?)?)?;
    x + norm(&m, &layer.post_ff_norm, eps)?
}

#[cfg(test)]
mod tests {
    use super::*;
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

//! Llama-family decoder (Llama 2/3, Mistral, SmolLM, Qwen2, Qwen3): pre-RMSNorm blocks, rotary
//! positions (rotate-half), grouped-query attention, SwiGLU MLP; Qwen3 adds an RMSNorm over
//! each head's queries and keys before the rotation. Mirrors transformers' `modeling_llama.py`
//! and `modeling_qwen3.py`; tensor names follow the checkpoint (`model.layers.{i}.self_attn.q_proj`).
//!
//! Legend: b batch, t time, c hidden channels, h heads, d head dim, i MLP width.

use std::sync::Arc;

use candle_core::{Module, Tensor};

use super::cache::KvCache;
use super::checkpoint::{checkpoint, LayerFn};
use super::config::ModelConfig;
use super::frozen_dtype::{compute_dtype, upcast};
use super::linear::Linear;
use super::ops::{rope_inv_freq, rope_tables};
use super::params::ParamLoader;
use super::ForwardInput;
use crate::error::Result;
use crate::kernels::{apply_rope, attention, rms_norm, swiglu};

struct Layer {
    input_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// Qwen3's per-head q/k RMSNorm weights (d).
    qk_norm: Option<(Tensor, Tensor)>,
    post_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

pub struct Llama {
    cfg: ModelConfig,
    embed: Tensor,
    layers: Vec<Arc<Layer>>,
    norm: Tensor,
    lm_head: Tensor,
    inv_freq: Vec<f32>,
}

impl Llama {
    pub fn load(cfg: &ModelConfig, p: &ParamLoader) -> Result<Self> {
        let (c, v, i) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let q_dim = cfg.num_attention_heads * cfg.head_dim;
        let kv_dim = cfg.num_key_value_heads * cfg.head_dim;
        let embed = p.get("model.embed_tokens.weight", &[v, c])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let pre = format!("model.layers.{l}");
            let attn = format!("{pre}.self_attn");
            let mlp = format!("{pre}.mlp");
            let d = cfg.head_dim;
            let qk_norm = if cfg.qk_norm {
                Some((
                    p.get(&format!("{attn}.q_norm.weight"), &[d])?,
                    p.get(&format!("{attn}.k_norm.weight"), &[d])?,
                ))
            } else {
                None
            };
            layers.push(Arc::new(Layer {
                input_norm: p.get(&format!("{pre}.input_layernorm.weight"), &[c])?,
                q: p.linear(&format!("{attn}.q_proj"), q_dim, c, cfg.qkv_bias)?,
                k: p.linear(&format!("{attn}.k_proj"), kv_dim, c, cfg.qkv_bias)?,
                v: p.linear(&format!("{attn}.v_proj"), kv_dim, c, cfg.qkv_bias)?,
                o: p.linear(&format!("{attn}.o_proj"), c, q_dim, cfg.o_bias)?,
                qk_norm,
                post_norm: p.get(&format!("{pre}.post_attention_layernorm.weight"), &[c])?,
                gate: p.linear(&format!("{mlp}.gate_proj"), i, c, cfg.mlp_bias)?,
                up: p.linear(&format!("{mlp}.up_proj"), i, c, cfg.mlp_bias)?,
                down: p.linear(&format!("{mlp}.down_proj"), c, i, cfg.mlp_bias)?,
            }));
        }
        let norm = p.get("model.norm.weight", &[c])?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            p.get("lm_head.weight", &[v, c])?
        };
        Ok(Llama {
            inv_freq: rope_inv_freq(cfg.head_dim, cfg.rope_theta, &cfg.rope_scaling),
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// Final-normed hidden states (b, t, c). With a cache, `input` holds only the new
    /// positions and its mask spans (cached + new) keys. With `checkpointed`, each layer keeps
    /// only its input for backward ([`super::checkpoint`]).
    pub fn forward_hidden(
        &self,
        input: &ForwardInput,
        mut cache: Option<&mut KvCache>,
        checkpointed: bool,
    ) -> Result<Tensor> {
        let (b, t) = input.ids.dims2()?;
        let cfg = &self.cfg;
        let d = cfg.head_dim;
        let (cos, sin) = rope_tables(&input.positions, &self.inv_freq, input.ids.device())?;
        let dtype = compute_dtype(self.embed.dtype());
        let cos = cos.reshape((b, 1, t, d))?.to_dtype(dtype)?;
        let sin = sin.reshape((b, 1, t, d))?.to_dtype(dtype)?;
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
                    layer_forward(&layer2, &cfg, x, &cos, &sin, &mask, None)
                });
                checkpoint(&x, layer.tensors(), f)?
            } else {
                let cache = cache.as_deref_mut().map(|c| (c, l));
                layer_forward(layer, cfg, &x, &cos, &sin, &input.mask, cache)?
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
        if let Some((qn, kn)) = &self.qk_norm {
            out.extend([qn.clone(), kn.clone()]);
        }
        for lin in [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ] {
            out.extend(lin.tensors());
        }
        out
    }
}

/// One decoder layer: x (b, t, c) → x + attention, then + MLP. With a cache, this layer's
/// keys and values (layer `l`) are appended and attention spans them.
fn layer_forward(
    layer: &Layer,
    cfg: &ModelConfig,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
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
    let heads = |lin: &Linear, n: usize, norm: Option<&Tensor>| -> candle_core::Result<Tensor> {
        let x = lin.forward(&h)?.reshape((b, t, n, d))?;
        let x = match norm {
            Some(w) => rms_norm(&x, w, cfg.norm_eps)?,
            None => x,
        };
        x.transpose(1, 2) // (b, n, t, d)
    };
    let (q_norm, k_norm) = match &layer.qk_norm {
        Some((qn, kn)) => (Some(qn), Some(kn)),
        None => (None, None),
    };
    let q = apply_rope(&heads(&layer.q, hq, q_norm)?, cos, sin)?;
    let k = apply_rope(&heads(&layer.k, hkv, k_norm)?, cos, sin)?;
    let v = heads(&layer.v, hkv, None)?;
    let (k, v) = match cache {
        Some((c, l)) => c.append(l, &k, &v)?, // (b, hkv, s, d)
        None => (k, v),
    };
    let y = attention(&q, &k, &v, mask, 1.0 / (d as f64).sqrt())?; // (b, hq, t, d)
    let y = y.transpose(1, 2)?.reshape((b, t, hq * d))?;
    let x = (x + layer.o.forward(&y)?)?;
    let h = rms_norm(&x, &layer.post_norm, cfg.norm_eps)?;
    let gated = swiglu(&layer.gate.forward(&h)?, &layer.up.forward(&h)?)?; // (b, t, i)
    x + layer.down.forward(&gated)?
}

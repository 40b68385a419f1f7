//! GPT-2 decoder: learned positions, pre-LayerNorm blocks, fused q/k/v projection stored as
//! `Conv1D` (weight (in, out)), GELU MLP, lm_head tied to the token embedding unless
//! `tie_word_embeddings` is false (then `lm_head.weight` is the checkpoint's own). Mirrors
//! transformers' `modeling_gpt2.py`. Checkpoints name tensors with or without the
//! `transformer.` prefix (the original OpenAI upload has none); both load.
//!
//! Legend: b batch, t time, c channels, h heads, d head dim.

use std::sync::Arc;

use candle_core::{Module, Tensor, D};

use super::cache::KvCache;
use super::checkpoint::{checkpoint, LayerFn};
use super::config::ModelConfig;
use super::frozen_dtype::upcast;
use super::linear::Linear;
use super::ops::layer_norm;
use super::params::ParamLoader;
use super::ForwardInput;
use crate::error::{LeashError, Result};
use crate::kernels::attention;

struct Norm {
    weight: Tensor,
    bias: Tensor,
}

struct Block {
    ln_1: Norm,
    c_attn: Linear,
    c_proj: Linear,
    ln_2: Norm,
    c_fc: Linear,
    mlp_proj: Linear,
}

pub struct Gpt2 {
    cfg: ModelConfig,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Arc<Block>>,
    ln_f: Norm,
    lm_head: Tensor,
}

/// The token embedding's name in this checkpoint (with or without the `transformer.` prefix).
pub fn embedding_name(p: &ParamLoader) -> &'static str {
    if p.contains("transformer.wte.weight") {
        "transformer.wte.weight"
    } else {
        "wte.weight"
    }
}

impl Gpt2 {
    pub fn load(cfg: &ModelConfig, p: &ParamLoader) -> Result<Self> {
        let prefix = if p.contains("transformer.wte.weight") {
            "transformer."
        } else {
            ""
        };
        let (c, i) = (cfg.hidden_size, cfg.intermediate_size);
        let norm = |name: &str| -> Result<Norm> {
            Ok(Norm {
                weight: p.get(&format!("{prefix}{name}.weight"), &[c])?,
                bias: p.get(&format!("{prefix}{name}.bias"), &[c])?,
            })
        };
        let conv = |name: &str, inp: usize, out: usize| -> Result<Linear> {
            let linear = Linear::conv1d(
                p.get(&format!("{prefix}{name}.weight"), &[inp, out])?,
                Some(p.get(&format!("{prefix}{name}.bias"), &[out])?),
            );
            Ok(p.linear_module(&format!("{prefix}{name}"), linear, inp, out))
        };
        let wte = p.get(&format!("{prefix}wte.weight"), &[cfg.vocab_size, c])?;
        let wpe = p.get(
            &format!("{prefix}wpe.weight"),
            &[cfg.max_position_embeddings, c],
        )?;
        // transformers names the untied head `lm_head.weight`, outside the `transformer.` prefix.
        let lm_head = if cfg.tie_word_embeddings {
            wte.clone()
        } else {
            p.get("lm_head.weight", &[cfg.vocab_size, c])?
        };
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            blocks.push(Arc::new(Block {
                ln_1: norm(&format!("h.{l}.ln_1"))?,
                c_attn: conv(&format!("h.{l}.attn.c_attn"), c, 3 * c)?,
                c_proj: conv(&format!("h.{l}.attn.c_proj"), c, c)?,
                ln_2: norm(&format!("h.{l}.ln_2"))?,
                c_fc: conv(&format!("h.{l}.mlp.c_fc"), c, i)?,
                mlp_proj: conv(&format!("h.{l}.mlp.c_proj"), i, c)?,
            }));
        }
        Ok(Gpt2 {
            cfg: cfg.clone(),
            wte,
            wpe,
            ln_f: norm("ln_f")?,
            blocks,
            lm_head,
        })
    }

    /// Final-normed hidden states (b, t, c); see [`super::llama::Llama::forward_hidden`] for
    /// the cache and `checkpointed`.
    pub fn forward_hidden(
        &self,
        input: &ForwardInput,
        mut cache: Option<&mut KvCache>,
        checkpointed: bool,
    ) -> Result<Tensor> {
        let (b, t) = input.ids.dims2()?;
        let cfg = &self.cfg;
        let c = cfg.hidden_size;
        if let Some(&p) = input.positions.iter().max() {
            if p as usize >= cfg.max_position_embeddings {
                return Err(LeashError::usage(
                    format!(
                        "position {p} is beyond GPT-2's n_positions {}",
                        cfg.max_position_embeddings
                    ),
                    "lower --max-length",
                ));
            }
        }
        let positions = Tensor::new(input.positions.as_slice(), input.ids.device())?;
        // Rows gathered from bf16 storage, then upcast (exact).
        let tok = upcast(&self.wte.index_select(&input.ids.flatten_all()?, 0)?)?;
        let pos = upcast(&self.wpe.index_select(&positions, 0)?)?;
        let mut x = (tok + pos)?.reshape((b, t, c))?; // (b, t, c)
        for (l, blk) in self.blocks.iter().enumerate() {
            x = if checkpointed && cache.is_none() {
                let (blk2, cfg, mask) = (blk.clone(), cfg.clone(), input.mask.clone());
                let f: LayerFn =
                    Arc::new(move |x: &Tensor| block_forward(&blk2, &cfg, x, &mask, None));
                checkpoint(&x, blk.tensors(), f)?
            } else {
                let cache = cache.as_deref_mut().map(|c| (c, l));
                block_forward(blk, cfg, &x, &input.mask, cache)?
            };
        }
        Ok(layer_norm(
            &x,
            &self.ln_f.weight,
            &self.ln_f.bias,
            cfg.norm_eps,
        )?)
    }

    /// The output projection (v, c): the token embedding when tied.
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }
}

impl Block {
    fn tensors(&self) -> Vec<Tensor> {
        let mut out = vec![
            self.ln_1.weight.clone(),
            self.ln_1.bias.clone(),
            self.ln_2.weight.clone(),
            self.ln_2.bias.clone(),
        ];
        for lin in [&self.c_attn, &self.c_proj, &self.c_fc, &self.mlp_proj] {
            out.extend(lin.tensors());
        }
        out
    }
}

/// One block: x (b, t, c) → x + attention, then + MLP; with a cache, block `l`'s keys and
/// values are appended.
fn block_forward(
    blk: &Block,
    cfg: &ModelConfig,
    x: &Tensor,
    mask: &Tensor,
    cache: Option<(&mut KvCache, usize)>,
) -> candle_core::Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    let (h, d) = (cfg.num_attention_heads, cfg.head_dim);
    let a = layer_norm(x, &blk.ln_1.weight, &blk.ln_1.bias, cfg.norm_eps)?;
    let qkv = blk.c_attn.forward(&a)?; // (b, t, 3c)
    let split = |k: usize| -> candle_core::Result<Tensor> {
        qkv.narrow(D::Minus1, k * c, c)?
            .reshape((b, t, h, d))?
            .transpose(1, 2) // (b, h, t, d)
    };
    let (k, v) = match cache {
        Some((cache, l)) => cache.append(l, &split(1)?, &split(2)?)?,
        None => (split(1)?, split(2)?),
    };
    let y = attention(&split(0)?, &k, &v, mask, 1.0 / (d as f64).sqrt())?;
    let y = y.transpose(1, 2)?.reshape((b, t, c))?;
    let x = (x + blk.c_proj.forward(&y)?)?;
    let m = layer_norm(&x, &blk.ln_2.weight, &blk.ln_2.bias, cfg.norm_eps)?;
    let m = blk.c_fc.forward(&m)?;
    let m = if cfg.gelu_tanh {
        m.gelu()?
    } else {
        m.gelu_erf()?
    };
    x + blk.mlp_proj.forward(&m)?
}

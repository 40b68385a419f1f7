//! Records which checkpoint tensors a decoder uses, in load order, so the same list drives
//! trainable variables, optimizer state and saving under Hugging Face names.

use std::cell::RefCell;
use std::collections::HashSet;

use candle_core::Tensor;

use super::linear::Linear;
use super::lora::{Adapters, LinearModule};
use super::weights::Weights;
use crate::error::{LeashError, Result};

/// Buffers older checkpoints store that transformers recomputes and never loads: GPT-2's
/// causal-mask buffers and Llama's rotary inverse frequencies.
const RECOMPUTED_BUFFERS: &[&str] = &[".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq"];

/// Fetches tensors from [`Weights`] and remembers each name it handed out.
pub struct ParamLoader<'a> {
    weights: &'a Weights,
    taken: RefCell<Vec<(String, Tensor)>>,
    adapters: Option<&'a Adapters>,
    modules: RefCell<Vec<LinearModule>>,
}

impl<'a> ParamLoader<'a> {
    pub fn new(weights: &'a Weights) -> Self {
        ParamLoader {
            weights,
            taken: RefCell::new(Vec::new()),
            adapters: None,
            modules: RefCell::new(Vec::new()),
        }
    }

    /// Attaches LoRA adapters to the linear modules they name.
    pub fn with_adapters(weights: &'a Weights, adapters: &'a Adapters) -> Self {
        ParamLoader {
            adapters: Some(adapters),
            ..ParamLoader::new(weights)
        }
    }

    /// The linear module `name`: `{name}.weight` (out, inp) and, when `bias`, `{name}.bias`
    /// (out), recorded for LoRA like [`Self::linear_module`].
    pub fn linear(&self, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let w = self.get(&format!("{name}.weight"), &[out, inp])?;
        let b = if bias {
            Some(self.get(&format!("{name}.bias"), &[out])?)
        } else {
            None
        };
        Ok(self.linear_module(name, Linear::new(w, b), inp, out))
    }

    /// Records a linear module (for LoRA targeting) and attaches its adapter, if any.
    pub fn linear_module(&self, path: &str, mut linear: Linear, inp: usize, out: usize) -> Linear {
        self.modules.borrow_mut().push(LinearModule {
            path: path.to_string(),
            inp,
            out,
        });
        linear.lora = self.adapters.and_then(|a| a.get(path).cloned());
        linear
    }

    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.weights.get(name, shape)?;
        self.taken.borrow_mut().push((name.to_string(), t.clone()));
        Ok(t)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.weights.contains(name)
    }

    /// Strict loading: every tensor of the checkpoint was used, or the load fails naming the
    /// ones that were not. `tied_embedding` names the embedding a tied head shares: an
    /// `lm_head.weight` equal to it is a redundant copy; a different one means config.json's
    /// `tie_word_embeddings` is wrong for these weights.
    pub fn check_all_used(&self, tied_embedding: Option<&str>) -> Result<()> {
        let taken = self.taken.borrow();
        let taken: HashSet<&str> = taken.iter().map(|(n, _)| n.as_str()).collect();
        let source = self.weights.source();
        let mut unused: Vec<&str> = Vec::new();
        for name in self.weights.names() {
            if taken.contains(name.as_str()) || RECOMPUTED_BUFFERS.iter().any(|b| name.ends_with(b))
            {
                continue;
            }
            if let (Some(embed), "lm_head.weight") = (tied_embedding, name.as_str()) {
                let (head, embed_t) = (self.weights.raw(name), self.weights.raw(embed));
                if let (Some(head), Some(embed_t)) = (head, embed_t) {
                    let same = head.dims() == embed_t.dims()
                        && (head - embed_t)?
                            .abs()?
                            .max_all()?
                            .to_dtype(candle_core::DType::F32)?
                            .to_scalar::<f32>()?
                            == 0.0;
                    if same {
                        continue;
                    }
                }
                return Err(LeashError::file(
                    source,
                    format!("config.json says tie_word_embeddings = true, but the checkpoint's `lm_head.weight` differs from `{embed}`"),
                    "if the model has its own output head, set \"tie_word_embeddings\": false in config.json (transformers would otherwise ignore this tensor)",
                ));
            }
            unused.push(name.as_str());
        }
        if unused.is_empty() {
            return Ok(());
        }
        unused.sort();
        let shown: Vec<String> = unused.iter().take(8).map(|n| format!("`{n}`")).collect();
        let more = if unused.len() > 8 {
            format!(" and {} more", unused.len() - 8)
        } else {
            String::new()
        };
        Err(LeashError::file(
            source,
            format!("{} checkpoint tensor(s) are not used by the model config.json describes: {}{more}", unused.len(), shown.join(", ")),
            "config.json does not match the weights (e.g. biases present but attention_bias/mlp_bias false, an \
             lm_head with tie_word_embeddings true, or extra layers); fix config.json, or the architecture is one leash does not support",
        ))
    }

    pub fn into_parts(self) -> (Vec<(String, Tensor)>, Vec<LinearModule>) {
        (self.taken.into_inner(), self.modules.into_inner())
    }
}

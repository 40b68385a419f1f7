//! Records which checkpoint tensors a decoder uses, in load order, so the same list drives
//! trainable variables, optimizer state and saving under Hugging Face names.

use std::cell::RefCell;
use std::collections::HashSet;

use candle_core::Tensor;

use super::linear::Linear;
use super::lora::{Adapters, LinearModule};
use super::weights::Weights;
use crate::error::{LeashError, Result};

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

    /// Strict loading: an error naming every checkpoint tensor the decoder did not take.
    pub fn check_all_used(&self, family: &str) -> Result<()> {
        let taken = self.taken.borrow();
        let taken: HashSet<&str> = taken.iter().map(|(n, _)| n.as_str()).collect();
        let mut unused: Vec<&str> = self
            .weights
            .names()
            .filter(|n| !taken.contains(n))
            .collect();
        if unused.is_empty() {
            return Ok(());
        }
        unused.sort_unstable();
        Err(LeashError::file(
            self.weights.source(),
            format!(
                "{} tensor(s) unused by the {family} decoder: {}",
                unused.len(),
                unused.join(", ")
            ),
            "the checkpoint holds weights this config does not describe (e.g. lm_head.weight \
             with tie_word_embeddings true, or a bias the config turns off); fix config.json",
        ))
    }

    pub fn into_parts(self) -> (Vec<(String, Tensor)>, Vec<LinearModule>) {
        (self.taken.into_inner(), self.modules.into_inner())
    }
}

//! Records which checkpoint tensors a decoder uses, in load order, so the same list drives
//! trainable variables, optimizer state and saving under Hugging Face names.

use std::cell::RefCell;

use candle_core::Tensor;

use super::weights::Weights;
use crate::error::Result;

/// Fetches tensors from [`Weights`] and remembers each name it handed out.
pub struct ParamLoader<'a> {
    weights: &'a Weights,
    taken: RefCell<Vec<(String, Tensor)>>,
}

impl<'a> ParamLoader<'a> {
    pub fn new(weights: &'a Weights) -> Self {
        ParamLoader {
            weights,
            taken: RefCell::new(Vec::new()),
        }
    }

    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.weights.get(name, shape)?;
        self.taken.borrow_mut().push((name.to_string(), t.clone()));
        Ok(t)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.weights.contains(name)
    }

    pub fn into_params(self) -> Vec<(String, Tensor)> {
        self.taken.into_inner()
    }
}

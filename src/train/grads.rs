//! Gradients of the trainable variables, summed over the micro-batches of one optimizer step.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::Result;
use crate::kernels::cpu::transpose::contiguous;

/// One slot per trainable variable; empty until a backward pass reaches it.
pub struct GradAccumulator {
    grads: Vec<Option<Tensor>>,
}

impl GradAccumulator {
    pub fn new(n_vars: usize) -> Self {
        GradAccumulator {
            grads: vec![None; n_vars],
        }
    }

    /// Adds this backward pass's gradients.
    pub fn add(&mut self, store: &GradStore, vars: &[(String, Var)]) -> Result<()> {
        for (g, (_, var)) in self.grads.iter_mut().zip(vars) {
            if let Some(new) = store.get(var) {
                // On the CPU, laid out as the parameter (a linear layer's arrives
                // transposed), so that clipping and the optimizer read it in one pass.
                let new = if new.device().is_cpu() {
                    contiguous(new)?
                } else {
                    new.clone()
                };
                *g = Some(match g.take() {
                    Some(old) => (old + new)?,
                    None => new,
                });
            }
        }
        Ok(())
    }

    /// The summed gradients, zeros for variables no backward pass reached.
    pub fn finish(self, vars: &[(String, Var)]) -> Result<Vec<Tensor>> {
        Ok(self
            .grads
            .into_iter()
            .zip(vars)
            .map(|(g, (_, v))| g.map_or_else(|| v.as_tensor().zeros_like(), Ok))
            .collect::<candle_core::Result<_>>()?)
    }

    /// Gradients of a single backward pass.
    pub fn of(store: &GradStore, vars: &[(String, Var)]) -> Result<Vec<Tensor>> {
        let mut acc = GradAccumulator::new(vars.len());
        acc.add(store, vars)?;
        acc.finish(vars)
    }
}

//! Divergence detection: a run that blew up must not end "done". Checked every optimizer step:
//! - a non-finite gradient norm → stop before the update is applied;
//! - non-finite weights after the update → stop;
//! - weights exploding (their RMS more than [`EXPLODE_FACTOR`] × the RMS the run started
//!   from): the signature of a far too large learning rate, where AdamW moves every weight by
//!   about `lr` per step, the logits saturate, the loss sticks and the gradient becomes 0
//!   (`--learning-rate 1e6`: weights at 3.9e6, grad_norm 0 from step 2) → stop;
//! - an exactly zero gradient → warn once (legitimate for the hinge loss once every margin is
//!   met and for GRPO groups whose completions all score the same, so never a stop).
//!
//! A stop saves nothing: the error names the last good checkpoint, or says none was saved.
//! Healthy fine-tuning moves weights by a small fraction of their size, so the factor leaves
//! a margin of several orders of magnitude.

use std::path::Path;

use candle_core::Var;

use super::run_dir::last_checkpoint_note;
use crate::error::{LeashError, Result};

/// How far the weights' RMS may grow over the run before it counts as divergence.
pub const EXPLODE_FACTOR: f64 = 1000.0;

/// Root mean square of all trainable weights, in f64; non-finite if any weight is.
pub fn weight_rms(vars: &[(String, Var)]) -> Result<f64> {
    let sum = crate::train::optimizer::sum_of_squares(vars.iter().map(|(_, v)| v.as_tensor()))?;
    let n: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    Ok((sum / n.max(1) as f64).sqrt())
}

/// The error of a run stopped at `step` (1-based) because of `what`.
pub fn stopped(output_dir: &Path, step: usize, what: &str, remedy: &str) -> LeashError {
    LeashError::Stopped {
        message: format!(
            "training diverged at step {step}: {what}; stopped without saving this state"
        ),
        hint: format!("{remedy}; {}", last_checkpoint_note(output_dir)),
    }
}

const REMEDY: &str = "lower --learning-rate (typical: 1e-6–1e-4 for fine-tuning) and keep --max-grad-norm on (default 1.0)";

/// Tracks one run's weights between steps.
pub struct DivergenceGuard {
    start_rms: f64,
    zero_grads_ok: bool,
    warned_zero: bool,
}

impl DivergenceGuard {
    /// `zero_grads_ok`: the method can produce exactly zero gradients on a healthy step.
    pub fn new(vars: &[(String, Var)], zero_grads_ok: bool) -> Result<Self> {
        Ok(DivergenceGuard {
            start_rms: weight_rms(vars)?,
            zero_grads_ok,
            warned_zero: false,
        })
    }

    /// Before the update: stops on a non-finite gradient norm; returns a warning (once) when
    /// the gradient is exactly zero.
    pub fn check_grads(
        &mut self,
        output_dir: &Path,
        step: usize,
        grad_norm: f64,
    ) -> Result<Option<String>> {
        if !grad_norm.is_finite() {
            return Err(stopped(
                output_dir,
                step,
                &format!("the gradient norm is {grad_norm} (nothing of this step was applied)"),
                REMEDY,
            ));
        }
        if grad_norm == 0.0 && !self.zero_grads_ok && !self.warned_zero {
            self.warned_zero = true;
            return Ok(Some(format!(
                "warning: the gradient is exactly zero at step {step}: nothing is learned from this batch. \
                 Expected with --loss-type hinge once every margin is met; otherwise the model is saturated \
                 (a far too large --learning-rate) or the batch has no scored tokens"
            )));
        }
        Ok(None)
    }

    /// After the update: stops on non-finite or exploding weights.
    pub fn check_weights(
        &self,
        vars: &[(String, Var)],
        output_dir: &Path,
        step: usize,
    ) -> Result<()> {
        let rms = weight_rms(vars)?;
        if !rms.is_finite() {
            return Err(stopped(
                output_dir,
                step,
                "weights became non-finite",
                REMEDY,
            ));
        }
        if rms > EXPLODE_FACTOR * self.start_rms.max(1e-6) {
            return Err(stopped(
                output_dir,
                step,
                &format!(
                    "the weights exploded: their RMS grew from {:.3e} to {rms:.3e} (×{:.0})",
                    self.start_rms,
                    rms / self.start_rms.max(1e-6)
                ),
                REMEDY,
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn var(values: &[f32]) -> (String, Var) {
        let t = Tensor::new(values, &Device::Cpu).unwrap();
        ("w".into(), Var::from_tensor(&t).unwrap())
    }

    #[test]
    fn rms_by_hand_and_the_three_stops() {
        let vars = vec![var(&[3.0, 4.0]), var(&[0.0, 0.0])];
        // sqrt((9 + 16) / 4) = 2.5
        assert!((weight_rms(&vars).unwrap() - 2.5).abs() < 1e-12);
        let dir = tempfile::tempdir().unwrap();
        let mut g = DivergenceGuard::new(&vars, false).unwrap();
        let err = g
            .check_grads(dir.path(), 3, f64::NAN)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("step 3") && err.contains("no checkpoint was saved"),
            "{err}"
        );
        assert!(g.check_grads(dir.path(), 1, 0.0).unwrap().is_some());
        assert!(g.check_grads(dir.path(), 2, 0.0).unwrap().is_none()); // once
        assert!(g.check_weights(&vars, dir.path(), 1).is_ok());
        vars[0]
            .1
            .set(&Tensor::new(&[3e4f32, 4e4], &Device::Cpu).unwrap())
            .unwrap();
        std::fs::create_dir(dir.path().join("checkpoint-2")).unwrap();
        let err = g
            .check_weights(&vars, dir.path(), 4)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("exploded") && err.contains("checkpoint-2"),
            "{err}"
        );
        vars[0]
            .1
            .set(&Tensor::new(&[f32::NAN, 0.0], &Device::Cpu).unwrap())
            .unwrap();
        let err = g
            .check_weights(&vars, dir.path(), 5)
            .unwrap_err()
            .to_string();
        assert!(err.contains("non-finite"), "{err}");
        let mut ok = DivergenceGuard::new(&vars[1..], true).unwrap();
        assert!(ok.check_grads(dir.path(), 1, 0.0).unwrap().is_none());
    }
}

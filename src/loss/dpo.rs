//! DPO and its variants on summed sequence log-probs (TRL `DPOTrainer`, `loss_type`):
//! - `sigmoid`: −log σ(β·Δ), Δ = (log π_w − log π_ref,w) − (log π_l − log π_ref,l)
//!   (Rafailov et al. 2023, eq. 7); with `label_smoothing` ε the conservative form
//!   −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ) (Mitchell 2023, "cDPO").
//! - `hinge`: relu(1 − β·Δ) (SLiC, Zhao et al. 2023).
//! - `ipo`: (Δ_w/n_w − Δ_l/n_l − 1/(2β))², log-ratios divided by completion token counts as
//!   TRL does (Azar et al. 2023, eq. 17).
//!
//! Implicit rewards r = β·(log π − log π_ref).
//!
//! Legend: p pairs.

use candle_core::Tensor;

use crate::error::{LeashError, Result};
use crate::kernels::log_sigmoid;

pub const LOSS_TYPES: &[&str] = &["sigmoid", "hinge", "ipo"];

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpoLossType {
    Sigmoid,
    Hinge,
    Ipo,
}

impl DpoLossType {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "sigmoid" => Ok(DpoLossType::Sigmoid),
            "hinge" => Ok(DpoLossType::Hinge),
            "ipo" => Ok(DpoLossType::Ipo),
            other => Err(LeashError::usage(
                format!("unknown loss_type `{other}`"),
                format!("valid loss types: {}", LOSS_TYPES.join(", ")),
            )),
        }
    }
}

/// Log-probs of one batch of pairs; all (p,). `*_tokens` are completion token counts.
pub struct PairLogps<'a> {
    pub chosen: &'a Tensor,
    pub rejected: &'a Tensor,
    pub ref_chosen: &'a Tensor,
    pub ref_rejected: &'a Tensor,
    pub chosen_tokens: &'a Tensor,
    pub rejected_tokens: &'a Tensor,
}

pub struct DpoOptions {
    pub beta: f64,
    pub loss_type: DpoLossType,
    pub label_smoothing: f64,
}

pub struct DpoOutput {
    /// Scalar: mean over pairs.
    pub loss: Tensor,
    /// (p,) detached β·(log π − log π_ref).
    pub chosen_rewards: Tensor,
    pub rejected_rewards: Tensor,
}

/// −log σ(z), stable, with an exact gradient at z = 0 (see [`crate::kernels::log_sigmoid`]).
pub fn neg_log_sigmoid(z: &Tensor) -> candle_core::Result<Tensor> {
    log_sigmoid(z)?.neg()
}

pub fn dpo_loss(lp: &PairLogps, opt: &DpoOptions) -> Result<DpoOutput> {
    let chosen_ratio = (lp.chosen - lp.ref_chosen)?;
    let rejected_ratio = (lp.rejected - lp.ref_rejected)?;
    let per_pair = match opt.loss_type {
        DpoLossType::Sigmoid => {
            let z = ((&chosen_ratio - &rejected_ratio)? * opt.beta)?;
            let eps = opt.label_smoothing;
            if eps == 0.0 {
                neg_log_sigmoid(&z)?
            } else {
                ((neg_log_sigmoid(&z)? * (1.0 - eps))? + (neg_log_sigmoid(&z.neg()?)? * eps)?)?
            }
        }
        DpoLossType::Hinge => {
            let z = ((&chosen_ratio - &rejected_ratio)? * opt.beta)?;
            (z.neg()? + 1.0)?.relu()?
        }
        DpoLossType::Ipo => {
            let c = chosen_ratio.div(&lp.chosen_tokens.clamp(1.0, f64::MAX)?)?;
            let r = rejected_ratio.div(&lp.rejected_tokens.clamp(1.0, f64::MAX)?)?;
            ((c - r)? - 1.0 / (2.0 * opt.beta))?.sqr()?
        }
    };
    Ok(DpoOutput {
        loss: per_pair.mean_all()?,
        chosen_rewards: (chosen_ratio.detach() * opt.beta)?,
        rejected_rewards: (rejected_ratio.detach() * opt.beta)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    fn run(loss_type: DpoLossType, eps: f64) -> f32 {
        let (c, r, rc, rr, nc, nr) = (
            t(&[-10.0, -4.0]),
            t(&[-12.0, -3.0]),
            t(&[-11.0, -4.0]),
            t(&[-11.0, -4.0]),
            t(&[5.0, 2.0]),
            t(&[4.0, 1.0]),
        );
        let lp = PairLogps {
            chosen: &c,
            rejected: &r,
            ref_chosen: &rc,
            ref_rejected: &rr,
            chosen_tokens: &nc,
            rejected_tokens: &nr,
        };
        let out = dpo_loss(
            &lp,
            &DpoOptions {
                beta: 0.5,
                loss_type,
                label_smoothing: eps,
            },
        )
        .unwrap();
        out.loss.to_scalar::<f32>().unwrap()
    }

    /// Hand computation: Δ = [(1) − (−1), (0) − (1)] = [2, −1]; β = 0.5.
    #[test]
    fn losses_match_hand_computation() {
        let nls = |z: f64| (1.0 + (-z).exp()).ln();
        let sigmoid = (nls(1.0) + nls(-0.5)) / 2.0;
        assert!((run(DpoLossType::Sigmoid, 0.0) as f64 - sigmoid).abs() < 1e-6);
        let smoothed = (0.9 * nls(1.0) + 0.1 * nls(-1.0) + 0.9 * nls(-0.5) + 0.1 * nls(0.5)) / 2.0;
        assert!((run(DpoLossType::Sigmoid, 0.1) as f64 - smoothed).abs() < 1e-6);
        let hinge = ((1.0f64 - 1.0).max(0.0) + (1.0f64 + 0.5).max(0.0)) / 2.0;
        assert!((run(DpoLossType::Hinge, 0.0) as f64 - hinge).abs() < 1e-6);
        // IPO: per-token ratios [1/5 − (−1)/4, 0/2 − 1/1] = [0.45, −1]; target 1/(2β) = 1.
        let ipo = ((0.45f64 - 1.0).powi(2) + (-1.0f64 - 1.0).powi(2)) / 2.0;
        assert!((run(DpoLossType::Ipo, 0.0) as f64 - ipo).abs() < 1e-5);
    }

    #[test]
    fn unknown_loss_type_lists_valid_ones() {
        let err = DpoLossType::parse("kto_pair").unwrap_err().to_string();
        assert!(err.contains("sigmoid, hinge, ipo"), "{err}");
    }
}

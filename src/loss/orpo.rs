//! ORPO (Hong et al. 2024, eq. 6–7) as TRL's experimental `ORPOTrainer` computes it, with no
//! reference model: loss = NLL(chosen) − β·mean(log σ(log_odds)), where on mean completion
//! log-probs l_w, l_l: log_odds = (l_w − l_l) − (log(1 − e^{l_w}) − log(1 − e^{l_l})).
//! NLL is the token-mean cross-entropy over the whole chosen sequence, prompt included.
//!
//! Legend: p pairs.

use candle_core::Tensor;

use super::dpo::neg_log_sigmoid;
use crate::error::Result;

pub struct OrpoOutput {
    pub loss: Tensor,
    /// mean(log σ(log_odds)) — TRL's `log_odds_ratio` (not multiplied by β).
    pub log_odds_ratio: f32,
    /// mean(log_odds) — TRL's `log_odds_chosen`.
    pub log_odds_chosen: f32,
}

/// log(1 − e^x) for x < 0. candle has no log1p/expm1; x is clamped just below 0 so a
/// near-certain sequence cannot produce log(0).
fn log1m_exp(x: &Tensor) -> candle_core::Result<Tensor> {
    let x = x.clamp(f64::MIN, -1e-6)?;
    (x.exp()?.neg()? + 1.0)?.log()
}

/// `chosen`, `rejected`: (p,) MEAN completion log-probs; `nll`: scalar chosen NLL.
pub fn orpo_loss(
    chosen: &Tensor,
    rejected: &Tensor,
    nll: &Tensor,
    beta: f64,
) -> Result<OrpoOutput> {
    let log_odds = ((chosen - rejected)? - (log1m_exp(chosen)? - log1m_exp(rejected)?)?)?;
    let log_sig = neg_log_sigmoid(&log_odds)?.neg()?; // (p,)
    let loss = (nll - (log_sig.mean_all()? * beta)?)?;
    Ok(OrpoOutput {
        loss,
        log_odds_ratio: log_sig.mean_all()?.to_scalar::<f32>()?,
        log_odds_chosen: log_odds.mean_all()?.to_scalar::<f32>()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_hand_computation() {
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        let (lc, lr) = (-0.5f64, -2.0f64);
        let out = orpo_loss(
            &t(&[lc as f32]),
            &t(&[lr as f32]),
            &Tensor::new(3.0f32, &Device::Cpu).unwrap(),
            0.1,
        )
        .unwrap();
        let lo = (lc - lr) - ((1.0 - lc.exp()).ln() - (1.0 - lr.exp()).ln());
        let ls = -(1.0 + (-lo).exp()).ln();
        assert!((out.log_odds_chosen as f64 - lo).abs() < 1e-5);
        assert!((out.loss.to_scalar::<f32>().unwrap() as f64 - (3.0 - 0.1 * ls)).abs() < 1e-5);
    }
}

//! KTO (Ethayarajh et al. 2024, eq. 8) as TRL's `KTOTrainer` computes it: the reference point
//! z = clamp(mean(log π − log π_ref on mismatched prompt/completion pairs), min 0), detached;
//! desirable rows lose w_d·(1 − σ(β(Δ − z))), undesirable rows w_u·(1 − σ(β(z − Δ))), with
//! Δ = log π − log π_ref; the loss is the mean over all rows.
//!
//! Legend: n rows.

use candle_core::Tensor;

use crate::error::Result;

pub struct KtoOptions {
    pub beta: f64,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
}

pub struct KtoOutput {
    pub loss: Tensor,
    /// The detached KL reference point z.
    pub kl: f32,
    /// (n,) detached β·Δ.
    pub rewards: Tensor,
}

/// `logps`, `ref_logps`: (n,) summed completion log-probs; `kl_logps`, `ref_kl_logps`: (n,)
/// the same for the mismatched pairs; `desirable`: the label of each row.
pub fn kto_loss(
    logps: &Tensor,
    ref_logps: &Tensor,
    kl_logps: &Tensor,
    ref_kl_logps: &Tensor,
    desirable: &[bool],
    opt: &KtoOptions,
) -> Result<KtoOutput> {
    let kl = (kl_logps - ref_kl_logps)?
        .mean_all()?
        .to_scalar::<f32>()?
        .max(0.0);
    let delta = (logps - ref_logps)?;
    // sign +1 for desirable rows, −1 for undesirable: 1 − σ(β·sign·(Δ − z)).
    let sign: Vec<f32> = desirable
        .iter()
        .map(|&d| if d { 1.0 } else { -1.0 })
        .collect();
    let weight: Vec<f32> = desirable
        .iter()
        .map(|&d| if d { opt.desirable_weight } else { opt.undesirable_weight } as f32)
        .collect();
    let device = logps.device();
    let sign = Tensor::new(sign.as_slice(), device)?;
    let weight = Tensor::new(weight.as_slice(), device)?;
    let z = ((delta.clone() - kl as f64)? * opt.beta)?.mul(&sign)?;
    let per_row = candle_nn::ops::sigmoid(&z)?
        .neg()?
        .add(&Tensor::ones_like(&z)?)?
        .mul(&weight)?;
    Ok(KtoOutput {
        loss: per_row.mean_all()?,
        kl,
        rewards: (delta.detach() * opt.beta)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_hand_computation() {
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        let out = kto_loss(
            &t(&[-5.0, -6.0]),
            &t(&[-6.0, -5.0]),
            &t(&[-3.0, -4.0]),
            &t(&[-4.0, -4.0]),
            &[true, false],
            &KtoOptions {
                beta: 0.5,
                desirable_weight: 1.0,
                undesirable_weight: 2.0,
            },
        )
        .unwrap();
        // z = mean([1, 0]) = 0.5; Δ = [1, −1].
        let s = |x: f64| 1.0 / (1.0 + (-x).exp());
        let expected = ((1.0 - s(0.5 * (1.0 - 0.5))) + 2.0 * (1.0 - s(0.5 * (0.5 + 1.0)))) / 2.0;
        assert!((out.kl - 0.5).abs() < 1e-6);
        assert!((out.loss.to_scalar::<f32>().unwrap() as f64 - expected).abs() < 1e-6);
    }

    #[test]
    fn kl_is_clamped_at_zero() {
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        let out = kto_loss(
            &t(&[-1.0, -1.0]),
            &t(&[-1.0, -1.0]),
            &t(&[-5.0, -5.0]),
            &t(&[-1.0, -1.0]),
            &[true, false],
            &KtoOptions {
                beta: 0.1,
                desirable_weight: 1.0,
                undesirable_weight: 1.0,
            },
        )
        .unwrap();
        assert_eq!(out.kl, 0.0);
        assert!((out.loss.to_scalar::<f32>().unwrap() - 0.5).abs() < 1e-6);
    }
}

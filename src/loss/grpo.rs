//! GRPO (Shao et al. 2024, "DeepSeekMath", eq. 3) as TRL's `GRPOTrainer` computes it:
//! - advantages A = (r − mean_group(r)) / (std + 1e-4), std of the group (`scale_rewards=group`),
//!   of the whole batch (`batch`) or no division (`none`, Dr. GRPO); torch's unbiased std;
//! - per token, ratio ρ = exp(log π − log π_old) with π_old the sampling policy (detached; ρ = 1
//!   in value at the first iteration, but its gradient is ∇log π) and the clipped surrogate
//!   −min(ρ·A, clip(ρ, 1 − ε, 1 + ε_high)·A);
//! - with β > 0, plus β·KL with the k3 estimator exp(ref − log π) − (ref − log π) − 1
//!   (Schulman 2020), ≥ 0 and exactly 0 where the policy equals the reference;
//! - aggregation by `loss_type`: `grpo` mean over each sequence's tokens, then over sequences;
//!   `dapo` sum over all tokens / token count (Yu et al. 2025, eq. 8); `dr_grpo`
//!   sum / (sequences × max_completion_length) (Liu et al. 2025, "Dr. GRPO").
//!
//! Legend: n scored tokens (all sequences, flattened), s sequences.

use candle_core::Tensor;

use crate::error::{LeashError, Result};

pub const LOSS_TYPES: &[&str] = &["grpo", "dapo", "dr_grpo"];

/// Added to the std before dividing (TRL's constant).
pub const STD_EPS: f64 = 1e-4;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrpoLossType {
    Grpo,
    Dapo,
    DrGrpo,
}

impl GrpoLossType {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "grpo" => Ok(GrpoLossType::Grpo),
            "dapo" => Ok(GrpoLossType::Dapo),
            "dr_grpo" => Ok(GrpoLossType::DrGrpo),
            other => Err(LeashError::usage(
                format!("unknown loss_type `{other}` for GRPO"),
                format!("valid loss types: {}", LOSS_TYPES.join(", ")),
            )),
        }
    }
}

/// How rewards are scaled into advantages (TRL's `scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleRewards {
    Group,
    Batch,
    None,
}

impl ScaleRewards {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "group" => Ok(ScaleRewards::Group),
            "batch" => Ok(ScaleRewards::Batch),
            "none" => Ok(ScaleRewards::None),
            other => Err(LeashError::usage(
                format!("unknown scale_rewards `{other}`"),
                "valid: group, batch, none",
            )),
        }
    }
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n.max(1.0);
    // torch.std: unbiased (n − 1).
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

/// Advantages of consecutive groups of `group` rewards, plus each group's std (for metrics).
pub fn advantages(rewards: &[f64], group: usize, scale: ScaleRewards) -> (Vec<f64>, Vec<f64>) {
    let batch_std = mean_std(rewards).1;
    let mut adv = Vec::with_capacity(rewards.len());
    let mut stds = Vec::new();
    for g in rewards.chunks(group) {
        let (mean, std) = mean_std(g);
        stds.push(std);
        let denom = match scale {
            ScaleRewards::Group => std + STD_EPS,
            ScaleRewards::Batch => batch_std + STD_EPS,
            ScaleRewards::None => 1.0,
        };
        adv.extend(g.iter().map(|r| (r - mean) / denom));
    }
    (adv, stds)
}

/// Log-probs of one batch of completions, token-aligned; all (n,).
pub struct GrpoInputs<'a> {
    /// log π with gradients.
    pub logps: &'a Tensor,
    /// log π_old at sampling time; `None` = this is the first iteration (π_old = π, detached).
    pub old_logps: Option<&'a Tensor>,
    /// log π_ref; needed when β > 0.
    pub ref_logps: Option<&'a Tensor>,
    /// Advantage of each sequence (s values).
    pub advantages: &'a [f64],
    /// Sequence of each token.
    pub seq_of: &'a [u32],
    /// 1 for completion tokens in the loss, 0 for the rest (prompt, masked truncations).
    pub mask: &'a [f32],
}

pub struct GrpoOptions {
    pub beta: f64,
    pub epsilon: f64,
    pub epsilon_high: f64,
    pub loss_type: GrpoLossType,
    pub max_completion_length: usize,
}

pub struct GrpoOutput {
    /// Scalar loss.
    pub loss: Tensor,
    /// Masked token mean of the k3 KL (only when β > 0).
    pub kl: Option<f64>,
    /// Fractions of masked tokens whose ratio was clipped: below 1 − ε with A < 0, above
    /// 1 + ε_high with A > 0, and either.
    pub clip_low: f64,
    pub clip_high: f64,
    pub clip_region: f64,
}

/// Per-token aggregation weights, so loss = Σ_t w_t · loss_t (mask folded in).
fn weights(inp: &GrpoInputs, opt: &GrpoOptions) -> Vec<f32> {
    let s = inp.advantages.len();
    let mut per_seq = vec![0f32; s];
    for (&q, &m) in inp.seq_of.iter().zip(inp.mask) {
        per_seq[q as usize] += m;
    }
    let total: f32 = per_seq.iter().sum();
    inp.seq_of
        .iter()
        .zip(inp.mask)
        .map(|(&q, &m)| match opt.loss_type {
            GrpoLossType::Grpo => m / (per_seq[q as usize].max(1.0) * s.max(1) as f32),
            GrpoLossType::Dapo => m / total.max(1.0),
            GrpoLossType::DrGrpo => m / (s.max(1) * opt.max_completion_length.max(1)) as f32,
        })
        .collect()
}

pub fn grpo_loss(inp: &GrpoInputs, opt: &GrpoOptions) -> Result<GrpoOutput> {
    let device = inp.logps.device();
    let n = inp.seq_of.len();
    let detached = inp.logps.detach();
    let old = inp.old_logps.unwrap_or(&detached);
    let log_ratio = (inp.logps - old)?; // (n,)
    let ratio = log_ratio.exp()?;
    let adv: Vec<f32> = inp
        .seq_of
        .iter()
        .map(|&q| inp.advantages[q as usize] as f32)
        .collect();
    let adv = Tensor::from_vec(adv, n, device)?;
    let clipped = ratio.clamp(1.0 - opt.epsilon, 1.0 + opt.epsilon_high)?;
    let surrogate = ratio.mul(&adv)?.minimum(&clipped.mul(&adv)?)?;
    let mut per_token = surrogate.neg()?; // (n,)
    let w = Tensor::from_vec(weights(inp, opt), n, device)?;
    let m_total: f64 = inp.mask.iter().map(|&m| m as f64).sum::<f64>().max(1.0);
    let mask = Tensor::new(inp.mask, device)?;
    let mut kl = None;
    if opt.beta > 0.0 {
        let reference = inp.ref_logps.ok_or_else(|| {
            LeashError::usage(
                "GRPO with beta > 0 needs reference log-probs",
                "this is a bug in the caller: pass ref_logps",
            )
        })?;
        let d = (reference - inp.logps)?; // ref − log π
        let k3 = ((d.exp()? - &d)? - 1.0)?;
        kl = Some(k3.detach().mul(&mask)?.sum_all()?.to_scalar::<f32>()? as f64 / m_total);
        per_token = (per_token + (k3 * opt.beta)?)?;
    }
    let loss = per_token.mul(&w)?.sum_all()?;
    // Clipping statistics (detached).
    let r: Vec<f32> = ratio.detach().to_vec1()?;
    let (mut low, mut high) = (0.0f64, 0.0f64);
    for ((&ri, &q), &m) in r.iter().zip(inp.seq_of).zip(inp.mask) {
        let (a, ri, m) = (inp.advantages[q as usize], ri as f64, m as f64);
        if ri < 1.0 - opt.epsilon && a < 0.0 {
            low += m;
        }
        if ri > 1.0 + opt.epsilon_high && a > 0.0 {
            high += m;
        }
    }
    Ok(GrpoOutput {
        loss,
        kl,
        clip_low: low / m_total,
        clip_high: high / m_total,
        clip_region: (low + high) / m_total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    const TOL: f64 = 1e-5;

    fn opts(loss_type: GrpoLossType, beta: f64) -> GrpoOptions {
        GrpoOptions {
            beta,
            epsilon: 0.2,
            epsilon_high: 0.2,
            loss_type,
            max_completion_length: 4,
        }
    }

    #[test]
    fn group_advantages_are_zero_mean_and_unit_std() {
        let r = [1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 0.0];
        let (a, stds) = advantages(&r, 4, ScaleRewards::Group);
        for g in a.chunks(4) {
            assert!(g.iter().sum::<f64>().abs() < 1e-12);
        }
        // Group 1: mean 3, unbiased std √(14/3) = 2.1602.
        let std = (14.0f64 / 3.0).sqrt();
        assert!((a[0] - (-2.0 / (std + STD_EPS))).abs() < 1e-12);
        assert!((stds[0] - std).abs() < 1e-12 && stds[1] == 0.0);
        assert!(
            a[4..].iter().all(|&x| x == 0.0),
            "equal rewards → zero advantage"
        );
        let (n, _) = advantages(&r, 4, ScaleRewards::None);
        assert_eq!(n[..4], [-2.0, -1.0, 0.0, 3.0]);
    }

    /// At the first iteration ρ = 1, so loss_t = −A and ∂loss/∂logπ_t = −A·w_t.
    /// Two sequences (A = 1, −0.5) of 3 and 1 tokens; hand-computed per loss type.
    #[test]
    fn aggregation_by_loss_type() {
        let dev = Device::Cpu;
        let lp = Var::new(&[-1.0f32, -2.0, -0.5, -1.5], &dev).unwrap();
        let seq_of = [0u32, 0, 0, 1];
        let mask = [1.0f32, 1.0, 1.0, 1.0];
        let adv = [1.0, -0.5];
        let inp = GrpoInputs {
            logps: lp.as_tensor(),
            old_logps: None,
            ref_logps: None,
            advantages: &adv,
            seq_of: &seq_of,
            mask: &mask,
        };
        // grpo: mean(−1, +0.5) = −0.25; grads: −1/(3·2) for seq 0 tokens, +0.5/2 for seq 1.
        // dapo: (−3 + 0.5)/4 = −0.625; grads −1/4, +0.5/4.
        // dr_grpo: (−3 + 0.5)/(2·4) = −0.3125; grads −1/8, +0.5/8.
        for (kind, loss, g0, g1) in [
            (GrpoLossType::Grpo, -0.25, -1.0 / 6.0, 0.25),
            (GrpoLossType::Dapo, -0.625, -0.25, 0.125),
            (GrpoLossType::DrGrpo, -0.3125, -0.125, 0.0625),
        ] {
            let out = grpo_loss(&inp, &opts(kind, 0.0)).unwrap();
            let v = out.loss.to_scalar::<f32>().unwrap() as f64;
            assert!((v - loss).abs() < TOL, "{kind:?}: {v} vs {loss}");
            let g: Vec<f32> = out
                .loss
                .backward()
                .unwrap()
                .get(&lp)
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(
                (g[0] as f64 - g0).abs() < TOL && (g[3] as f64 - g1).abs() < TOL,
                "{kind:?}: {g:?}"
            );
            assert_eq!(out.clip_region, 0.0);
            assert!(out.kl.is_none());
        }
    }

    #[test]
    fn clipping_stops_the_gradient_and_is_counted() {
        let dev = Device::Cpu;
        // ρ = e^0.5 ≈ 1.65 > 1.2 with A > 0: clipped, no gradient; ρ = e^−0.5 with A > 0: kept.
        let lp = Var::new(&[0.0f32, 0.0], &dev).unwrap();
        let old = Tensor::new(&[-0.5f32, 0.5], &dev).unwrap();
        let inp = GrpoInputs {
            logps: lp.as_tensor(),
            old_logps: Some(&old),
            ref_logps: None,
            advantages: &[1.0, 1.0],
            seq_of: &[0, 1],
            mask: &[1.0, 1.0],
        };
        let out = grpo_loss(&inp, &opts(GrpoLossType::Dapo, 0.0)).unwrap();
        let v = out.loss.to_scalar::<f32>().unwrap() as f64;
        let want = -(1.2 + (-0.5f64).exp()) / 2.0;
        assert!((v - want).abs() < TOL, "{v} vs {want}");
        let g: Vec<f32> = out
            .loss
            .backward()
            .unwrap()
            .get(&lp)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(g[0], 0.0);
        assert!((g[1] as f64 + (-0.5f64).exp() / 2.0).abs() < TOL);
        assert_eq!(
            (out.clip_high, out.clip_low, out.clip_region),
            (0.5, 0.0, 0.5)
        );
    }

    #[test]
    fn k3_kl_is_zero_at_the_reference_and_matches_by_hand() {
        let dev = Device::Cpu;
        let lp = Var::new(&[-1.0f32, -2.0], &dev).unwrap();
        let same = lp.as_tensor().detach();
        let inp = |r| GrpoInputs {
            logps: lp.as_tensor(),
            old_logps: None,
            ref_logps: Some(r),
            advantages: &[0.0],
            seq_of: &[0, 0],
            mask: &[1.0, 1.0],
        };
        let out = grpo_loss(&inp(&same), &opts(GrpoLossType::Grpo, 0.1)).unwrap();
        assert_eq!(out.kl, Some(0.0));
        assert_eq!(out.loss.to_scalar::<f32>().unwrap(), 0.0);
        // ref − logπ = (0.5, −0.5): k3 = e^0.5 − 1.5 and e^−0.5 − 0.5.
        let r = Tensor::new(&[-0.5f32, -2.5], &dev).unwrap();
        let out = grpo_loss(&inp(&r), &opts(GrpoLossType::Grpo, 0.1)).unwrap();
        let k3 = ((0.5f64.exp() - 1.5) + ((-0.5f64).exp() - 0.5)) / 2.0;
        assert!((out.kl.unwrap() - k3).abs() < TOL);
        let v = out.loss.to_scalar::<f32>().unwrap() as f64;
        assert!((v - 0.1 * k3).abs() < TOL, "{v}");
    }

    #[test]
    fn equal_rewards_give_zero_gradient() {
        let dev = Device::Cpu;
        let lp = Var::new(&[-1.0f32, -2.0, -0.5, -1.5], &dev).unwrap();
        let (adv, _) = advantages(&[0.7, 0.7], 2, ScaleRewards::Group);
        let inp = GrpoInputs {
            logps: lp.as_tensor(),
            old_logps: None,
            ref_logps: None,
            advantages: &adv,
            seq_of: &[0, 0, 1, 1],
            mask: &[1.0; 4],
        };
        for kind in [GrpoLossType::Grpo, GrpoLossType::Dapo, GrpoLossType::DrGrpo] {
            let out = grpo_loss(&inp, &opts(kind, 0.0)).unwrap();
            let g: Vec<f32> = out
                .loss
                .backward()
                .unwrap()
                .get(&lp)
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(g.iter().all(|&x| x == 0.0), "{kind:?}: {g:?}");
        }
    }
}

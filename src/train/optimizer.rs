//! AdamW exactly as PyTorch's `torch.optim.AdamW` (decoupled decay, bias-corrected moments),
//! with parameter groups (no decay on norms and biases, as transformers' Trainer) and
//! global-norm gradient clipping as `torch.nn.utils.clip_grad_norm_`.
//! candle-nn's AdamW has neither groups nor clipping.

use candle_core::{Tensor, Var};

use crate::error::Result;

pub struct AdamWSettings {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// First and second moments of one parameter, flat.
pub struct Moments {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

pub struct AdamW {
    pub settings: AdamWSettings,
    pub step: usize,
    pub moments: Vec<Moments>,
    decay: Vec<bool>,
}

/// transformers excludes biases and norm weights from weight decay (by name, and GPT-2's
/// LayerNorm modules `ln_*`).
pub fn decays(name: &str) -> bool {
    let n = name.to_lowercase();
    let is_norm = n.contains("layernorm")
        || n.contains("rmsnorm")
        || n.contains("_norm.")
        || n.ends_with("_norm")
        || n.split('.')
            .any(|part| part == "norm" || part.starts_with("ln_"));
    !(n.contains("bias") || is_norm)
}

impl AdamW {
    pub fn new(params: &[(String, Var)], settings: AdamWSettings) -> Self {
        AdamW {
            settings,
            step: 0,
            moments: params
                .iter()
                .map(|(_, v)| Moments {
                    m: vec![0.0; v.elem_count()],
                    v: vec![0.0; v.elem_count()],
                })
                .collect(),
            decay: params.iter().map(|(n, _)| decays(n)).collect(),
        }
    }

    /// One update of every parameter with gradient `grads[i]` at learning rate `lr`.
    pub fn step(&mut self, params: &[(String, Var)], grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let s = &self.settings;
        // As torch: 1 − β is formed in double precision, then used as an f32 scalar.
        let (b2, one_m_b1, one_m_b2) = (
            s.beta2 as f32,
            (1.0 - s.beta1) as f32,
            (1.0 - s.beta2) as f32,
        );
        let bias1 = 1.0 - s.beta1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - s.beta2.powi(self.step as i32)).sqrt() as f32;
        let step_size = (lr / bias1) as f32;
        let eps = s.eps as f32;
        for (i, ((_, var), grad)) in params.iter().zip(grads).enumerate() {
            let g: Vec<f32> = grad.flatten_all()?.to_vec1()?;
            let mut p: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
            let decay = if self.decay[i] {
                (1.0 - lr * s.weight_decay) as f32
            } else {
                1.0
            };
            let mo = &mut self.moments[i];
            for j in 0..p.len() {
                p[j] *= decay;
                // torch: exp_avg.lerp_(grad, 1 − β1); exp_avg_sq.mul_(β2).addcmul_(g, g, 1 − β2)
                mo.m[j] += one_m_b1 * (g[j] - mo.m[j]);
                mo.v[j] = mo.v[j] * b2 + one_m_b2 * g[j] * g[j];
                let denom = mo.v[j].sqrt() / bias2_sqrt + eps;
                p[j] -= step_size * mo.m[j] / denom;
            }
            var.set(&Tensor::from_vec(p, var.shape(), var.device())?)?;
        }
        Ok(())
    }
}

/// The global L2 norm of all gradients (before clipping).
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut total = 0f64;
    for g in grads {
        let n = g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        total += n;
    }
    Ok(total.sqrt())
}

/// Scales gradients by min(1, max_norm / (norm + 1e-6)) as torch does; returns the pre-clip norm.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 {
        let coef = (max_norm / (norm + 1e-6)).min(1.0);
        if coef < 1.0 {
            for g in grads.iter_mut() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn decay_groups_follow_transformers() {
        assert!(decays("model.layers.0.self_attn.q_proj.weight"));
        assert!(!decays("model.layers.0.self_attn.q_proj.bias"));
        assert!(!decays("model.layers.0.input_layernorm.weight"));
        assert!(!decays("model.norm.weight"));
        assert!(!decays("transformer.h.0.ln_1.weight"));
        assert!(decays("transformer.wte.weight"));
    }

    /// Two steps by hand (torch's formulas), lr 0.1, wd 0.1 on a decayed parameter.
    #[test]
    fn matches_hand_computed_adamw() {
        let var = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let params = vec![("w.weight".to_string(), var.clone())];
        let settings = AdamWSettings {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(&params, settings);
        let grads = [0.5f64, -1.0];
        let mut p = [1.0f64, -2.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for t in 1..=2 {
            let g = Tensor::new(&[0.5f32, -1.0], &Device::Cpu).unwrap();
            opt.step(&params, &[g], 0.1).unwrap();
            for j in 0..2 {
                p[j] *= 1.0 - 0.1 * 0.1;
                m[j] = 0.9 * m[j] + 0.1 * grads[j];
                v[j] = 0.999 * v[j] + 0.001 * grads[j] * grads[j];
                let mh = m[j] / (1.0 - 0.9f64.powi(t));
                let vh = v[j] / (1.0 - 0.999f64.powi(t));
                p[j] -= 0.1 * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        for j in 0..2 {
            assert!((got[j] as f64 - p[j]).abs() < 1e-6, "{got:?} vs {p:?}");
        }
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let mut g = vec![Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap()];
        let norm = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        let after = global_norm(&g).unwrap();
        assert!((after - 1.0).abs() < 1e-5);
    }
}

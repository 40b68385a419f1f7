//! AdamW exactly as PyTorch's `torch.optim.AdamW` (decoupled decay, bias-corrected moments),
//! with parameter groups (no decay on norms and biases, as transformers' Trainer) and
//! global-norm gradient clipping as `torch.nn.utils.clip_grad_norm_`.
//! candle-nn's AdamW has neither groups nor clipping.
//!
//! The moments live where the parameters do: on the CPU as flat vectors updated in place in
//! one pass; on a GPU as tensors beside the parameter, updated with tensor ops in the same
//! order of f32 operations (a test holds the two bit-identical on the CPU), so nothing but
//! the loss and metrics crosses to the host during training.

use candle_core::{Device, Tensor, Var};

use crate::error::Result;

pub struct AdamWSettings {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// First and second moments of one parameter.
pub struct Moments {
    /// Elements of the parameter (of each moment).
    len: usize,
    store: Store,
}

enum Store {
    /// On the CPU: flat vectors.
    Host { m: Vec<f32>, v: Vec<f32> },
    /// On the parameter's GPU, in its shape; `None` (zeros) until the first step.
    Device(Option<(Tensor, Tensor)>),
}

impl Moments {
    fn zeros(var: &Var, on_host: bool) -> Self {
        let len = var.elem_count();
        let store = if on_host {
            Store::Host {
                m: vec![0.0; len],
                v: vec![0.0; len],
            }
        } else {
            Store::Device(None)
        };
        Moments { len, store }
    }

    /// Elements held (both moments), for memory accounting.
    pub fn elements(&self) -> usize {
        2 * self.len
    }

    /// Both moments as flat host vectors (a checkpoint's `exp_avg`, `exp_avg_sq`).
    pub fn to_host(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok(match &self.store {
            Store::Host { m, v } => (m.clone(), v.clone()),
            Store::Device(Some((m, v))) => {
                (m.flatten_all()?.to_vec1()?, v.flatten_all()?.to_vec1()?)
            }
            Store::Device(None) => (vec![0.0; self.len], vec![0.0; self.len]),
        })
    }

    /// Restores both moments from a checkpoint's tensors (read on any device), onto the
    /// parameter's device `device`.
    pub fn restore(&mut self, m: &Tensor, v: &Tensor, device: &Device) -> Result<()> {
        self.store = match self.store {
            Store::Host { .. } => Store::Host {
                m: m.flatten_all()?.to_vec1()?,
                v: v.flatten_all()?.to_vec1()?,
            },
            Store::Device(_) => Store::Device(Some((
                m.to_dtype(candle_core::DType::F32)?.to_device(device)?,
                v.to_dtype(candle_core::DType::F32)?.to_device(device)?,
            ))),
        };
        Ok(())
    }
}

/// The per-step constants of the update, as f32 exactly as the host loop uses them.
struct Coefs {
    decay: f32,
    b2: f32,
    one_m_b1: f32,
    one_m_b2: f32,
    bias2_sqrt: f32,
    step_size: f32,
    eps: f32,
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
                .map(|(_, v)| Moments::zeros(v, v.device().is_cpu()))
                .collect(),
            decay: params.iter().map(|(n, _)| decays(n)).collect(),
        }
    }

    /// One update of every parameter with gradient `grads[i]` at learning rate `lr`.
    pub fn step(&mut self, params: &[(String, Var)], grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let s = &self.settings;
        // As torch: 1 − β is formed in double precision, then used as an f32 scalar.
        let base = Coefs {
            decay: 1.0,
            b2: s.beta2 as f32,
            one_m_b1: (1.0 - s.beta1) as f32,
            one_m_b2: (1.0 - s.beta2) as f32,
            bias2_sqrt: (1.0 - s.beta2.powi(self.step as i32)).sqrt() as f32,
            step_size: (lr / (1.0 - s.beta1.powi(self.step as i32))) as f32,
            eps: s.eps as f32,
        };
        for (i, ((_, var), grad)) in params.iter().zip(grads).enumerate() {
            let k = Coefs {
                decay: if self.decay[i] {
                    (1.0 - lr * s.weight_decay) as f32
                } else {
                    1.0
                },
                ..base
            };
            match &mut self.moments[i].store {
                Store::Host { m, v } => step_host(var, grad, m, v, &k)?,
                Store::Device(mv) => step_device(var, grad, mv, &k)?,
            }
        }
        Ok(())
    }
}

/// The update on the CPU: one pass over flat copies, written back into the variable.
fn step_host(var: &Var, grad: &Tensor, m: &mut [f32], v: &mut [f32], k: &Coefs) -> Result<()> {
    let g: Vec<f32> = grad.flatten_all()?.to_vec1()?;
    let mut p: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
    for j in 0..p.len() {
        p[j] *= k.decay;
        // torch: exp_avg.lerp_(grad, 1 − β1); exp_avg_sq.mul_(β2).addcmul_(g, g, 1 − β2)
        m[j] += k.one_m_b1 * (g[j] - m[j]);
        v[j] = v[j] * k.b2 + k.one_m_b2 * g[j] * g[j];
        let denom = v[j].sqrt() / k.bias2_sqrt + k.eps;
        p[j] -= k.step_size * m[j] / denom;
    }
    var.set(&Tensor::from_vec(p, var.shape(), var.device())?)?;
    Ok(())
}

/// The same update with tensor ops on the parameter's device, operation for operation as
/// [`step_host`] (elementwise f32 ops with scalar tensors: no fused or reciprocal forms), so
/// it rounds the same.
fn step_device(
    var: &Var,
    grad: &Tensor,
    mv: &mut Option<(Tensor, Tensor)>,
    k: &Coefs,
) -> Result<()> {
    let dev = var.device();
    let c = |x: f32| Tensor::new(x, dev);
    let g = grad.reshape(var.shape())?;
    let (m, v) = match mv.take() {
        Some(mv) => mv,
        None => (g.zeros_like()?, g.zeros_like()?),
    };
    let p = var.as_tensor().detach();
    let p = if k.decay == 1.0 {
        p
    } else {
        p.broadcast_mul(&c(k.decay)?)?
    };
    let m = (&m + (&g - &m)?.broadcast_mul(&c(k.one_m_b1)?)?)?;
    let v = (v.broadcast_mul(&c(k.b2)?)? + g.broadcast_mul(&c(k.one_m_b2)?)?.mul(&g)?)?;
    let denom = v
        .sqrt()?
        .broadcast_div(&c(k.bias2_sqrt)?)?
        .broadcast_add(&c(k.eps)?)?;
    let p = (p - m.broadcast_mul(&c(k.step_size)?)?.div(&denom)?)?;
    var.set(&p)?;
    *mv = Some((m, v));
    Ok(())
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

    /// The device path (tensor ops), run on the CPU, leaves parameters and moments
    /// bit-identical to the host loop over several steps with decay and without.
    #[test]
    fn device_update_is_the_host_update_bit_for_bit() {
        let dev = Device::Cpu;
        // Small weights and a large step, so that one ulp of the update shows in the result,
        // and gradients over six orders of magnitude.
        let value = |i: usize, salt: usize| {
            let x = ((i * 2_654_435_761 + salt * 40_503) % 10_007) as f32 / 10_007.0 - 0.5;
            x * 10f32.powi(-(((i + salt) % 6) as i32))
        };
        let make = || {
            let w: Vec<f32> = (0..600).map(|i| 1e-3 * value(i, 1)).collect();
            let b: Vec<f32> = (0..40).map(|i| 1e-3 * value(i, 2)).collect();
            vec![
                (
                    "w.weight".to_string(),
                    Var::from_vec(w, (20, 30), &dev).unwrap(),
                ),
                ("w.bias".to_string(), Var::from_vec(b, 40, &dev).unwrap()),
            ]
        };
        let settings = || AdamWSettings {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.05,
        };
        let (host_params, dev_params) = (make(), make());
        let mut host = AdamW::new(&host_params, settings());
        let mut device = AdamW::new(&dev_params, settings());
        for m in &mut device.moments {
            m.store = Store::Device(None);
        }
        for step in 0..4 {
            let grads: Vec<Tensor> = host_params
                .iter()
                .map(|(_, v)| {
                    let g: Vec<f32> = (0..v.elem_count()).map(|j| value(j, 3 + step)).collect();
                    Tensor::from_vec(g, v.shape(), &dev).unwrap()
                })
                .collect();
            host.step(&host_params, &grads, 0.1).unwrap();
            device.step(&dev_params, &grads, 0.1).unwrap();
        }
        let bits = |t: &Tensor| -> Vec<u32> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        for (i, ((_, a), (_, b))) in host_params.iter().zip(&dev_params).enumerate() {
            assert_eq!(bits(a.as_tensor()), bits(b.as_tensor()), "parameter {i}");
            let (hm, hv) = host.moments[i].to_host().unwrap();
            let (dm, dv) = device.moments[i].to_host().unwrap();
            assert!(matches!(device.moments[i].store, Store::Device(Some(_))));
            let b = |x: &[f32]| x.iter().map(|y| y.to_bits()).collect::<Vec<_>>();
            assert_eq!((b(&hm), b(&hv)), (b(&dm), b(&dv)), "moments {i}");
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

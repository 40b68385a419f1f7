//! AdamW exactly as PyTorch's `torch.optim.AdamW` (decoupled decay, bias-corrected moments),
//! with parameter groups (no decay on norms and biases, as transformers' Trainer) and
//! global-norm gradient clipping as `torch.nn.utils.clip_grad_norm_`.
//! candle-nn's AdamW has neither groups nor clipping.
//!
//! The moments live where the parameters do: on the CPU as flat vectors updated in place in
//! one pass; on a GPU as tensors beside the parameter, updated with tensor ops in the same
//! order of f32 operations (a test holds the two bit-identical on the CPU), so nothing but
//! the loss and metrics crosses to the host during training.

use std::sync::Mutex;

use candle_core::{CpuStorage, Device, InplaceOp1, Layout, Tensor, Var};
use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::cpu::{dot, with_host_f32, ELEMS_PER_TASK};

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
        self.step_scaled(params, grads, 1.0, lr)
    }

    /// [`AdamW::step`] with every gradient multiplied by `grad_scale` first (gradient
    /// clipping's factor, see [`clip_grad_norm`]), as torch's `g * clip_coef` would round it.
    pub fn step_scaled(
        &mut self,
        params: &[(String, Var)],
        grads: &[Tensor],
        grad_scale: f64,
        lr: f64,
    ) -> Result<()> {
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
                Store::Host { m, v } => step_host(var, grad, grad_scale as f32, m, v, &k)?,
                Store::Device(mv) => {
                    if grad_scale == 1.0 {
                        step_device(var, grad, mv, &k)?
                    } else {
                        step_device(var, &(grad * grad_scale)?, mv, &k)?
                    }
                }
            }
        }
        Ok(())
    }
}

/// The update on the CPU: the parameter overwritten in place, by the pool in fixed chunks
/// (element-wise, so the result does not depend on the split). A serial loop over copies of
/// the weights, written back with `Var::set`, left the workers idle for ~7 % of a full
/// fine-tuning step of the side-by-side workload (BENCHMARKS.md, eighth session).
fn step_host(
    var: &Var,
    grad: &Tensor,
    scale: f32,
    m: &mut [f32],
    v: &mut [f32],
    k: &Coefs,
) -> Result<()> {
    let mut update = |g: &[f32]| -> candle_core::Result<()> {
        let op = HostUpdate {
            g,
            scale,
            moments: Mutex::new((&mut *m, &mut *v)),
            k,
        };
        var.as_tensor().inplace_op1(&op)
    };
    match with_host_f32(grad, &mut update) {
        Some(done) => done?,
        None => update(&grad.flatten_all()?.to_vec1::<f32>()?)?,
    }
    Ok(())
}

/// The AdamW update of one f32 CPU parameter, applied in place by candle (`inplace_op1`).
struct HostUpdate<'a> {
    g: &'a [f32],
    scale: f32,
    /// (m, v): the op gets `&self`, and runs once.
    moments: Mutex<(&'a mut [f32], &'a mut [f32])>,
    k: &'a Coefs,
}

impl InplaceOp1 for HostUpdate<'_> {
    fn name(&self) -> &'static str {
        "adamw-host-update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::F32(data), Some((a, b))) = (storage, layout.contiguous_offsets()) else {
            candle_core::bail!("adamw: parameters are updated on the host as contiguous f32")
        };
        let p = &mut data[a..b];
        let mut guard = self
            .moments
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (m, v) = &mut *guard;
        if [m.len(), v.len(), self.g.len()] != [p.len(); 3] {
            candle_core::bail!(
                "adamw: {} parameters, {} gradients, moments of {} and {}",
                p.len(),
                self.g.len(),
                m.len(),
                v.len()
            )
        }
        let (g, scale, k) = (self.g, self.scale, self.k);
        p.par_chunks_mut(ELEMS_PER_TASK)
            .zip(m.par_chunks_mut(ELEMS_PER_TASK))
            .zip(v.par_chunks_mut(ELEMS_PER_TASK))
            .zip(g.par_chunks(ELEMS_PER_TASK))
            .for_each(|(((p, m), v), g)| adamw_chunk(p, m, v, g, scale, k));
        Ok(())
    }
}

/// torch's AdamW on one chunk, in f32 in torch's order of operations.
fn adamw_chunk(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], scale: f32, k: &Coefs) {
    for j in 0..p.len() {
        // clip_grad_norm_: g.mul_(clip_coef); × 1.0 leaves every f32 as it is.
        let g = g[j] * scale;
        p[j] *= k.decay;
        // torch: exp_avg.lerp_(grad, 1 − β1); exp_avg_sq.mul_(β2).addcmul_(g, g, 1 − β2)
        m[j] += k.one_m_b1 * (g - m[j]);
        v[j] = v[j] * k.b2 + k.one_m_b2 * g * g;
        let denom = v[j].sqrt() / k.bias2_sqrt + k.eps;
        p[j] -= k.step_size * m[j] / denom;
    }
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
    Ok(sum_of_squares(grads)?.sqrt())
}

/// Σ x² over every element of `tensors`, in f64. Contiguous f32 CPU tensors are summed by
/// the pool in fixed chunks (so the result does not depend on scheduling); others with
/// tensor ops on their device.
pub fn sum_of_squares<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> Result<f64> {
    let mut total = 0f64;
    for t in tensors {
        let host = with_host_f32(t, |d| {
            let parts: Vec<f64> = d
                .par_chunks(ELEMS_PER_TASK)
                .map(|c| dot(c, c) as f64)
                .collect();
            parts.iter().sum::<f64>()
        });
        total += match host {
            Some(s) => s,
            None => t
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?,
        };
    }
    Ok(total)
}

/// torch's `clip_grad_norm_`: the pre-clip global norm, and the factor
/// min(1, max_norm / (norm + 1e-6)) to multiply the gradients by (1 when `max_norm` is 0,
/// clipping off), for [`AdamW::step_scaled`].
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f64) -> Result<(f64, f64)> {
    let norm = global_norm(grads)?;
    let coef = if max_norm > 0.0 {
        (max_norm / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    };
    Ok((norm, coef))
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
            // Over three of the host loop's parallel chunks, with a ragged last one.
            let w: Vec<f32> = (0..60 * 900).map(|i| 1e-3 * value(i, 1)).collect();
            let b: Vec<f32> = (0..40).map(|i| 1e-3 * value(i, 2)).collect();
            vec![
                (
                    "w.weight".to_string(),
                    Var::from_vec(w, (60, 900), &dev).unwrap(),
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
            // Clipped on odd steps: the host loop's fused g·scale against the device's
            // separate multiply (candle's affine, as the unfused clipping did).
            let scale = if step % 2 == 1 { 0.37 } else { 1.0 };
            host.step_scaled(&host_params, &grads, scale, 0.1).unwrap();
            device.step_scaled(&dev_params, &grads, scale, 0.1).unwrap();
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
        let g = vec![Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap()];
        let (norm, coef) = clip_grad_norm(&g, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        assert_eq!(coef, 1.0 / (5.0 + 1e-6));
        let after = global_norm(&[(&g[0] * coef).unwrap()]).unwrap();
        assert!((after - 1.0).abs() < 1e-5);
        assert_eq!(clip_grad_norm(&g, 10.0).unwrap().1, 1.0);
        assert_eq!(
            clip_grad_norm(&g, 0.0).unwrap().1,
            1.0,
            "0 turns clipping off"
        );
    }

    /// The pool's chunked sum against an f64 sum by hand, over several chunks; a transposed
    /// (non-contiguous) view takes the tensor-op path to the same value.
    #[test]
    fn sum_of_squares_matches_a_hand_sum() {
        let n = 7 * 7100; // three chunks of ELEMS_PER_TASK and a ragged fourth
        let xs: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5)
            .collect();
        let want: f64 = xs.iter().map(|&x| x as f64 * x as f64).sum();
        let t = Tensor::from_vec(xs, (n / 7, 7), &Device::Cpu).unwrap();
        let small = Tensor::new(&[2.0f32, -1.0], &Device::Cpu).unwrap();
        let got = sum_of_squares([&t, &small]).unwrap();
        assert!(
            (got - (want + 5.0)).abs() < 1e-6 * want,
            "{got} vs {}",
            want + 5.0
        );
        let strided = sum_of_squares([&t.t().unwrap()]).unwrap();
        assert!((strided - want).abs() < 1e-5 * want, "{strided} vs {want}");
    }
}

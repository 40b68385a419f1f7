//! log σ(z) on the CPU (f32), with an exact gradient everywhere.
//!
//! The usual stable composition −(relu(−z) + log(1 + e^{−|z|})) has kinks at z = 0 whose
//! subgradients candle picks inconsistently: at z = 0 (every DPO pair at step 0, where the
//! policy equals the reference) it gave 3× the true gradient. This op computes the value
//! stably, min(z, 0) − log1p(e^{−|z|}), and the gradient as σ(−z). The composed path
//! (`kernels::composed::log_sigmoid`) selects a smooth branch per sign instead; tests/kernels/
//! checks the two agree, at z = 0 and far out in both tails.
//!
//! Reference: PyTorch's `F.logsigmoid` (TRL's DPO loss `-F.logsigmoid(beta * logits)`).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::is_f32;

/// Whether the kernel takes `z`: f32.
pub fn supports(z: &Tensor) -> bool {
    is_f32(z)
}

/// Elementwise log σ(z), stable for large |z|. `z` must pass [`supports`].
pub fn log_sigmoid(z: &Tensor) -> candle_core::Result<Tensor> {
    z.contiguous()?.apply_op1(LogSigmoid)
}

fn log_sigmoid_f32(z: f32) -> f32 {
    // log σ(z) = min(z, 0) − log(1 + e^{−|z|})
    z.min(0.0) - (-z.abs()).exp().ln_1p()
}

struct LogSigmoid;

impl CustomOp1 for LogSigmoid {
    fn name(&self) -> &'static str {
        "log-sigmoid"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("log_sigmoid: f32 only")
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("log_sigmoid: input must be contiguous")
        };
        let out: Vec<f32> = data[a..b].iter().map(|&z| log_sigmoid_f32(z)).collect();
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, z: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // d/dz log σ(z) = σ(−z)
        Ok(Some(grad.mul(&candle_nn::ops::sigmoid(&z.neg()?)?)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn value_and_gradient_including_zero() {
        let z = Var::new(&[-200.0f32, -3.0, 0.0, 2.5, 90.0], &Device::Cpu).unwrap();
        let y = log_sigmoid(z.as_tensor()).unwrap();
        let got: Vec<f32> = y.to_vec1().unwrap();
        for (&zi, &yi) in [-200.0f64, -3.0, 0.0, 2.5, 90.0].iter().zip(&got) {
            let expected = -(1.0 + (-zi).exp()).ln();
            let expected = if zi < -50.0 { zi } else { expected };
            assert!(
                (yi as f64 - expected).abs() < 1e-5,
                "{zi}: {yi} vs {expected}"
            );
        }
        let g: Vec<f32> = y
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(&z)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (&zi, &gi) in [-200.0f64, -3.0, 0.0, 2.5, 90.0].iter().zip(&g) {
            let expected = 1.0 / (1.0 + zi.exp());
            assert!(
                (gi as f64 - expected).abs() < 1e-6,
                "{zi}: {gi} vs {expected}"
            );
        }
    }
}

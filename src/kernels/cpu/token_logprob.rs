//! Fused `log_softmax(logits)[target]` per row on the CPU (f32), with a backward pass.
//!
//! The composed form (`kernels::composed::token_logprobs`: log_softmax then gather, TRL's
//! `selective_log_softmax`) keeps several (rows × vocab) intermediates alive for backward;
//! this op keeps none: forward reads the logits once per row, and backward writes the single
//! (rows × vocab) gradient `g ⊙ (onehot(target) − softmax(logits))`. Checked against finite
//! differences below and against the composed form in tests/kernels/.
//!
//! Legend: n rows, v vocab.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::fast_exp::{log_sum_exp, scaled_exp_shifted};
use super::{is_f32, par_zeros};

/// Whether the kernel takes `logits`: f32 (targets are u32).
pub fn supports(logits: &Tensor) -> bool {
    is_f32(logits)
}

/// log p(target | row) for each row of `logits` (n, v) and `targets` (n,) u32 → (n,).
/// `logits` must pass [`supports`].
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    logits.contiguous()?.apply_op2(targets, TokenLogProb)
}

fn cpu_slices<'a>(
    s1: &'a CpuStorage,
    l1: &Layout,
    s2: &'a CpuStorage,
    l2: &Layout,
) -> candle_core::Result<(&'a [f32], &'a [u32], usize)> {
    let (n, v) = l1.shape().dims2()?;
    let logits = match s1 {
        CpuStorage::F32(d) => d,
        _ => candle_core::bail!("token_logprob: logits must be f32"),
    };
    let targets = match s2 {
        CpuStorage::U32(d) => d,
        _ => candle_core::bail!("token_logprob: targets must be u32"),
    };
    let (Some((a, b)), Some((c, e))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
        candle_core::bail!("token_logprob: inputs must be contiguous")
    };
    if e - c != n {
        candle_core::bail!("token_logprob: {n} rows but {} targets", e - c);
    }
    Ok((&logits[a..b], &targets[c..e], v))
}

struct TokenLogProb;

impl CustomOp2 for TokenLogProb {
    fn name(&self) -> &'static str {
        "token-logprob"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (logits, targets, v) = cpu_slices(s1, l1, s2, l2)?;
        let out: Vec<f32> = logits
            .par_chunks(v)
            .zip(targets.par_iter())
            .map(|(row, &t)| row[t as usize] - log_sum_exp(row))
            .collect();
        let n = out.len();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // Pack per-row (target, upstream grad, logp) so the grad op needs one extra input.
        let packed = Tensor::stack(
            &[&targets.to_dtype(candle_core::DType::F32)?, grad_res, res],
            1,
        )?;
        let grad = logits.apply_op2_no_bwd(&packed, &TokenLogProbGrad)?;
        Ok((Some(grad), None))
    }
}

struct TokenLogProbGrad;

impl CustomOp2 for TokenLogProbGrad {
    fn name(&self) -> &'static str {
        "token-logprob-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let logits = match s1 {
            CpuStorage::F32(d) => d,
            _ => candle_core::bail!("token_logprob grad: logits must be f32"),
        };
        let packed = match s2 {
            CpuStorage::F32(d) => d,
            _ => candle_core::bail!("token_logprob grad: packed must be f32"),
        };
        let (Some((a, b)), Some((c, e))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("token_logprob grad: inputs must be contiguous")
        };
        let (logits, packed) = (&logits[a..b], &packed[c..e]);
        let mut grad = par_zeros(n * v);
        grad.par_chunks_mut(v)
            .zip(logits.par_chunks(v))
            .zip(packed.par_chunks(3))
            .for_each(|((g_row, row), p)| {
                let (target, g, logp) = (p[0] as usize, p[1], p[2]);
                let lse = row[target] - logp;
                scaled_exp_shifted(g_row, row, lse, -g);
                g_row[target] += g;
            });
        Ok((CpuStorage::F32(grad), Shape::from((n, v))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn gradient_matches_finite_differences() {
        let dev = Device::Cpu;
        let base: Vec<f32> = (0..12).map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.7).collect();
        let targets = Tensor::new(&[2u32, 5], &dev).unwrap();
        let f = |vals: &[f32]| -> f64 {
            let t = Tensor::from_slice(vals, (2, 6), &dev).unwrap();
            let lp = token_logprobs(&t, &targets)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            lp.get(0).unwrap().to_scalar::<f64>().unwrap() * 1.5
                - lp.get(1).unwrap().to_scalar::<f64>().unwrap()
        };
        let var = Var::from_tensor(&Tensor::from_slice(&base, (2, 6), &dev).unwrap()).unwrap();
        let lp = token_logprobs(var.as_tensor(), &targets).unwrap();
        let obj = (lp.get(0).unwrap() * 1.5).unwrap() - lp.get(1).unwrap();
        let grads = obj.unwrap().backward().unwrap();
        let analytic: Vec<f32> = grads
            .get(&var)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let eps = 1e-2f32;
        for i in 0..base.len() {
            let mut plus = base.clone();
            plus[i] += eps;
            let mut minus = base.clone();
            minus[i] -= eps;
            let numeric = (f(&plus) - f(&minus)) / (2.0 * eps as f64);
            assert!(
                (numeric - analytic[i] as f64).abs() < 2e-3,
                "{i}: {numeric} vs {}",
                analytic[i]
            );
        }
    }
}

//! The dispatching functions in src/kernels/mod.rs follow `kernels::choice`: by default on
//! the CPU each runs its fused kernel, under `kernels::force_composed` the composed path.

use candle_core::{Device, Tensor, Var};
use leash::kernels::{self, composed, cpu, Path};
use leash::model::ops::causal_mask;

use super::{max_abs_diff, noise, rope_tables_for};

/// The gradient of Σ f(v) ⊙ noise at v = `at`.
fn grad(at: &Tensor, f: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> Tensor {
    let v = Var::from_tensor(at).unwrap();
    let y = f(v.as_tensor()).unwrap();
    let g = (&y * noise(y.dims(), 1.0, 36)).unwrap().sum_all().unwrap();
    g.backward().unwrap().get(&v).unwrap().clone()
}

/// The dispatching functions follow `choice`: on the CPU each runs its kernel (bit-identical
/// to calling it directly), under `force_composed` the composed path (likewise), and the
/// guard restores the default when dropped. Each op is compared where the two paths differ
/// in some bit (forward values, else gradients). frozen_matmul is left out: both paths run
/// candle's CPU matmul forward and `g · Wᵀ` backward, equal to the bit (they differ in which
/// graph node holds W, not in any value).
#[test]
fn dispatch_follows_the_choice() {
    // Rows longer than the kernels' 8-lane sums, so the two paths round differently.
    let x = noise(&[4, 5, 37], 1.0, 28);
    let w = (noise(&[37], 0.3, 29) + 1.0).unwrap();
    let (cos, sin) = rope_tables_for(2, 5, 36);
    let x4 = noise(&[2, 2, 5, 36], 1.0, 30);
    let mask = causal_mask(&[5, 3], 5, None, &Device::Cpu).unwrap();
    let logits = noise(&[5, 37], 2.0, 31);
    let targets = Tensor::new(&[1u32, 0, 36, 7, 3], &Device::Cpu).unwrap();
    let ids = [1u32, 0, 36, 7, 3];
    let (h, head) = (noise(&[5, 16], 1.0, 32), noise(&[37, 16], 1.0, 33));
    // A LoRA layer (16 → 37, rank 4) over a frozen W stored (out, in).
    let (lora_a, lora_b) = (noise(&[4, 16], 0.5, 34), noise(&[37, 4], 0.5, 35));
    let w_io = head.t().unwrap();
    // (dispatched, CPU kernel, composed) for each op.
    let run = || -> Vec<(Tensor, Tensor, Tensor)> {
        let r = |t: candle_core::Result<Tensor>| t.unwrap();
        vec![
            (
                r(kernels::rms_norm(&x, &w, 1e-6)),
                r(cpu::rms_norm::rms_norm(&x, &w, 1e-6)),
                r(composed::rms_norm(&x, &w, 1e-6)),
            ),
            (
                r(kernels::softmax(&x)),
                r(cpu::softmax::softmax(&x)),
                r(composed::softmax(&x)),
            ),
            // SwiGLU and attention compute the same f32 operations in the same order
            // forward on both paths; their backward passes differ, so compare gradients.
            (
                grad(&x, |v| kernels::swiglu(v, &x)),
                grad(&x, |v| cpu::swiglu::swiglu(v, &x)),
                grad(&x, |v| composed::swiglu(v, &x)),
            ),
            // RoPE is equal to the bit both ways; `rope_tables_get_a_gradient` tells it apart.
            (
                r(kernels::apply_rope(&x4, &cos, &sin)),
                r(cpu::rope::apply_rope(&x4, &cos, &sin)),
                r(composed::apply_rope(&x4, &cos, &sin)),
            ),
            (
                grad(&x4, |v| kernels::attention(v, &x4, &x4, &mask, 0.5)),
                grad(&x4, |v| cpu::attention::attention(v, &x4, &x4, &mask, 0.5)),
                grad(&x4, |v| composed::attention(v, &x4, &x4, &mask, 0.5)),
            ),
            (
                r(kernels::token_logprobs(&logits, &targets)),
                r(cpu::token_logprob::token_logprobs(&logits, &targets)),
                r(composed::token_logprobs(&logits, &targets)),
            ),
            (
                r(kernels::log_sigmoid(&x)),
                r(cpu::log_sigmoid::log_sigmoid(&x)),
                r(composed::log_sigmoid(&x)),
            ),
            (
                r(kernels::head_logprobs(&h, &head, &ids, false).map(|o| o.token_logps)),
                r(cpu::lm_head_logprob::head_logprobs(&h, &head, &ids, false)
                    .map(|o| o.token_logps)),
                r(composed::head_logprobs(&h, &head, &ids, false).map(|o| o.token_logps)),
            ),
            (
                r(kernels::lora_linear(
                    &h,
                    &w_io,
                    None,
                    (&lora_a, &lora_b),
                    2.0,
                    None,
                )),
                r(cpu::lora_linear::lora_linear(
                    &h, &w_io, None, &lora_a, &lora_b, 2.0,
                )),
                r(composed::lora_linear(
                    &h,
                    &w_io,
                    None,
                    (&lora_a, &lora_b),
                    2.0,
                    None,
                )),
            ),
        ]
    };
    assert_eq!(kernels::choice(&[&x]), Path::CpuFused);
    let mut differ = Vec::new();
    for (i, (k, f, c)) in run().iter().enumerate() {
        assert_eq!(
            max_abs_diff(k, f),
            0.0,
            "op {i}: default is not the CPU kernel"
        );
        if max_abs_diff(f, c) > 0.0 {
            differ.push(i);
        }
    }
    // The checks only tell the paths apart where their results differ in some bit.
    // The fused RoPE gives its tables no gradient; the composed one does.
    let rope_tables_get_a_gradient = || {
        let c = Var::from_tensor(&cos).unwrap();
        let y = kernels::apply_rope(&x4, c.as_tensor(), &sin).unwrap();
        y.sum_all().unwrap().backward().unwrap().get(&c).is_some()
    };
    assert!(
        !rope_tables_get_a_gradient(),
        "default RoPE is not the CPU kernel"
    );
    assert_eq!(
        differ.len(),
        8,
        "only ops {differ:?} differ between the paths"
    );
    {
        let _forced = kernels::force_composed(true);
        assert_eq!(kernels::choice(&[&x]), Path::Composed);
        assert!(
            rope_tables_get_a_gradient(),
            "forced RoPE is not the composed path"
        );
        for (i, (k, _, c)) in run().iter().enumerate() {
            assert_eq!(
                max_abs_diff(k, c),
                0.0,
                "op {i}: forced is not the composed path"
            );
        }
    }
    assert_eq!(
        kernels::choice(&[&x]),
        Path::CpuFused,
        "the guard restores the default"
    );
}

//! Each kernel op: the fused CPU kernel against the composed path, forward and the gradients
//! of a random weighted sum of the output for every input that is a variable.

use candle_core::{DType, Device, Tensor, Var};
use leash::kernels::{composed, cpu};
use leash::model::ops::{causal_mask, MASKED};

use super::{noise, rel_diff, rope_tables_for};

/// Forward: the two paths' outputs, max |Δ| relative to max |composed| (floor 1).
const FWD_TOL: f64 = 1e-5;
/// Gradients, relative to max |composed gradient| (floor 1e-3): the kernels sum in other
/// orders (dw over every row, attention's dK over the query heads of a group).
const BWD_TOL: f64 = 1e-5;

/// Compares `fused()` and `composed()`: outputs, then the gradient of Σ w ⊙ y for each var.
fn check(name: &str, vars: &[&Var], fused: impl Fn() -> Tensor, composed: impl Fn() -> Tensor) {
    let (yf, yc) = (fused(), composed());
    let d = rel_diff(&yf, &yc, 1.0);
    assert!(d <= FWD_TOL, "{name} forward: {d:e}");
    let w = noise(yf.dims(), 1.0, 99);
    let gf = (&yf * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gc = (&yc * &w).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, v) in vars.iter().enumerate() {
        let (a, b) = (gf.get(v).unwrap(), gc.get(v).unwrap());
        let d = rel_diff(a, b, 1e-3);
        assert!(
            d <= BWD_TOL,
            "{name}: gradient of input {i} differs by {d:e}"
        );
    }
}

fn var(shape: &[usize], std: f32, seed: u64) -> Var {
    Var::from_tensor(&noise(shape, std, seed)).unwrap()
}

/// A Var of `shape` handed out as a non-contiguous view (the transpose of its last two dims).
fn transposed_var(shape: &[usize], std: f32, seed: u64) -> (Var, Tensor) {
    let r = shape.len();
    let mut stored = shape.to_vec();
    stored.swap(r - 1, r - 2);
    let v = var(&stored, std, seed);
    let view = v.as_tensor().transpose(r - 1, r - 2).unwrap();
    assert!(!view.is_contiguous());
    (v, view)
}

#[test]
fn rms_norm() {
    for (shape, eps) in [
        (&[3, 5, 37][..], 1e-6),
        (&[2, 64][..], 1e-5),
        (&[1, 1, 3][..], 1e-6),
    ] {
        let x = var(shape, 1.5, 1);
        let c = shape[shape.len() - 1];
        let w = Var::from_tensor(&(noise(&[c], 0.3, 2) + 1.0).unwrap()).unwrap();
        let (xt, wt) = (x.as_tensor(), w.as_tensor());
        check(
            "rms_norm",
            &[&x, &w],
            || cpu::rms_norm::rms_norm(xt, wt, eps).unwrap(),
            || composed::rms_norm(xt, wt, eps).unwrap(),
        );
    }
    // Non-contiguous input, and more rows than one partial-sum block of dw.
    let (x, xt) = transposed_var(&[5, 41, 19], 1.0, 3);
    let w = Var::from_tensor(&(noise(&[19], 0.3, 4) + 1.0).unwrap()).unwrap();
    let wt = w.as_tensor();
    check(
        "rms_norm (strided)",
        &[&x, &w],
        || cpu::rms_norm::rms_norm(&xt, wt, 1e-6).unwrap(),
        || composed::rms_norm(&xt, wt, 1e-6).unwrap(),
    );
}

#[test]
fn softmax() {
    let x = var(&[2, 3, 7, 13], 3.0, 5);
    let xt = x.as_tensor();
    check(
        "softmax",
        &[&x],
        || cpu::softmax::softmax(xt).unwrap(),
        || composed::softmax(xt).unwrap(),
    );
    // Masked scores, as attention produces them (causal: row i sees columns ≤ i).
    let mask = causal_mask(&[9], 9, None, &Device::Cpu)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let (x, xt) = transposed_var(&[4, 9, 9], 2.0, 6);
    let masked = xt.broadcast_add(&mask).unwrap();
    check(
        "softmax (masked, strided)",
        &[&x],
        || cpu::softmax::softmax(&masked).unwrap(),
        || composed::softmax(&masked).unwrap(),
    );
}

#[test]
fn rope() {
    let (b, h, t, d) = (2, 3, 5, 10);
    let (cos, sin) = rope_tables_for(b, t, d);
    let x = var(&[b, h, t, d], 1.0, 7);
    let xt = x.as_tensor();
    check(
        "rope",
        &[&x],
        || cpu::rope::apply_rope(xt, &cos, &sin).unwrap(),
        || composed::apply_rope(xt, &cos, &sin).unwrap(),
    );
    // As the decoder calls it: heads split from (b, t, h·d) then transposed (strided), and
    // tables shared across the batch (1, 1, t, d).
    let y = var(&[b, t, h * d], 1.0, 8);
    let heads = y
        .as_tensor()
        .reshape((b, t, h, d))
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    let (cos1, sin1) = (cos.narrow(0, 0, 1).unwrap(), sin.narrow(0, 0, 1).unwrap());
    assert!(cpu::rope::supports(&heads, &cos1, &sin1));
    check(
        "rope (strided heads, shared tables)",
        &[&y],
        || cpu::rope::apply_rope(&heads, &cos1, &sin1).unwrap(),
        || composed::apply_rope(&heads, &cos1, &sin1).unwrap(),
    );
    // Rows with a non-unit last-dim stride are copied first.
    let (z, zt) = transposed_var(&[b, h, t, d], 1.0, 9);
    check(
        "rope (transposed last dims)",
        &[&z],
        || cpu::rope::apply_rope(&zt, &cos, &sin).unwrap(),
        || composed::apply_rope(&zt, &cos, &sin).unwrap(),
    );
}

#[test]
fn swiglu() {
    let (a, u) = (var(&[3, 7, 29], 3.0, 10), var(&[3, 7, 29], 1.0, 11));
    let (at, ut) = (a.as_tensor(), u.as_tensor());
    check(
        "swiglu",
        &[&a, &u],
        || cpu::swiglu::swiglu(at, ut).unwrap(),
        || composed::swiglu(at, ut).unwrap(),
    );
    let (a, at) = transposed_var(&[4, 33], 2.0, 12);
    let u = var(&[4, 33], 1.0, 13);
    let ut = u.as_tensor();
    check(
        "swiglu (strided)",
        &[&a, &u],
        || cpu::swiglu::swiglu(&at, ut).unwrap(),
        || composed::swiglu(&at, ut).unwrap(),
    );
}

/// Additive mask (b, 1, t, s): queries are the last t of s positions (a KV cache holds the
/// first s − t), causal, and row 1 has only `len1` real keys (right padding).
fn padded_mask(b: usize, t: usize, s: usize, len1: usize) -> Tensor {
    let mut m = vec![0f32; b * t * s];
    for row in 0..b {
        let len = if row == 1 { len1 } else { s };
        for i in 0..t {
            let at = s - t + i;
            for j in 0..s {
                if j > at || (j >= len && j != at) {
                    m[(row * t + i) * s + j] = MASKED;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, t, s), &Device::Cpu).unwrap()
}

#[test]
fn attention() {
    // (b, hq, hkv, t, s, d): grouped-query (3 query heads per kv head), plain multi-head,
    // and queries over a longer cached key range.
    for (b, hq, hkv, t, s, d) in [(2, 6, 2, 7, 7, 5), (2, 2, 2, 6, 6, 4), (2, 4, 1, 3, 8, 6)] {
        let mask = padded_mask(b, t, s, 4.min(s));
        let q = var(&[b, hq, t, d], 1.0, 14);
        let k = var(&[b, hkv, s, d], 1.0, 15);
        // v as the decoder hands it over: heads transposed out of (b, s, hkv, d).
        let v_store = var(&[b, s, hkv, d], 1.0, 16);
        let v = v_store.as_tensor().transpose(1, 2).unwrap();
        for scale in [1.0 / (d as f64).sqrt(), 0.3] {
            let (qt, kt) = (q.as_tensor(), k.as_tensor());
            check(
                &format!("attention {:?} scale {scale}", (b, hq, hkv, t, s, d)),
                &[&q, &k, &v_store],
                || cpu::attention::attention(qt, kt, &v, &mask, scale).unwrap(),
                || composed::attention(qt, kt, &v, &mask, scale).unwrap(),
            );
        }
    }
}

/// Additive mask (2, 1, 192, 192) with the shapes the fused kernel skips tiles of: row 0 packs
/// a shared prompt [0, 64), a chosen [64, 128) and a rejected [128, 192) completion (each
/// completion sees the prompt and itself, causally; src/data/pack.rs's layout); row 1 is
/// causal over its first 100 positions and its last 92 queries see no key at all.
fn multi_tile_mask() -> Tensor {
    let (t, seg) = (192, 64);
    let mut m = vec![MASKED; 2 * t * t];
    for i in 0..t {
        for j in 0..=i {
            let same = i / seg == j / seg;
            if same || j < seg {
                m[i * t + j] = 0.0;
            }
            if i < 100 {
                m[(t + i) * t + j] = 0.0;
            }
        }
    }
    Tensor::from_vec(m, (2, 1, t, t), &Device::Cpu).unwrap()
}

/// Longer rows than one tile (64): the kernel multiplies only the tiles some query sees, and
/// must still give the dense result, blind (all-masked) queries included.
#[test]
fn attention_over_several_tiles() {
    let (b, hq, hkv, t, d) = (2, 4, 2, 192, 8);
    let mask = multi_tile_mask();
    let q = var(&[b, hq, t, d], 1.0, 30);
    let k = var(&[b, hkv, t, d], 1.0, 31);
    let v = var(&[b, hkv, t, d], 1.0, 32);
    let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
    check(
        "attention over several tiles",
        &[&q, &k, &v],
        || cpu::attention::attention(qt, kt, vt, &mask, 0.35).unwrap(),
        || composed::attention(qt, kt, vt, &mask, 0.35).unwrap(),
    );
}

/// The kernel reuses a mask's tiles while the next call attends over the same mask tensor
/// (every layer of a forward does): calls alternating between two masks of one shape, on one
/// thread, must each get their own mask's result.
#[test]
fn attention_alternating_masks() {
    let (b, hq, hkv, t, d) = (2, 2, 2, 192, 8);
    let packed = multi_tile_mask();
    let causal = padded_mask(b, t, t, t);
    let q = var(&[b, hq, t, d], 1.0, 33);
    let k = var(&[b, hkv, t, d], 1.0, 34);
    let v = var(&[b, hkv, t, d], 1.0, 35);
    let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
    for (name, mask) in [
        ("packed", &packed),
        ("causal", &causal),
        ("packed again", &packed),
    ] {
        check(
            &format!("attention, {name} mask"),
            &[&q, &k, &v],
            || cpu::attention::attention(qt, kt, vt, mask, 0.35).unwrap(),
            || composed::attention(qt, kt, vt, mask, 0.35).unwrap(),
        );
    }
}

#[test]
fn token_logprobs() {
    let logits = var(&[5, 11], 3.0, 17);
    let targets = Tensor::new(&[0u32, 10, 3, 3, 7], &Device::Cpu).unwrap();
    let lt = logits.as_tensor();
    check(
        "token_logprobs",
        &[&logits],
        || cpu::token_logprob::token_logprobs(lt, &targets).unwrap(),
        || composed::token_logprobs(lt, &targets).unwrap(),
    );
}

/// lm_head + log-softmax + gather, trainable and frozen weight: values, statistics,
/// gradients; a frozen weight gets no gradient on either path.
#[test]
fn head_logprobs() {
    let targets = [0u32, 12, 3, 3, 9, 1, 12];
    let h = var(&[7, 5], 1.0, 18);
    let w = Var::from_tensor(&(noise(&[13, 5], 1.0, 19) * 3.0).unwrap()).unwrap();
    let (ht, wt) = (h.as_tensor(), w.as_tensor());
    let fused = || cpu::lm_head_logprob::head_logprobs(ht, wt, &targets, true).unwrap();
    let comp = || composed::head_logprobs(ht, wt, &targets, true).unwrap();
    let (a, b) = (fused(), comp());
    for (x, y) in a.stats.iter().zip(&b.stats) {
        assert!((x.entropy - y.entropy).abs() < 1e-5);
        assert!((x.mean_logit - y.mean_logit).abs() < 1e-6);
        assert_eq!(x.argmax_hit, y.argmax_hit);
    }
    assert_eq!(a.stats.len(), targets.len());
    check(
        "head_logprobs",
        &[&h, &w],
        || fused().token_logps,
        || comp().token_logps,
    );
    // Frozen lm_head (LoRA, the reference model), also held in bf16.
    for frozen in [
        noise(&[13, 5], 1.0, 20),
        noise(&[13, 5], 1.0, 20).to_dtype(DType::BF16).unwrap(),
    ] {
        let grads = |lp: Tensor| lp.sum_all().unwrap().backward().unwrap();
        let gf = grads(
            cpu::lm_head_logprob::head_logprobs(ht, &frozen, &targets, false)
                .unwrap()
                .token_logps,
        );
        let gc = grads(
            composed::head_logprobs(ht, &frozen, &targets, false)
                .unwrap()
                .token_logps,
        );
        assert!(
            gf.get(&frozen).is_none() && gc.get(&frozen).is_none(),
            "frozen lm_head got a gradient"
        );
        let d = rel_diff(gf.get(&h).unwrap(), gc.get(&h).unwrap(), 1e-3);
        assert!(d <= BWD_TOL, "hidden gradient under a frozen head: {d:e}");
    }
}

#[test]
fn log_sigmoid() {
    // Far tails, around 0 (every DPO pair at step 0) and 0 itself.
    let zs = [-200f32, -30.0, -3.0, -1e-3, 0.0, 1e-3, 2.5, 30.0, 90.0];
    let z = Var::new(&zs, &Device::Cpu).unwrap();
    let zt = z.as_tensor();
    check(
        "log_sigmoid",
        &[&z],
        || cpu::log_sigmoid::log_sigmoid(zt).unwrap(),
        || composed::log_sigmoid(zt).unwrap(),
    );
    // Independent values: d/dz log σ(z) = σ(−z), 0.5 at z = 0.
    let g = composed::log_sigmoid(zt)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g: Vec<f32> = g.get(&z).unwrap().to_vec1().unwrap();
    for (&zi, &gi) in zs.iter().zip(&g) {
        let want = 1.0 / (1.0 + (zi as f64).exp());
        assert!((gi as f64 - want).abs() < 1e-6, "z {zi}: {gi} vs {want}");
    }
}

/// x tracks a gradient and W does not: same values and input gradient on both paths, and
/// W (f32 or bf16) gets no gradient on either.
#[test]
fn frozen_matmul() {
    let x = var(&[6, 9], 1.0, 21);
    let xt = x.as_tensor();
    for w in [
        noise(&[9, 4], 1.0, 22),
        noise(&[4, 9], 1.0, 22)
            .t()
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap(),
    ] {
        assert!(cpu::frozen_matmul::supports(xt, &w));
        check(
            "frozen_matmul",
            &[&x],
            || cpu::frozen_matmul::frozen_matmul(xt, &w).unwrap(),
            || composed::frozen_matmul(xt, &w).unwrap(),
        );
        for y in [
            cpu::frozen_matmul::frozen_matmul(xt, &w).unwrap(),
            composed::frozen_matmul(xt, &w).unwrap(),
        ] {
            let store = y.sum_all().unwrap().backward().unwrap();
            assert!(store.get(&w).is_none(), "frozen weight got a gradient");
            assert_eq!(store.get_ids().count(), 1, "only x holds a gradient");
        }
    }
}

/// One LoRA layer x (5, 7) → (5, 6), rank 3, scale 2, W stored (out, in) or (in, out), with
/// bias, without and with dropout (one keep mask for both paths): output and the gradients
/// of x, A and B agree, and W and the bias get none on either path.
#[test]
fn lora_linear() {
    let p = 0.3;
    let keep: Vec<u8> = (0..35).map(|i| (i * 7 % 5 != 0) as u8).collect();
    let (x, a, b) = (
        var(&[5, 7], 1.0, 23),
        var(&[3, 7], 0.5, 24),
        var(&[6, 3], 0.5, 25),
    );
    let bias = noise(&[6], 0.2, 26);
    for transposed in [false, true] {
        let w_io = if transposed {
            noise(&[7, 6], 0.5, 27)
        } else {
            noise(&[6, 7], 0.5, 27).t().unwrap()
        };
        for dropout in [None, Some((keep.clone(), p))] {
            let (xt, at, bt) = (x.as_tensor(), a.as_tensor(), b.as_tensor());
            let fused = || match &dropout {
                None => cpu::lora_linear::lora_linear(xt, &w_io, Some(&bias), at, bt, 2.0).unwrap(),
                Some((k, p)) => cpu::lora_linear::lora_linear_dropout(
                    xt,
                    &w_io,
                    Some(&bias),
                    at,
                    bt,
                    2.0,
                    k.clone(),
                    *p,
                )
                .unwrap(),
            };
            let comp = || {
                let d = dropout.as_ref().map(|(k, p)| (k.as_slice(), *p));
                composed::lora_linear(xt, &w_io, Some(&bias), (at, bt), 2.0, d).unwrap()
            };
            let what = format!(
                "lora_linear (transposed {transposed}, dropout {})",
                dropout.is_some()
            );
            check(&what, &[&x, &a, &b], fused, comp);
            for y in [fused(), comp()] {
                let store = y.sum_all().unwrap().backward().unwrap();
                assert!(
                    store.get(&w_io).is_none() && store.get(&bias).is_none(),
                    "{what}: base got a gradient"
                );
                assert_eq!(
                    store.get_ids().count(),
                    3,
                    "{what}: only x, A, B hold gradients"
                );
            }
        }
    }
}

/// The thin product (decode steps: ≤ 8 rows, no gradient) against candle's matmul, on a
/// weight stored (out, in) as checkpoints store it, for every row count it takes and an output
/// count that does not fill its last task; and which operands it refuses.
#[test]
fn thin_matmul() {
    let w_stored = noise(&[600, 48], 1.0, 51); // (n, k)
    let w = w_stored.t().unwrap(); // (k, n) view
    for m in 1..=cpu::thin_matmul::MAX_ROWS {
        let x = noise(&[m, 48], 1.0, 50 + m as u64);
        assert!(cpu::thin_matmul::supports(&x, &w), "{m} rows");
        let got = cpu::thin_matmul::thin_matmul(&x, &w).unwrap();
        let want = x.matmul(&w).unwrap();
        assert_eq!(got.dims(), &[m, 600]);
        let d = rel_diff(&got, &want, 1.0);
        assert!(d <= FWD_TOL, "{m} rows: {d:e}");
    }
    let x9 = noise(&[9, 48], 1.0, 60);
    assert!(!cpu::thin_matmul::supports(&x9, &w), "more rows: gemm");
    let x = noise(&[2, 48], 1.0, 61);
    assert!(
        !cpu::thin_matmul::supports(&x, &w_stored.t().unwrap().contiguous().unwrap()),
        "a (k, n) layout"
    );
    let tracked = var(&[2, 48], 1.0, 62);
    assert!(
        !cpu::thin_matmul::supports(tracked.as_tensor(), &w),
        "a gradient is wanted"
    );
}

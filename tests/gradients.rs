//! Gradients through every decoder family: each trainable tensor receives a non-zero
//! gradient, and sampled entries match central finite differences in f64.

use candle_core::{DType, Device, Tensor, Var};
use leash::data::collate::collate;
use leash::data::encode::Sequence;
use leash::loss::logps::score;
use leash::model::weights::{RandomInit, Weights};
use leash::model::{Decoder, ModelConfig};
use std::path::Path;

const FD_EPS: f64 = 1e-5;
const FD_REL_TOL: f64 = 1e-4;

fn tiny(config: &str) -> Decoder {
    let cfg = ModelConfig::from_json_str(config, Path::new("config.json")).unwrap();
    let init = RandomInit {
        seed: 7,
        std: 0.3,
        norm_jitter: 0.2,
        bias_std: 0.2,
        dtype: DType::F64,
    };
    Decoder::from_weights(cfg, &Weights::random(init, &Device::Cpu)).unwrap()
}

/// A weighted sum of two sequences' log-probs (different lengths, so padding is exercised).
fn objective(model: &Decoder) -> Tensor {
    let a = Sequence {
        ids: vec![1, 5, 9, 3, 7, 2],
        loss_start: 2,
    };
    let b = Sequence {
        ids: vec![1, 4, 4, 8],
        loss_start: 1,
    };
    let batch = collate(&[&a, &b], 0, model.config.sliding_window, &[], &Device::Cpu).unwrap();
    let lp = score(model, &batch).unwrap().seq_logps;
    let w = Tensor::new(&[1.0f64, -0.7], &Device::Cpu).unwrap();
    (lp * w).unwrap().sum_all().unwrap()
}

fn check(config: &str) {
    let base = tiny(config);
    let (model, vars) = base.to_trainable().unwrap();
    let grads = objective(&model).backward().unwrap();
    for (name, var) in &vars {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(norm > 0.0, "{name}: zero gradient");
        let flat_g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        let n = flat_g.len();
        for &i in &[0, n / 3, n - 1] {
            let numeric = finite_difference(&model, var, i);
            let analytic = flat_g[i];
            let scale = numeric.abs().max(analytic.abs()).max(1e-6);
            assert!(
                (numeric - analytic).abs() / scale < FD_REL_TOL,
                "{name}[{i}]: analytic {analytic} vs numeric {numeric}"
            );
        }
    }
}

fn finite_difference(model: &Decoder, var: &Var, i: usize) -> f64 {
    let original = var.as_tensor().copy().unwrap();
    let shape = original.shape().clone();
    let mut values: Vec<f64> = original.flatten_all().unwrap().to_vec1().unwrap();
    let mut eval = |delta: f64| {
        let v0 = values[i];
        values[i] = v0 + delta;
        var.set(&Tensor::from_slice(&values, &shape, &Device::Cpu).unwrap())
            .unwrap();
        values[i] = v0;
        objective(model).to_scalar::<f64>().unwrap()
    };
    let plus = eval(FD_EPS);
    let minus = eval(-FD_EPS);
    var.set(&original).unwrap();
    (plus - minus) / (2.0 * FD_EPS)
}

#[test]
fn llama_gqa_untied() {
    check(
        r#"{"model_type":"llama","vocab_size":13,"hidden_size":8,"intermediate_size":12,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"tie_word_embeddings":false}"#,
    );
}

#[test]
fn qwen2_tied_with_qkv_bias() {
    check(
        r#"{"model_type":"qwen2","vocab_size":13,"hidden_size":8,"intermediate_size":12,"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,"tie_word_embeddings":true,"rope_theta":1000.0}"#,
    );
}

#[test]
fn mistral_sliding_window() {
    check(
        r#"{"model_type":"mistral","vocab_size":13,"hidden_size":8,"intermediate_size":12,"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":2,"sliding_window":3}"#,
    );
}

#[test]
fn qwen3_qk_norm_explicit_head_dim() {
    check(
        r#"{"model_type":"qwen3","vocab_size":13,"hidden_size":8,"intermediate_size":12,"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,"head_dim":6,"attention_bias":true,"tie_word_embeddings":true}"#,
    );
}

#[test]
fn gpt2_untied_head() {
    check(
        r#"{"model_type":"gpt2","vocab_size":13,"n_embd":8,"n_layer":1,"n_head":2,"n_positions":16,"n_inner":12,"tie_word_embeddings":false}"#,
    );
}

#[test]
fn gpt2_conv1d_layernorm_gelu() {
    check(
        r#"{"model_type":"gpt2","vocab_size":13,"n_embd":8,"n_layer":2,"n_head":2,"n_positions":16}"#,
    );
}

#[test]
fn gemma3_local_global_qk_norm() {
    check(
        r#"{"model_type":"gemma3_text","vocab_size":13,"hidden_size":8,"intermediate_size":12,"num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1,"head_dim":6,"query_pre_attn_scalar":5,"sliding_window":2,"layer_types":["sliding_attention","full_attention"],"rope_parameters":{"sliding_attention":{"rope_type":"default","rope_theta":100.0},"full_attention":{"rope_type":"linear","factor":2.0,"rope_theta":1000.0}}}"#,
    );
}

#[test]
fn phi3_fused_partial_rotary_longrope() {
    check(
        r#"{"model_type":"phi3","vocab_size":13,"hidden_size":16,"intermediate_size":12,"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,"max_position_embeddings":32,"original_max_position_embeddings":4,"sliding_window":3,"rope_parameters":{"rope_type":"longrope","rope_theta":1000.0,"partial_rotary_factor":0.5,"short_factor":[1.0,2.0],"long_factor":[3.0,5.0]}}"#,
    );
}

// ---- LoRA: the fused base+adapter op, and whole decoders with adapters ----

use leash::model::lora::{Adapter, Adapters};
use leash::model::lora_fused::{lora_linear, lora_linear_dropout};

/// The fused op vs the composed path in f32 (same math, different rounding).
const FUSED_VS_COMPOSED_TOL: f64 = 1e-5;

fn filled(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    // A deterministic, irregular fill in (-1, 1).
    let v: Vec<f64> = (0..n)
        .map(|i| (((i as u64 + 1) * (seed * 2 + 7919)) % 1999) as f64 / 999.5 - 1.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Operands of one LoRA layer: x (5, 7), W (6 out, 7 in) stored (out, in) or, GPT-2 style,
/// (in, out); bias (6); A (3, 7); B (6, 3); scale 2.
struct LoraCase {
    x: Var,
    a: Var,
    b: Var,
    w_io: Tensor,
    bias: Option<Tensor>,
    r_weights: Tensor,
}

const SCALE: f64 = 2.0;

fn lora_case(dtype: DType, transposed: bool, bias: bool) -> LoraCase {
    let w_io = if transposed {
        filled(&[7, 6], 3, dtype) // (in, out) as GPT-2 stores it
    } else {
        filled(&[6, 7], 3, dtype).t().unwrap() // (out, in) read as (in, out) in place
    };
    LoraCase {
        x: Var::from_tensor(&filled(&[5, 7], 1, dtype)).unwrap(),
        a: Var::from_tensor(&filled(&[3, 7], 4, dtype)).unwrap(),
        b: Var::from_tensor(&filled(&[6, 3], 5, dtype)).unwrap(),
        w_io,
        bias: bias.then(|| filled(&[6], 6, dtype)),
        r_weights: filled(&[5, 6], 9, dtype),
    }
}

impl LoraCase {
    fn fused(&self) -> Tensor {
        lora_linear(
            self.x.as_tensor(),
            &self.w_io,
            self.bias.as_ref(),
            self.a.as_tensor(),
            self.b.as_tensor(),
            SCALE,
        )
        .unwrap()
    }

    /// y = x·W + b + s·(x·Aᵀ)·Bᵀ from candle's own ops.
    fn composed(&self) -> Tensor {
        let x = self.x.as_tensor();
        let mut y = x.matmul(&self.w_io).unwrap();
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b).unwrap();
        }
        let low = x.matmul(&self.a.as_tensor().t().unwrap()).unwrap();
        (y + (low.matmul(&self.b.as_tensor().t().unwrap()).unwrap() * SCALE).unwrap()).unwrap()
    }

    fn objective(&self, y: &Tensor) -> Tensor {
        (y * &self.r_weights).unwrap().sum_all().unwrap()
    }

    fn vars(&self) -> [(&'static str, &Var); 3] {
        [("x", &self.x), ("A", &self.a), ("B", &self.b)]
    }
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (to_f64(a), to_f64(b));
    let scale = a.iter().map(|v| v.abs()).fold(1e-12, f64::max);
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / scale)
        .fold(0.0, f64::max)
}

#[test]
fn fused_lora_linear_matches_the_composed_path() {
    for transposed in [false, true] {
        for bias in [false, true] {
            let case = lora_case(DType::F32, transposed, bias);
            let (yf, yc) = (case.fused(), case.composed());
            let d = max_rel_diff(&yf, &yc);
            assert!(d < FUSED_VS_COMPOSED_TOL, "output: {d}");
            let gf = case.objective(&yf).backward().unwrap();
            let gc = case.objective(&yc).backward().unwrap();
            for (name, var) in case.vars() {
                let d = max_rel_diff(gf.get(var).unwrap(), gc.get(var).unwrap());
                assert!(
                    d < FUSED_VS_COMPOSED_TOL,
                    "d{name} (transposed {transposed}, bias {bias}): {d}"
                );
            }
            // W and b are held by the op: beyond x, A, B (and the objective's weights) the
            // store holds nothing.
            let known = [case.x.id(), case.a.id(), case.b.id(), case.r_weights.id()];
            assert_eq!(gf.get_ids().filter(|id| !known.contains(id)).count(), 0);
        }
    }
}

/// Training dropout inside the fused op: with a fixed keep mask, output and the gradients of
/// x, A and B equal the composed path where only the low-rank branch sees x ⊙ keep / (1 − p).
#[test]
fn fused_lora_linear_with_dropout_matches_the_composed_path() {
    let p = 0.3;
    let keep: Vec<u8> = (0..35).map(|i| (i * 7 % 5 != 0) as u8).collect();
    for transposed in [false, true] {
        let case = lora_case(DType::F64, transposed, true);
        let x = case.x.as_tensor();
        let yf = lora_linear_dropout(
            x,
            &case.w_io,
            case.bias.as_ref(),
            case.a.as_tensor(),
            case.b.as_tensor(),
            SCALE,
            keep.clone(),
            p,
        )
        .unwrap();
        let mask: Vec<f64> = keep.iter().map(|&k| k as f64 / (1.0 - p)).collect();
        let mask = Tensor::from_vec(mask, (5, 7), &Device::Cpu).unwrap();
        let dropped = (x * &mask).unwrap();
        let low = dropped.matmul(&case.a.as_tensor().t().unwrap()).unwrap();
        let update = (low.matmul(&case.b.as_tensor().t().unwrap()).unwrap() * SCALE).unwrap();
        let base = x.matmul(&case.w_io).unwrap();
        let yc = (base.broadcast_add(case.bias.as_ref().unwrap()).unwrap() + update).unwrap();
        assert!(max_rel_diff(&yf, &yc) < 1e-12, "output");
        let gf = case.objective(&yf).backward().unwrap();
        let gc = case.objective(&yc).backward().unwrap();
        for (name, var) in case.vars() {
            let d = max_rel_diff(gf.get(var).unwrap(), gc.get(var).unwrap());
            assert!(d < 1e-12, "d{name} (transposed {transposed}): {d}");
        }
    }
}

#[test]
fn fused_lora_linear_gradients_match_finite_differences() {
    for transposed in [false, true] {
        let case = lora_case(DType::F64, transposed, true);
        let grads = case.objective(&case.fused()).backward().unwrap();
        for (name, var) in case.vars() {
            let analytic = to_f64(grads.get(var).unwrap());
            let original = var.as_tensor().copy().unwrap();
            let shape = original.shape().clone();
            let values = to_f64(&original);
            for (i, &g) in analytic.iter().enumerate() {
                let at = |delta: f64| {
                    let mut v = values.clone();
                    v[i] += delta;
                    var.set(&Tensor::from_vec(v, &shape, &Device::Cpu).unwrap())
                        .unwrap();
                    case.objective(&case.fused()).to_scalar::<f64>().unwrap()
                };
                let numeric = (at(FD_EPS) - at(-FD_EPS)) / (2.0 * FD_EPS);
                let scale = numeric.abs().max(g.abs()).max(1e-6);
                assert!(
                    (numeric - g).abs() / scale < FD_REL_TOL,
                    "d{name}[{i}]: analytic {g} vs numeric {numeric}"
                );
            }
            var.set(&original).unwrap();
        }
    }
}

/// Adapters with non-zero A and B on every linear module, as f64 variables.
fn f64_adapters(model: &Decoder) -> (Adapters, Vec<(String, Var)>) {
    let mut adapters = Adapters::new();
    let mut vars = Vec::new();
    for (k, m) in model.linear_modules().iter().enumerate() {
        let a = Var::from_tensor(&(filled(&[2, m.inp], 10 + k as u64, DType::F64) * 0.5).unwrap())
            .unwrap();
        let b = Var::from_tensor(&(filled(&[m.out, 2], 50 + k as u64, DType::F64) * 0.5).unwrap())
            .unwrap();
        adapters.insert(
            m.path.clone(),
            Adapter {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scale: 1.5,
                dropout: 0.0,
            },
        );
        vars.push((format!("{}.lora_A", m.path), a));
        vars.push((format!("{}.lora_B", m.path), b));
    }
    (adapters, vars)
}

/// Whole-decoder LoRA gradients (through the fused op in f64) against finite differences.
fn check_lora(config: &str) {
    let base = tiny(config);
    let (adapters, vars) = f64_adapters(&base);
    let model = base.with_adapters(&adapters).unwrap();
    let grads = objective(&model).backward().unwrap();
    for (name, var) in &vars {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let flat_g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        let n = flat_g.len();
        for &i in &[0, n / 2, n - 1] {
            let numeric = finite_difference(&model, var, i);
            let analytic = flat_g[i];
            let scale = numeric.abs().max(analytic.abs()).max(1e-6);
            assert!(
                (numeric - analytic).abs() / scale < FD_REL_TOL,
                "{name}[{i}]: analytic {analytic} vs numeric {numeric}"
            );
        }
    }
    for (name, w) in base.params() {
        assert!(grads.get(w).is_none(), "base weight {name} got a gradient");
    }
}

#[test]
fn llama_lora_adapters() {
    check_lora(
        r#"{"model_type":"llama","vocab_size":13,"hidden_size":8,"intermediate_size":12,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"tie_word_embeddings":false}"#,
    );
}

#[test]
fn gpt2_lora_adapters_transposed_weights_and_biases() {
    check_lora(
        r#"{"model_type":"gpt2","vocab_size":13,"n_embd":8,"n_layer":2,"n_head":2,"n_positions":16}"#,
    );
}

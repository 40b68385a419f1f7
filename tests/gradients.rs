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
fn gpt2_conv1d_layernorm_gelu() {
    check(
        r#"{"model_type":"gpt2","vocab_size":13,"n_embd":8,"n_layer":2,"n_head":2,"n_positions":16}"#,
    );
}

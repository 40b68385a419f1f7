//! Prefix sharing and packing are exact: every sequence's log-prob equals the one computed
//! in the plain padded layout, on every decoder family (rotary, learned positions, GQA,
//! sliding window), with pairs sharing prompts, prompts repeated across pairs, and
//! unrelated sequences packed into one row.

use candle_core::{DType, Device};
use leash::data::collate::collate;
use leash::data::encode::Sequence;
use leash::data::pack::{collate_packed, processed_tokens};
use leash::loss::logps::score;
use leash::model::weights::{RandomInit, Weights};
use leash::model::{Decoder, ModelConfig};
use leash::model_io::load_model;
use rand::{Rng, SeedableRng};

mod common;

/// Pairs with shared prompts of varied lengths; pairs 0 and 3 repeat one prompt (several
/// pairs per prompt, as in UltraFeedback), and an empty-prompt sequence is mixed in.
fn pairs(vocab: u32, seed: u64) -> Vec<Sequence> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut random = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.gen_range(1..vocab)).collect() };
    let prompts: Vec<Vec<u32>> = [5, 1, 9, 3, 12].iter().map(|&n| random(n)).collect();
    let (mut chosen, mut rejected) = (Vec::new(), Vec::new());
    for (i, len) in [(0, 4), (1, 7), (2, 2), (0, 6), (3, 1), (4, 8)] {
        for (out, extra) in [(&mut chosen, 0), (&mut rejected, 3)] {
            let prompt: &Vec<u32> = &prompts[i];
            let completion = random(len + extra);
            out.push(Sequence {
                ids: prompt.iter().chain(&completion).copied().collect(),
                loss_start: prompt.len(),
            });
        }
    }
    chosen.extend(rejected);
    chosen.push(Sequence {
        ids: random(6),
        loss_start: 0,
    });
    chosen
}

fn assert_packed_equals_padded(model: &Decoder, vocab: u32, tol: f32) {
    for seed in 0..3 {
        let seqs = pairs(vocab, seed);
        let refs: Vec<&Sequence> = seqs.iter().collect();
        let window = model.config.sliding_window;
        let padded = collate(&refs, 0, window, &[], &Device::Cpu).unwrap();
        let plain = score(model, &padded).unwrap();
        for share in [true, false] {
            let packed = collate_packed(&refs, 0, window, share, &Device::Cpu).unwrap();
            assert!(processed_tokens(&packed) < processed_tokens(&padded));
            assert_eq!(packed.n_tokens, padded.n_tokens);
            let got = score(model, &packed).unwrap();
            assert_eq!(got.seq_tokens, plain.seq_tokens);
            let a = plain
                .seq_logps
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let b = got
                .seq_logps
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert!(
                    (x - y).abs() <= tol * x.abs().max(1.0),
                    "seed {seed} share {share} seq {i}: padded {x} packed {y}"
                );
            }
        }
    }
}

#[test]
fn llama_fixture() {
    let (model, _) = load_model(&common::fixture("tiny-llama"), &Device::Cpu).unwrap();
    let vocab = model.config.vocab_size as u32;
    assert_packed_equals_padded(&model, vocab, 1e-5);
}

#[test]
fn qwen2_fixture() {
    let (model, _) = load_model(&common::fixture("tiny-qwen2"), &Device::Cpu).unwrap();
    let vocab = model.config.vocab_size as u32;
    assert_packed_equals_padded(&model, vocab, 1e-5);
}

#[test]
fn gpt2_fixture_learned_positions() {
    let (model, _) = load_model(&common::fixture("tiny-gpt2"), &Device::Cpu).unwrap();
    let vocab = model.config.vocab_size as u32;
    assert_packed_equals_padded(&model, vocab, 1e-5);
}

#[test]
fn mistral_sliding_window_in_f64() {
    let cfg = ModelConfig::from_json_str(
        r#"{"model_type":"mistral","vocab_size":50,"hidden_size":16,"intermediate_size":24,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"sliding_window":4}"#,
        std::path::Path::new("config.json"),
    )
    .unwrap();
    let init = RandomInit {
        seed: 3,
        std: 0.3,
        norm_jitter: 0.2,
        bias_std: 0.0,
        dtype: DType::F64,
    };
    let model = Decoder::from_weights(cfg, &Weights::random(init, &Device::Cpu)).unwrap();
    assert_packed_equals_padded(&model, 50, 1e-10);
}

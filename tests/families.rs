//! Architectures as real checkpoints vary them, strict loading, and PEFT interop.
//!
//! Fixtures and goldens: scripts/make_family_fixtures.py (transformers 5.24.0, peft 0.21.2):
//! tiny-gpt2-untied (own lm_head, n_inner 96), tiny-qwen3 (head_dim 24 ≠ 64/4, q/k norm),
//! tiny-llama3 (llama3 rope_scaling, attention/mlp biases), tiny-mistral (sliding_window 16,
//! shorter than the test sequences). Each holds golden_logps.json (transformers' log-probs),
//! golden_roundtrip.json (leash saved it, transformers loaded it: largest |Δ logp|), and
//! tiny-qwen3/peft-* / tiny-gpt2-untied/peft-all-linear adapters PEFT wrote with each
//! target_modules form, scored by PEFT; tiny-qwen3/leash-all-linear is an adapter leash wrote
//! with `--lora-target-modules all-linear`, scored by PEFT.

mod common;
use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Device;
use common::{copy_fixture, fixture};
use leash::model::lora::{load_adapter, TargetModules};
use leash::model::Decoder;
use serde_json::Value;

/// float32 summation-order noise over ≤ 128 tokens stays well under this (as logps_golden.rs).
const LOGP_TOL: f64 = 1e-4;

const FAMILIES: &[&str] = &[
    "tiny-gpt2-untied",
    "tiny-qwen3",
    "tiny-llama3",
    "tiny-mistral",
];

fn score(model: &Decoder, tok: &leash::data::tokenizer::TextTokenizer) -> Vec<Value> {
    let mut rows = Vec::new();
    leash::scoring::score_dataset(
        model,
        tok,
        &fixture("tiny-llama/pref_test.jsonl"),
        Some(128),
        |o| {
            rows.push(o);
            Ok(())
        },
    )
    .unwrap();
    rows
}

fn golden(path: &Path) -> Vec<Value> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["rows"].as_array().unwrap().clone()
}

/// Same token ids; summed log-probs within LOGP_TOL. Returns the largest difference.
fn compare(mine: &[Value], golden: &[Value], what: &str) -> f64 {
    assert_eq!(mine.len(), golden.len(), "{what}: row count");
    let mut worst = 0.0f64;
    for (m, g) in mine.iter().zip(golden) {
        for key in ["prompt_ids", "chosen_ids", "rejected_ids"] {
            assert_eq!(m[key], g[key], "{what} row {}: {key}", g["index"]);
        }
        for key in ["chosen_logp", "rejected_logp"] {
            let (a, b) = (m[key].as_f64().unwrap(), g[key].as_f64().unwrap());
            worst = worst.max((a - b).abs());
            assert!(
                (a - b).abs() <= LOGP_TOL,
                "{what} row {}: {key} {a} vs golden {b}",
                g["index"]
            );
        }
    }
    worst
}

#[test]
fn every_family_matches_transformers() {
    for name in FAMILIES {
        let (model, tok) = leash::model_io::load_model(&fixture(name), &Device::Cpu).unwrap();
        let d = compare(
            &score(&model, &tok),
            &golden(&fixture(&format!("{name}/golden_logps.json"))),
            name,
        );
        eprintln!("{name}: max |leash - transformers| = {d:e}");
    }
}

#[test]
fn untied_gpt2_scores_with_its_own_head() {
    let (model, _) =
        leash::model_io::load_model(&fixture("tiny-gpt2-untied"), &Device::Cpu).unwrap();
    assert!(model.params().iter().any(|(n, _)| n == "lm_head.weight"));
    let head = model.lm_head();
    let wte = &model.params()[0].1;
    let diff = (head - wte).unwrap().abs().unwrap().max_all().unwrap();
    assert!(
        diff.to_scalar::<f32>().unwrap() > 0.1,
        "head must not be the embedding"
    );
}

fn safetensors_shapes(path: &Path) -> BTreeMap<String, Vec<usize>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec()))
        .collect()
}

/// leash's saved checkpoint holds exactly the tensors transformers' own save_pretrained wrote
/// for the fixture (tied heads once, untied ones kept), and the same config.
#[test]
fn saved_checkpoints_have_transformers_tensors_and_config() {
    let mut names: Vec<&str> = FAMILIES.to_vec();
    names.extend(["tiny-gpt2", "tiny-llama", "tiny-qwen2"]);
    for name in names {
        let (model, _) = leash::model_io::load_model(&fixture(name), &Device::Cpu).unwrap();
        let (_, vars) = model.to_trainable().unwrap();
        let dir = tempfile::tempdir().unwrap();
        leash::model_io::save_model(dir.path(), &fixture(name), &vars).unwrap();
        assert_eq!(
            safetensors_shapes(&dir.path().join("model.safetensors")),
            safetensors_shapes(&fixture(&format!("{name}/model.safetensors"))),
            "{name}: saved tensor names/shapes"
        );
        let read = |p: &Path| -> Value {
            let mut v: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
            v.as_object_mut().unwrap().remove("dtype");
            v
        };
        assert_eq!(
            read(&dir.path().join("config.json")),
            read(&fixture(&format!("{name}/config.json"))),
            "{name}: config"
        );
    }
}

/// The dev script's record: after 2 leash DPO steps, transformers loaded leash's folder and
/// scored it as leash does (`make_family_fixtures.py --leash`; the tied GPT-2, Llama and Qwen2
/// fixtures with `--roundtrip-only`). Gemma 3 and Phi-3: tests/families_gemma_phi.rs.
#[test]
fn transformers_loaded_leash_checkpoints_with_identical_logps() {
    let mut names: Vec<&str> = FAMILIES.to_vec();
    names.extend(["tiny-gpt2", "tiny-llama", "tiny-qwen2"]);
    for name in names {
        let path = fixture(&format!("{name}/golden_roundtrip.json"));
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let d = v["max_abs_logp_diff_leash_vs_transformers"]
            .as_f64()
            .unwrap();
        assert!(d <= LOGP_TOL, "{name}: {d}");
        assert!(v["max_abs_logp_change_from_training"].as_f64().unwrap() > 1e-3);
        assert_eq!(v["tensor_names_and_shapes_equal_transformers_save"], true);
        assert_eq!(v["config_equal_except_dtype"], true);
    }
}

/// Adapters PEFT wrote with each target_modules form load in leash and score as PEFT does.
#[test]
fn peft_adapters_of_every_target_form_load() {
    for (base, form) in [
        ("tiny-qwen3", "peft-all-linear"),
        ("tiny-qwen3", "peft-regex"),
        ("tiny-qwen3", "peft-list"),
        ("tiny-gpt2-untied", "peft-all-linear"),
        ("tiny-qwen3", "leash-all-linear"),
    ] {
        let dir = fixture(&format!("{base}/{form}"));
        let (model, tok) = leash::model_io::load_model(&fixture(base), &Device::Cpu).unwrap();
        let (config, adapters) = load_adapter(&dir, model.linear_modules(), &Device::Cpu).unwrap();
        let with = model.with_adapters(&adapters).unwrap();
        let what = format!("{base}/{form}");
        let d = compare(
            &score(&with, &tok),
            &golden(&dir.join("golden_logps.json")),
            &what,
        );
        eprintln!(
            "{what} ({:?}): max |leash - PEFT| = {d:e}",
            config.target_modules
        );
        // The adapter changes the numbers (a test of loading, not of the base).
        let base_rows = golden(&fixture(&format!("{base}/golden_logps.json")));
        let moved = base_rows
            .iter()
            .zip(golden(&dir.join("golden_logps.json")))
            .map(|(a, b)| {
                (a["chosen_logp"].as_f64().unwrap() - b["chosen_logp"].as_f64().unwrap()).abs()
            })
            .fold(0.0, f64::max);
        assert!(
            moved > 1e-2,
            "{what}: adapter moved log-probs by only {moved}"
        );
    }
}

/// `all-linear` is saved as PEFT saves it: the module paths it expanded to.
#[test]
fn leash_all_linear_adapter_names_modules_as_peft_does() {
    let text = std::fs::read_to_string(fixture("tiny-qwen3/leash-all-linear/adapter_config.json"))
        .unwrap();
    let cfg: Value = serde_json::from_str(&text).unwrap();
    let mut saved: Vec<String> = cfg["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let peft_text =
        std::fs::read_to_string(fixture("tiny-qwen3/peft-all-linear/adapter_config.json")).unwrap();
    let peft: Value = serde_json::from_str(&peft_text).unwrap();
    let mut expected: Vec<String> = peft["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    saved.sort();
    expected.sort();
    assert_eq!(saved, expected);
    assert_eq!(expected.len(), 14);
    let _ = TargetModules::from_cli("all-linear");
}

fn load_err(dir: &Path) -> String {
    match leash::model_io::load_model(dir, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = dir.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn config_keys_that_change_the_math_are_refused_by_name() {
    for (key, value, expect) in [
        (
            "final_logit_softcapping",
            serde_json::json!(30.0),
            "final_logit_softcapping",
        ),
        ("attention_bias", serde_json::json!(true), "attention_bias"),
        ("use_mrope", serde_json::json!(true), "use_mrope"),
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
            "yarn",
        ),
        ("some_new_switch", serde_json::json!(1), "some_new_switch"),
    ] {
        let dir = copy_fixture("tiny-mistral");
        edit_config(dir.path(), |c| {
            c.insert(key.into(), value.clone());
        });
        let err = load_err(dir.path());
        assert!(
            err.contains(expect) && err.contains("hint:"),
            "{key}: {err}"
        );
    }
    // Qwen3 with a mix of sliding and full layers: refused, naming layer_types.
    let dir = copy_fixture("tiny-qwen3");
    edit_config(dir.path(), |c| {
        c.insert("use_sliding_window".into(), true.into());
        c.insert("sliding_window".into(), 8.into());
        c.insert(
            "layer_types".into(),
            serde_json::json!(["full_attention", "sliding_attention"]),
        );
    });
    let err = load_err(dir.path());
    assert!(err.contains("layer_types"), "{err}");
}

#[test]
fn tensors_the_config_does_not_describe_are_named() {
    // GPT-2 untied checkpoint declared tied: its own head differs from the embedding.
    let dir = copy_fixture("tiny-gpt2-untied");
    edit_config(dir.path(), |c| {
        c.insert("tie_word_embeddings".into(), true.into());
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("lm_head.weight") && err.contains("tie_word_embeddings"),
        "{err}"
    );
    // Llama with biases in the file but attention_bias false.
    let dir = copy_fixture("tiny-llama3");
    edit_config(dir.path(), |c| {
        c.insert("attention_bias".into(), false.into());
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("model.layers.0.self_attn.k_proj.bias") && err.contains("hint:"),
        "{err}"
    );
    // Qwen3 weights declared as Llama: the q/k norms are not used.
    let dir = copy_fixture("tiny-qwen3");
    edit_config(dir.path(), |c| {
        c.insert("model_type".into(), "llama".into());
        for key in [
            "use_sliding_window",
            "sliding_window",
            "max_window_layers",
            "layer_types",
        ] {
            c.remove(key);
        }
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("model.layers.0.self_attn.q_norm.weight"),
        "{err}"
    );
}

#[test]
fn tokenizer_larger_than_the_embedding_names_both_sizes() {
    let dir = copy_fixture("tiny-qwen3");
    edit_config(dir.path(), |c| {
        c.insert("vocab_size".into(), 300.into());
    });
    // Shrink the embedding to 300 rows so the weights agree with config.json.
    let path = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let e = tensors["model.embed_tokens.weight"]
        .narrow(0, 0, 300)
        .unwrap();
    tensors.insert("model.embed_tokens.weight".into(), e);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("512 token ids") && err.contains("300 rows"),
        "{err}"
    );
}

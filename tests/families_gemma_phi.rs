//! Gemma 3 text and Phi-3 against transformers: summed log-probs equal transformers' within
//! LOGP_TOL of tests/common/logps_check.rs (goldens by
//! scripts/make_family_fixtures_gemma_phi.py on tiny random checkpoints
//! whose configs exercise what the families vary: Gemma 3's head_dim ≠ hidden/heads, mixed
//! sliding/global layers with a window shorter than the sequences, per-type RoPE; Phi-3's
//! fused projections, partial rotary, LongRoPE, sliding window, untied head); KV-cache decoding
//! equals the full forward; every trainer runs; LoRA adapters use PEFT's module names and merge
//! exactly; a checkpoint leash saves holds the tensor names transformers loaded strictly, with
//! the log-probs transformers computed on it.

mod common;
use candle_core::{Device, Tensor};
use common::{fixture, leash, stderr};
use leash::model::cache::KvCache;
use leash::model::ops::causal_mask;
use leash::model::ForwardInput;
use leash::train::config::{resolve, Method, TrainArgs};
use serde_json::Value;
use std::path::Path;

/// float32 summation-order noise over ≤ 128 tokens stays well under this.
/// Cached and recomputed logits differ only by f32 summation order.
const CACHE_TOL: f32 = 1e-4;
const FAMILIES: [&str; 2] = ["tiny-gemma3", "tiny-phi3"];

fn run_logps(model: &Path) -> Vec<Value> {
    let out = leash(&[
        "logps",
        "--model",
        model.to_str().unwrap(),
        "--dataset",
        fixture("tiny-llama/pref_test.jsonl").to_str().unwrap(),
        "--max-length",
        "128",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn golden(path: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(path)).unwrap()).unwrap()
}

/// Row by row against a golden file's `rows` (tests/common/logps_check.rs).
fn compare(mine: &[Value], golden: &Value, what: &str) {
    common::logps_check::compare(mine, golden["rows"].as_array().unwrap(), what);
}

#[test]
fn gemma3_logps_match_transformers() {
    let mine = run_logps(&fixture("tiny-gemma3"));
    compare(&mine, &golden("tiny-gemma3/golden_logps.json"), "gemma3");
}

#[test]
fn phi3_logps_match_transformers() {
    let mine = run_logps(&fixture("tiny-phi3"));
    compare(&mine, &golden("tiny-phi3/golden_logps.json"), "phi3");
}

/// Prefills `prefill` tokens, then decodes one token at a time; each step's logits equal a
/// full forward over the whole prefix. Gemma 3 starts at 1 token so that decoding walks past
/// its 12-token window; Phi-3 prefills 9 (> original_max_position_embeddings 8) so that
/// LongRoPE picks its long factors for the cache and the full forward alike.
#[test]
fn cached_decoding_equals_full_forward() {
    let dev = Device::Cpu;
    for (name, prefill) in [("tiny-gemma3", 1), ("tiny-phi3", 9)] {
        let (model, tok) = leash::model_io::load_model(&fixture(name), &dev).unwrap();
        let ids = tok
            .encode(
                "Q: quick one, 13 - 1? Good question, the answer is twelve.",
                true,
            )
            .unwrap();
        assert!(
            ids.len() > 16,
            "{name}: prompt too short to cross the window"
        );
        let logits = |h: &Tensor, row: usize| -> Vec<f32> {
            let last = h.get(0).unwrap().get(row).unwrap().unsqueeze(0).unwrap();
            let l = last.matmul(&model.lm_head().t().unwrap()).unwrap();
            l.flatten_all().unwrap().to_vec1().unwrap()
        };
        let full = |n: usize| {
            let input = ForwardInput {
                ids: Tensor::new(&ids[..n], &dev).unwrap().unsqueeze(0).unwrap(),
                positions: (0..n as u32).collect(),
                mask: causal_mask(&[n], n, model.config.sliding_window, &dev).unwrap(),
            };
            logits(&model.forward_hidden(&input).unwrap(), n - 1)
        };
        let mut cache = KvCache::new();
        let mut step = |from: usize, to: usize| {
            let t = to - from;
            let mut mask = vec![0f32; t * to];
            for i in 0..t {
                for j in 0..to {
                    let q = from + i;
                    let hidden = j > q || model.config.sliding_window.is_some_and(|w| q - j >= w);
                    if hidden {
                        mask[i * to + j] = leash::model::ops::MASKED;
                    }
                }
            }
            let input = ForwardInput {
                ids: Tensor::new(&ids[from..to], &dev)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                positions: (from as u32..to as u32).collect(),
                mask: Tensor::from_vec(mask, (1, 1, t, to), &dev).unwrap(),
            };
            let h = model.forward_cached(&input, Some(&mut cache)).unwrap();
            logits(&h, t - 1)
        };
        let mut checked = 0;
        for n in prefill..=ids.len() {
            let cached = if n == prefill {
                step(0, n)
            } else {
                step(n - 1, n)
            };
            let recomputed = full(n);
            let diff = cached
                .iter()
                .zip(&recomputed)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < CACHE_TOL, "{name}: step {n} differs by {diff}");
            checked += 1;
        }
        assert!(checked > 8, "{name}: {checked} steps");
    }
}

fn train_args(model: &str, data: &str, out: &Path) -> TrainArgs {
    TrainArgs {
        model: Some(fixture(model)),
        dataset: Some(fixture(&format!("tiny-llama/{data}"))),
        output_dir: Some(out.to_path_buf()),
        max_steps: Some(2),
        learning_rate: Some(1e-3),
        max_length: Some(128),
        logging_steps: Some(1),
        per_device_train_batch_size: Some(4),
        ..Default::default()
    }
}

fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn tensor_names(file: &Path) -> Vec<String> {
    let mut names: Vec<String> = candle_core::safetensors::load(file, &Device::Cpu)
        .unwrap()
        .into_keys()
        .collect();
    names.sort();
    names
}

/// SFT, DPO, KTO and ORPO (full fine-tuning) run two steps with finite losses on both families
/// and save a checkpoint with exactly the checkpoint's own tensor names.
#[test]
fn every_preference_trainer_runs() {
    for name in FAMILIES {
        let source = tensor_names(&fixture(&format!("{name}/model.safetensors")));
        for (method, data) in [
            (Method::Sft, "sft_train.jsonl"),
            (Method::Dpo, "pref_train.jsonl"),
            (Method::Kto, "kto_train.jsonl"),
            (Method::Orpo, "pref_train.jsonl"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let cfg = resolve(method, &train_args(name, data, dir.path())).unwrap();
            leash::train::trainer::train(&cfg)
                .unwrap_or_else(|e| panic!("{name} {}: {e}", method.name()));
            let m = metrics(dir.path());
            assert_eq!(m.len(), 2, "{name} {}", method.name());
            for row in &m {
                let loss = row["loss"].as_f64().unwrap();
                assert!(loss.is_finite(), "{name} {}: loss {loss}", method.name());
            }
            let saved = tensor_names(&dir.path().join("model.safetensors"));
            assert_eq!(
                saved,
                source,
                "{name} {}: saved tensor names",
                method.name()
            );
        }
    }
}

#[test]
fn grpo_runs() {
    for name in FAMILIES {
        let dir = tempfile::tempdir().unwrap();
        let run = leash(&[
            "grpo",
            "--model",
            fixture(name).to_str().unwrap(),
            "--dataset",
            fixture("tiny-llama/pref_train.jsonl").to_str().unwrap(),
            "--output-dir",
            dir.path().to_str().unwrap(),
            "--logging-steps",
            "1",
            "--max-steps",
            "2",
            "--beta",
            "0.1",
            "--num-generations",
            "4",
            "--per-device-train-batch-size",
            "8",
            "--max-completion-length",
            "8",
            "--reward-funcs",
            "length",
        ]);
        assert!(run.status.success(), "{name}: {}", stderr(&run));
        let m = metrics(dir.path());
        assert_eq!(m.len(), 2, "{name}");
        assert!(m.iter().all(|r| r["loss"].as_f64().unwrap().is_finite()));
    }
}

/// LoRA on every linear module, named as PEFT names them; the merged checkpoint scores as
/// base + adapter does.
#[test]
fn lora_uses_peft_module_names_and_merges_exactly() {
    for (name, targets) in [
        ("tiny-phi3", "qkv_proj,gate_up_proj,o_proj,down_proj"),
        (
            "tiny-gemma3",
            "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut args = train_args(name, "pref_train.jsonl", dir.path());
        args.use_peft = Some(true);
        args.lora_r = Some(4);
        args.lora_alpha = Some(8.0);
        args.lora_dropout = Some(0.0);
        args.learning_rate = Some(1e-2);
        args.lora_target_modules = Some(targets.into());
        leash::train::trainer::train(&resolve(Method::Dpo, &args).unwrap()).unwrap();
        let keys = tensor_names(&dir.path().join("adapter_model.safetensors"));
        let layers = leash::model::ModelConfig::from_dir(&fixture(name))
            .unwrap()
            .num_hidden_layers;
        let n_targets = targets.split(',').count();
        assert_eq!(keys.len(), layers * n_targets * 2, "{name}: {keys:?}");
        for target in targets.split(',') {
            let attention = ["q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"];
            let block = if attention.contains(&target) {
                "self_attn"
            } else {
                "mlp"
            };
            for l in 0..layers {
                for which in ["A", "B"] {
                    let key = format!(
                        "base_model.model.model.layers.{l}.{block}.{target}.lora_{which}.weight"
                    );
                    assert!(keys.contains(&key), "{name}: no {key} in {keys:?}");
                }
            }
        }
        let merged = dir.path().join("merged");
        let out = leash(&[
            "merge",
            "--model",
            fixture(name).to_str().unwrap(),
            "--adapter",
            dir.path().to_str().unwrap(),
            "--output-dir",
            merged.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let merged_lp = run_logps(&merged);
        let base_lp = run_logps(&fixture(name));
        let (model, tok) = leash::model_io::load_model(&fixture(name), &Device::Cpu).unwrap();
        let (_, adapters) =
            leash::model_io::load_adapter(dir.path(), model.linear_modules(), &Device::Cpu)
                .unwrap();
        let with = model.with_adapters(&adapters).unwrap();
        let mut adapted = Vec::new();
        leash::scoring::score_dataset(
            &with,
            &tok,
            &fixture("tiny-llama/pref_test.jsonl"),
            Some(128),
            |o| {
                adapted.push(o);
                Ok(())
            },
        )
        .unwrap();
        let mut moved = 0f64;
        for ((m, a), b) in merged_lp.iter().zip(&adapted).zip(&base_lp) {
            let (m, a, b) = (
                m["chosen_logp"].as_f64().unwrap(),
                a["chosen_logp"].as_f64().unwrap(),
                b["chosen_logp"].as_f64().unwrap(),
            );
            assert!((m - a).abs() < 1e-4, "{name}: merged {m} vs adapter {a}");
            moved = moved.max((a - b).abs());
        }
        assert!(moved > 1e-3, "{name}: the adapter did not change the model");
    }
}

/// A copy of `name` with config.json edited by `edit` and `extra` tensors added to the weights.
fn altered(name: &str, edit: &dyn Fn(&mut Value), extra: &[&str]) -> tempfile::TempDir {
    let dir = common::copy_fixture(name);
    let cfg_path = dir.path().join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    if !extra.is_empty() {
        let file = dir.path().join("model.safetensors");
        let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
        for name in extra {
            let like = tensors["model.embed_tokens.weight"].clone();
            tensors.insert(name.to_string(), like);
        }
        candle_core::safetensors::save(&tensors, &file).unwrap();
    }
    dir
}

fn load_error(dir: &Path) -> String {
    match leash::model_io::load_model(dir, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unused_tensors_are_named() {
    for (name, stray) in [
        ("tiny-phi3", "model.layers.0.self_attn.q_proj.weight"),
        // (An lm_head.weight equal to the tied embedding is a redundant copy and loads; one
        // that differs is refused in tests/families.rs.)
        ("tiny-gemma3", "model.layers.1.self_attn.o_proj.bias"),
    ] {
        let dir = altered(name, &|_| {}, &[stray]);
        let err = load_error(dir.path());
        assert!(
            err.contains(stray) && err.contains("hint:"),
            "{name}: {err}"
        );
    }
}

#[test]
fn math_changing_keys_are_refused_by_name() {
    let cases: [(&str, &str, Value, &str); 5] = [
        (
            "tiny-gemma3",
            "final_logit_softcapping",
            30.0.into(),
            "final_logit_softcapping",
        ),
        (
            "tiny-gemma3",
            "attn_logit_softcapping",
            50.0.into(),
            "attn_logit_softcapping",
        ),
        (
            "tiny-gemma3",
            "use_bidirectional_attention",
            true.into(),
            "use_bidirectional_attention",
        ),
        (
            "tiny-gemma3",
            "hidden_activation",
            "relu".into(),
            "hidden_activation `relu`",
        ),
        (
            "tiny-phi3",
            "hidden_act",
            "gelu".into(),
            "hidden_act `gelu`",
        ),
    ];
    for (name, key, value, expect) in cases {
        let dir = altered(name, &|c: &mut Value| c[key] = value.clone(), &[]);
        let err = load_error(dir.path());
        assert!(
            err.contains(expect) && err.contains("hint:"),
            "{name} {key}: {err}"
        );
    }
    let dir = altered(
        "tiny-phi3",
        &|c: &mut Value| c["rope_parameters"]["rope_type"] = "dynamic".into(),
        &[],
    );
    let err = load_error(dir.path());
    assert!(err.contains("rope type `dynamic`"), "{err}");
}

/// A checkpoint leash saves after two DPO steps. At fixture time the same run's output was
/// loaded by transformers with no missing, unexpected or mismatched tensor and scored
/// (golden_saved.json, `scripts/make_family_fixtures_gemma_phi.py --check-saved`); the
/// checkpoint saved now holds exactly those tensor names and leash scores it as transformers
/// did.
#[test]
fn saved_checkpoints_load_in_transformers() {
    for name in FAMILIES {
        let dir = tempfile::tempdir().unwrap();
        let cfg = resolve(
            Method::Dpo,
            &train_args(name, "pref_train.jsonl", dir.path()),
        )
        .unwrap();
        leash::train::trainer::train(&cfg).unwrap();
        let gold = golden(&format!("{name}/golden_saved.json"));
        let names: Vec<String> = gold["tensor_names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            tensor_names(&dir.path().join("model.safetensors")),
            names,
            "{name}"
        );
        compare(&run_logps(dir.path()), &gold, &format!("{name} saved"));
    }
}

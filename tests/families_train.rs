//! Qwen3 and Mistral through every trainer (full and LoRA with PEFT's module names) and
//! KV-cache generation. Fixtures: scripts/make_family_fixtures.py. The numbers of each
//! family are checked against transformers in tests/families.rs; here each trainer must run,
//! move the weights, and save a folder leash (and, per golden_roundtrip.json, transformers)
//! loads. Mistral's sliding_window is 16, so generation past 16 tokens exercises the window
//! in the cached path.

mod common;
use candle_core::Device;
use common::{fixture, leash, stderr};
use leash::eval::generate::{generate, SamplingOptions};
use rand::SeedableRng;
use serde_json::Value;
use std::path::Path;

fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn logps(model: &Path) -> Vec<f64> {
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
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["chosen_logp"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn every_trainer_runs_on_qwen3_and_mistral() {
    for name in ["tiny-qwen3", "tiny-mistral"] {
        let model = fixture(name);
        let base = logps(&model);
        for (method, data, extra) in [
            ("sft", "sft_train.jsonl", vec![]),
            ("dpo", "pref_train.jsonl", vec![]),
            ("kto", "kto_train.jsonl", vec![]),
            ("orpo", "pref_train.jsonl", vec![]),
            (
                "grpo",
                "pref_train.jsonl",
                vec![
                    "--num-generations",
                    "4",
                    "--max-completion-length",
                    "20",
                    "--reward-funcs",
                    "length",
                ],
            ),
            (
                "dpo",
                "pref_train.jsonl",
                vec![
                    "--use-peft",
                    "--lora-target-modules",
                    "all-linear",
                    "--lora-r",
                    "4",
                ],
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("out");
            let mut args = vec![
                method,
                "--model",
                model.to_str().unwrap(),
                "--dataset",
                &*Box::leak(
                    fixture(&format!("tiny-llama/{data}"))
                        .display()
                        .to_string()
                        .into_boxed_str(),
                ),
                "--output-dir",
                out.to_str().unwrap(),
                "--max-steps",
                "2",
                "--per-device-train-batch-size",
                "4",
                "--learning-rate",
                "1e-3",
                "--logging-steps",
                "1",
            ];
            args.extend(extra.iter().copied());
            let lora = extra.contains(&"--use-peft");
            let what = format!("{name} {method}{}", if lora { " lora" } else { "" });
            let run = leash(&args);
            assert!(run.status.success(), "{what}: {}", stderr(&run));
            let m = metrics(&out);
            assert_eq!(m.len(), 2, "{what}");
            assert!(
                m.iter()
                    .all(|r| r["loss"].as_f64().is_some_and(f64::is_finite)),
                "{what}: {m:?}"
            );
            let trained = if lora {
                let merged = dir.path().join("merged");
                let run = leash(&[
                    "merge",
                    "--model",
                    model.to_str().unwrap(),
                    "--adapter",
                    out.to_str().unwrap(),
                    "--output-dir",
                    merged.to_str().unwrap(),
                ]);
                assert!(run.status.success(), "{what}: {}", stderr(&run));
                let cfg: Value = serde_json::from_str(
                    &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
                )
                .unwrap();
                // PEFT's module paths, e.g. model.layers.0.self_attn.q_proj.
                let targets = cfg["target_modules"].as_array().unwrap();
                assert!(
                    targets.iter().any(|t| t == "model.layers.1.mlp.down_proj"),
                    "{what}: {targets:?}"
                );
                logps(&merged)
            } else {
                logps(&out)
            };
            let moved = base
                .iter()
                .zip(&trained)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(moved > 1e-4, "{what}: weights did not move ({moved})");
        }
    }
}

#[test]
fn cached_generation_equals_recompute() {
    for name in [
        "tiny-qwen3",
        "tiny-mistral",
        "tiny-llama3",
        "tiny-gpt2-untied",
    ] {
        let (model, tok) = leash::model_io::load_model(&fixture(name), &Device::Cpu).unwrap();
        let prompt = tok.encode("Q: what is 9 * 15?", true).unwrap();
        let opt = SamplingOptions {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 24,
        };
        let run = |cache: bool| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(3);
            generate(&model, &prompt, 3, &opt, &[tok.eos_id], &mut rng, cache).unwrap()
        };
        let cached = run(true);
        assert_eq!(
            cached,
            run(false),
            "{name}: cached and recomputed sampling differ"
        );
        assert!(
            cached.iter().any(|r| r.len() > 16),
            "{name}: too short to pass the window"
        );
    }
}

/// TRL 1.16 DPOTrainer's 30-step trajectory on tiny-qwen3 (scripts/make_dpo_golden.py), with the
/// settings and tolerances of tests/train_golden.rs.
#[test]
fn qwen3_dpo_matches_trl() {
    dpo_matches_trl("tiny-qwen3");
}

/// The same on tiny-gemma3, whose sliding-window layers see a window (12) shorter than most
/// rows (scripts/make_family_fixtures_gemma_phi.py --dpo-trajectory; eager attention).
#[test]
fn gemma3_dpo_matches_trl() {
    dpo_matches_trl("tiny-gemma3");
}

fn dpo_matches_trl(name: &str) {
    use common::train_check::{compare_trajectory, golden_args};
    use leash::train::config::{resolve, Method};
    let dir = tempfile::tempdir().unwrap();
    let mut args = golden_args("pref_train.jsonl", dir.path());
    args.model = Some(fixture(name));
    leash::train::trainer::train(&resolve(Method::Dpo, &args).unwrap()).unwrap();
    let golden = fixture(name).join("golden_dpo.json");
    let worst = compare_trajectory(&metrics(dir.path()), &golden, &format!("{name} dpo"));
    eprintln!(
        "{name} dpo vs TRL: worst {:.0}% of the tolerance",
        worst * 100.0
    );
}

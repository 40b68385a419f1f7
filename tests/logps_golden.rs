//! `leash logps` against golden numbers from TRL/transformers (tests/fixtures/*/golden*):
//! identical token ids and summed completion log-probs within LOGP_TOL.
//!
//! Golden values: tiny-llama/golden/logps.json was computed by TRL 1.16.0 (see its
//! "versions"); the other fixtures by scripts/make_fixtures.py with transformers 5.24.0.

mod common;
use common::{fixture, leash};
use serde_json::Value;

/// float32 summation-order noise over ≤ 128 tokens stays well under this.
const LOGP_TOL: f64 = 1e-4;

fn run_logps(model: &str, data: &str) -> Vec<Value> {
    let out = leash(&[
        "logps",
        "--model",
        fixture(model).to_str().unwrap(),
        "--dataset",
        fixture(data).to_str().unwrap(),
        "--max-length",
        "128",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn compare(mine: &[Value], golden: &[Value], what: &str) {
    assert_eq!(mine.len(), golden.len(), "{what}: row count");
    for (m, g) in mine.iter().zip(golden) {
        for key in ["prompt_ids", "chosen_ids", "rejected_ids"] {
            assert_eq!(m[key], g[key], "{what} row {}: {key}", g["index"]);
        }
        for key in ["chosen_logp", "rejected_logp"] {
            let (a, b) = (m[key].as_f64().unwrap(), g[key].as_f64().unwrap());
            assert!(
                (a - b).abs() <= LOGP_TOL,
                "{what} row {}: {key} {a} vs golden {b}",
                g["index"]
            );
        }
    }
}

fn golden_rows(path: &str, key: &[&str]) -> Vec<Value> {
    let text = std::fs::read_to_string(fixture(path)).unwrap();
    let mut v: Value = serde_json::from_str(&text).unwrap();
    for k in key {
        v = v[*k].take();
    }
    v.as_array().unwrap().clone()
}

#[test]
fn llama_matches_trl_on_all_80_rows() {
    let train = golden_rows("tiny-llama/golden/logps.json", &["examples", "train"]);
    let test = golden_rows("tiny-llama/golden/logps.json", &["examples", "test"]);
    compare(
        &run_logps("tiny-llama", "tiny-llama/pref_train.jsonl"),
        &train,
        "llama train",
    );
    compare(
        &run_logps("tiny-llama", "tiny-llama/pref_test.jsonl"),
        &test,
        "llama test",
    );
}

#[test]
fn truncated_rows_score_only_kept_tokens() {
    let train = run_logps("tiny-llama", "tiny-llama/pref_train.jsonl");
    // Row 31: 74 prompt + 75 chosen tokens → 54 chosen tokens survive max_length 128.
    assert_eq!(train[31]["chosen_scored_tokens"], 54);
}

#[test]
fn qwen2_matches_transformers() {
    let golden = golden_rows("tiny-qwen2/golden_logps.json", &["rows"]);
    compare(
        &run_logps("tiny-qwen2", "tiny-llama/pref_test.jsonl"),
        &golden,
        "qwen2",
    );
}

#[test]
fn gpt2_matches_transformers() {
    let golden = golden_rows("tiny-gpt2/golden_logps.json", &["rows"]);
    compare(
        &run_logps("tiny-gpt2", "tiny-llama/pref_test.jsonl"),
        &golden,
        "gpt2",
    );
}

#[test]
fn bf16_checkpoint_matches_within_rounding() {
    // Exact against the bf16 weights upcast to f32...
    let golden = golden_rows("tiny-llama-bf16/golden_logps.json", &["rows"]);
    let bf16 = run_logps("tiny-llama-bf16", "tiny-llama/pref_test.jsonl");
    compare(&bf16, &golden, "bf16");
    // ...and within bf16 rounding of the f32 original (weights differ by ≤ 2⁻⁸ relative).
    let f32_rows = run_logps("tiny-llama", "tiny-llama/pref_test.jsonl");
    for (a, b) in bf16.iter().zip(&f32_rows) {
        let d = (a["chosen_logp"].as_f64().unwrap() - b["chosen_logp"].as_f64().unwrap()).abs();
        assert!(d < 0.05, "bf16 vs f32 differ by {d}");
    }
}

#[test]
fn sharded_checkpoint_gives_identical_logps() {
    let sharded = run_logps("tiny-llama-sharded", "tiny-llama/pref_test.jsonl");
    let single = run_logps("tiny-llama", "tiny-llama/pref_test.jsonl");
    assert_eq!(sharded, single);
}

//! `leash logps` against golden numbers from TRL/transformers (tests/fixtures/*/golden*):
//! identical token ids and summed completion log-probs within LOGP_TOL.
//!
//! Golden values: tiny-llama/golden/logps.json was computed by TRL 1.16.0 (see its
//! "versions"); the other fixtures by scripts/make_fixtures.py with transformers 5.24.0.

mod common;
use common::logps_check::{compare, golden_rows, run_logps};

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

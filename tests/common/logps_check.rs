//! `leash logps` run on fixtures and compared with golden rows (tests/logps_golden.rs on the CPU,
//! tests/gpu.rs on the GPU).

use super::{fixture, leash};
use serde_json::Value;

/// float32 summation-order noise over ≤ 128 tokens stays well under this.
pub const LOGP_TOL: f64 = 1e-4;

/// `leash logps` on a fixture model and data set (max length 128), one JSON value per row.
pub fn run_logps(model: &str, data: &str) -> Vec<Value> {
    run_logps_with(model, data, &[])
}

/// As [`run_logps`], with `extra` arguments (e.g. `--device cuda`).
pub fn run_logps_with(model: &str, data: &str, extra: &[&str]) -> Vec<Value> {
    let (model, data) = (fixture(model), fixture(data));
    let mut args = vec![
        "logps",
        "--model",
        model.to_str().unwrap(),
        "--dataset",
        data.to_str().unwrap(),
        "--max-length",
        "128",
    ];
    args.extend_from_slice(extra);
    let out = leash(&args);
    assert!(out.status.success(), "{}", super::stderr(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Same token ids and summed log-probs within [`LOGP_TOL`], row by row.
pub fn compare(mine: &[Value], golden: &[Value], what: &str) {
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

/// The array at `key` in a fixture's golden JSON file.
pub fn golden_rows(path: &str, key: &[&str]) -> Vec<Value> {
    let text = std::fs::read_to_string(fixture(path)).unwrap();
    let mut v: Value = serde_json::from_str(&text).unwrap();
    for k in key {
        v = v[*k].take();
    }
    v.as_array().unwrap().clone()
}

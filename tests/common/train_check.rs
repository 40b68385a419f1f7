//! A 30-step training run on the tiny-llama fixture compared with TRL 1.16.0's trajectory
//! (tests/train_golden.rs on the CPU, tests/gpu.rs on the GPU). Tolerances: see
//! tests/train_golden.rs.

use super::fixture;
use leash::device::DeviceChoice;
use leash::train::config::{resolve, Method, TrainArgs};
use serde_json::Value;

pub const STEP1_REL: f64 = 1e-5;
pub const TRAJ_REL_PER_STEP: f64 = 5e-5;
pub const REL_FLOOR: f64 = 1e-2;

pub fn golden_args(data: &str, out: &std::path::Path) -> TrainArgs {
    TrainArgs {
        model: Some(fixture("tiny-llama")),
        dataset: Some(fixture(&format!("tiny-llama/{data}"))),
        output_dir: Some(out.to_path_buf()),
        max_steps: Some(30),
        per_device_train_batch_size: Some(8),
        learning_rate: Some(5e-4),
        lr_scheduler_type: Some("constant".into()),
        max_grad_norm: Some(1.0),
        max_length: Some(128),
        beta: Some(0.1),
        shuffle: Some(false),
        logging_steps: Some(1),
        ..Default::default()
    }
}

pub fn read_metrics(out: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Trains 30 steps on the tiny-llama fixture (on `device`, the default when `None`) and
/// compares every logged metric with TRL's trajectory in `golden/{golden}.json`.
pub fn check_against_golden(
    method: Method,
    data: &str,
    golden: &str,
    loss_type: Option<&str>,
    device: Option<DeviceChoice>,
) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = golden_args(data, dir.path());
    args.loss_type = loss_type.map(str::to_string);
    args.device = device;
    if method == Method::Sft {
        // SFT has no β (neither has TRL's SFTConfig); passing it is refused.
        args.beta = None;
    }
    leash::train::trainer::train(&resolve(method, &args).unwrap()).unwrap();
    let golden_file = fixture(&format!("tiny-llama/golden/{golden}.json"));
    compare_trajectory(&read_metrics(dir.path()), &golden_file, golden);
}

/// Every logged metric of `mine` against TRL's trajectory in `golden_file`, step by step,
/// within the tolerances above; returns the worst error as a fraction of its tolerance.
pub fn compare_trajectory(mine: &[Value], golden_file: &std::path::Path, what: &str) -> f64 {
    let text = std::fs::read_to_string(golden_file).unwrap();
    let gold: Value = serde_json::from_str(&text).unwrap();
    let steps = gold["steps"].as_array().unwrap();
    assert_eq!(mine.len(), steps.len());
    let mut worst = 0.0f64;
    for (m, g) in mine.iter().zip(steps) {
        let step = g["step"].as_u64().unwrap() as f64;
        assert_eq!(m["step"].as_u64(), g["step"].as_u64());
        let rel = if step == 1.0 {
            STEP1_REL
        } else {
            TRAJ_REL_PER_STEP * step
        };
        for (key, gv) in g.as_object().unwrap() {
            if [
                "step",
                "batch_rows",
                "step_time_s",
                "step_cpu_s",
                "interval_s",
            ]
            .contains(&key.as_str())
            {
                continue;
            }
            let gv = gv.as_f64().unwrap();
            let mv = m[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{what}: step {step} lacks `{key}`"));
            let tol = rel * gv.abs().max(REL_FLOOR);
            worst = worst.max((mv - gv).abs() / tol);
            assert!(
                (mv - gv).abs() <= tol,
                "{what} step {step} {key}: {mv} vs TRL {gv} (tol {tol:e})"
            );
        }
    }
    worst
}

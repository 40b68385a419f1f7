//! Training mechanics: parameters move (and the reference does not), accumulation equals a
//! bigger batch, resume continues the same trajectory, checkpoints reload with the same
//! log-probs, the reference cache matches the live reference, bad setups fail early, and the
//! last log line reports the peak RSS.

mod common;
use common::{fixture, leash};
use leash::data::tokenizer::TextTokenizer;
use leash::train::config::{resolve, Method, TrainArgs, TrainConfig};
use leash::train::examples::prepare;
use leash::train::optimizer::{AdamW, AdamWSettings};
use leash::train::step::{micro_batch, Reference, StepContext};
use serde_json::Value;
use std::path::Path;

fn args(out: &Path, steps: usize) -> TrainArgs {
    TrainArgs {
        model: Some(fixture("tiny-llama")),
        dataset: Some(fixture("tiny-llama/pref_train.jsonl")),
        output_dir: Some(out.to_path_buf()),
        max_steps: Some(steps as i64),
        learning_rate: Some(5e-4),
        max_length: Some(128),
        logging_steps: Some(1),
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

fn close(a: &Value, b: &Value, key: &str, tol: f64) {
    let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
    assert!((x - y).abs() <= tol * y.abs().max(1.0), "{key}: {x} vs {y}");
}

/// One DPO step by hand: every trainable tensor changes, the frozen reference's bytes do not.
#[test]
fn every_parameter_moves_and_reference_stays() {
    let dir = tempfile::tempdir().unwrap();
    let cfg: TrainConfig = resolve(Method::Dpo, &args(dir.path(), 1)).unwrap();
    let device = candle_core::Device::Cpu;
    let (base, tok): (_, TextTokenizer) = leash::model_io::load_model(&cfg.model, &device).unwrap();
    let data = prepare(Method::Dpo, &cfg.dataset, &tok, 128, 8).unwrap();
    let (policy, vars) = base.to_trainable().unwrap();
    let before_ref: Vec<Vec<f32>> = base
        .params()
        .iter()
        .map(|(_, t)| t.flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    let before: Vec<Vec<f32>> = vars
        .iter()
        .map(|(_, v)| v.flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    let ctx = StepContext {
        cfg: &cfg,
        policy: &policy,
        policy_frozen: &policy,
        reference: Reference::Model(&base),
        pad_id: tok.pad_id,
        device: &device,
    };
    let examples: Vec<_> = (0..8).map(|i| (i, &data.examples[i].1)).collect();
    let out = micro_batch(&ctx, &examples, 1.0, 0.0).unwrap();
    let store = out.loss.backward().unwrap();
    let grads: Vec<_> = vars
        .iter()
        .map(|(n, v)| {
            store
                .get(v)
                .unwrap_or_else(|| panic!("{n}: no grad"))
                .clone()
        })
        .collect();
    let mut opt = AdamW::new(
        &vars,
        AdamWSettings {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    );
    opt.step(&vars, &grads, 5e-4).unwrap();
    for ((name, v), b) in vars.iter().zip(&before) {
        let after: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            after.iter().zip(b).any(|(x, y)| x != y),
            "{name} did not change"
        );
    }
    for ((name, t), b) in base.params().iter().zip(&before_ref) {
        let now: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(&now, b, "reference {name} changed");
    }
}

#[test]
fn accumulating_4x2_equals_8x1() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut one = args(a.path(), 3);
    one.per_device_train_batch_size = Some(8);
    let mut two = args(b.path(), 3);
    two.per_device_train_batch_size = Some(4);
    two.gradient_accumulation_steps = Some(2);
    leash::train::trainer::train(&resolve(Method::Dpo, &one).unwrap()).unwrap();
    leash::train::trainer::train(&resolve(Method::Dpo, &two).unwrap()).unwrap();
    for (x, y) in metrics(a.path()).iter().zip(&metrics(b.path())) {
        for key in [
            "loss",
            "grad_norm",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
            "num_tokens",
        ] {
            close(y, x, key, 1e-4);
        }
    }
}

#[test]
fn resume_continues_the_same_trajectory() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut full = args(a.path(), 6);
    full.save_steps = Some(3);
    full.per_device_train_batch_size = Some(4);
    leash::train::trainer::train(&resolve(Method::Dpo, &full).unwrap()).unwrap();
    let mut resumed = full.clone();
    resumed.output_dir = Some(b.path().to_path_buf());
    resumed.resume_from_checkpoint = Some(a.path().join("checkpoint-3"));
    leash::train::trainer::train(&resolve(Method::Dpo, &resumed).unwrap()).unwrap();
    let wa = std::fs::read(a.path().join("checkpoint-6/model.safetensors")).unwrap();
    let wb = std::fs::read(b.path().join("checkpoint-6/model.safetensors")).unwrap();
    assert!(wa == wb, "resumed run ended with different weights");
    let (ma, mb) = (metrics(a.path()), metrics(b.path()));
    assert_eq!(ma[5]["loss"], mb[2]["loss"]);
}

#[test]
fn checkpoint_reloads_with_identical_logps() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = args(dir.path(), 2);
    a.eval_dataset = Some(fixture("tiny-llama/pref_test.jsonl"));
    leash::train::trainer::train(&resolve(Method::Dpo, &a).unwrap()).unwrap();
    let eval = metrics(dir.path())
        .into_iter()
        .find(|m| m.get("eval_loss").is_some())
        .unwrap();
    for model in ["checkpoint-2", "."] {
        let out = leash(&[
            "logps",
            "--model",
            dir.path().join(model).to_str().unwrap(),
            "--dataset",
            fixture("tiny-llama/pref_test.jsonl").to_str().unwrap(),
            "--max-length",
            "128",
        ]);
        assert!(out.status.success(), "{}", common::stderr(&out));
        let rows: Vec<Value> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let mean = rows
            .iter()
            .map(|r| r["chosen_logp"].as_f64().unwrap())
            .sum::<f64>()
            / rows.len() as f64;
        let logged = eval["eval_logps/chosen"].as_f64().unwrap();
        assert!(
            (mean - logged).abs() < 1e-4,
            "{model}: reloaded {mean} vs in-memory {logged}"
        );
    }
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("checkpoint-2/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["model_type"], "llama");
    assert!(dir.path().join("checkpoint-2/tokenizer.json").exists());
}

#[test]
fn precomputed_reference_matches_live_reference() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    leash::train::trainer::train(&resolve(Method::Dpo, &args(a.path(), 3)).unwrap()).unwrap();
    let mut cached = args(b.path(), 3);
    cached.precompute_ref_log_probs = Some(true);
    leash::train::trainer::train(&resolve(Method::Dpo, &cached).unwrap()).unwrap();
    assert!(b.path().join("ref_logps_train.json").exists());
    for (x, y) in metrics(a.path()).iter().zip(&metrics(b.path())) {
        for key in ["loss", "rewards/chosen", "rewards/margins"] {
            close(y, x, key, 1e-4);
        }
    }
}

#[test]
fn output_dir_holding_a_run_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    leash::train::trainer::train(
        &resolve(
            Method::Sft,
            &TrainArgs {
                dataset: Some(fixture("tiny-llama/sft_train.jsonl")),
                ..args(dir.path(), 1)
            },
        )
        .unwrap(),
    )
    .unwrap();
    let err = leash::train::trainer::train(
        &resolve(
            Method::Sft,
            &TrainArgs {
                dataset: Some(fixture("tiny-llama/sft_train.jsonl")),
                ..args(dir.path(), 1)
            },
        )
        .unwrap(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("already holds a run") && err.contains("--overwrite-output-dir"),
        "{err}"
    );
}

#[test]
fn eval_set_in_the_wrong_format_is_refused_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = args(dir.path(), 1);
    a.eval_dataset = Some(fixture("tiny-llama/sft_train.jsonl"));
    let err = leash::train::trainer::train(&resolve(Method::Dpo, &a).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("sft_train.jsonl:1:") && err.contains("cannot train `dpo`"),
        "{err}"
    );
    assert!(!dir.path().join("metrics.jsonl").exists());
}

fn vm_hwm_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    kib / 1024.0
}

/// The last log line carries the run's peak RSS (and only the last): between the kernel's
/// high-water mark (VmHWM, read here) before and after the run.
#[test]
fn last_log_line_reports_peak_rss() {
    let dir = tempfile::tempdir().unwrap();
    let before = vm_hwm_mib();
    leash::train::trainer::train(&resolve(Method::Dpo, &args(dir.path(), 2)).unwrap()).unwrap();
    let after = vm_hwm_mib();
    let lines = metrics(dir.path());
    assert!(lines[0].get("peak_rss_mib").is_none());
    let peak = lines[1]["peak_rss_mib"].as_f64().unwrap();
    assert!(
        before - 1.0 <= peak && peak <= after + 1.0,
        "{before} <= {peak} <= {after}"
    );
}

//! GRPO: group advantages are zero-mean, equal rewards give no gradient, the KL to the
//! reference is exactly 0 at the first step, a reward command that fails stops the run with
//! a checkpoint, and on a toy verifiable reward the mean reward rises over a short seeded run.

mod common;
use candle_core::Device;
use common::{fixture, leash, stderr};
use leash::data::collate::collate;
use leash::data::encode::Sequence;
use leash::loss::grpo::{
    advantages, grpo_loss, GrpoInputs, GrpoLossType, GrpoOptions, ScaleRewards,
};
use leash::loss::logps::score;
use serde_json::Value;
use std::path::Path;

fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn group_advantages_are_zero_mean_per_group() {
    // A deterministic spread of rewards, 5 groups of 6.
    let rewards: Vec<f64> = (0..30)
        .map(|i| ((i * 37) % 11) as f64 * 0.3 - 1.0)
        .collect();
    for scale in [ScaleRewards::Group, ScaleRewards::Batch, ScaleRewards::None] {
        let (adv, _) = advantages(&rewards, 6, scale);
        for g in adv.chunks(6) {
            assert!(g.iter().sum::<f64>().abs() < 1e-9, "{scale:?}: {g:?}");
        }
    }
}

/// On the real model: when every completion of a group has the same reward, no parameter
/// gets a gradient, whatever the aggregation.
#[test]
fn equal_rewards_give_zero_gradient_on_the_model() {
    let (base, tok) = leash::model_io::load_model(&fixture("tiny-llama"), &Device::Cpu).unwrap();
    let (policy, vars) = base.to_trainable().unwrap();
    let prompt = tok.encode("Q: what is 4 + 1?", true).unwrap();
    let seqs: Vec<Sequence> = [" 5.", " Good question! 4 + 1 equals 5.", " 4"]
        .iter()
        .map(|c| Sequence {
            ids: prompt
                .iter()
                .chain(&tok.encode(c, false).unwrap())
                .copied()
                .collect(),
            loss_start: prompt.len(),
        })
        .collect();
    let refs: Vec<&Sequence> = seqs.iter().collect();
    let batch = collate(&refs, tok.pad_id, None, &[], &Device::Cpu).unwrap();
    let (adv, _) = advantages(&[2.0, 2.0, 2.0], 3, ScaleRewards::Group);
    let mask: Vec<f32> = batch
        .in_completion
        .iter()
        .map(|&c| c as u8 as f32)
        .collect();
    for loss_type in [GrpoLossType::Grpo, GrpoLossType::Dapo, GrpoLossType::DrGrpo] {
        let scored = score(&policy, &batch).unwrap();
        let out = grpo_loss(
            &GrpoInputs {
                logps: &scored.token_logps,
                old_logps: None,
                ref_logps: None,
                advantages: &adv,
                seq_of: &batch.seq_of,
                mask: &mask,
            },
            &GrpoOptions {
                beta: 0.0,
                epsilon: 0.2,
                epsilon_high: 0.2,
                loss_type,
                max_completion_length: 16,
            },
        )
        .unwrap();
        let grads = out.loss.backward().unwrap();
        for (name, v) in &vars {
            if let Some(g) = grads.get(v) {
                let max = g
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert_eq!(max, 0.0, "{loss_type:?}: {name} has gradient {max}");
            }
        }
    }
}

fn grpo_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "grpo",
        "--model",
        fixture_str("tiny-llama"),
        "--dataset",
        fixture_str("tiny-llama/pref_train.jsonl"),
        "--output-dir",
        out,
        "--logging-steps",
        "1",
    ];
    a.extend_from_slice(extra);
    a
}

fn fixture_str(name: &str) -> &'static str {
    Box::leak(fixture(name).display().to_string().into_boxed_str())
}

#[test]
fn kl_is_zero_at_the_first_step_and_metrics_use_trl_names() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().display().to_string();
    let run = leash(&grpo_args(
        &out,
        &[
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
            "length,polite",
            "--reward-weights",
            "1.0,0.5",
            "--learning-rate",
            "1e-3",
        ],
    ));
    assert!(run.status.success(), "{}", stderr(&run));
    let m = metrics(dir.path());
    assert_eq!(m.len(), 2);
    let kl0 = m[0]["kl"].as_f64().unwrap();
    assert!(
        kl0.abs() < 1e-6,
        "KL at step 1 must be 0 (policy = reference), got {kl0}"
    );
    assert!(
        m[1]["kl"].as_f64().unwrap() > 0.0,
        "one update moves the policy off the reference"
    );
    for key in [
        "reward",
        "reward_std",
        "rewards/length/mean",
        "rewards/length/std",
        "rewards/polite/mean",
        "completions/mean_length",
        "completions/clipped_ratio",
        "frac_reward_zero_std",
        "entropy",
        "clip_ratio/region_mean",
        "loss",
        "grad_norm",
        "learning_rate",
        "num_tokens",
        "time/sampling_s",
        "time/training_s",
    ] {
        assert!(m[0].get(key).is_some(), "missing {key}: {}", m[0]);
    }
    assert!(
        dir.path().join("checkpoint-2").exists() && dir.path().join("model.safetensors").exists()
    );
}

#[test]
fn failing_reward_command_stops_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().display().to_string();
    let run = leash(&grpo_args(
        &out,
        &[
            "--max-steps",
            "2",
            "--num-generations",
            "2",
            "--per-device-train-batch-size",
            "2",
            "--max-completion-length",
            "4",
            "--reward-cmd",
            "head -n 1 | sed 's/.*/1/'",
        ],
    ));
    assert!(!run.status.success());
    let err = stderr(&run);
    assert!(
        err.contains("reward command `head -n 1") && err.contains("printed 1 lines for 2 rows"),
        "{err}"
    );
    assert!(
        err.contains("--resume-from-checkpoint") && err.contains("hint:"),
        "{err}"
    );
    assert!(
        dir.path().join("checkpoint-0/trainer_state.json").exists(),
        "{err}"
    );
    let single = leash(&grpo_args(
        &out,
        &["--num-generations", "1", "--reward-funcs", "length"],
    ));
    assert!(stderr(&single).contains("num_generations must be ≥ 2"));
}

/// The fixture model is close to uniform; the built-in `length` reward (−words/10) is learnt
/// quickly by stopping early or gluing words. Seeded; the margin is about half the observed rise
/// (−0.36 → −0.16 between the first and last five steps).
#[test]
fn mean_reward_rises_on_a_toy_verifiable_task() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().display().to_string();
    let run = leash(&grpo_args(
        &out,
        &[
            "--max-steps",
            "20",
            "--reward-funcs",
            "length",
            "--num-generations",
            "8",
            "--per-device-train-batch-size",
            "16",
            "--max-completion-length",
            "8",
            "--learning-rate",
            "1e-2",
            "--lr-scheduler-type",
            "constant",
        ],
    ));
    assert!(run.status.success(), "{}", stderr(&run));
    let r: Vec<f64> = metrics(dir.path())
        .iter()
        .map(|m| m["reward"].as_f64().unwrap())
        .collect();
    let (first, last) = (
        r[..5].iter().sum::<f64>() / 5.0,
        r[15..].iter().sum::<f64>() / 5.0,
    );
    assert!(
        last > first + 0.1,
        "reward did not rise: first 5 steps {first:.3}, last 5 {last:.3}: {r:?}"
    );
}

#[test]
fn a_logging_window_logs_the_mean_loss_and_the_last_steps_grad_norm() {
    // As transformers' Trainer logs (and TRL's GRPOTrainer with it): `loss` averaged over the
    // steps since the last log, `grad_norm` of the logging step itself. The same seeded run
    // logged every step gives each step's values.
    let run = |logging: &str| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().display().to_string();
        let mut extra = vec!["--max-steps", "2", "--reward-funcs", "length"];
        extra.extend(["--num-generations", "4", "--max-completion-length", "8"]);
        extra.extend([
            "--per-device-train-batch-size",
            "8",
            "--learning-rate",
            "1e-3",
        ]);
        let mut args = grpo_args(&out, &extra);
        let at = args.iter().position(|a| *a == "--logging-steps").unwrap();
        args[at + 1] = logging;
        let result = leash(&args);
        assert!(result.status.success(), "{}", stderr(&result));
        metrics(dir.path())
    };
    let every = run("1");
    let window = run("2");
    assert_eq!((every.len(), window.len()), (2, 1));
    let f = |m: &Value, k: &str| m[k].as_f64().unwrap();
    let mean_loss = (f(&every[0], "loss") + f(&every[1], "loss")) / 2.0;
    assert!((f(&window[0], "loss") - mean_loss).abs() <= 1e-9 * mean_loss.abs().max(1.0));
    assert_eq!(f(&window[0], "grad_norm"), f(&every[1], "grad_norm"));
    assert_ne!(f(&every[0], "grad_norm"), f(&every[1], "grad_norm"));
}

//! Mixed precision (`--bf16`, src/kernels/autocast.rs): the linear layers', adapters' and
//! lm_head's products in bf16, everything else in f32. Checked on the CPU against the f32 path
//! as issue 13 asks of the GPU: per-token log-probs within 0.05 nats of f32 on every family, a
//! 30-step DPO run's losses within 5 % of f32's; frozen weights still get no gradient, master
//! weights stay f32, gradient checkpointing stays exact, and the run records what it used.

mod common;
use candle_core::{DType, Device, Tensor};
use common::train_check::{golden_args, read_metrics};
use common::{fixture, leash, stderr};
use leash::data::collate::{collate, Collated};
use leash::data::encode::Sequence;
use leash::kernels::autocast::autocast;
use leash::loss::logps::score;
use leash::model::checkpoint;
use leash::model::Decoder;
use leash::train::config::{resolve, Method};

const FAMILIES: [&str; 7] = [
    "tiny-llama",
    "tiny-qwen2",
    "tiny-qwen3",
    "tiny-gpt2",
    "tiny-gpt2-untied",
    "tiny-gemma3",
    "tiny-phi3",
];

fn batch() -> Collated {
    let seqs = [
        Sequence {
            ids: vec![1, 40, 41, 42, 43, 44, 45, 46, 2],
            loss_start: 3,
        },
        Sequence {
            ids: vec![1, 9, 8, 7, 6, 5, 4, 3, 30, 31, 32, 33, 34, 35, 2],
            loss_start: 6,
        },
    ];
    let refs: Vec<&Sequence> = seqs.iter().collect();
    collate(&refs, 0, None, &[], &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().to_vec1().unwrap()
}

#[test]
fn per_token_log_probs_are_within_0_05_nats_of_f32_on_every_family() {
    for family in FAMILIES {
        let model = Decoder::load(&fixture(family), &Device::Cpu).unwrap();
        let f32_logps = score(&model, &batch()).unwrap().token_logps;
        let bf16_logps = {
            let _bf16 = autocast(Some(DType::BF16));
            score(&model, &batch()).unwrap().token_logps
        };
        // The log-probs themselves come back in f32 (the log-softmax runs in f32).
        assert_eq!(bf16_logps.dtype(), DType::F32, "{family}");
        let (a, b) = (values(&f32_logps), values(&bf16_logps));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        println!("{family}: max |bf16 − f32| = {worst} nats");
        assert!(worst < 0.05, "{family}: max |bf16 − f32| = {worst} nats");
        // bf16 products round: a path that silently stayed in f32 would match exactly.
        assert!(worst > 0.0, "{family}: bf16 changed nothing");
    }
}

#[test]
fn frozen_weights_get_no_gradient_and_trainable_ones_an_f32_one() {
    let base = Decoder::load(&fixture("tiny-llama"), &Device::Cpu).unwrap();
    let (model, vars) = common::lora::all_linear_lora(&base, 0.0);
    let _bf16 = autocast(Some(DType::BF16));
    let lp = score(&model, &batch())
        .unwrap()
        .seq_logps
        .sum_all()
        .unwrap();
    let store = checkpoint::backward(&lp).unwrap();
    for (name, w) in base.params() {
        assert!(store.get(w).is_none(), "base weight {name} got a gradient");
    }
    for (name, v) in &vars {
        let g = store
            .get(v)
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        assert_eq!(g.dtype(), DType::F32, "{name}: gradient dtype");
        assert_eq!(v.dtype(), DType::F32, "{name}: master weight dtype");
        let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{name}: gradient norm² {norm}"
        );
    }
}

#[test]
fn gradient_checkpointing_under_bf16_gives_the_same_gradients() {
    let base = Decoder::load(&fixture("tiny-qwen2"), &Device::Cpu).unwrap();
    let (mut model, vars) = base.to_trainable().unwrap();
    let _bf16 = autocast(Some(DType::BF16));
    let grads = |m: &Decoder| {
        let lp = score(m, &batch()).unwrap().seq_logps.sum_all().unwrap();
        let store = checkpoint::backward(&lp).unwrap();
        vars.iter()
            .map(|(n, v)| {
                (
                    n.clone(),
                    values(&store.get(v).unwrap().flatten_all().unwrap()),
                )
            })
            .collect::<Vec<_>>()
    };
    let off = grads(&model);
    model.set_gradient_checkpointing(true);
    let on = grads(&model);
    assert_eq!(checkpoint::last_backward_reruns(), 2, "layers rerun");
    for ((name, a), (_, b)) in off.iter().zip(&on) {
        // The rerun repeats the same bf16 products: equal up to f32 summation order.
        let scale = a.iter().map(|x| x.abs()).fold(0f32, f32::max).max(1e-3);
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff <= 1e-5 * scale, "{name}: {diff} (scale {scale})");
    }
}

/// Mean of `key` over logged steps.
fn mean_of(m: &[serde_json::Value], key: &str) -> f64 {
    m.iter().map(|r| r[key].as_f64().unwrap()).sum::<f64>() / m.len() as f64
}

#[test]
fn thirty_dpo_steps_in_bf16_stay_within_5_percent_of_f32() {
    let run = |bf16: Option<bool>| {
        let dir = tempfile::tempdir().unwrap();
        let mut args = golden_args("pref_train.jsonl", dir.path());
        args.bf16 = bf16;
        leash::train::trainer::train(&resolve(Method::Dpo, &args).unwrap()).unwrap();
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("leash_config.json")).unwrap(),
        )
        .unwrap();
        (read_metrics(dir.path()), config["bf16"].clone())
    };
    let (f32_run, f32_recorded) = run(None);
    let (bf16_run, bf16_recorded) = run(Some(true));
    // The default on the CPU is f32, and each run records what it used.
    assert_eq!(f32_recorded, false);
    assert_eq!(bf16_recorded, true);
    assert_eq!((f32_run.len(), bf16_run.len()), (30, 30));
    for (a, b) in f32_run.iter().zip(&bf16_run) {
        let (la, lb) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!(
            (la - lb).abs() <= 0.05 * la.abs(),
            "step {}: loss f32 {la} vs bf16 {lb}",
            a["step"]
        );
    }
    let (ma, mb) = (mean_of(&f32_run, "loss"), mean_of(&bf16_run, "loss"));
    assert!(
        (ma - mb).abs() <= 0.05 * ma,
        "mean loss f32 {ma} vs bf16 {mb}"
    );
    // DPO learned in both (the loss fell well below ln 2), and bf16 did round.
    let last = |m: &[serde_json::Value]| m[29]["loss"].as_f64().unwrap();
    assert!(last(&f32_run) < 0.5 && last(&bf16_run) < 0.5);
    assert_ne!(f32_run, bf16_run, "bf16 changed nothing");
}

#[test]
fn the_cli_takes_bf16_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let sft = |extra: &[&str]| {
        let (model, data) = (fixture("tiny-llama"), fixture("tiny-llama/sft_train.jsonl"));
        let mut args = vec!["sft", "--model", model.to_str().unwrap()];
        args.extend(["--dataset", data.to_str().unwrap()]);
        args.extend(["--output-dir", out.to_str().unwrap()]);
        args.extend(extra);
        let run = leash(&args);
        let err = stderr(&run);
        assert!(run.status.success(), "{err}");
        err
    };
    let err = sft(&["--max-steps", "1", "--bf16"]);
    assert!(err.contains("mixed precision: bf16"), "{err}");
    // The checkpoint holds the f32 master weights, not a bf16 rounding of them.
    let saved = std::fs::read(out.join("model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&saved).unwrap();
    for (name, view) in tensors.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
    }
    // Resuming it without --bf16 (f32 on the CPU) continues, with a warning naming both.
    let checkpoint = out.join("checkpoint-1");
    let err = sft(&[
        "--max-steps",
        "2",
        "--resume-from-checkpoint",
        checkpoint.to_str().unwrap(),
    ]);
    assert!(
        err.contains("trained in bf16 mixed precision, this run continues in f32"),
        "{err}"
    );
}

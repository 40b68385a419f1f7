//! GPU checks (issue 13): the CPU's goldens and parity on an NVIDIA GPU. scripts/gpu-check.sh
//! runs this file's test binary, built with `--features cuda` by
//! scripts/build-gpu-artifacts.sh, on a GPU machine (`LEASH_BIN` and `LEASH_REPO` point it at
//! the carried binary and the repository) with `--include-ignored`. Each test is `#[ignore]`d
//! with the reason, so `cargo test` on a machine without a GPU compiles them and lists them as
//! ignored instead of passing them; run where there is no usable GPU, they fail saying why.

mod common;
use common::logps_check::{compare, golden_rows, run_logps_with};
use common::train_check::{check_against_golden, golden_args, read_metrics};
use leash::device::DeviceChoice;
use leash::train::config::{resolve, Method};

/// Fails the test, saying why, when CUDA device 0 cannot be opened.
fn require_gpu() {
    if let Err(e) = candle_core::Device::new_cuda(0) {
        panic!("this test needs a CUDA GPU and a binary built with --features cuda: {e}");
    }
}

/// Per-row log-probs on the GPU in f32 equal the CPU path's and the goldens (TRL's for Llama,
/// transformers' for Qwen2 and GPT-2) within 1e-4, as on the CPU.
#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn logps_on_the_gpu_match_the_goldens_and_the_cpu() {
    require_gpu();
    let cases = [
        (
            "tiny-llama",
            "tiny-llama/golden/logps.json",
            &["examples", "test"][..],
        ),
        ("tiny-qwen2", "tiny-qwen2/golden_logps.json", &["rows"][..]),
        ("tiny-gpt2", "tiny-gpt2/golden_logps.json", &["rows"][..]),
    ];
    for (model, golden, key) in cases {
        let data = "tiny-llama/pref_test.jsonl";
        let on_gpu = run_logps_with(model, data, &["--device", "cuda"]);
        compare(
            &on_gpu,
            &golden_rows(golden, key),
            &format!("{model} on cuda vs golden"),
        );
        let on_cpu = run_logps_with(model, data, &["--device", "cpu"]);
        compare(&on_gpu, &on_cpu, &format!("{model} on cuda vs cpu"));
    }
}

/// Every TRL golden trajectory (SFT, DPO, IPO, KTO, ORPO; 30 steps) on the GPU in f32, with the
/// CPU's tolerances.
#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn trl_golden_trajectories_on_the_gpu() {
    require_gpu();
    let gpu = Some(DeviceChoice::Cuda(0));
    check_against_golden(Method::Sft, "sft_train.jsonl", "sft", None, gpu);
    check_against_golden(Method::Dpo, "pref_train.jsonl", "dpo", None, gpu);
    check_against_golden(Method::Dpo, "pref_train.jsonl", "ipo", Some("ipo"), gpu);
    check_against_golden(Method::Kto, "kto_train.jsonl", "kto", None, gpu);
    check_against_golden(Method::Orpo, "pref_train.jsonl", "orpo", None, gpu);
}

/// LoRA DPO on every linear layer (composed LoRA with dropout, frozen base on the GPU) and
/// Qwen2's biases: 10 steps on the GPU, with and without gradient checkpointing, log the same
/// trajectory as on the CPU (loss, rewards, log-probs, grad norm within 1e-4 relative per step,
/// compounding like the goldens').
#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn lora_dpo_on_the_gpu_follows_the_cpu_trajectory() {
    require_gpu();
    let run = |device: DeviceChoice, checkpointing: bool| {
        let dir = tempfile::tempdir().unwrap();
        let mut args = golden_args("pref_train.jsonl", dir.path());
        args.model = Some(common::fixture("tiny-qwen2"));
        args.max_steps = Some(10);
        args.use_peft = Some(true);
        args.lora_target_modules = Some("all-linear".into());
        args.device = Some(device);
        args.gradient_checkpointing = Some(checkpointing);
        leash::train::run(&resolve(Method::Dpo, &args).unwrap()).unwrap();
        read_metrics(dir.path())
    };
    let cpu = run(DeviceChoice::Cpu, false);
    const KEYS: [&str; 5] = [
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "logps/chosen",
        "grad_norm",
    ];
    for checkpointing in [false, true] {
        let gpu = run(DeviceChoice::Cuda(0), checkpointing);
        assert_eq!(gpu.len(), cpu.len());
        for (step, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
            for key in KEYS {
                let (a, b) = (g[key].as_f64().unwrap(), c[key].as_f64().unwrap());
                let tol = 1e-4 * (step + 1) as f64 * b.abs().max(1e-2);
                assert!(
                    (a - b).abs() <= tol,
                    "step {} (checkpointing {checkpointing}): {key} {a} (cuda) vs {b} (cpu)",
                    step + 1
                );
            }
        }
    }
}

/// Mixed precision on the GPU (`--bf16`, the default there): per-token log-probs within 0.05
/// nats of the GPU's f32 on Llama, Qwen2 and GPT-2, and a 30-step DPO run's losses within 5 %
/// of f32's (tests/bf16.rs checks the same on the CPU).
#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn bf16_on_the_gpu_stays_within_its_tolerances_of_f32() {
    use candle_core::DType;
    use leash::kernels::autocast::autocast;
    require_gpu();
    let gpu = candle_core::Device::new_cuda(0).unwrap();
    let data = common::fixture("tiny-llama/pref_test.jsonl");
    for family in ["tiny-llama", "tiny-qwen2", "tiny-gpt2"] {
        let (model, tok) = leash::model_io::load_model(&common::fixture(family), &gpu).unwrap();
        let prepared = leash::train::examples::prepare(Method::Dpo, &data, &tok, 128, 8).unwrap();
        let seqs: Vec<leash::data::encode::Sequence> = prepared
            .examples
            .iter()
            .filter_map(|(_, e)| match e {
                leash::train::examples::TrainExample::Pair { chosen, .. } => {
                    Some(leash::train::examples::to_sequence(chosen, 128))
                }
                _ => None,
            })
            .collect();
        let refs: Vec<_> = seqs.iter().collect();
        let batch = leash::data::collate::collate(&refs, tok.pad_id, None, &[], &gpu).unwrap();
        let lp = |bf16: bool| -> Vec<f32> {
            let _cast = autocast(bf16.then_some(DType::BF16));
            leash::loss::logps::score(&model, &batch)
                .unwrap()
                .token_logps
                .to_vec1()
                .unwrap()
        };
        let (f, b) = (lp(false), lp(true));
        let worst = f
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        println!("{family}: bf16 vs f32 per-token log-probs on cuda, max |Δ| = {worst} nats");
        assert!(
            worst < 0.05 && worst > 0.0,
            "{family}: max |bf16 − f32| = {worst}"
        );
    }
    let run = |bf16: bool| {
        let dir = tempfile::tempdir().unwrap();
        let mut args = golden_args("pref_train.jsonl", dir.path());
        args.device = Some(DeviceChoice::Cuda(0));
        args.bf16 = Some(bf16);
        leash::train::run(&resolve(Method::Dpo, &args).unwrap()).unwrap();
        read_metrics(dir.path())
    };
    let (f, b) = (run(false), run(true));
    for (x, y) in f.iter().zip(&b) {
        let (lx, ly) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        println!("step {}: DPO loss f32 {lx:.5} bf16 {ly:.5}", x["step"]);
        assert!(
            (lx - ly).abs() <= 0.05 * lx.abs(),
            "step {}: {lx} vs {ly}",
            x["step"]
        );
    }
}

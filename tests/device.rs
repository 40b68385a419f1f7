//! `--device` on every command that runs a model (src/device.rs). This test binary, like the
//! default build, has no CUDA: `--device cuda` must stop with a hint before writing anything,
//! a malformed value is refused by the parser listing the accepted forms, and `cpu` and `auto`
//! give exactly the run the default gives, whose first line names the device.

mod common;
use common::{fixture, leash, stderr};
use std::path::Path;

/// Every command that runs a model.
const COMMANDS: &[&str] = &[
    "sft", "dpo", "kto", "orpo", "grpo", "logps", "generate", "eval", "merge", "bench", "lab",
    "demo",
];

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// The arguments of a short valid run of `command` writing to `out` (unused by logps and
/// generate, which write to stdout).
fn command_args(command: &str, out: &Path) -> Vec<String> {
    let model = s(&fixture("tiny-llama"));
    let pref = s(&fixture("tiny-llama/pref_train.jsonl"));
    let v = |a: &[&str]| a.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    match command {
        "logps" => v(&["logps", "--model", &model, "--dataset", &pref]),
        "generate" => v(&[
            "generate",
            "--model",
            &model,
            "--prompts",
            &pref,
            "--max-new-tokens",
            "2",
        ]),
        // The adapter need not exist: the device is resolved first.
        "merge" => v(&[
            "merge",
            "--model",
            &model,
            "--adapter",
            &s(&out.with_extension("adapter")),
            "--output-dir",
            &s(out),
        ]),
        "eval" => v(&[
            "eval",
            "--model",
            &model,
            "--reference",
            &model,
            "--dataset",
            &s(&fixture("tiny-llama/pref_test.jsonl")),
            "--output-dir",
            &s(out),
        ]),
        "lab" => v(&["lab", "logps", "--small", "--output-dir", &s(out)]),
        "demo" => v(&["demo", "--small", "--output-dir", &s(out)]),
        "bench" => v(&["bench", "--what", "matmul"]),
        "grpo" => v(&[
            "grpo",
            "--model",
            &model,
            "--dataset",
            &pref,
            "--output-dir",
            &s(out),
            "--max-steps",
            "1",
            "--per-device-train-batch-size",
            "2",
            "--num-generations",
            "2",
            "--reward-funcs",
            "length",
        ]),
        method => {
            let data = if method == "sft" {
                s(&fixture("tiny-llama/sft_train.jsonl"))
            } else {
                pref
            };
            v(&[
                method,
                "--model",
                &model,
                "--dataset",
                &data,
                "--output-dir",
                &s(out),
                "--max-steps",
                "2",
                "--per-device-train-batch-size",
                "2",
                "--logging-steps",
                "1",
            ])
        }
    }
}

fn run(args: &[String]) -> std::process::Output {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    leash(&refs)
}

#[test]
fn cuda_in_a_cpu_build_exits_2_with_a_hint_and_writes_nothing() {
    for &command in COMMANDS {
        for device in ["cuda", "cuda:1"] {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("out");
            let mut args = command_args(command, &out);
            args.extend(["--device".to_string(), device.to_string()]);
            let result = run(&args);
            let err = stderr(&result);
            let what = format!("{command} --device {device}");
            assert_eq!(result.status.code(), Some(2), "{what}: {err}");
            assert!(!err.contains("panicked"), "{what}: {err}");
            assert!(err.contains("built without CUDA support"), "{what}: {err}");
            assert!(
                err.contains("hint:") && err.contains("--features cuda"),
                "{what}: {err}"
            );
            assert!(err.contains("--device cpu"), "{what}: {err}");
            assert!(result.stdout.is_empty(), "{what}: wrote to stdout");
            assert!(!out.exists(), "{what}: created {}", out.display());
            assert_eq!(
                std::fs::read_dir(dir.path()).unwrap().count(),
                0,
                "{what}: wrote into the folder"
            );
        }
    }
}

/// A `--config` file asking for a GPU is refused the same way, before the run folder exists.
#[test]
fn cuda_from_a_config_file_is_refused_before_the_run_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let config = dir.path().join("run.toml");
    std::fs::write(&config, "device = \"cuda:0\"\n").unwrap();
    let mut args = command_args("dpo", &out);
    args.extend(["--config".to_string(), s(&config)]);
    let result = run(&args);
    let err = stderr(&result);
    assert_eq!(result.status.code(), Some(2), "{err}");
    assert!(
        err.contains("built without CUDA support") && err.contains("hint:"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn malformed_devices_are_refused_listing_the_accepted_forms() {
    for &command in COMMANDS {
        for bad in ["cuda:x", "gpu", "cuda:", "CPU"] {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("out");
            let mut args = command_args(command, &out);
            args.extend(["--device".to_string(), bad.to_string()]);
            let result = run(&args);
            let err = stderr(&result);
            let what = format!("{command} --device {bad}");
            assert_eq!(result.status.code(), Some(2), "{what}: {err}");
            assert!(
                err.contains(&format!("`{bad}` is not a device")),
                "{what}: {err}"
            );
            for form in ["auto", "cpu", "cuda", "cuda:N"] {
                assert!(err.contains(form), "{what}: {form} missing in {err}");
            }
            assert!(!out.exists(), "{what}");
        }
    }
}

/// metrics.jsonl without the run's peak memory (a property of the process, not the run).
fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("peak_rss_mib");
            v
        })
        .collect()
}

#[test]
fn cpu_and_auto_train_exactly_as_the_default_and_say_so_first() {
    let prefix = "device: cpu (";
    let mut runs = Vec::new();
    for device in [None, Some("cpu"), Some("auto")] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let mut args = command_args("dpo", &out);
        if let Some(d) = device {
            args.extend(["--device".to_string(), d.to_string()]);
        }
        let result = run(&args);
        let err = stderr(&result);
        assert!(result.status.success(), "{device:?}: {err}");
        let first = err.lines().next().unwrap_or_default();
        assert!(
            first.starts_with(prefix) && first.ends_with(" threads)"),
            "{device:?}: first line {first:?}"
        );
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("leash_config.json")).unwrap())
                .unwrap();
        // The resolved config records the device used, not `auto`.
        assert_eq!(config["device"], "cpu", "{device:?}");
        let m = metrics(&out);
        assert_eq!(m.len(), 2, "{device:?}");
        let weights = std::fs::read(out.join("model.safetensors")).unwrap();
        runs.push((m, weights));
    }
    assert_eq!(runs[0].0, runs[1].0, "--device cpu changed the metrics");
    assert_eq!(runs[0].0, runs[2].0, "--device auto changed the metrics");
    assert!(
        runs[0].1 == runs[1].1 && runs[0].1 == runs[2].1,
        "weights differ"
    );
}

#[test]
fn scoring_and_sampling_name_the_device_first_and_match_the_default() {
    for command in ["logps", "generate"] {
        let dir = tempfile::tempdir().unwrap();
        let mut outputs = Vec::new();
        for device in [None, Some("cpu"), Some("auto")] {
            let mut args = command_args(command, &dir.path().join("unused"));
            if let Some(d) = device {
                args.extend(["--device".to_string(), d.to_string()]);
            }
            let result = run(&args);
            let err = stderr(&result);
            assert!(result.status.success(), "{command} {device:?}: {err}");
            let first = err.lines().next().unwrap_or_default();
            assert!(
                first.starts_with("device: cpu (") && first.ends_with(" threads)"),
                "{command} {device:?}: first line {first:?}"
            );
            outputs.push(result.stdout);
        }
        assert!(!outputs[0].is_empty(), "{command}");
        assert!(
            outputs[0] == outputs[1] && outputs[0] == outputs[2],
            "{command}: output depends on --device"
        );
    }
}

#[test]
fn every_command_that_runs_a_model_documents_device() {
    for command in COMMANDS {
        let result = leash(&[command, "--help"]);
        let help = String::from_utf8_lossy(&result.stdout);
        assert!(result.status.success(), "{command} --help");
        assert!(
            help.contains("--device <DEVICE>"),
            "{command}: no --device in\n{help}"
        );
        for needle in ["auto", "cpu", "cuda:N", "--features cuda"] {
            assert!(
                help.contains(needle),
                "{command} --help lacks {needle}:\n{help}"
            );
        }
    }
}

/// A run resumes on whatever device it is given: the checkpoint records where it was trained
/// and a different device is reported, not refused.
#[test]
fn resume_records_the_device_and_does_not_refuse_another() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut args = command_args("dpo", &out);
    args.extend(["--save-steps".to_string(), "1".to_string()]);
    let first = run(&args);
    assert!(first.status.success(), "{}", stderr(&first));
    let state_path = out.join("checkpoint-1/trainer_state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    assert_eq!(state["device"], "cpu");
    // As if checkpoint-1 had been written on a GPU.
    state["device"] = "cuda:0".into();
    std::fs::write(&state_path, state.to_string()).unwrap();
    let mut resume = args.clone();
    resume.extend([
        "--resume-from-checkpoint".to_string(),
        s(&out.join("checkpoint-1")),
        "--device".to_string(),
        "cpu".to_string(),
    ]);
    let second = run(&resume);
    let err = stderr(&second);
    assert!(second.status.success(), "{err}");
    assert!(
        err.contains("trained on cuda:0, this run continues on cpu"),
        "{err}"
    );
}

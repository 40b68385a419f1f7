//! Options are per method, as TRL's config classes (`src/train/method_options.rs`): an option
//! the method does not take is refused (flag or `--config` key), naming the option, the method
//! and where it belongs; every option a method does take is accepted. The tests walk the
//! table itself, so it cannot drift from the code; a new option without a sample value here
//! fails them.

mod common;
use clap::Parser;
use common::{leash, stderr};
use leash::train::config::{resolve, Method, TrainArgs};
use leash::train::method_options::OPTIONS;

const METHODS: [Method; 5] = [
    Method::Sft,
    Method::Dpo,
    Method::Kto,
    Method::Orpo,
    Method::Grpo,
];

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: TrainArgs,
}

/// A valid value for each option as (TOML value, flag values); all of one method's options
/// together form a valid run.
fn sample(option: &str) -> (&'static str, &'static [&'static str]) {
    match option {
        "model" => ("\"m\"", &["m"]),
        "dataset" => ("\"d\"", &["d"]),
        "output_dir" => ("\"o\"", &["o"]),
        "eval_dataset" => ("\"e\"", &["e"]),
        "dataset_train_split" => ("\"train\"", &["train"]),
        "dataset_test_split" => ("\"test\"", &["test"]),
        "report_to" => ("\"none\"", &["none"]),
        "resume_from_checkpoint" => ("\"o/checkpoint-1\"", &["o/checkpoint-1"]),
        "adapter" => ("\"a\"", &["a"]),
        "lora_target_modules" => ("\"q_proj,v_proj\"", &["q_proj,v_proj"]),
        "lr_scheduler_type" => ("\"cosine\"", &["cosine"]),
        "scale_rewards" => ("\"batch\"", &["batch"]),
        "frozen_dtype" => ("\"bf16\"", &["bf16"]),
        "device" => ("\"cpu\"", &["cpu"]),
        "reward_funcs" => ("[\"length\"]", &["length"]),
        "reward_cmd" => ("[\"cat\"]", &["cat"]),
        "reward_weights" => ("[1.0, 2.0]", &["1,2"]),
        "overwrite_output_dir"
        | "shuffle"
        | "precompute_ref_log_probs"
        | "padding_free"
        | "gradient_checkpointing"
        | "bf16"
        | "assistant_only_loss"
        | "use_peft"
        | "mask_truncated_completions" => ("true", &["true"]),
        "beta" | "temperature" | "top_p" | "epsilon" | "epsilon_high" | "max_grad_norm" => {
            ("0.5", &["0.5"])
        }
        "label_smoothing" | "rpo_alpha" | "warmup_ratio" | "weight_decay" | "lora_dropout" => {
            ("0.1", &["0.1"])
        }
        "learning_rate" => ("1e-5", &["1e-5"]),
        "adam_beta1" | "adam_beta2" => ("0.9", &["0.9"]),
        "adam_epsilon" => ("1e-6", &["1e-6"]),
        "desirable_weight" | "undesirable_weight" | "lora_alpha" | "num_train_epochs" => {
            ("2.0", &["2.0"])
        }
        "per_device_train_batch_size" | "per_device_eval_batch_size" => ("4", &["4"]),
        "num_generations" => ("2", &["2"]),
        "gradient_accumulation_steps" | "num_iterations" | "warmup_steps" => ("2", &["2"]),
        "max_steps" | "logging_steps" | "eval_steps" | "save_steps" | "save_total_limit" => {
            ("5", &["5"])
        }
        "max_length" | "max_completion_length" | "lora_r" | "seed" | "reward_timeout" => {
            ("64", &["64"])
        }
        other => panic!("no sample value for option `{other}`: add one to tests/method_options.rs"),
    }
}

/// `loss_type` takes a different value set per method.
fn loss_type(method: Method) -> &'static str {
    if method == Method::Grpo {
        "dr_grpo"
    } else {
        "ipo"
    }
}

fn value(method: Method, option: &str) -> (String, Vec<String>) {
    if option == "loss_type" {
        let v = loss_type(method);
        return (format!("\"{v}\""), vec![v.to_string()]);
    }
    let (toml, flags) = sample(option);
    (
        toml.to_string(),
        flags.iter().map(|s| s.to_string()).collect(),
    )
}

/// Options other than `config` (a file path, never itself a key) that `method` takes or not.
fn options(method: Method, taken: bool) -> Vec<&'static str> {
    OPTIONS
        .iter()
        .filter(|(name, methods)| *name != "config" && methods.contains(&method) == taken)
        .map(|(name, _)| *name)
        .collect()
}

fn base() -> TrainArgs {
    TrainArgs {
        model: Some("m".into()),
        dataset: Some("d".into()),
        output_dir: Some("o".into()),
        ..Default::default()
    }
}

fn flags(method: Method, opts: &[&str]) -> TrainArgs {
    let mut argv = vec!["leash".to_string()];
    for &opt in opts {
        let (_, vals) = value(method, opt);
        for v in vals {
            argv.push(format!("--{}", opt.replace('_', "-")));
            argv.push(v);
        }
    }
    let mut args = Cli::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
        .args;
    let b = base();
    args.model = args.model.or(b.model);
    args.dataset = args.dataset.or(b.dataset);
    args.output_dir = args.output_dir.or(b.output_dir);
    args
}

fn config_file(dir: &std::path::Path, method: Method, opts: &[&str]) -> std::path::PathBuf {
    let text: String = opts
        .iter()
        .map(|opt| format!("{opt} = {}\n", value(method, opt).0))
        .collect();
    let path = dir.join("run.toml");
    std::fs::write(&path, format!("# a run config\n{text}")).unwrap();
    path
}

fn assert_refused(err: &str, option: &str, method: Method) {
    let needle = format!("`{option}` is a");
    let owner = format!("option; `leash {}` does not use it", method.name());
    assert!(
        err.contains(&needle) && err.contains(&owner) && err.contains("hint:"),
        "{err}"
    );
    assert!(err.contains("or run `leash "), "{err}");
}

#[test]
fn every_option_of_a_method_is_accepted_from_flags_and_config() {
    let dir = tempfile::tempdir().unwrap();
    for method in METHODS {
        let own = options(method, true);
        let cfg = resolve(method, &flags(method, &own))
            .unwrap_or_else(|e| panic!("{} flags: {e}", method.name()));
        assert_eq!(cfg.method, method);
        let mut a = base();
        a.config = Some(config_file(dir.path(), method, &own));
        let from_file =
            resolve(method, &a).unwrap_or_else(|e| panic!("{} config: {e}", method.name()));
        // Both paths resolve to the same settings.
        assert_eq!(
            serde_json::to_value(&cfg).unwrap(),
            serde_json::to_value(&from_file).unwrap(),
            "{}",
            method.name()
        );
    }
}

#[test]
fn every_foreign_option_is_refused_from_flags_and_config() {
    let dir = tempfile::tempdir().unwrap();
    let mut refused = 0;
    for method in METHODS {
        for option in options(method, false) {
            let err = resolve(method, &flags(method, &[option]))
                .err()
                .unwrap_or_else(|| panic!("{option} accepted by {}", method.name()))
                .to_string();
            assert_refused(&err, option, method);
            assert!(
                err.contains(&format!("drop --{}", option.replace('_', "-"))),
                "{err}"
            );
            let mut a = base();
            let path = config_file(dir.path(), method, &[option]);
            a.config = Some(path.clone());
            let err = resolve(method, &a).err().unwrap().to_string();
            assert_refused(&err, option, method);
            // The file and the key's line (line 1 is a comment).
            assert!(
                err.contains(&format!("{}:2:", path.display())) && err.contains("remove `"),
                "{err}"
            );
            refused += 1;
        }
    }
    assert!(refused >= 5 * 2, "only {refused} foreign options checked");
}

/// Defaults never count: every method's defaults hold every option (DPO's include
/// num_generations), and a run setting none of its foreign ones resolves.
#[test]
fn defaults_and_unset_options_are_not_refused() {
    for method in METHODS {
        let mut a = base();
        a.reward_funcs = (method == Method::Grpo).then(|| vec!["length".into()]);
        resolve(method, &a).unwrap_or_else(|e| panic!("{}: {e}", method.name()));
    }
}

/// One foreign option per method through the binary: exit code 2, the option, the method,
/// the methods that take it and a `hint:`.
#[test]
fn the_cli_refuses_a_foreign_option_per_method() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cases: [(&str, &[&str], &str, &str); 5] = [
        (
            "sft",
            &["--beta", "0.1"],
            "`beta` is a DPO, KTO, ORPO and GRPO option; `leash sft` does not use it",
            "drop --beta, or run `leash dpo`, `leash kto`, `leash orpo` or `leash grpo`",
        ),
        (
            "dpo",
            &["--num-generations", "4"],
            "`num_generations` is a GRPO option; `leash dpo` does not use it",
            "drop --num-generations, or run `leash grpo`",
        ),
        (
            "kto",
            &["--label-smoothing", "0.1"],
            "`label_smoothing` is a DPO option; `leash kto` does not use it",
            "drop --label-smoothing, or run `leash dpo`",
        ),
        (
            "orpo",
            &["--precompute-ref-log-probs"],
            "`precompute_ref_log_probs` is a DPO and KTO option; `leash orpo` does not use it",
            "drop --precompute-ref-log-probs, or run `leash dpo` or `leash kto`",
        ),
        (
            "grpo",
            &["--desirable-weight", "2"],
            "`desirable_weight` is a KTO option; `leash grpo` does not use it",
            "drop --desirable-weight, or run `leash kto`",
        ),
    ];
    for (method, extra, message, hint) in cases {
        let mut argv = vec![
            method,
            "--model",
            "m",
            "--dataset",
            "d",
            "--output-dir",
            out.to_str().unwrap(),
        ];
        argv.extend_from_slice(extra);
        let run = leash(&argv);
        let err = stderr(&run);
        assert_eq!(run.status.code(), Some(2), "{err}");
        assert!(err.contains(message), "{err}");
        assert!(err.contains(&format!("hint: {hint}")), "{err}");
        assert!(!out.exists(), "{method}: wrote an output folder");
    }
}

/// The same through `--config`: the error names the file, the key's line and the method.
#[test]
fn the_cli_refuses_a_foreign_config_key_per_method() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cases = [
        (
            "sft",
            "loss_type = \"sigmoid\"",
            "`loss_type` is a DPO and GRPO option",
        ),
        (
            "dpo",
            "assistant_only_loss = true",
            "`assistant_only_loss` is an SFT option",
        ),
        ("kto", "temperature = 0.7", "`temperature` is a GRPO option"),
        (
            "orpo",
            "padding_free = false",
            "`padding_free` is an SFT, DPO, KTO and GRPO option",
        ),
        (
            "grpo",
            "max_length = 512",
            "`max_length` is an SFT, DPO, KTO and ORPO option",
        ),
    ];
    for (method, line, message) in cases {
        let path = dir.path().join(format!("{method}.toml"));
        std::fs::write(&path, format!("learning_rate = 1e-5\n{line}\n")).unwrap();
        let run = leash(&[
            method,
            "--config",
            path.to_str().unwrap(),
            "--model",
            "m",
            "--dataset",
            "d",
            "--output-dir",
            out.to_str().unwrap(),
        ]);
        let err = stderr(&run);
        assert_eq!(run.status.code(), Some(2), "{err}");
        assert!(err.contains(&format!("{}:2:", path.display())), "{err}");
        assert!(err.contains(message), "{err}");
        assert!(
            err.contains(&format!("`leash {method}` does not use it")),
            "{err}"
        );
        assert!(err.contains("hint: remove `"), "{err}");
    }
}

/// `loss_type` is typed per method: DPO's names are no GRPO loss and the reverse, and the
/// resolved config writes TRL's names.
#[test]
fn loss_type_is_parsed_per_method_and_written_under_trls_names() {
    for (method, good, foreign) in [
        (Method::Dpo, "hinge", "dapo"),
        (Method::Grpo, "grpo", "ipo"),
    ] {
        let mut a = base();
        a.reward_funcs = (method == Method::Grpo).then(|| vec!["length".into()]);
        a.loss_type = Some(good.into());
        let cfg = resolve(method, &a).unwrap();
        assert_eq!(serde_json::to_value(&cfg).unwrap()["loss_type"], good);
        a.loss_type = Some(foreign.into());
        let err = resolve(method, &a).err().unwrap().to_string();
        assert!(
            err.contains(&format!("loss_type `{foreign}`")) && err.contains("hint:"),
            "{err}"
        );
    }
    let dpo = resolve(Method::Dpo, &base()).unwrap();
    assert_eq!(serde_json::to_value(&dpo).unwrap()["loss_type"], "sigmoid");
    let sft = resolve(Method::Sft, &base()).unwrap();
    assert!(serde_json::to_value(&sft)
        .unwrap()
        .get("loss_type")
        .is_none());
}

/// `leash <method> --help` lists exactly the method's options.
#[test]
fn help_lists_exactly_the_methods_options() {
    for method in METHODS {
        let run = leash(&[method.name(), "--help"]);
        assert!(run.status.success(), "{}", stderr(&run));
        let help = String::from_utf8(run.stdout).unwrap();
        for (name, methods) in OPTIONS {
            let flag = format!("--{}", name.replace('_', "-"));
            let listed = help.lines().any(|l| {
                let l = l.trim_start();
                l == flag || l.starts_with(&format!("{flag} "))
            });
            assert_eq!(
                listed,
                methods.contains(&method),
                "{flag} in `leash {} --help`",
                method.name()
            );
        }
    }
}

/// The required options only (GRPO needs a reward).
fn runnable(method: Method) -> TrainArgs {
    let mut args = base();
    if method == Method::Grpo {
        args.reward_funcs = Some(vec!["length".into()]);
    }
    args
}

#[test]
fn the_written_config_holds_exactly_the_methods_options() {
    // leash_config.json and TensorBoard's `args` record a run's own options only, as TRL's
    // per-method config classes save theirs.
    for method in METHODS {
        let cfg = resolve(method, &runnable(method)).unwrap();
        let json = cfg.method_json();
        let written = json.as_object().unwrap();
        assert_eq!(written["method"], method.name(), "{json}");
        for option in options(method, false) {
            assert!(
                !written.contains_key(option),
                "{method:?}'s config lists {option}"
            );
        }
        // Every option the method takes that the resolved config holds is written (the
        // serialised config minus the foreign ones: nothing else is dropped).
        let full = serde_json::to_value(&cfg).unwrap();
        for (key, value) in full.as_object().unwrap() {
            let own = OPTIONS
                .iter()
                .find(|(name, _)| name == key)
                .is_none_or(|(_, methods)| methods.contains(&method));
            assert_eq!(written.get(key), own.then_some(value), "{method:?}: {key}");
        }
    }
    let grpo = resolve(Method::Grpo, &runnable(Method::Grpo))
        .unwrap()
        .method_json();
    assert_eq!(grpo["num_generations"], 8);
    assert_eq!(grpo["scale_rewards"], "group");
    assert!(resolve(Method::Dpo, &runnable(Method::Dpo))
        .unwrap()
        .method_json()["beta"]
        .is_number());
}

//! Real chat templates of ten families (Llama 2, Llama 3, Llama 3.1, Mistral, Zephyr, Qwen 2.5,
//! Qwen3, Gemma, Gemma 3, Phi-3; tests/fixtures/templates/<family>/) give the token ids TRL 1.16
//! makes for every conversational layout: DPOTrainer (explicit and implicit prompt), KTOTrainer,
//! GRPOTrainer's prompts and SFTTrainer (`messages`, prompt-completion), for single-turn,
//! system+user and multi-turn conversations, with tools and per-row `chat_template_kwargs`;
//! SFT's `assistant_only_loss` labels equal TRL's (transformers' `return_assistant_tokens_mask`,
//! TRL's training-template swap included); a row the template rejects is an error naming the
//! data file and line, the template file and line, and the template's message.
//! Goldens: scripts/make_template_goldens.py (real TRL code, on the tiny-llama tokenizer with
//! each family's special tokens added).

mod common;
use common::{copy_fixture, fixture};
use leash::data::encode::{Encoded, Encoder, PromptCompletion, Style};
use leash::data::read::read_jsonl;
use leash::data::tokenizer::TextTokenizer;
use leash::model::ModelConfig;
use leash::train::config::{resolve, Method, TrainArgs};
use serde_json::Value;

const FAMILIES: [&str; 10] = [
    "llama2", "llama3", "llama3_1", "mistral", "zephyr", "qwen2_5", "qwen3", "gemma", "gemma3",
    "phi3",
];

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// TRL's SFT labels: the id where it is in the loss, -100 elsewhere.
fn labels(pc: &PromptCompletion) -> Vec<i64> {
    let all: Vec<u32> = pc.prompt.iter().chain(&pc.completion).copied().collect();
    all.iter()
        .enumerate()
        .map(|(p, &id)| {
            if p >= pc.prompt.len() && pc.in_loss(p) {
                id as i64
            } else {
                -100
            }
        })
        .collect()
}

/// Compares leash's encoding of one golden case; returns whether the template rejected it.
fn check(
    family: &str,
    name: &str,
    layout: &str,
    got: leash::Result<Encoded>,
    want: &Value,
    data: &std::path::Path,
    line: usize,
) -> bool {
    let ctx = format!("{family}/{name}");
    if let Some(msg) = want.get("raises").and_then(Value::as_str) {
        let err = got
            .err()
            .unwrap_or_else(|| panic!("{ctx}: TRL raised {msg:?}, leash did not"))
            .to_string();
        assert!(err.contains(msg), "{ctx}: {err}");
        assert!(
            err.starts_with(&format!("{}:{line}:", data.display())),
            "{ctx}: {err}"
        );
        assert!(err.contains(".jinja, template line"), "{ctx}: {err}");
        assert!(err.contains("hint:"), "{ctx}: {err}");
        return true;
    }
    let got = got.unwrap_or_else(|e| panic!("{ctx}: {e}"));
    match (layout, got) {
        ("dpo", Encoded::Pair { chosen, rejected }) => {
            assert_eq!(chosen.prompt, ids(&want["prompt_ids"]), "{ctx} prompt");
            assert_eq!(rejected.prompt, chosen.prompt, "{ctx} shared prompt");
            assert_eq!(chosen.completion, ids(&want["chosen_ids"]), "{ctx} chosen");
            assert_eq!(
                rejected.completion,
                ids(&want["rejected_ids"]),
                "{ctx} rejected"
            );
        }
        ("kto", Encoded::Unpaired { seq, .. }) => {
            assert_eq!(seq.prompt, ids(&want["prompt_ids"]), "{ctx} prompt");
            assert_eq!(
                seq.completion,
                ids(&want["completion_ids"]),
                "{ctx} completion"
            );
        }
        ("grpo", Encoded::Prompt { prompt, .. }) => {
            assert_eq!(prompt, ids(&want["prompt_ids"]), "{ctx} prompt");
        }
        ("sft", Encoded::Sft(pc)) => {
            let all: Vec<u32> = pc.prompt.iter().chain(&pc.completion).copied().collect();
            assert_eq!(all, ids(&want["input_ids"]), "{ctx} input_ids");
            let gold: Vec<i64> = want["labels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect();
            assert_eq!(labels(&pc), gold, "{ctx} labels");
        }
        (layout, other) => panic!("{ctx}: {layout} row encoded as {other:?}"),
    }
    false
}

#[test]
fn conversations_tokenize_as_trl_for_ten_template_families() {
    let config = ModelConfig::from_dir(&fixture("tiny-llama")).unwrap();
    let mut compared = 0;
    let mut rejected = 0;
    let mut masked = 0;
    for family in FAMILIES {
        let dir = fixture(&format!("templates/{family}"));
        let tok = TextTokenizer::from_dir(&dir, &config).unwrap();
        let golden: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap())
                .unwrap();
        let cases = golden["cases"].as_array().unwrap();
        let data = tempfile::Builder::new()
            .suffix(".jsonl")
            .tempfile()
            .unwrap();
        let lines: Vec<String> = cases.iter().map(|c| c["row"].to_string()).collect();
        std::fs::write(data.path(), lines.join("\n")).unwrap();
        let rows = read_jsonl(data.path()).unwrap();
        assert_eq!(rows.len(), cases.len());
        for assistant_only_loss in [false, true] {
            let enc = Encoder {
                tokenizer: &tok,
                style: Style::Trl,
                path: data.path(),
                assistant_only_loss,
            };
            for (row, case) in rows.iter().zip(cases) {
                let want = if assistant_only_loss {
                    match case.get("assistant_only") {
                        Some(w) => w,
                        None => continue,
                    }
                } else {
                    case
                };
                let name = case["name"].as_str().unwrap();
                let layout = case["layout"].as_str().unwrap();
                let raised = check(
                    family,
                    name,
                    layout,
                    enc.encode(row),
                    want,
                    data.path(),
                    row.line,
                );
                compared += 1;
                rejected += raised as usize;
                masked += assistant_only_loss as usize;
            }
        }
    }
    // Guards against a golden set that silently shrank: 146 cases, 31 of them also with
    // assistant_only_loss; Mistral and Gemma reject their system rows (Gemma's also in training).
    assert_eq!((compared, masked, rejected), (177, 31, 10));
}

#[test]
fn assistant_only_loss_without_markers_is_a_clear_error() {
    // Llama 2's template has no {% generation %} markers and TRL has no training variant of it.
    let config = ModelConfig::from_dir(&fixture("tiny-llama")).unwrap();
    let tok = TextTokenizer::from_dir(&fixture("templates/llama2"), &config).unwrap();
    let err = tok.training_template().err().unwrap().to_string();
    assert!(err.contains("chat_template.jinja"), "{err}");
    assert!(err.contains("{% generation %}"), "{err}");
    assert!(err.contains("hint:"), "{err}");
}

fn metrics(out: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// SFT with assistant_only_loss on tiny-llama with Gemma's template (swapped for TRL's
/// gemma_training.jinja, as TRL does): 4 steps of TRL's SFTTrainer, same tolerances as
/// tests/train_golden.rs.
#[test]
fn sft_assistant_only_loss_matches_trl() {
    let model = copy_fixture("tiny-llama");
    let cfg_path = model.path().join("tokenizer_config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let gemma = std::fs::read_to_string(fixture("templates/gemma/chat_template.jinja")).unwrap();
    cfg["chat_template"] = gemma.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let args = TrainArgs {
        model: Some(model.path().to_path_buf()),
        dataset: Some(fixture("templates/sft_assistant_only.jsonl")),
        output_dir: Some(out.path().to_path_buf()),
        max_steps: Some(4),
        per_device_train_batch_size: Some(4),
        learning_rate: Some(5e-4),
        lr_scheduler_type: Some("constant".into()),
        max_grad_norm: Some(1.0),
        max_length: Some(128),
        shuffle: Some(false),
        logging_steps: Some(1),
        assistant_only_loss: Some(true),
        ..Default::default()
    };
    leash::train::trainer::train(&resolve(Method::Sft, &args).unwrap()).unwrap();
    let mine = metrics(out.path());
    let gold: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("templates/sft_assistant_only.json")).unwrap(),
    )
    .unwrap();
    let steps = gold["steps"].as_array().unwrap();
    assert_eq!(mine.len(), steps.len());
    for (m, g) in mine.iter().zip(steps) {
        let step = g["step"].as_f64().unwrap();
        let rel = if step == 1.0 { 1e-5 } else { 5e-5 * step };
        for key in [
            "loss",
            "grad_norm",
            "entropy",
            "mean_token_accuracy",
            "num_tokens",
        ] {
            let (mv, gv) = (m[key].as_f64().unwrap(), g[key].as_f64().unwrap());
            let tol = rel * gv.abs().max(1e-2);
            assert!(
                (mv - gv).abs() <= tol,
                "step {step} {key}: {mv} vs TRL {gv}"
            );
        }
    }
}

#[test]
fn assistant_only_loss_is_refused_for_other_methods_and_plain_text() {
    let out = tempfile::tempdir().unwrap();
    let args = TrainArgs {
        model: Some(fixture("tiny-llama")),
        dataset: Some(fixture("tiny-llama/pref_train.jsonl")),
        output_dir: Some(out.path().to_path_buf()),
        assistant_only_loss: Some(true),
        ..Default::default()
    };
    let err = resolve(Method::Dpo, &args).err().unwrap().to_string();
    assert!(
        err.contains("`assistant_only_loss` is an SFT option; `leash dpo` does not use it"),
        "{err}"
    );

    let args = TrainArgs {
        dataset: Some(fixture("tiny-llama/sft_train.jsonl")),
        max_steps: Some(1),
        ..args
    };
    let err = leash::train::trainer::train(&resolve(Method::Sft, &args).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("sft_train.jsonl:1:"), "{err}");
    assert!(err.contains("needs conversational rows"), "{err}");
}

//! Conversational rows are rendered with the checkpoint's chat template and tokenized as TRL
//! does: without the tokenizer's special tokens (the template writes its own) and without an
//! appended EOS, so they score like the equivalent plain-text row minus its added BOS and EOS;
//! implicit-prompt rows split at the common prefix.

mod common;
use common::{copy_fixture, leash};
use serde_json::Value;
use std::fs;

const TEMPLATE: &str = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}";

fn logps(model: &std::path::Path, rows: &str) -> Vec<Value> {
    let data = tempfile::Builder::new()
        .suffix(".jsonl")
        .tempfile()
        .unwrap();
    fs::write(data.path(), rows).unwrap();
    let out = leash(&[
        "logps",
        "--model",
        model.to_str().unwrap(),
        "--dataset",
        data.path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn conversation_scores_like_its_rendered_text() {
    let dir = copy_fixture("tiny-llama");
    let cfg_path = dir.path().join("tokenizer_config.json");
    let mut cfg: Value = serde_json::from_str(&fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["chat_template"] = TEMPLATE.into();
    fs::write(&cfg_path, cfg.to_string()).unwrap();

    let conv = r#"{"prompt":[{"role":"user","content":"Q: 2 + 2?"}],"chosen":[{"role":"assistant","content":"Sure, 4."}],"rejected":[{"role":"assistant","content":"5"}]}"#;
    let conv_implicit = r#"{"chosen":[{"role":"user","content":"Q: 2 + 2?"},{"role":"assistant","content":"Sure, 4."}],"rejected":[{"role":"user","content":"Q: 2 + 2?"},{"role":"assistant","content":"5"}]}"#;
    let plain =
        r#"{"prompt":"user: Q: 2 + 2?\nassistant:","chosen":" Sure, 4.\n","rejected":" 5\n"}"#;
    let implicit = r#"{"chosen":"user: Q: 2 + 2?\nassistant: Sure, 4.\n","rejected":"user: Q: 2 + 2?\nassistant: 5\n"}"#;
    let a = logps(dir.path(), &format!("{conv}\n"));
    let b = logps(dir.path(), &format!("{plain}\n"));
    let c = logps(dir.path(), &format!("{implicit}\n"));
    let d = logps(dir.path(), &format!("{conv_implicit}\n"));
    let ids = |v: &Value| -> Vec<u64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect()
    };
    for key in [
        "prompt_ids",
        "chosen_ids",
        "rejected_ids",
        "chosen_logp",
        "rejected_logp",
    ] {
        assert_eq!(c[0][key], b[0][key], "implicit {key}");
        assert_eq!(d[0][key], a[0][key], "implicit conversation {key}");
    }
    // The plain row gets BOS (id 1) from the tokenizer and EOS (id 2) appended as text.
    assert_eq!(ids(&b[0]["prompt_ids"])[0], 1);
    assert_eq!(ids(&a[0]["prompt_ids"]), ids(&b[0]["prompt_ids"])[1..]);
    for key in ["chosen_ids", "rejected_ids"] {
        let plain = ids(&b[0][key]);
        assert_eq!(plain.last(), Some(&2));
        assert_eq!(ids(&a[0][key]), plain[..plain.len() - 1], "{key}");
    }
}

#[test]
fn conversation_without_template_is_a_clear_error() {
    let dir = copy_fixture("tiny-llama");
    let data = tempfile::Builder::new()
        .suffix(".jsonl")
        .tempfile()
        .unwrap();
    fs::write(data.path(), r#"{"prompt":[{"role":"user","content":"hi"}],"chosen":[{"role":"assistant","content":"a"}],"rejected":[{"role":"assistant","content":"b"}]}"#).unwrap();
    let out = leash(&[
        "logps",
        "--model",
        dir.path().to_str().unwrap(),
        "--dataset",
        data.path().to_str().unwrap(),
    ]);
    let err = common::stderr(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err.contains("no chat_template") && err.contains("hint:"),
        "{err}"
    );
}

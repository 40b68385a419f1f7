//! Bad input: each case exits with code 2 and a message naming the file (and line and field
//! for data) followed by a `hint:` line — never a panic.

mod common;
use common::{copy_fixture, fixture, leash, stderr};
use std::fs;

fn logps(model: &std::path::Path, data: &std::path::Path) -> (i32, String) {
    let out = leash(&[
        "logps",
        "--model",
        model.to_str().unwrap(),
        "--dataset",
        data.to_str().unwrap(),
    ]);
    (out.status.code().unwrap_or(-1), stderr(&out))
}

fn assert_error(code: i32, err: &str, needles: &[&str]) {
    assert_eq!(code, 2, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("hint:"), "no hint in: {err}");
    for n in needles {
        assert!(err.contains(n), "missing {n:?} in: {err}");
    }
}

fn data() -> std::path::PathBuf {
    fixture("tiny-llama/pref_test.jsonl")
}

#[test]
fn missing_model_folder() {
    let (code, err) = logps(std::path::Path::new("/nonexistent/model"), &data());
    assert_error(
        code,
        &err,
        &["/nonexistent/model", "model folder not found"],
    );
}

#[test]
fn missing_dataset() {
    let (code, err) = logps(
        &fixture("tiny-llama"),
        std::path::Path::new("/nonexistent.jsonl"),
    );
    assert_error(code, &err, &["/nonexistent.jsonl"]);
}

fn edit_config(dir: &tempfile::TempDir, edit: impl Fn(&mut serde_json::Value)) {
    let path = dir.path().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    fs::write(path, v.to_string()).unwrap();
}

#[test]
fn missing_config_key() {
    let dir = copy_fixture("tiny-llama");
    edit_config(&dir, |v| {
        v.as_object_mut().unwrap().remove("hidden_size");
    });
    let (code, err) = logps(dir.path(), &data());
    assert_error(code, &err, &["config.json", "missing field `hidden_size`"]);
}

#[test]
fn malformed_config() {
    let dir = copy_fixture("tiny-llama");
    fs::write(dir.path().join("config.json"), "{\"model_type\": ").unwrap();
    let (code, err) = logps(dir.path(), &data());
    assert_error(code, &err, &["config.json", "malformed JSON"]);
}

#[test]
fn mistyped_config_key() {
    let dir = copy_fixture("tiny-llama");
    edit_config(&dir, |v| v["num_hidden_layers"] = "two".into());
    let (code, err) = logps(dir.path(), &data());
    assert_error(code, &err, &["config.json", "invalid type"]);
}

#[test]
fn unsupported_architecture() {
    let dir = copy_fixture("tiny-llama");
    edit_config(&dir, |v| v["model_type"] = "t5".into());
    let (code, err) = logps(dir.path(), &data());
    assert_error(
        code,
        &err,
        &["unsupported model_type `t5`", "llama", "qwen3", "gpt2"],
    );
}

#[test]
fn missing_tensor() {
    let dir = copy_fixture("tiny-llama");
    edit_config(&dir, |v| v["num_hidden_layers"] = 3.into());
    let (code, err) = logps(dir.path(), &data());
    assert_error(
        code,
        &err,
        &["missing tensor `model.layers.2.input_layernorm.weight`"],
    );
}

#[test]
fn shape_mismatch() {
    let dir = copy_fixture("tiny-llama");
    edit_config(&dir, |v| v["intermediate_size"] = 100.into());
    let (code, err) = logps(dir.path(), &data());
    assert_error(code, &err, &["has shape [172, 64]", "implies [100, 64]"]);
}

fn write_data(body: &[u8]) -> tempfile::NamedTempFile {
    let f = tempfile::Builder::new()
        .suffix(".jsonl")
        .tempfile()
        .unwrap();
    fs::write(f.path(), body).unwrap();
    f
}

const GOOD: &str = r#"{"prompt": "Q: 1 + 1?", "chosen": " 2", "rejected": " 3"}"#;

#[test]
fn malformed_json_line() {
    let f = write_data(format!("{GOOD}\n{{\"prompt\": \"x\",\n").as_bytes());
    let (code, err) = logps(&fixture("tiny-llama"), f.path());
    assert_error(
        code,
        &err,
        &[&format!("{}:2:", f.path().display()), "malformed JSON"],
    );
}

#[test]
fn missing_field() {
    let f = write_data(
        format!("{GOOD}\n{GOOD}\n{{\"prompt\": \"q\", \"chosen\": \" a\"}}\n").as_bytes(),
    );
    let (code, err) = logps(&fixture("tiny-llama"), f.path());
    assert_error(code, &err, &[":3:", "missing field `rejected`"]);
}

#[test]
fn mistyped_field() {
    let f = write_data(b"{\"prompt\": \"q\", \"chosen\": 5, \"rejected\": \" b\"}\n");
    let (code, err) = logps(&fixture("tiny-llama"), f.path());
    assert_error(code, &err, &[":1:", "field `chosen`"]);
}

#[test]
fn empty_completion() {
    let f = write_data(b"{\"prompt\": \"q\", \"chosen\": \"\", \"rejected\": \" b\"}\n");
    let (code, err) = logps(&fixture("tiny-llama"), f.path());
    assert_error(code, &err, &[":1:", "field `chosen` is empty"]);
}

#[test]
fn non_utf8_data() {
    let f = write_data(b"{\"prompt\": \"q\xff\", \"chosen\": \"a\", \"rejected\": \"b\"}\n");
    let (code, err) = logps(&fixture("tiny-llama"), f.path());
    assert_error(code, &err, &["not valid UTF-8"]);
}

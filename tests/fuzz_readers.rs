//! Property tests for every reader of user data: JSONL data sets (every layout, through
//! `read_jsonl`, `data report` and `data balance-length`), TOML run configs, and checkpoint
//! `trainer_state.json`. Inputs: arbitrary bytes, arbitrary JSON values (biased towards the
//! keys the readers look for), huge lines and deep nesting. Properties: no panic, and every
//! rejection names the file — and, for data sets, the line, which is the first line that is
//! rejected on its own.

use std::path::{Path, PathBuf};

use leash::data::length::{balance_length, length_report};
use leash::data::read::read_jsonl;
use leash::LeashError;
use proptest::prelude::*;
use serde_json::{Map, Value};

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Checks a data-set rejection: it names `path`, and a line when the file has any content.
fn assert_names_file_and_line(err: &LeashError, path: &Path, lines: usize) {
    let text = err.to_string();
    let shown = path.display().to_string();
    assert!(text.starts_with(&shown), "does not name the file: {text}");
    assert!(text.contains("\nhint: "), "no hint: {text}");
    match err {
        LeashError::Row { line, .. } => {
            assert!(
                *line >= 1 && *line <= lines.max(1),
                "line {line} of {lines}: {text}"
            )
        }
        LeashError::File { message, .. } => {
            assert!(
                message.contains("no rows"),
                "a rejection without a line: {text}"
            )
        }
        other => panic!("unexpected error kind: {other}"),
    }
}

const KEYS: &[&str] = &[
    "prompt",
    "chosen",
    "rejected",
    "completion",
    "label",
    "text",
    "messages",
    "role",
    "content",
    "x",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON numbers are finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..5).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    })
}

/// Rows that are mostly objects with the readers' keys, so every layout's checks run.
fn json_row() -> impl Strategy<Value = Value> {
    prop_oneof![
        json_value(),
        prop::collection::vec((prop::sample::select(KEYS), json_value()), 1..5).prop_map(|kv| {
            Value::Object(
                kv.into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect::<Map<_, _>>(),
            )
        }),
    ]
}

fn check_file(dir: &Path, bytes: &[u8]) {
    let path = write(dir, "data.jsonl", bytes);
    let lines = bytes.split(|&b| b == b'\n').count();
    if let Err(e) = read_jsonl(&path) {
        assert_names_file_and_line(&e, &path, lines);
    }
    for result in [
        length_report(&path).map(|_| ()),
        balance_length(&path, &dir.join("out.jsonl")).map(|_| ()),
    ] {
        if let Err(e) = result {
            assert_names_file_and_line(&e, &path, lines);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let dir = tempfile::tempdir().unwrap();
        check_file(dir.path(), &bytes);
    }

    #[test]
    fn arbitrary_json_rows_fail_at_the_first_bad_line(rows in prop::collection::vec(json_row(), 1..6)) {
        let dir = tempfile::tempdir().unwrap();
        let lines: Vec<String> = rows.iter().map(Value::to_string).collect();
        let body = lines.join("\n");
        check_file(dir.path(), body.as_bytes());
        // The file's verdict is the first line's that is rejected on its own.
        let first_bad = lines.iter().position(|l| {
            read_jsonl(&write(dir.path(), "one.jsonl", l.as_bytes())).is_err()
        });
        let path = write(dir.path(), "all.jsonl", body.as_bytes());
        match (read_jsonl(&path), first_bad) {
            (Ok(read), None) => prop_assert_eq!(read.len(), lines.len()),
            (Err(LeashError::Row { line, .. }), Some(i)) => prop_assert_eq!(line, i + 1),
            (got, want) => prop_assert!(false, "file: {:?}, first bad line: {:?}", got.map(|r| r.len()), want),
        }
    }

    #[test]
    fn arbitrary_toml_configs_never_panic(text in ".{0,200}", rows in prop::collection::vec(json_value(), 0..3)) {
        let dir = tempfile::tempdir().unwrap();
        for body in [text.clone(), rows.iter().enumerate().map(|(i, v)| format!("learning_rate = {v}\nk{i} = {text:?}\n")).collect()] {
            let path = write(dir.path(), "run.toml", body.as_bytes());
            if let Err(e) = leash::train::config::read_toml(&path) {
                let msg = e.to_string();
                prop_assert!(msg.starts_with(&path.display().to_string()) && msg.contains("hint:"), "{}", msg);
            }
        }
    }

    #[test]
    fn arbitrary_trainer_states_never_panic(v in json_value()) {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "trainer_state.json", v.to_string().as_bytes());
        if let Err(e) = leash::train::checkpoint::read_state(dir.path()) {
            prop_assert!(e.to_string().contains("trainer_state.json"), "{}", e);
        }
    }
}

#[test]
fn huge_lines_and_deep_nesting() {
    let dir = tempfile::tempdir().unwrap();
    // A 4 MB prompt is read as it is.
    let big = "x".repeat(4 << 20);
    let row = serde_json::json!({"prompt": big, "chosen": "a", "rejected": "b"}).to_string();
    let path = write(
        dir.path(),
        "big.jsonl",
        format!("{row}\n{row}\n").as_bytes(),
    );
    assert_eq!(read_jsonl(&path).unwrap().len(), 2);
    // 100 000 levels of nesting: a rejection naming the line, not a stack overflow.
    let deep = format!(
        "{row}\n{{\"prompt\": {}1{}, \"chosen\": \"a\", \"rejected\": \"b\"}}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let path = write(dir.path(), "deep.jsonl", deep.as_bytes());
    let err = read_jsonl(&path).unwrap_err();
    assert_names_file_and_line(&err, &path, 2);
    assert!(err.to_string().contains(":2: malformed JSON"), "{err}");
    let toml = format!("beta = {}1{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let path = write(dir.path(), "deep.toml", toml.as_bytes());
    let err = leash::train::config::read_toml(&path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("deep.toml") && err.contains("hint:"), "{err}");
    // Invalid UTF-8 on line 3 is reported on line 3.
    let mut bytes = format!("{row}\n\n{{\"prompt\": \"\u{00e9}").into_bytes();
    bytes.extend_from_slice(b"\xff\"}\n");
    let path = write(dir.path(), "bad.jsonl", &bytes);
    let err = read_jsonl(&path).unwrap_err().to_string();
    assert!(err.contains("bad.jsonl:3: not valid UTF-8"), "{err}");
}

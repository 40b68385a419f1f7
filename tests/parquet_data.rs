//! Parquet and Hub-style dataset folders read as their JSONL equivalents: the same rows, the
//! same extra columns, the same training trajectory; bad files fail with the file, row and
//! column named. Fixtures: tests/fixtures/parquet, written by pyarrow
//! (scripts/make_parquet_fixtures.py) from the tiny-llama JSONL sets.

mod common;
use common::{copy_fixture, fixture, leash, stderr};
use leash::data::dataset::read_rows;
use leash::data::read::{read_jsonl, Content, Example, Row};
use leash::train::config::{resolve, Method, TrainArgs};
use leash::train::trainer::train;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn pq(name: &str) -> PathBuf {
    fixture("parquet").join(name)
}

fn same_rows(a: &[Row], b: &[Row]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.example, y.example, "row {}", x.line);
        assert_eq!(x.extra, y.extra, "row {}", x.line);
        assert_eq!(x.line, y.line);
    }
}

#[test]
fn parquet_file_reads_as_its_jsonl_across_row_groups() {
    let parquet = read_rows(&pq("pref_train.parquet"), None).unwrap();
    let jsonl = read_jsonl(&pq("pref_train_extra.jsonl")).unwrap();
    assert_eq!(parquet.len(), 64);
    same_rows(&parquet, &jsonl);
    // Extra columns survive with their types (for reward commands).
    assert_eq!(parquet[3].extra["id"], Value::from(3));
    assert_eq!(parquet[3].extra["score_chosen"], Value::from(6.5));
}

#[test]
fn hub_folder_gives_each_split_and_lists_them_when_one_is_missing() {
    let hub = pq("hub");
    let train_rows = read_rows(&hub, Some("train")).unwrap();
    let expected = read_jsonl(&fixture("tiny-llama/pref_train.jsonl")).unwrap();
    same_rows(&train_rows, &expected);
    let test_rows = read_rows(&hub, Some("test")).unwrap();
    same_rows(
        &test_rows,
        &read_jsonl(&fixture("tiny-llama/pref_test.jsonl")).unwrap(),
    );
    let err = read_rows(&hub, Some("validation")).unwrap_err().to_string();
    assert!(
        err.contains("no split `validation` (the folder has: test, train)")
            && err.contains("hint:"),
        "{err}"
    );
}

#[test]
fn conversational_list_of_structs_reads_as_messages() {
    let folder = read_rows(&pq("ultrafeedback"), Some("train_prefs")).unwrap();
    let jsonl = read_jsonl(&pq("ultrafeedback.jsonl")).unwrap();
    same_rows(&folder, &jsonl);
    let Example::Pair { prompt, chosen, .. } = &folder[0].example else {
        panic!("not a pair: {:?}", folder[0].example);
    };
    // Implicit prompt: the shared user turn.
    let (Content::Messages(p), Content::Messages(c)) = (prompt, chosen) else {
        panic!("not conversations");
    };
    assert_eq!((p.len(), p[0].role.as_str()), (1, "user"));
    assert_eq!((c.len(), c[0].role.as_str()), (1, "assistant"));
    assert_eq!(folder[0].extra["score_chosen"], Value::from(9.0));
}

fn dpo_metrics(model: &Path, dataset: &Path, split: Option<&str>) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let args = TrainArgs {
        model: Some(model.to_path_buf()),
        dataset: Some(dataset.to_path_buf()),
        dataset_train_split: split.map(String::from),
        output_dir: Some(dir.path().to_path_buf()),
        max_steps: Some(3),
        learning_rate: Some(5e-4),
        max_length: Some(128),
        per_device_train_batch_size: Some(4),
        logging_steps: Some(1),
        ..Default::default()
    };
    train(&resolve(Method::Dpo, &args).unwrap()).unwrap();
    std::fs::read_to_string(dir.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut row: Value = serde_json::from_str(l).unwrap();
            // The process's peak memory is not part of the trajectory.
            row.as_object_mut().unwrap().remove("peak_rss_mib");
            row
        })
        .collect()
}

#[test]
fn parquet_file_and_hub_folder_train_exactly_like_jsonl() {
    let model = fixture("tiny-llama");
    let jsonl = dpo_metrics(&model, &fixture("tiny-llama/pref_train.jsonl"), None);
    assert_eq!(jsonl.len(), 3);
    assert_eq!(
        dpo_metrics(&model, &pq("pref_train.parquet"), None),
        jsonl,
        "single Parquet file"
    );
    assert_eq!(
        dpo_metrics(&model, &pq("hub"), Some("train")),
        jsonl,
        "Hub folder, two shards"
    );
}

#[test]
fn conversational_parquet_trains_exactly_like_its_jsonl() {
    let model = copy_fixture("tiny-llama");
    let cfg_path = model.path().join("tokenizer_config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["chat_template"] = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let jsonl = dpo_metrics(model.path(), &pq("ultrafeedback.jsonl"), None);
    let parquet = dpo_metrics(model.path(), &pq("ultrafeedback"), Some("train_prefs"));
    assert_eq!(parquet, jsonl);
}

#[test]
fn missing_column_and_wrong_type_name_file_row_and_column() {
    let err = read_rows(&pq("bad_missing_rejected.parquet"), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "bad_missing_rejected.parquet: row 1 (row group 0): missing column `rejected`"
        ) && err.contains("hint:"),
        "{err}"
    );
    let err = read_rows(&pq("bad_chosen_int.parquet"), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "bad_chosen_int.parquet: row 1 (row group 0): column `chosen` must be a string"
        ) && err.contains("hint:"),
        "{err}"
    );
}

#[test]
fn unsupported_codec_says_which_and_how_to_convert() {
    let err = read_rows(&pq("zstd.parquet"), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("zstd.parquet: cannot read Parquet") && err.contains("ZSTD")
            || err.contains("zstd"),
        "{err}"
    );
    assert!(
        err.contains("hint: leash reads uncompressed, snappy, gzip and lz4"),
        "{err}"
    );
}

/// Truncated and damaged copies of a real file: each read ends in rows or an error naming the
/// file, never a panic (the reader's panics would abort the test thread).
#[test]
fn corrupt_parquet_is_an_error_not_a_panic() {
    let good = std::fs::read(pq("pref_train.parquet")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("damaged.parquet");
    let mut errors = 0;
    let mut cases: Vec<Vec<u8>> = [
        0,
        3,
        4,
        8,
        100,
        good.len() / 2,
        good.len() - 9,
        good.len() - 1,
    ]
    .iter()
    .map(|&n| good[..n].to_vec())
    .collect();
    // Flip one byte at many offsets: page headers, data, the footer's thrift metadata.
    for i in (0..good.len())
        .step_by(97)
        .chain(good.len() - 400..good.len() - 8)
    {
        let mut bad = good.clone();
        bad[i] ^= 0x5A;
        cases.push(bad);
    }
    for bytes in &cases {
        std::fs::write(&path, bytes).unwrap();
        if let Err(e) = read_rows(&path, None) {
            let msg = e.to_string();
            assert!(
                msg.contains("damaged.parquet") && msg.contains("hint:"),
                "{msg}"
            );
            errors += 1;
        }
    }
    assert!(
        errors >= 8,
        "only {errors} of {} damaged copies failed",
        cases.len()
    );
}

#[test]
fn cli_train_split_option_and_missing_split() {
    let dir = tempfile::tempdir().unwrap();
    let out = leash(&[
        "dpo",
        "--model",
        fixture("tiny-llama").to_str().unwrap(),
        "--dataset",
        pq("hub").to_str().unwrap(),
        "--dataset-train-split",
        "train_prefs",
        "--output-dir",
        dir.path().to_str().unwrap(),
        "--max-steps",
        "1",
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("no split `train_prefs` (the folder has: test, train)"),
        "{err}"
    );
}

/// GRPO reward commands see a Parquet row's own columns, as with JSONL.
#[test]
fn grpo_reward_command_receives_parquet_columns() {
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen.jsonl");
    let cmd = format!("tee -a {} | sed 's/.*/1/'", seen.display());
    let out_dir = dir.path().join("run");
    let out = leash(&[
        "grpo",
        "--model",
        fixture("tiny-llama").to_str().unwrap(),
        "--dataset",
        pq("pref_train.parquet").to_str().unwrap(),
        "--output-dir",
        out_dir.to_str().unwrap(),
        "--max-steps",
        "1",
        "--num-generations",
        "2",
        "--per-device-train-batch-size",
        "4",
        "--max-completion-length",
        "4",
        "--reward-cmd",
        &cmd,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<Value> = std::fs::read_to_string(&seen)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 4);
    for r in &rows {
        let id = r["id"].as_u64().unwrap() as usize;
        assert_eq!(
            r["score_chosen"].as_f64().unwrap(),
            8.0 - (id % 5) as f64 * 0.5
        );
        assert!(r["completion"].is_string(), "{r}");
    }
}

//! `--report-to tensorboard` and the run report. The stored event file and what TensorBoard's
//! own EventAccumulator read from it (tests/fixtures/tensorboard, made by
//! scripts/check_tensorboard.py) pin the format; a live DPO run's events must carry every
//! number of its metrics.jsonl at its step, and the run must leave plots/ and report.md.

mod common;
use common::{fixture, leash, stderr};
use leash::report::tensorboard::{read_events, tag_for, Data, Event};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

type Scalars = BTreeMap<String, Vec<(i64, f32)>>;

fn scalars_of(events: &[Event]) -> Scalars {
    let mut out = Scalars::new();
    for e in events {
        for (tag, data) in &e.values {
            if let Data::Scalar(x) = data {
                out.entry(tag.clone()).or_default().push((e.step, *x));
            }
        }
    }
    out
}

/// What metrics.jsonl says TensorBoard should show: every number but `step`, at its step.
fn scalars_of_metrics(path: &Path) -> Scalars {
    let mut out = Scalars::new();
    for line in std::fs::read_to_string(path).unwrap().lines() {
        let m: serde_json::Map<String, Value> = serde_json::from_str(line).unwrap();
        let step = m["step"].as_i64().unwrap();
        for (k, v) in &m {
            if let (false, Some(x)) = (k == "step", v.as_f64()) {
                out.entry(tag_for(k)).or_default().push((step, x as f32));
            }
        }
    }
    out
}

#[test]
fn stored_event_file_reads_as_tensorboard_read_it() {
    let dir = fixture("tensorboard");
    let events = read_events(&dir.join("events.out.tfevents.fixture")).unwrap();
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected_scalars.json")).unwrap())
            .unwrap();
    let mut python = Scalars::new();
    for (tag, points) in golden["scalars"].as_object().unwrap() {
        for p in points.as_array().unwrap() {
            python
                .entry(tag.clone())
                .or_default()
                .push((p[0].as_i64().unwrap(), p[1].as_f64().unwrap() as f32));
        }
    }
    assert!(python.contains_key("train/loss") && python.contains_key("eval/loss"));
    assert_eq!(scalars_of(&events), python);
    // The writer's mapping, checked against TensorBoard's view of the same run.
    assert_eq!(scalars_of_metrics(&dir.join("metrics.jsonl")), python);
    let text = events
        .iter()
        .flat_map(|e| &e.values)
        .find_map(|(tag, d)| match (tag.as_str(), d) {
            ("args", Data::Text(t)) => Some(t.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(Value::from(text), golden["text"]["args"][0]);
}

#[test]
fn dpo_run_logs_every_metric_to_tensorboard_and_writes_its_report() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = fixture("tiny-llama");
    let out = leash(&[
        "dpo",
        "--model",
        tiny.to_str().unwrap(),
        "--dataset",
        tiny.join("pref_train.jsonl").to_str().unwrap(),
        "--eval-dataset",
        tiny.join("pref_test.jsonl").to_str().unwrap(),
        "--output-dir",
        dir.path().to_str().unwrap(),
        "--max-steps",
        "4",
        "--logging-steps",
        "1",
        "--eval-steps",
        "2",
        "--save-steps",
        "2",
        "--learning-rate",
        "5e-4",
        "--max-length",
        "128",
        "--report-to",
        "tensorboard",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let files: Vec<_> = std::fs::read_dir(dir.path().join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let events = read_events(&files[0]).unwrap();
    let metrics = scalars_of_metrics(&dir.path().join("metrics.jsonl"));
    assert_eq!(scalars_of(&events), metrics);
    assert_eq!(metrics["eval/loss"].len(), 2);
    assert_eq!(metrics["train/rewards/margins"].len(), 4);

    // plots/ and report.md: the curves DPO logs, linked from the report with the final numbers.
    let report = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    for png in [
        "loss.png",
        "rewards.png",
        "logps.png",
        "logps_per_token.png",
        "learning_rate.png",
        "eval_rewards.png",
    ] {
        let path = dir.path().join("plots").join(png);
        let bytes = std::fs::read(&path).unwrap_or_else(|_| panic!("{png} missing"));
        assert_eq!(&bytes[1..4], b"PNG", "{png}");
        assert!(
            report.contains(&format!("(plots/{png})")),
            "{png} not linked"
        );
    }
    let last_loss = std::fs::read_to_string(dir.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["loss"].as_f64())
        .next_back()
        .unwrap();
    assert!(
        report.contains(&format!("| loss | {last_loss:.4} |")),
        "{report}"
    );
    assert!(report.contains("Final eval metrics"), "{report}");
}

//! The demo end to end in its small configuration: it writes the report and plots, and the
//! DPO-aligned model beats its SFT reference under the judge on held-out prompts.

use leash::demo::{run_demo, DemoConfig};

#[test]
fn small_demo_aligns_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let summary = run_demo(dir.path(), &DemoConfig::small()).unwrap();
    let r = &summary.report;
    let f = |k: &str| r[k].as_f64().unwrap();
    assert!(f("policy/judge_score") > f("reference/judge_score"), "{r}");
    assert!(f("win_rate") > f("loss_rate"), "{r}");
    assert!(f("kl") > 0.0, "{r}");
    let md = std::fs::read_to_string(&summary.report_path).unwrap();
    assert!(md.contains("judge win rate"));
    // What got worse is stated beside what got better, aspect by aspect.
    assert!(md.contains("## What got better, what got worse"), "{md}");
    assert!(
        md.contains("**Better:**") && md.contains("**Worse:**"),
        "{md}"
    );
    assert!(md.contains("| correct answers |"), "{md}");
    for png in [
        "sft_loss.png",
        "dpo_loss.png",
        "dpo_rewards.png",
        "dpo_logps.png",
    ] {
        assert!(dir.path().join(png).exists(), "{png} missing");
    }
    for model in ["base", "sft", "dpo"] {
        assert!(
            dir.path().join(model).join("tokenizer.json").exists(),
            "{model}"
        );
    }
}

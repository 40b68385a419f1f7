//! Each lab's qualitative finding holds on real (small) training runs: its computed verdict
//! says "reproduced". One shared SFT reference serves all labs.

use leash::demo::DemoConfig;
use leash::lab::{run_lab, EXPERIMENTS};

#[test]
fn every_lab_reproduces_its_lesson() {
    let root = tempfile::tempdir().unwrap();
    let cfg = DemoConfig::small();
    for name in EXPERIMENTS {
        let outcome = run_lab(name, root.path(), &cfg).unwrap();
        assert!(outcome.reproduced, "lab {name}: {}", outcome.verdict);
        let report = std::fs::read_to_string(&outcome.report).unwrap();
        assert!(report.contains("**Verdict:**"), "{name}");
        // Every lab draws its lesson: each linked plot exists, and there is at least one.
        let links: Vec<&str> = report
            .split("](")
            .skip(1)
            .filter_map(|s| s.split(')').next())
            .filter(|l| l.ends_with(".png"))
            .collect();
        assert!(!links.is_empty(), "lab {name} draws no plot:\n{report}");
        let dir = outcome.report.parent().unwrap();
        for l in links {
            assert!(dir.join(l).exists(), "lab {name}: {l} missing");
        }
    }
    assert!(run_lab("nope", root.path(), &cfg).is_err());
}

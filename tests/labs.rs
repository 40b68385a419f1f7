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
    }
    assert!(run_lab("nope", root.path(), &cfg).is_err());
}

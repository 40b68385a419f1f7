#!/usr/bin/env python3
"""Dev-only check that TensorBoard itself reads leash's event files, and the golden it leaves for
tests/tensorboard.rs. Usage (after `cargo build`):

  /opt/pyenv/bin/python scripts/check_tensorboard.py

Runs a short `leash dpo --report-to tensorboard` on the tiny-llama fixture (with eval), reads the
event file with tensorboard's EventAccumulator, checks that every number of metrics.jsonl is a
scalar at its step (transformers' names: train/<key>, eval/<key without eval_>) and that the
config is there as text, then stores in tests/fixtures/tensorboard/: the event file, the run's
metrics.jsonl, and what EventAccumulator returned (expected_scalars.json).
"""

import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/fixtures/tensorboard"


def main():
    tmp = pathlib.Path(tempfile.mkdtemp())
    fx = ROOT / "tests/fixtures/tiny-llama"
    subprocess.run([str(ROOT / "target/debug/leash"), "dpo", "--model", str(fx),
                    "--dataset", str(fx / "pref_train.jsonl"), "--eval-dataset", str(fx / "pref_test.jsonl"),
                    "--output-dir", str(tmp / "run"), "--max-steps", "4", "--logging-steps", "1",
                    "--eval-steps", "2", "--learning-rate", "5e-4", "--max-length", "128",
                    "--report-to", "tensorboard"], check=True)
    events = sorted((tmp / "run/runs").glob("events.out.tfevents.*"))
    assert len(events) == 1, events
    acc = EventAccumulator(str(events[0]), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    texts = {tag: [t.tensor_proto.string_val[0].decode() for t in acc.Tensors(tag)]
             for tag in acc.Tags()["tensors"]}
    metrics = [json.loads(l) for l in (tmp / "run/metrics.jsonl").read_text().splitlines()]
    want = {}
    for m in metrics:
        for k, v in m.items():
            if k == "step" or not isinstance(v, (int, float)):
                continue
            tag = "eval/" + k[5:] if k.startswith("eval_") else "train/" + k
            want.setdefault(tag, []).append([m["step"], v])
    assert set(want) == set(scalars), (set(want) ^ set(scalars))
    import numpy as np
    for tag, pts in want.items():
        got = scalars[tag]
        assert [p[0] for p in got] == [p[0] for p in pts], tag
        for (_, a), (_, b) in zip(got, pts):
            assert a == float(np.float32(b)), (tag, a, b)
    cfg = json.loads((tmp / "run/leash_config.json").read_text())
    assert "args" in texts and json.loads(texts["args"][0]) == cfg, texts.keys()
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("events.out.tfevents.*"):
        old.unlink()
    shutil.copy(events[0], OUT / "events.out.tfevents.fixture")
    shutil.copy(tmp / "run/metrics.jsonl", OUT / "metrics.jsonl")
    (OUT / "expected_scalars.json").write_text(json.dumps(
        {"scalars": scalars, "text": texts}, indent=1, sort_keys=True) + "\n")
    print(f"ok: {len(scalars)} scalar tags, {sum(len(v) for v in scalars.values())} points; text tags {list(texts)}")


if __name__ == "__main__":
    sys.exit(main())

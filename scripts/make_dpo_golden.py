#!/usr/bin/env python3
"""TRL DPOTrainer's 30-step trajectory on tests/fixtures/tiny-qwen3, written to
tests/fixtures/tiny-qwen3/golden_dpo.json in the format of tests/fixtures/tiny-llama/golden/dpo.json.

Settings are those of the shared tiny-llama goldens (see tests/train_golden.rs): fp32, batch 8,
AdamW (torch) lr 5e-4, betas (0.9, 0.999), eps 1e-8, no weight decay, constant schedule without
warm-up, clipping at global norm 1.0, max_length 128, beta 0.1, sigmoid loss, no dropout, and
sequential batches (step k uses rows 8k..8k+7 of pref_train.jsonl, wrapping around), one metric
record per step.

Run from the repository root (trl 1.16.0, transformers 5.24.0, torch 2.15.0, CPU):

    /opt/pyenv/bin/python scripts/make_dpo_golden.py
"""

import json
import platform
import sys
import tempfile
from pathlib import Path

import datasets
import torch
import transformers
import trl
from torch.utils.data import SequentialSampler
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "tiny-qwen3"
DATA = ROOT / "tests" / "fixtures" / "tiny-llama" / "pref_train.jsonl"
STEPS = 30
BATCH = 8


class SequentialDPOTrainer(DPOTrainer):
    """Batches in file order, so the run is comparable row for row."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class Record(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.steps.append({"step": state.global_step, **{k: float(v) for k, v in logs.items()}})


def main() -> None:
    torch.manual_seed(42)
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(FIXTURE)
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    dataset = datasets.Dataset.from_list(rows)
    record = Record()
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out,
            max_steps=STEPS,
            per_device_train_batch_size=BATCH,
            learning_rate=5e-4,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            adam_beta1=0.9,
            adam_beta2=0.999,
            adam_epsilon=1e-8,
            optim="adamw_torch",
            max_grad_norm=1.0,
            max_length=128,
            beta=0.1,
            loss_type=["sigmoid"],
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=42,
            bf16=False,
            fp16=False,
            use_cpu=True,
            disable_dropout=True,
            dataloader_drop_last=False,
        )
        trainer = SequentialDPOTrainer(
            model=model, args=config, train_dataset=dataset, processing_class=tok, callbacks=[record]
        )
        trainer.train()
    assert len(record.steps) == STEPS, len(record.steps)
    for s in record.steps:
        k = s["step"] - 1
        s["batch_rows"] = [(BATCH * k + i) % len(rows) for i in range(BATCH)]
    doc = {
        "trainer": "dpo",
        "trl_class": "DPOTrainer",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "datasets": datasets.__version__,
        },
        "fixture": "tiny-qwen3",
        "generated_by": "scripts/make_dpo_golden.py",
        "settings": {"steps": STEPS, "batch_size": BATCH, "lr": 5e-4, "optim": "adamw_torch", "lr_scheduler": "constant",
                     "max_grad_norm": 1.0, "max_length": 128, "beta": 0.1, "loss_type": ["sigmoid"], "dtype": "float32",
                     "sampler": "sequential", "attn_implementation": "sdpa"},
        "steps": record.steps,
    }
    (FIXTURE / "golden_dpo.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(record.steps[0]), file=sys.stderr)
    print(json.dumps(record.steps[-1]), file=sys.stderr)


if __name__ == "__main__":
    main()

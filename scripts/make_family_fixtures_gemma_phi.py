#!/usr/bin/env python3
"""Build the Gemma 3 text and Phi-3 test checkpoints and their golden log-probabilities (dev only).

What it writes (relative to the repository root):

  tests/fixtures/tiny-gemma3/  random Gemma3ForCausalLM (model_type gemma3_text): head_dim 24 with
                               hidden 64 / 4 heads (so head_dim != hidden/heads), 2 kv heads,
                               query_pre_attn_scalar 20 (!= head_dim), layer types
                               sliding/sliding/full/sliding with sliding_window 12 (the scored
                               sequences run to 128 tokens, so the window matters), local RoPE base
                               10^4 and global base 10^6 with linear scaling x2, tied embeddings,
                               randomised (1+w) norm weights + golden_logps.json
  tests/fixtures/tiny-phi3/    random Phi3ForCausalLM: fused qkv_proj and gate_up_proj, 2 kv heads of
                               4, partial_rotary_factor 0.5, LongRoPE with original_max_position_embeddings
                               8 (every scored sequence is longer, so the long factors and the attention
                               factor apply), sliding_window 10, untied lm_head + golden_logps.json

Both reuse the tiny-llama tokenizer and pref_test.jsonl and the reference tokenization and scoring
rules of scripts/make_fixtures.py (imported from there; see its docstring).

With --check-saved DIR (a checkpoint leash wrote from one of these fixtures), it loads DIR with
transformers, fails on any missing or unexpected tensor, scores pref_test.jsonl and writes
DIR/../saved_golden.json-style output to --saved-out (see tests/families_gemma_phi.rs).

Run from the repository root (torch 2.15.0, transformers 5.24.0, CPU):

    /opt/pyenv/bin/python scripts/make_family_fixtures_gemma_phi.py
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, Phi3Config, Phi3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

GEMMA3_SEED = 3131
PHI3_SEED = 3232
ATTN = "eager"  # sdpa may skip the sliding-window mask (is_causal shortcut); eager applies it


def make_gemma3(src: Path, dest: Path) -> None:
    config = Gemma3TextConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        query_pre_attn_scalar=20,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
        },
        attention_bias=False,
        sliding_window=12,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        initializer_range=mf.INIT_STD,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(GEMMA3_SEED)
    model = Gemma3ForCausalLM(config).float().eval()
    gen = torch.Generator().manual_seed(GEMMA3_SEED + 1)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            mf.randomise_(param, gen, 0.0, 0.3)  # the init leaves them at zero, i.e. scale 1
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "head not tied"
    model.save_pretrained(dest, safe_serialization=True)
    mf.copy_tokenizer(src, dest)


def make_phi3(src: Path, dest: Path) -> None:
    config = Phi3Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        original_max_position_embeddings=8,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10_000.0,
            "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.25, 2.0, 3.5],
            "long_factor": [1.5, 4.0, 9.0, 20.0],
        },
        sliding_window=10,
        tie_word_embeddings=False,
        hidden_act="silu",
        initializer_range=mf.INIT_STD,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(PHI3_SEED)
    model = Phi3ForCausalLM(config).float().eval()
    gen = torch.Generator().manual_seed(PHI3_SEED + 1)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            mf.randomise_(param, gen, 1.0, 0.2)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr(), "head tied"
    model.save_pretrained(dest, safe_serialization=True)
    mf.copy_tokenizer(src, dest)


def check_saved(saved: Path, out: Path, tok, rows) -> None:
    """Loads a checkpoint leash wrote, strictly, and records transformers' log-probs on it."""
    model, info = AutoModelForCausalLM.from_pretrained(
        saved, attn_implementation=mf.ATTN_IMPLEMENTATION, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"transformers reports {problems} for {saved}"
    model = model.float().eval()
    golden = mf.golden_rows(model, tok, rows)
    from safetensors import safe_open

    with safe_open(saved / "model.safetensors", "pt") as f:
        names = sorted(f.keys())
    expected = sorted(k for k in model.state_dict().keys() if not (model.config.tie_word_embeddings and k == "lm_head.weight"))
    assert names == expected, (names, expected)
    doc = {
        "description": f"transformers' log-probs of pref_test.jsonl under the checkpoint leash saved ({saved.name}); "
        "loaded with no missing, unexpected or mismatched tensors.",
        "versions": mf.versions(),
        "generated_by": "scripts/make_family_fixtures_gemma_phi.py --check-saved",
        "tensor_names": names,
        "rows": golden,
    }
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{saved}: {len(names)} tensors, strict load ok, {len(golden)} rows -> {out}")


def dpo_trajectory(model_dir: Path, data: Path, out: Path) -> None:
    """TRL DPOTrainer for 30 steps with the settings of tests/fixtures/tiny-llama/golden/dpo.json
    (batch 8, AdamW lr 5e-4, constant schedule, clip 1.0, max_length 128, beta 0.1, sequential
    batches, fp32) and every metric it logs at every step."""
    import tempfile

    import trl
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(2)  # as the tiny-llama goldens
    torch.manual_seed(42)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=ATTN)
    tok = mf.AutoTokenizer.from_pretrained(model_dir)
    dataset = load_dataset("json", data_files=str(data), split="train")
    settings = dict(
        per_device_train_batch_size=8,
        learning_rate=5e-4,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        optim="adamw_torch",
        max_length=128,
        beta=0.1,
        loss_type=["sigmoid"],
        max_steps=30,
        seed=42,
        train_sampling_strategy="sequential",
    )
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            output_dir=tmp,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            # TRL 1.16 defaults to bf16=True, which on the CPU autocasts the matmuls to bfloat16;
            # the goldens are float32 throughout.
            bf16=False,
            **settings,
        )
        trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
        trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    doc = {
        "trainer": "dpo",
        "trl_class": "DPOTrainer",
        "versions": {**mf.versions(), "trl": trl.__version__, "torch_num_threads": torch.get_num_threads()},
        "fixture": model_dir.name,
        "generated_by": "scripts/make_family_fixtures_gemma_phi.py --dpo-trajectory",
        "settings": {**settings, "dtype": "float32", "attn_implementation": ATTN, "data": data.name},
        "steps": steps,
    }
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{model_dir.name}: {len(steps)} DPO steps -> {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parent.parent / "tests/fixtures/tiny-llama")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "tests" / "fixtures")
    parser.add_argument("--check-saved", type=Path, help="a checkpoint folder leash saved")
    parser.add_argument("--saved-out", type=Path, help="where --check-saved writes its golden")
    parser.add_argument("--dpo-trajectory", type=Path, help="a fixture folder to train 30 TRL DPO steps on")
    parser.add_argument("--trajectory-out", type=Path, help="where --dpo-trajectory writes its golden")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tok = mf.AutoTokenizer.from_pretrained(args.src)
    rows = mf.read_jsonl(args.src / "pref_test.jsonl")
    if args.dpo_trajectory:
        dpo_trajectory(args.dpo_trajectory, args.src / "pref_train.jsonl", args.trajectory_out)
        return
    if args.check_saved:
        check_saved(args.check_saved, args.saved_out, tok, rows)
        return
    for name, make, desc in (
        ("tiny-gemma3", make_gemma3, "tiny-gemma3 (random Gemma3ForCausalLM, fp32)"),
        ("tiny-phi3", make_phi3, "tiny-phi3 (random Phi3ForCausalLM, fp32)"),
    ):
        dest = mf.fresh_dir(args.out / name)
        make(args.src, dest)
        golden = mf.write_golden(dest, desc, mf.load_fp32(dest), tok, rows)
        print(f"{name}: {len(golden)} golden rows")


if __name__ == "__main__":
    main()

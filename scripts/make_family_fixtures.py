#!/usr/bin/env python3
"""Build tiny checkpoints of the architectures leash loads, with configs varied as real ones vary,
their transformers log-prob goldens, PEFT adapters in every target_modules form, and (with --leash)
the round-trip checks: checkpoints and adapters written by leash, loaded by transformers / PEFT.

What it writes under tests/fixtures/ (dev-only; tests never run Python):

  tiny-gpt2-untied/  GPT2LMHeadModel, "tie_word_embeddings": false with its own lm_head.weight,
                     n_inner = 96 (not 4 * n_embd)                              + golden_logps.json
  tiny-qwen3/        Qwen3ForCausalLM, head_dim 24 != hidden/heads = 16, per-head q/k RMSNorm,
                     tied embeddings                                             + golden_logps.json
  tiny-llama3/       LlamaForCausalLM with Llama 3.1-style "rope_scaling" {"rope_type": "llama3"}
                     in the legacy top-level form Llama 3.x checkpoints use, attention_bias and
                     mlp_bias true, tied embeddings                              + golden_logps.json
  tiny-mistral/      MistralForCausalLM, sliding_window 16 (shorter than most test sequences, so the
                     window changes the numbers), one kv head, untied            + golden_logps.json
  tiny-qwen3/peft-{all-linear,regex,list}/, tiny-gpt2-untied/peft-all-linear/
                     adapters written by PEFT (random A and B, init_lora_weights=False) with each
                     target_modules form + golden_logps.json of base+adapter under PEFT

With --leash PATH (the built leash binary) it also:
  * trains each checkpoint 2 DPO steps with leash, loads leash's saved folder in transformers and
    records in <fixture>/golden_roundtrip.json the largest |leash logp - transformers logp| over
    pref_test.jsonl, and the saved tensor names/shapes (which must equal transformers' own);
  * trains a LoRA adapter with `--lora-target-modules all-linear` on tiny-qwen3, stores it as
    tiny-qwen3/leash-all-linear/ and scores it with PEFT (golden_logps.json there).

Tokenization and scoring follow scripts/make_fixtures.py (imported): TRL's DPOTrainer rules, one
unpadded float32 sequence per forward pass, eager attention, max_length 128.

It recreates the fixture folders, so run scripts/make_dpo_golden.py afterwards (it writes
tiny-qwen3/golden_dpo.json). Run from the repository root (torch 2.15.0, transformers 5.24.0,
peft 0.21.2, CPU):

    /opt/pyenv/bin/python scripts/make_family_fixtures.py [--leash target/debug/leash]
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import peft
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import (  # noqa: E402
    INIT_STD,
    copy_tokenizer,
    fresh_dir,
    golden_rows,
    load_fp32,
    randomise_,
    read_jsonl,
    versions,
    write_golden,
)

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
LLAMA = FIXTURES / "tiny-llama"
COMMON = dict(vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=INIT_STD)


def randomise_norms_and_biases(model, seed: int) -> None:
    """Norm weights 1 ± 0.2, biases ± 0.2 (init leaves them at 1 and 0, hiding a missing one)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() == 1 and ("norm" in name or ".ln_" in name or name.startswith("ln_")) and name.endswith("weight"):
            randomise_(param, gen, 1.0, 0.2)
        elif name.endswith(".bias"):
            randomise_(param, gen, 0.0, 0.2)


def save(model, dest: Path) -> None:
    model.save_pretrained(dest, safe_serialization=True)
    copy_tokenizer(LLAMA, dest)


def make_gpt2_untied(dest: Path) -> None:
    config = GPT2Config(
        n_positions=256, n_embd=64, n_layer=2, n_head=4, n_inner=96, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False, **COMMON,
    )
    torch.manual_seed(11)
    model = GPT2LMHeadModel(config).float().eval()
    randomise_norms_and_biases(model, 12)
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr(), "head tied"
    save(model, dest)


def make_qwen3(dest: Path) -> None:
    config = Qwen3Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=24, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True,
        use_sliding_window=False, attention_dropout=0.0, **COMMON,
    )
    torch.manual_seed(21)
    model = Qwen3ForCausalLM(config).float().eval()
    randomise_norms_and_biases(model, 22)
    assert model.model.layers[0].self_attn.q_norm.weight.shape == (24,)
    save(model, dest)


def make_llama3(dest: Path) -> None:
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5, rope_parameters=rope,
        attention_bias=True, mlp_bias=True, tie_word_embeddings=True, **COMMON,
    )
    torch.manual_seed(31)
    model = LlamaForCausalLM(config).float().eval()
    randomise_norms_and_biases(model, 32)
    save(model, dest)
    # Rewrite the rope settings as Llama 3.x checkpoints carry them: top-level rope_theta and a
    # "rope_scaling" object (transformers 5 still reads that form).
    path = dest / "config.json"
    cfg = json.loads(path.read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    reloaded = LlamaConfig.from_pretrained(dest)
    assert reloaded.rope_parameters["rope_type"] == "llama3", reloaded.rope_parameters
    assert reloaded.rope_parameters["original_max_position_embeddings"] == 64, reloaded.rope_parameters


def make_mistral(dest: Path) -> None:
    config = MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        max_position_embeddings=512, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        sliding_window=16, tie_word_embeddings=False, **COMMON,
    )
    torch.manual_seed(41)
    model = MistralForCausalLM(config).float().eval()
    randomise_norms_and_biases(model, 42)
    save(model, dest)


def peft_adapter(base: Path, dest: Path, target_modules, seed: int) -> None:
    """An adapter as PEFT writes it, with random A and B so that it changes the log-probs."""
    torch.manual_seed(seed)
    model = load_fp32(base)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=target_modules,
                        init_lora_weights=False, task_type="CAUSAL_LM")
    wrapped = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.mul_(0.5)  # keep the update moderate: log-probs move by a few nats, not hundreds
    wrapped.save_pretrained(dest)


def score_adapter(base: Path, adapter: Path, rows, tok) -> list[dict]:
    model = PeftModel.from_pretrained(load_fp32(base), adapter).eval()
    return golden_rows(model, tok, rows)


def write_rows(dest: Path, description: str, rows: list[dict], extra: dict) -> None:
    doc = {"description": description, "versions": {**versions(), "peft": peft.__version__},
           "generated_by": "scripts/make_family_fixtures.py", "max_length": 128, **extra, "rows": rows}
    (dest / "golden_logps.json").write_text(json.dumps(doc, indent=1) + "\n")


def tensor_shapes(path: Path) -> dict:
    with safe_open(path / "model.safetensors", "pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in sorted(f.keys())}


def run(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stderr}"
    return out.stdout


def leash_logps(leash: str, model: Path) -> list[dict]:
    out = run([leash, "logps", "--model", str(model), "--dataset", str(LLAMA / "pref_test.jsonl"), "--max-length", "128"])
    return [json.loads(line) for line in out.splitlines()]


def max_diff(a: list[dict], b: list[dict]) -> float:
    assert [r["index"] for r in a] == [r["index"] for r in b]
    return max(abs(x[f"{k}_logp"] - y[f"{k}_logp"]) for x, y in zip(a, b) for k in ("chosen", "rejected"))


def leash_dpo(leash: str, model: Path, out: Path, extra: list[str], lr: str = "1e-3", steps: str = "2") -> None:
    run([leash, "dpo", "--model", str(model), "--dataset", str(LLAMA / "pref_train.jsonl"), "--output-dir", str(out),
         "--max-steps", steps, "--per-device-train-batch-size", "4", "--learning-rate", lr, *extra])


def roundtrip(leash: str, name: str, tok, rows) -> None:
    """leash trains 2 steps and saves; transformers loads the folder and must score as leash does."""
    fixture = FIXTURES / name
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        leash_dpo(leash, fixture, out, [])
        mine = leash_logps(leash, out)
        theirs = golden_rows(load_fp32(out), tok, rows)
        diff = max_diff(mine, theirs)
        moved = max_diff(theirs, golden_rows(load_fp32(fixture), tok, rows))
        same_tensors = tensor_shapes(out) == tensor_shapes(fixture)
        saved_config = json.loads((out / "config.json").read_text())
        source_config = json.loads((fixture / "config.json").read_text())
    doc = {
        "description": f"{name}: leash dpo (2 steps, lr 1e-3) saves; transformers loads the folder and scores pref_test.jsonl.",
        "versions": versions(),
        "generated_by": "scripts/make_family_fixtures.py --leash",
        "max_abs_logp_diff_leash_vs_transformers": diff,
        "max_abs_logp_change_from_training": moved,
        "tensor_names_and_shapes_equal_transformers_save": same_tensors,
        "config_equal_except_dtype": {k: v for k, v in saved_config.items() if k != "dtype"}
        == {k: v for k, v in source_config.items() if k != "dtype"},
    }
    (fixture / "golden_roundtrip.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"round trip {name}: |leash - transformers| = {diff:.2e}, training moved logps by {moved:.3f}, "
          f"tensors equal: {same_tensors}")
    assert diff < 1e-4 and same_tensors and moved > 1e-3, doc


def leash_lora(leash: str, tok, rows) -> None:
    base = FIXTURES / "tiny-qwen3"
    dest = base / "leash-all-linear"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        leash_dpo(leash, base, out, ["--use-peft", "--lora-target-modules", "all-linear", "--lora-r", "4",
                                     "--lora-alpha", "8", "--lora-dropout", "0"], lr="5e-2", steps="3")
        fresh_dir(dest)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(out / f, dest / f)
        merged = Path(tmp) / "merged"
        run([leash, "merge", "--model", str(base), "--adapter", str(dest), "--output-dir", str(merged)])
        leash_merged = leash_logps(leash, merged)
    golden = score_adapter(base, dest, rows, tok)
    diff = max_diff(leash_merged, golden)
    moved = max_diff(golden, json.loads((base / "golden_logps.json").read_text())["rows"])
    write_rows(dest, "tiny-qwen3 + the all-linear LoRA adapter leash wrote, loaded and scored by PEFT.", golden,
               {"max_abs_logp_diff_peft_vs_leash_merged": diff, "max_abs_logp_change_from_adapter": moved})
    print(f"leash all-linear adapter under PEFT: |PEFT - leash merged| = {diff:.2e}, adapter moved logps by {moved:.3f}")
    assert diff < 1e-4 and moved > 1e-3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--leash", help="built leash binary: also run the round-trip and PEFT checks")
    parser.add_argument("--roundtrip-only", nargs="+", metavar="FIXTURE",
                        help="with --leash: only record the round trip of these existing fixtures (e.g. tiny-llama)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(LLAMA)
    rows = read_jsonl(LLAMA / "pref_test.jsonl")
    if args.roundtrip_only:
        for name in args.roundtrip_only:
            roundtrip(args.leash, name, tok, rows)
        return
    makers = {
        "tiny-gpt2-untied": (make_gpt2_untied, "random GPT2LMHeadModel, untied lm_head, n_inner 96"),
        "tiny-qwen3": (make_qwen3, "random Qwen3ForCausalLM, head_dim 24, q/k norm, tied"),
        "tiny-llama3": (make_llama3, "random LlamaForCausalLM, llama3 rope_scaling, attention/mlp biases, tied"),
        "tiny-mistral": (make_mistral, "random MistralForCausalLM, sliding_window 16, 1 kv head, untied"),
    }
    for name, (make, desc) in makers.items():
        dest = fresh_dir(FIXTURES / name)
        make(dest)
        write_golden(dest, f"{name} ({desc}, fp32)", load_fp32(dest), tok, rows,
                     {"generated_by": "scripts/make_family_fixtures.py"})
        print(f"{name}: written")

    forms = {"all-linear": "all-linear", "regex": r".*\.(q|v)_proj", "list": ["k_proj", "down_proj"]}
    adapters = [("tiny-qwen3", form, target) for form, target in forms.items()]
    adapters.append(("tiny-gpt2-untied", "all-linear", "all-linear"))
    for seed, (name, form, target) in enumerate(adapters):
        base = FIXTURES / name
        dest = fresh_dir(base / f"peft-{form}")
        peft_adapter(base, dest, target, 100 + seed)
        saved = json.loads((dest / "adapter_config.json").read_text())["target_modules"]
        write_rows(dest, f"{name} + a PEFT adapter (target_modules {target!r} given to LoraConfig), scored by PEFT.",
                   score_adapter(base, dest, rows, tok), {"target_modules_given": target, "target_modules_saved": saved})
        print(f"{name} peft-{form}: target_modules saved as {saved!r}")

    if args.leash:
        for name in makers:
            roundtrip(args.leash, name, tok, rows)
        leash_lora(args.leash, tok, rows)

    for path in FIXTURES.rglob("*"):  # save_pretrained writes the weights with mode 600
        path.chmod(0o755 if path.is_dir() else 0o644)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Build the test fixtures under tests/fixtures/ and their golden log-probabilities.

What it writes (relative to the repository root):

  tests/fixtures/tiny-llama/         verbatim copy of the shared tiny-llama fixture (weights, tokenizer,
                                     JSONL data, golden/ from TRL 1.16.0)
  tests/fixtures/tiny-llama-bf16/    the same weights cast to bfloat16 (config dtype "bfloat16")
                                     + golden_logps.json
  tests/fixtures/tiny-llama-sharded/ the same fp32 weights split into two safetensors shards plus
                                     model.safetensors.index.json (Hugging Face sharded layout); its
                                     log-probs are those of tiny-llama/golden/logps.json
  tests/fixtures/tiny-qwen2/         random Qwen2ForCausalLM (tied embeddings, q/k/v biases, legacy
                                     top-level `rope_theta` in config.json) + golden_logps.json
  tests/fixtures/tiny-gpt2/          random GPT2LMHeadModel (tied embeddings, Conv1D weights, learned
                                     positions, LayerNorm with bias) + golden_logps.json

All new checkpoints reuse the tiny-llama tokenizer (byte-level BPE, vocab 512, <pad>=0, <bos>=1,
<eos>=2; its post-processor prepends BOS). GPT-2 normally has its own tokenizer and no BOS; reusing
this one is deliberate, since the fixtures test scoring and not tokenization.

The random models are initialised with a larger std (initializer_range 0.2) than usual, and their
biases and norm weights are randomised, so that logits are far from zero, per-token log-probs differ
clearly between tokens, and a missing bias, norm weight or tied head changes the numbers visibly.

golden_logps.json follows the reference (TRL DPOTrainer) tokenization exactly, on pref_test.jsonl:
  * EOS is appended to each completion as text unless the text already ends with it;
  * tok(prompt) and tok(prompt + completion) are tokenized with add_special_tokens=True;
  * prompt length = min over chosen/rejected of the longest common prefix of the two id lists;
    completion ids = ids of tok(prompt + completion) after that prefix;
  * sequence = prompt ids + completion ids truncated to max_length (128) keeping the start; rows whose
    prompt alone is >= max_length are dropped;
  * token t is scored with the logits at t-1; a sequence's log-prob is the SUM over its completion
    tokens (within the truncated sequence);
  * one unpadded sequence per forward pass, in float32 (the bf16 checkpoint is loaded, cast to float32
    and evaluated in float32), eager attention.

It also checks its own pipeline against the shared golden file: the token ids of every train and test
row must equal tiny-llama/golden/logps.json, and the fp32 tiny-llama log-probs (all test rows, first 16
train rows) must match it within 1e-4; the sharded copy must score exactly like the single-file one.

Run it from the repository root with a Python environment holding torch, transformers and
safetensors (made with torch 2.15.0, transformers 5.24.0, safetensors 0.8.0, tokenizers 0.23.3,
CPU, Python 3.11):

    python3 -m venv /tmp/pyenv
    /tmp/pyenv/bin/pip install torch==2.15.0 transformers==5.24.0 safetensors
    /tmp/pyenv/bin/python scripts/make_fixtures.py [--src /work/shared/fixtures/tiny-llama] [--out tests/fixtures]

The output is deterministic for a given set of versions (seeded with torch.manual_seed).
"""

import argparse
import json
import platform
import shutil
from pathlib import Path

import safetensors
import tokenizers
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

MAX_LENGTH = 128
INIT_STD = 0.2
QWEN2_SEED = 1234
GPT2_SEED = 5678
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
ATTN_IMPLEMENTATION = "eager"


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
    }


# ----------------------------------------------------------------------------------------------
# Tokenization and scoring (the reference rules, see the module docstring)
# ----------------------------------------------------------------------------------------------


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_pair(tok, prompt: str, chosen: str, rejected: str) -> dict | None:
    eos = tok.eos_token
    chosen = chosen if chosen.endswith(eos) else chosen + eos
    rejected = rejected if rejected.endswith(eos) else rejected + eos
    prompt_ids = tok(prompt, add_special_tokens=True)["input_ids"]
    prompt_chosen_ids = tok(prompt + chosen, add_special_tokens=True)["input_ids"]
    prompt_rejected_ids = tok(prompt + rejected, add_special_tokens=True)["input_ids"]
    prompt_len = min(
        common_prefix_length(prompt_ids, prompt_chosen_ids),
        common_prefix_length(prompt_ids, prompt_rejected_ids),
    )
    if prompt_len >= MAX_LENGTH:
        return None  # dropped by the reference
    return {
        "prompt_ids": prompt_ids[:prompt_len],
        "chosen_ids": prompt_chosen_ids[prompt_len:],
        "rejected_ids": prompt_rejected_ids[prompt_len:],
    }


@torch.no_grad()
def score(model, prompt_ids: list[int], completion_ids: list[int]) -> tuple[float, list[float]]:
    """Summed log-prob of the completion tokens kept after keep-start truncation, and the per-token values."""
    ids = (prompt_ids + completion_ids)[:MAX_LENGTH]
    mask = ([0] * len(prompt_ids) + [1] * len(completion_ids))[:MAX_LENGTH]
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    targets = torch.tensor(ids[1:])
    per_token = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    keep = torch.tensor(mask[1:], dtype=torch.bool)
    token_logps = per_token[keep]
    return token_logps.sum().item(), token_logps.tolist()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def golden_rows(model, tok, rows: list[dict]) -> list[dict]:
    out = []
    for index, row in enumerate(rows):
        t = tokenize_pair(tok, row["prompt"], row["chosen"], row["rejected"])
        if t is None:
            continue
        chosen_logp, chosen_token_logps = score(model, t["prompt_ids"], t["chosen_ids"])
        rejected_logp, rejected_token_logps = score(model, t["prompt_ids"], t["rejected_ids"])
        out.append(
            {
                "index": index,
                **t,
                "chosen_logp": chosen_logp,
                "rejected_logp": rejected_logp,
                "chosen_n_tokens": len(chosen_token_logps),
                "rejected_n_tokens": len(rejected_token_logps),
                "chosen_token_logps": chosen_token_logps,
                "rejected_token_logps": rejected_token_logps,
            }
        )
    return out


def load_fp32(path: Path):
    """Load a checkpoint (fp32 or bf16 on disk), cast to float32, eval mode."""
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=ATTN_IMPLEMENTATION)
    return model.float().eval()


def write_golden(dest: Path, model_desc: str, model, tok, rows: list[dict], extra: dict | None = None) -> list[dict]:
    golden = golden_rows(model, tok, rows)
    doc = {
        "description": f"Summed completion log-probs of pref_test.jsonl under {model_desc}.",
        "versions": versions(),
        "generated_by": "scripts/make_fixtures.py",
        "data": "pref_test.jsonl (copied from tests/fixtures/tiny-llama/)",
        "max_length": MAX_LENGTH,
        "dtype": "float32",
        "attn_implementation": ATTN_IMPLEMENTATION,
        "tokenization": (
            "EOS appended to each completion as text unless present; tok(prompt) and tok(prompt+completion) with "
            "add_special_tokens=True; prompt length = min over chosen/rejected of the longest common prefix; "
            "completion ids = ids after it; sequence = prompt+completion truncated to max_length keeping the start."
        ),
        "scoring": (
            "token t scored with the logits at t-1; per-sequence SUM over completion tokens kept after truncation; "
            "one unpadded sequence per forward pass, float32."
        ),
        **(extra or {}),
        "rows": golden,
    }
    (dest / "golden_logps.json").write_text(json.dumps(doc, indent=1) + "\n")
    return golden


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def copy_tokenizer(src: Path, dest: Path) -> None:
    for name in TOKENIZER_FILES:
        shutil.copy2(src / name, dest / name)


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def randomise_(tensor: torch.Tensor, gen: torch.Generator, mean: float, std: float) -> None:
    with torch.no_grad():
        tensor.copy_(mean + std * torch.randn(tensor.shape, generator=gen))


def make_qwen2(src: Path, dest: Path) -> None:
    config = Qwen2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        initializer_range=INIT_STD,
        hidden_act="silu",
        attention_dropout=0.0,
        use_sliding_window=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(QWEN2_SEED)
    model = Qwen2ForCausalLM(config).float().eval()
    gen = torch.Generator().manual_seed(QWEN2_SEED + 1)
    for name, param in model.named_parameters():
        if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            randomise_(param, gen, 0.0, 0.5)  # the init leaves them at zero
        elif name.endswith("norm.weight"):
            randomise_(param, gen, 1.0, 0.2)  # the init leaves them at one
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "head not tied"
    model.save_pretrained(dest, safe_serialization=True)
    copy_tokenizer(src, dest)

    # Rewrite the rope settings in the legacy top-level form (`"rope_theta": 10000.0`, no `rope_parameters`),
    # as older checkpoints have it; transformers 5 still reads it.
    config_path = dest / "config.json"
    cfg = json.loads(config_path.read_text())
    rope = cfg.pop("rope_parameters")
    assert rope == {"rope_theta": 10000.0, "rope_type": "default"}, rope
    cfg["rope_theta"] = rope["rope_theta"]
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    reloaded = Qwen2Config.from_pretrained(dest)
    assert reloaded.rope_parameters["rope_theta"] == 10000.0, reloaded.rope_parameters
    assert reloaded.rope_parameters["rope_type"] == "default", reloaded.rope_parameters


def make_gpt2(src: Path, dest: Path) -> None:
    config = GPT2Config(
        vocab_size=512,
        n_positions=256,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_inner=None,  # 4 * n_embd
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        initializer_range=INIT_STD,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(GPT2_SEED)
    model = GPT2LMHeadModel(config).float().eval()
    gen = torch.Generator().manual_seed(GPT2_SEED + 1)
    for name, param in model.named_parameters():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            randomise_(param, gen, 1.0, 0.2)
        elif name.endswith(("ln_1.bias", "ln_2.bias", "ln_f.bias")):
            randomise_(param, gen, 0.0, 0.2)
        elif name.endswith(".bias"):  # c_attn, c_proj, c_fc biases: zero after init
            randomise_(param, gen, 0.0, 0.2)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), "head not tied"
    model.save_pretrained(dest, safe_serialization=True)
    copy_tokenizer(src, dest)


def make_llama_bf16(llama: Path, dest: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(dest, safe_serialization=True)
    copy_tokenizer(llama, dest)
    assert json.loads((dest / "config.json").read_text())["dtype"] == "bfloat16"


def make_llama_sharded(llama: Path, dest: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    model.save_pretrained(dest, safe_serialization=True, max_shard_size=int(total * 0.6))
    copy_tokenizer(llama, dest)
    shards = sorted(p.name for p in dest.glob("*.safetensors"))
    expected = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert shards == expected, shards
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(expected), index


# ----------------------------------------------------------------------------------------------
# Checks of the pipeline against the shared golden file
# ----------------------------------------------------------------------------------------------


def check_against_shared_golden(llama: Path, tok) -> dict:
    shared = json.loads((llama / "golden" / "logps.json").read_text())
    model = load_fp32(llama)
    report = {}
    for split in ("train", "test"):
        rows = read_jsonl(llama / f"pref_{split}.jsonl")
        expected = {e["index"]: e for e in shared["examples"][split]}
        ids_ok, max_diff = True, 0.0
        for index, row in enumerate(rows):
            t = tokenize_pair(tok, row["prompt"], row["chosen"], row["rejected"])
            e = expected.get(index)
            if t is None or e is None:
                ids_ok &= t is None and e is None
                continue
            ids_ok &= all(t[k] == e[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
            if split == "test" or index < 16:  # a subset of train keeps it quick
                for key in ("chosen", "rejected"):
                    logp, _ = score(model, t["prompt_ids"], t[f"{key}_ids"])
                    max_diff = max(max_diff, abs(logp - e[f"{key}_logp"]))
        report[split] = {"token_ids_match": ids_ok, "max_abs_logp_diff": max_diff}
        assert ids_ok, f"token ids differ from the shared golden file ({split})"
        assert max_diff < 1e-4, f"log-probs differ from the shared golden file ({split}): {max_diff}"
    return report


def max_abs_diff(a: list[dict], b: list[dict]) -> float:
    return max(abs(x[f"{k}_logp"] - y[f"{k}_logp"]) for x, y in zip(a, b) for k in ("chosen", "rejected"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", type=Path, default=Path("/work/shared/fixtures/tiny-llama"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "tests" / "fixtures")
    args = parser.parse_args()
    torch.set_num_threads(1)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    # tiny-llama: a verbatim copy of the shared fixture
    llama = out / "tiny-llama"
    if llama.exists():
        shutil.rmtree(llama)
    shutil.copytree(args.src, llama)
    for path in [llama, *llama.rglob("*")]:  # the shared copy is read-only
        path.chmod(0o755 if path.is_dir() else 0o644)

    tok = AutoTokenizer.from_pretrained(llama)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, len(tok)) == (0, 1, 2, 512)
    test_rows = read_jsonl(llama / "pref_test.jsonl")

    shared_check = check_against_shared_golden(llama, tok)
    print("pipeline vs shared golden:", json.dumps(shared_check))
    llama_fp32 = golden_rows(load_fp32(llama), tok, test_rows)

    make_llama_bf16(llama, fresh_dir(out / "tiny-llama-bf16"))
    bf16 = write_golden(
        out / "tiny-llama-bf16",
        "tiny-llama cast to bfloat16 (weights loaded and cast back to float32 for the forward)",
        load_fp32(out / "tiny-llama-bf16"),
        tok,
        test_rows,
    )
    print(f"bf16 llama vs fp32 llama: max |dlogp| = {max_abs_diff(bf16, llama_fp32):.3g}")

    make_llama_sharded(llama, fresh_dir(out / "tiny-llama-sharded"))
    sharded = golden_rows(load_fp32(out / "tiny-llama-sharded"), tok, test_rows)
    diff = max_abs_diff(sharded, llama_fp32)
    assert diff == 0.0, diff
    print("sharded llama vs fp32 llama: identical")

    make_qwen2(llama, fresh_dir(out / "tiny-qwen2"))
    qwen2 = write_golden(
        out / "tiny-qwen2",
        "tiny-qwen2 (random Qwen2ForCausalLM, fp32)",
        load_fp32(out / "tiny-qwen2"),
        tok,
        test_rows,
        {"config_note": "config.json uses the legacy top-level rope_theta (no rope_parameters)."},
    )

    make_gpt2(llama, fresh_dir(out / "tiny-gpt2"))
    gpt2 = write_golden(
        out / "tiny-gpt2",
        "tiny-gpt2 (random GPT2LMHeadModel, fp32)",
        load_fp32(out / "tiny-gpt2"),
        tok,
        test_rows,
        {"tokenizer_note": "reuses the tiny-llama tokenizer (BOS prepended by its post-processor), not GPT-2's."},
    )

    for path in out.rglob("*"):  # save_pretrained writes the weights with mode 600
        path.chmod(0o755 if path.is_dir() else 0o644)

    for name, rows in (("llama", llama_fp32), ("qwen2", qwen2), ("gpt2", gpt2)):
        token_logps = torch.tensor([v for r in rows for v in r["chosen_token_logps"] + r["rejected_token_logps"]])
        print(
            f"{name}: row0 chosen {rows[0]['chosen_logp']:.4f} rejected {rows[0]['rejected_logp']:.4f}; "
            f"per-token logp mean {token_logps.mean():.3f} std {token_logps.std():.3f} "
            f"min {token_logps.min():.3f} max {token_logps.max():.3f}"
        )


if __name__ == "__main__":
    main()

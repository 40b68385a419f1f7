#!/usr/bin/env python3
"""Time TRL's DPOTrainer and `leash dpo` side by side on the same generated workload (dev-only).

Workload (issue 16, "Speed where users feel it"): a random-initialised Llama (vocab 4096, hidden
256, intermediate 688, 4 layers, 4 heads, untied lm_head) with a word-level tokenizer, so one
random word is one token; every row is a prompt of <bos> + 127 random words (128 tokens) and a
chosen and a rejected completion of 127 random words + <eos> (128 tokens); 8 pairs per step, one
epoch. Both trainers run with their own defaults otherwise (live reference model), then both with
`precompute_ref_log_probs` (the precompute pass is part of the run, so it is counted per row;
each TRL run gets a fresh `datasets` cache, where TRL would otherwise find the log-probs an
earlier run with the same data and arguments stored, and skip the pass).

Per-step time = (wall time of a 9-step run - wall time of a 3-step run) / 6, so start-up, loading
and the final save cancel: from the fastest run of each length, and (with several rounds) also
as the median over rounds of each round's own difference, which one lucky or unlucky run moves
less. Each run is its own process (its peak RSS is that process's
ru_maxrss). The runs alternate TRL, leash, TRL, leash, ... and the script prints each run, the
per-step times and the ratio TRL / leash, from wall time and from CPU time (user + system of
the process; steadier than wall time when other work shares the machine).

Usage, from the repository root after `cargo build --release`:

    /opt/pyenv/bin/python scripts/side_by_side.py [--threads 2] [--rounds 1] [--work /tmp/sbs]

Made with torch 2.15, transformers 5.24, TRL 1.16, tokenizers 0.23 (the dev venv /opt/pyenv).
"""

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

VOCAB, HIDDEN, INTER, LAYERS, HEADS = 4096, 256, 688, 4, 4
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PROMPT_WORDS, COMPLETION_WORDS, PAIRS = 127, 127, 8
SHORT, LONG = 3, 9


def make_model(dest: Path) -> None:
    """A random Llama and a word-level tokenizer (<bos> prepended by the post-processor)."""
    import tokenizers
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, tie_word_embeddings=False,
        max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(dest)
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), VOCAB)})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 1)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    ).save_pretrained(dest)


def make_data(path: Path, rows: int, seed: int) -> None:
    rng = random.Random(seed)
    words = lambda n: " ".join(f"w{rng.randrange(len(SPECIALS), VOCAB)}" for _ in range(n))
    with path.open("w") as f:
        for _ in range(rows):
            row = {"prompt": words(PROMPT_WORDS), "chosen": " " + words(COMPLETION_WORDS),
                   "rejected": " " + words(COMPLETION_WORDS)}
            f.write(json.dumps(row) + "\n")


def trl_main(model: str, data: str, out: str, precompute: bool, threads: int, fp32: bool) -> None:
    """One TRL run in this process (called through the `trl` sub-command)."""
    import torch
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(threads)
    args = DPOConfig(output_dir=out, num_train_epochs=1, per_device_train_batch_size=PAIRS,
                     precompute_ref_log_probs=precompute, report_to="none", use_cpu=True,
                     **({"bf16": False} if fp32 else {}))
    print(f"trl settings: bf16={args.bf16} gradient_checkpointing={args.gradient_checkpointing} "
          f"padding_free={args.padding_free} max_length={args.max_length}", file=sys.stderr)
    trainer = DPOTrainer(model=model, args=args, train_dataset=load_dataset("json", data_files=data, split="train"))
    trainer.train()
    trainer.save_model(out)
    print(f"peak_rss_mib {vm_hwm_mib():.0f}", file=sys.stderr)


def vm_hwm_mib() -> float:
    """This process image's peak RSS (not ru_maxrss, which Linux carries over from the parent)."""
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024


def run(cmd: list[str], env: dict, out: str) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MiB) of one child process (TRL
    prints its peak; leash logs it as `peak_rss_mib` in the last line of metrics.jsonl)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    cpu = usage.ru_utime + usage.ru_stime
    secs = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{err[-3000:]}")
    rss = float("nan")
    for line in err.splitlines():
        if line.startswith("trl settings"):
            print("   ", line)
        if line.startswith("peak_rss_mib"):
            rss = float(line.split()[1])
    metrics = Path(out) / "metrics.jsonl"
    if metrics.exists():
        rss = json.loads(metrics.read_text().splitlines()[-1]).get("peak_rss_mib", rss)
    return secs, cpu, rss


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd")
    t = sub.add_parser("trl")
    for a in ("model", "data", "out"):
        t.add_argument(a)
    t.add_argument("--precompute", action="store_true")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--fp32", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--work", default="/tmp/side_by_side")
    ap.add_argument("--leash", default="target/release/leash")
    ap.add_argument("--leash-flag", action="append", default=[], help="extra flag for every leash run")
    ap.add_argument("--trl-fp32", action="store_true", help="TRL with bf16=False (its default on CPU is bf16 autocast)")
    a = ap.parse_args()
    if a.cmd == "trl":
        return trl_main(a.model, a.data, a.out, a.precompute, a.threads, a.fp32)

    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model = work / "model"
    make_model(model)
    data = {}
    for steps in (SHORT, LONG):
        data[steps] = work / f"pairs_{steps}.jsonl"
        make_data(data[steps], steps * PAIRS, seed=steps)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               RAYON_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} cpus, load average {' '.join(load)}, {a.threads} threads per run")

    def out_dir(side: str, steps: int, precompute: bool) -> str:
        return str(work / f"out_{side}_{steps}_{int(precompute)}")

    def command(side: str, steps: int, precompute: bool) -> list[str]:
        out = out_dir(side, steps, precompute)
        shutil.rmtree(out, ignore_errors=True)
        if side == "trl":
            cmd = [sys.executable, __file__, "trl", str(model), str(data[steps]), out, "--threads", str(a.threads)]
            return cmd + (["--precompute"] if precompute else []) + (["--fp32"] if a.trl_fp32 else [])
        cmd = [a.leash, "dpo", "--model", str(model), "--dataset", str(data[steps]), "--output-dir", out,
               "--num-train-epochs", "1", "--per-device-train-batch-size", str(PAIRS)] + a.leash_flag
        return cmd + (["--precompute-ref-log-probs"] if precompute else [])

    for precompute in (False, True):
        label = "precompute_ref_log_probs" if precompute else "defaults (live reference)"
        keys = [(side, s) for side in ("trl", "leash") for s in (SHORT, LONG)]
        wall = {k: [] for k in keys}
        cpu = {k: [] for k in keys}
        for _ in range(a.rounds):
            for steps in (SHORT, LONG):
                for side in ("trl", "leash"):
                    cmd = command(side, steps, precompute)
                    out = out_dir(side, steps, precompute)
                    # Each TRL run gets an empty `datasets` cache inside its (just emptied) output
                    # folder: TRL stores the precomputed reference log-probs in that cache, keyed
                    # by the data and the run's arguments, so with the shared ~/.cache a repeated
                    # round found them there and skipped the very pass it is timed for (leash's
                    # ref_logps_*.json lives in its output folder, emptied before every run).
                    run_env = dict(env, HF_DATASETS_CACHE=str(Path(out) / "hf_datasets_cache"))
                    secs, cpu_s, rss = run(cmd, run_env, out)
                    wall[(side, steps)].append(secs)
                    cpu[(side, steps)].append(cpu_s)
                    with open("/proc/loadavg") as f:
                        load = f.read().split()[0]
                    print(f"  {label}: {side:5} {steps} steps  wall {secs:7.2f} s  cpu {cpu_s:7.2f} s  "
                          f"peak RSS {rss:6.0f} MiB  (load {load})", flush=True)
        tokens = 2 * PAIRS * (PROMPT_WORDS + 1 + COMPLETION_WORDS + 1)
        for name, t in (("wall", wall), ("cpu", cpu)):
            per_step = {side: (min(t[(side, LONG)]) - min(t[(side, SHORT)])) / (LONG - SHORT)
                        for side in ("trl", "leash")}
            print(f"{label}, {name} time: TRL {per_step['trl']:.3f} s/step ({tokens / per_step['trl']:.0f} tok/s), "
                  f"leash {per_step['leash']:.3f} s/step ({tokens / per_step['leash']:.0f} tok/s), "
                  f"leash = {per_step['trl'] / per_step['leash']:.2f}x TRL", flush=True)
            if a.rounds > 1:
                # A second estimate: each round's own difference, then the median over rounds.
                # The minima above can pair a lucky short run with an unlucky long one.
                paired = {side: statistics.median(
                    (lng - sht) / (LONG - SHORT) for lng, sht in zip(t[(side, LONG)], t[(side, SHORT)]))
                    for side in ("trl", "leash")}
                print(f"{label}, {name} time, median of the {a.rounds} rounds' differences: "
                      f"TRL {paired['trl']:.3f} s/step, leash {paired['leash']:.3f} s/step, "
                      f"leash = {paired['trl'] / paired['leash']:.2f}x TRL", flush=True)


if __name__ == "__main__":
    main()

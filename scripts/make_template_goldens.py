#!/usr/bin/env python3
"""Dev-only: real chat templates and TRL 1.16's token ids for conversations (tests/chat_templates.rs).

For each family below it writes tests/fixtures/templates/<family>/:

  tokenizer.json, tokenizer_config.json, chat_template.jinja
      the tiny-llama tokenizer (tests/fixtures/tiny-llama) with the family's special tokens added
      as special tokens, its bos/eos/pad names, and the family's real chat template;
  golden.json
      for every row of ROWS (preference, implicit prompt, unpaired, prompt-only, SFT `messages`,
      SFT prompt-completion; single-turn, system+user, multi-turn; tools and per-row
      chat_template_kwargs where the template reads them) the ids TRL 1.16 makes:
        dpo:  DPOTrainer._prepare_dataset  -> prompt_ids, chosen_ids, rejected_ids
        kto:  KTOTrainer._prepare_dataset  -> prompt_ids, completion_ids
        sft:  SFTTrainer._prepare_dataset  -> input_ids, labels (-100 = not in the loss)
        grpo: GRPOTrainer._tokenize_prompts' apply_chat_template call -> prompt_ids
      and, for SFT with assistant_only_loss=True, the labels TRL builds from transformers'
      `return_assistant_tokens_mask` ({% generation %} markers; TRL swaps in its own training
      template for the families it knows). A row the template rejects records the template's
      message under "raises".

The trainers' own `_prepare_dataset` methods run on a stand-in `self` holding only what they read
(`_tokenizer`, SFT's `chat_template` and `completion_only_loss`), so the ids come from TRL's code.

Templates: TRL ships the originals of the families it supports in trl/chat_templates (llama3,
llama3_1, qwen2_5, qwen3, gemma, gemma3, phi3 and their *_training variants); Mistral-7B-Instruct
v0.1, Zephyr-7B-beta and Llama-2-chat are written out below as those checkpoints ship them.

Run from the repository root (made with trl 1.16.0, transformers 5.24.0, Python 3.11):
    /opt/pyenv/bin/python scripts/make_template_goldens.py
"""

import json
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import datasets
import trl
from datasets import Dataset
from transformers import AutoTokenizer
from trl import DPOConfig, KTOConfig, SFTConfig
from trl.chat_template_utils import get_training_chat_template, has_generation_markers
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.kto_trainer import KTOTrainer
from trl.trainer.sft_trainer import SFTTrainer

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests/fixtures/tiny-llama"
OUT = ROOT / "tests/fixtures/templates"
TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"

MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def trl_template(name):
    return (TRL_TEMPLATES / f"{name}.jinja").read_text()


# family -> (template, special tokens: bos/eos/pad and extra specials, extra non-special added tokens)
LLAMA3_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
FAMILIES = {
    "llama2": (LLAMA2, dict(bos="<s>", eos="</s>"), [], []),
    "mistral": (MISTRAL, dict(bos="<s>", eos="</s>"), [], []),
    "zephyr": (ZEPHYR, dict(bos="<s>", eos="</s>"), [], []),
    "llama3": (trl_template("llama3"), dict(bos="<|begin_of_text|>", eos="<|eot_id|>"), LLAMA3_SPECIALS, []),
    "llama3_1": (trl_template("llama3_1"), dict(bos="<|begin_of_text|>", eos="<|eot_id|>"), LLAMA3_SPECIALS, []),
    "qwen2_5": (trl_template("qwen2_5"), dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>"), QWEN_SPECIALS,
                ["<tool_call>", "</tool_call>"]),
    "qwen3": (trl_template("qwen3"), dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>"), QWEN_SPECIALS,
              ["<tool_call>", "</tool_call>", "<think>", "</think>"]),
    "gemma": (trl_template("gemma"), dict(bos="<bos>", eos="<eos>", pad="<pad>"), ["<start_of_turn>", "<end_of_turn>"], []),
    "gemma3": (trl_template("gemma3"), dict(bos="<bos>", eos="<eos>", pad="<pad>"), ["<start_of_turn>", "<end_of_turn>"], []),
    "phi3": (trl_template("phi3"), dict(bos="<s>", eos="<|endoftext|>"), ["<|user|>", "<|assistant|>", "<|end|>", "<|system|>"], []),
}
# Families whose template TRL swaps for its `*_training` variant under assistant_only_loss.
TRAINING = {"llama3", "qwen2_5", "qwen3", "gemma", "gemma3", "phi3"}


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def s(text):
    return {"role": "system", "content": text}


WEATHER_TOOL = json.dumps([{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city, in °C.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "e.g. Zürich"}},
                       "required": ["city"]},
    },
}])

SINGLE = [u("What is 2 + 2?")]
SYSTEM = [s("You are terse."), u("  Name a colour.  ")]
MULTI = [u("Hi there!"), a("Hello. How can I help?"), u("Say café twice, then stop.\nThanks")]

ROWS = [
    ("dpo_single", "dpo", {"prompt": SINGLE, "chosen": [a("4")], "rejected": [a(" It is five. ")]}),
    ("dpo_system", "dpo", {"prompt": SYSTEM, "chosen": [a("Blue.")], "rejected": [a("I like 🍎 red")]}),
    ("dpo_multi", "dpo", {"prompt": MULTI, "chosen": [a("café café")], "rejected": [a("No.")]}),
    ("dpo_implicit", "dpo", {"chosen": MULTI + [a("café café")], "rejected": MULTI + [a("cafe")]}),
    ("kto_single", "kto", {"prompt": SINGLE, "completion": [a("4")], "label": True}),
    ("kto_multi", "kto", {"prompt": MULTI, "completion": [a("No.")], "label": False}),
    ("grpo_single", "grpo", {"prompt": SINGLE}),
    ("grpo_system", "grpo", {"prompt": SYSTEM}),
    ("grpo_multi", "grpo", {"prompt": MULTI}),
    ("sft_messages_single", "sft", {"messages": SINGLE + [a("4")]}),
    ("sft_messages_system", "sft", {"messages": SYSTEM + [a("Blue.")]}),
    ("sft_messages_multi", "sft", {"messages": MULTI + [a("café café")]}),
    ("sft_prompt_completion", "sft", {"prompt": MULTI, "completion": [a("café café")]}),
    ("sft_prompt_completion_system", "sft", {"prompt": SYSTEM, "completion": [a("Blue.")]}),
]
EXTRA_ROWS = {
    "qwen2_5": [("dpo_tools", "dpo", {"prompt": [u("Weather in Bern?")], "chosen": [a("Let me check.")],
                                      "rejected": [a("Sunny.")], "tools": WEATHER_TOOL})],
    "qwen3": [
        ("dpo_tools", "dpo", {"prompt": [u("Weather in Bern?")], "chosen": [a("Let me check.")],
                              "rejected": [a("Sunny.")], "tools": WEATHER_TOOL}),
        ("dpo_no_thinking", "dpo", {"prompt": SINGLE, "chosen": [a("4")], "rejected": [a("5")],
                                    "chat_template_kwargs": {"enable_thinking": False}}),
        ("sft_reasoning", "sft", {"messages": [u("2+2?"), a("<think>\nAdd them.\n</think>\n\n4"), u("3+3?"),
                                               a("<think>\nAgain.\n</think>\n\n6")]}),
        ("grpo_no_thinking", "grpo", {"prompt": SINGLE, "chat_template_kwargs": {"enable_thinking": False}}),
    ],
    "llama3_1": [("dpo_tools", "dpo", {"prompt": [u("Weather in Bern?")], "chosen": [a("Let me check.")],
                                       "rejected": [a("Sunny.")], "tools": WEATHER_TOOL,
                                       "chat_template_kwargs": {"date_string": "29 Nov 2026"}})],
}


def make_tokenizer(family, template, special, extra_special, extra_added, out):
    tok = AutoTokenizer.from_pretrained(TINY)
    names = {"bos_token": special.get("bos"), "eos_token": special["eos"], "pad_token": special.get("pad", special["eos"])}
    tok.add_special_tokens({k: v for k, v in names.items() if v is not None})
    extra = [t for t in extra_special if t not in names.values()]
    if extra:
        tok.add_special_tokens({"additional_special_tokens": extra}, replace_extra_special_tokens=False)
    if extra_added:
        tok.add_tokens(extra_added)
    if special.get("bos") is None:
        tok.bos_token = None
    tok.chat_template = template
    if out.exists():
        shutil.rmtree(out)
    tok.save_pretrained(out)
    # The goldens come from the saved files, as leash reads them.
    return AutoTokenizer.from_pretrained(out)


def error_message(e):
    return str(e).splitlines()[0]


def dpo(tok, row):
    me = SimpleNamespace(_tokenizer=tok)
    args = DPOConfig(output_dir=tempfile.mkdtemp(), max_length=None, dataset_num_proc=None, use_cpu=True, bf16=False)
    out = DPOTrainer._prepare_dataset(me, Dataset.from_list([row]), tok, args, "train")[0]
    return {k: out[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}


def kto(tok, row):
    me = SimpleNamespace(_tokenizer=tok, calculate_KL=False)
    args = KTOConfig(output_dir=tempfile.mkdtemp(), max_length=None, dataset_num_proc=None, use_cpu=True, bf16=False)
    out = KTOTrainer._prepare_dataset(me, Dataset.from_list([row]), tok, args, "train")[0]
    return {k: out[k] for k in ("prompt_ids", "completion_ids")}


def sft(tok, row, assistant_only_loss):
    template = None
    if assistant_only_loss and not has_generation_markers(tok.chat_template):
        template = get_training_chat_template(tok)  # what SFTTrainer.__init__ does
    me = SimpleNamespace(_tokenizer=tok, chat_template=template, completion_only_loss="prompt" in row)
    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_length=None, assistant_only_loss=assistant_only_loss,
                     dataset_num_proc=None, use_cpu=True, bf16=False)
    out = SFTTrainer._prepare_dataset(me, Dataset.from_list([row]), tok, args, False, None, "train")[0]
    return {"input_ids": out["input_ids"], "labels": out["labels"]}


def grpo(tok, row):
    ids = tok.apply_chat_template(conversation=[row["prompt"]], add_generation_prompt=True, tokenize=True,
                                  return_dict=True, **row.get("chat_template_kwargs", {}))["input_ids"][0]
    return {"prompt_ids": ids}


def run(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # the template's raise_exception (jinja2 TemplateError)
        if type(e).__name__ != "TemplateError":
            raise
        return {"raises": error_message(e)}


def sft_assistant_only_trajectory():
    """TRL's SFTTrainer with assistant_only_loss=True on tiny-llama whose template is Gemma's
    (no markers: TRL swaps in gemma_training.jinja): 4 steps of batch 4, sequential batches.
    Writes tests/fixtures/templates/sft_assistant_only.jsonl and sft_assistant_only.json."""
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(2)
    src = [json.loads(l) for l in (TINY / "sft_train.jsonl").read_text().splitlines()[:24]]
    rows = []
    for i in range(16):
        a_, b_ = src[i], src[i + 8]
        turns = [u(a_["prompt"]), a(a_["completion"].strip())]
        if i % 2:  # every other row has a second exchange
            turns += [u(b_["prompt"]), a(b_["completion"].strip())]
        rows.append({"messages": turns})
    data = OUT / "sft_assistant_only.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    work = Path(tempfile.mkdtemp()) / "model"
    shutil.copytree(TINY, work)
    tok = AutoTokenizer.from_pretrained(work)
    tok.chat_template = trl_template("gemma")
    model = AutoModelForCausalLM.from_pretrained(work, dtype=torch.float32)

    class Sequential(SFTTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-4,
                     lr_scheduler_type="constant", max_grad_norm=1.0, max_length=128, logging_steps=1,
                     assistant_only_loss=True, use_cpu=True, bf16=False, report_to=[], save_strategy="no", seed=42)
    trainer = Sequential(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer.train()
    steps = [{k: v for k, v in log.items() if k in ("step", "loss", "grad_norm", "entropy", "mean_token_accuracy",
                                                    "num_tokens")} for log in trainer.state.log_history if "loss" in log]
    golden = {"trl": trl.__version__, "template": "trl/chat_templates/gemma.jinja (swapped for gemma_training.jinja)",
              "settings": {"max_steps": 4, "batch_size": 4, "lr": 5e-4, "lr_scheduler": "constant",
                           "max_grad_norm": 1.0, "max_length": 128, "sampler": "sequential"},
              "steps": steps}
    (OUT / "sft_assistant_only.json").write_text(json.dumps(golden, indent=1) + "\n")
    print("sft_assistant_only:", [round(s["loss"], 4) for s in steps])


def main():
    datasets.disable_progress_bars()
    sft_assistant_only_trajectory()
    OUT.mkdir(parents=True, exist_ok=True)
    for family, (template, special, extra_special, extra_added) in FAMILIES.items():
        tok = make_tokenizer(family, template, special, extra_special, extra_added, OUT / family)
        cases = []
        for name, layout, row in ROWS + EXTRA_ROWS.get(family, []):
            case = {"name": name, "layout": layout, "row": row}
            if layout == "dpo":
                case.update(run(dpo, tok, row))
            elif layout == "kto":
                case.update(run(kto, tok, row))
            elif layout == "grpo":
                case.update(run(grpo, tok, row))
            else:
                case.update(run(sft, tok, row, False))
                if family in TRAINING:
                    masked = run(sft, tok, row, True)
                    case["assistant_only"] = masked
            cases.append(case)
        golden = {
            "family": family,
            "made_with": {"trl": trl.__version__, "transformers": __import__("transformers").__version__},
            "cases": cases,
        }
        # One case per line: small diffs when a golden changes.
        body = ",\n".join(json.dumps(c, ensure_ascii=False) for c in cases)
        head = json.dumps({k: v for k, v in golden.items() if k != "cases"}, ensure_ascii=False)[:-1]
        (OUT / family / "golden.json").write_text(f'{head}, "cases": [\n{body}\n]}}\n')
        raised = sum("raises" in c for c in cases)
        print(f"{family}: {len(cases)} cases ({raised} raise)")


if __name__ == "__main__":
    main()

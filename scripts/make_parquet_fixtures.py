#!/usr/bin/env python3
"""Build tests/fixtures/parquet/: the tiny-llama JSONL data sets written by pyarrow (an independent
Parquet writer) in the layouts the Hugging Face Hub uses, plus bad files for error tests. Dev-only:
/opt/pyenv/bin/python scripts/make_parquet_fixtures.py

  pref_train.parquet          pref_train.jsonl, 4 row groups of 16 (snappy), extra columns id, score_chosen
  pref_train_extra.jsonl      the same rows as JSON lines (with the extra columns)
  hub/data/train-0000{0,1}-of-00002.parquet   pref_train.jsonl in two shards (snappy, lz4)
  hub/data/test-00000-of-00001.parquet        pref_test.jsonl (gzip)
  ultrafeedback/data/train_prefs-00000-of-00001.parquet
      conversational rows as trl-lib/ultrafeedback_binarized stores them: chosen/rejected are
      list<struct<content: string, role: string>> (implicit prompt: the shared user turn),
      score_chosen/score_rejected doubles
  ultrafeedback.jsonl         the same rows as JSON lines
  bad_missing_rejected.parquet   prompt/chosen only
  bad_chosen_int.parquet         chosen is an int64 column
  zstd.parquet                   4 rows compressed with zstd (a codec leash does not build in)
"""

import json
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = ROOT / "tests/fixtures/tiny-llama"
OUT = ROOT / "tests/fixtures/parquet"


def rows(name):
    return [json.loads(l) for l in (SRC / name).read_text().splitlines() if l.strip()]


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    train = rows("pref_train.jsonl")
    test = rows("pref_test.jsonl")

    extra = [dict(r, id=i, score_chosen=8.0 - (i % 5) * 0.5) for i, r in enumerate(train)]
    pq.write_table(pa.Table.from_pylist(extra), OUT / "pref_train.parquet", row_group_size=16,
                   compression="snappy")
    write_jsonl(OUT / "pref_train_extra.jsonl", extra)

    data = OUT / "hub/data"
    data.mkdir(parents=True, exist_ok=True)
    half = len(train) // 2
    pq.write_table(pa.Table.from_pylist(train[:half]), data / "train-00000-of-00002.parquet",
                   compression="snappy")
    pq.write_table(pa.Table.from_pylist(train[half:]), data / "train-00001-of-00002.parquet",
                   compression="lz4")
    pq.write_table(pa.Table.from_pylist(test), data / "test-00000-of-00001.parquet",
                   compression="gzip")

    msg = pa.struct([("content", pa.string()), ("role", pa.string())])
    conv = []
    for i, r in enumerate(train[:16]):
        user = {"content": r["prompt"], "role": "user"}
        conv.append({
            "chosen": [user, {"content": r["chosen"].strip(), "role": "assistant"}],
            "rejected": [user, {"content": r["rejected"].strip(), "role": "assistant"}],
            "score_chosen": 9.0,
            "score_rejected": 2.0 + (i % 3),
        })
    schema = pa.schema([("chosen", pa.list_(msg)), ("rejected", pa.list_(msg)),
                        ("score_chosen", pa.float64()), ("score_rejected", pa.float64())])
    uf = OUT / "ultrafeedback/data"
    uf.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(conv, schema=schema),
                   uf / "train_prefs-00000-of-00001.parquet", row_group_size=8)
    write_jsonl(OUT / "ultrafeedback.jsonl", conv)

    pq.write_table(pa.Table.from_pylist([{"prompt": r["prompt"], "chosen": r["chosen"]} for r in train[:4]]),
                   OUT / "bad_missing_rejected.parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": r["prompt"], "chosen": i, "rejected": r["rejected"]}
                                         for i, r in enumerate(train[:4])]),
                   OUT / "bad_chosen_int.parquet")
    pq.write_table(pa.Table.from_pylist(train[:4]), OUT / "zstd.parquet", compression="zstd")
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            print(p.relative_to(ROOT), p.stat().st_size)


if __name__ == "__main__":
    main()

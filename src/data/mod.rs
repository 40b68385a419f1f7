//! Data: read JSONL or Parquet rows (files, shard folders, Hub split folders), render chat templates, tokenize as TRL does, collate into batches.

pub mod collate;
pub mod conversation;
pub mod dataset;
pub mod encode;
pub mod jinja_py;
pub mod length;
pub mod pack;
pub mod parquet;
pub mod read;
pub mod template;
pub mod tokenizer;
pub mod training_templates;

//! Data: read JSONL rows, render chat templates, tokenize as TRL does, collate into batches.

pub mod collate;
pub mod conversation;
pub mod encode;
pub mod jinja_py;
pub mod length;
pub mod pack;
pub mod read;
pub mod template;
pub mod tokenizer;
pub mod training_templates;

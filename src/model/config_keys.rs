//! Which config.json keys leash reads, which it accepts because they do not change the
//! computation, and which it refuses: strict in, so a checkpoint is never computed wrong
//! silently. Each family passes the keys its parser honours; everything else must be in the
//! explicit no-math lists below, or a value-checked key at its neutral value, or the load fails
//! naming the key. Reference: transformers 5.24 `PretrainedConfig` and the model configs
//! (`configuration_llama.py`, `configuration_qwen3.py`, `configuration_gpt2.py`, ...).

use std::path::Path;

use serde_json::Value;

use crate::error::{LeashError, Result};

/// Keys of any Hugging Face config that do not change a causal LM's forward pass: bookkeeping,
/// token ids (read separately), dropout (leash trains without it, as TRL disables it), init
/// ranges, cache and output switches, and the generation defaults older configs carry.
pub const NO_MATH_KEYS: &[&str] = &[
    "_name_or_path",
    "architectures",
    "auto_map",
    "model_type",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "use_bfloat16",
    "id2label",
    "label2id",
    "num_labels",
    "problem_type",
    "finetuning_task",
    "task_specific_params",
    "tokenizer_class",
    "prefix",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "use_cache",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
    "output_scores",
    "return_dict_in_generate",
    "torchscript",
    "pruned_heads",
    "chunk_size_feed_forward",
    "is_decoder",
    "tie_encoder_decoder",
    "cross_attention_hidden_size",
    "tf_legacy_loss",
    "initializer_range",
    "attention_dropout",
    "gradient_checkpointing",
    // Generation defaults stored in older configs (generation_config.json holds them today).
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
    // Llama: tensor-parallel slicing of the same matmuls (same result up to float rounding).
    "pretraining_tp",
];

/// GPT-2 keys without effect on GPT2LMHeadModel's logits: dropout, the double-heads model's
/// summary head, the legacy context size (= n_positions), and fp32 upcasting of attention
/// scores (leash computes in f32 anyway).
pub const GPT2_NO_MATH_KEYS: &[&str] = &[
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "summary_type",
    "summary_use_proj",
    "summary_activation",
    "summary_proj_to_labels",
    "summary_first_dropout",
    "n_ctx",
    "reorder_and_upcast_attn",
];

/// Keys that change the math and that leash only accepts at their neutral value: (key, is the
/// value neutral, what the neutral value is).
type Neutral = (&'static str, fn(&Value) -> bool, &'static str);

fn is_null_or_false(v: &Value) -> bool {
    v.is_null() || v == &Value::Bool(false)
}
fn is_null_or_true(v: &Value) -> bool {
    v.is_null() || v == &Value::Bool(true)
}
fn is_null(v: &Value) -> bool {
    v.is_null()
}
fn is_null_or_one(v: &Value) -> bool {
    v.is_null() || v.as_f64() == Some(1.0)
}

const NEUTRAL_ONLY: &[Neutral] = &[
    ("is_encoder_decoder", is_null_or_false, "false"),
    ("add_cross_attention", is_null_or_false, "false"),
    ("scale_attn_weights", is_null_or_true, "true"),
    ("scale_attn_by_inverse_layer_idx", is_null_or_false, "false"),
    ("use_mrope", is_null_or_false, "false"),
    ("attn_logit_softcapping", is_null, "null"),
    ("final_logit_softcapping", is_null, "null"),
    ("partial_rotary_factor", is_null_or_one, "1.0"),
    ("query_pre_attn_scalar", is_null, "absent"),
    (
        "quantization_config",
        is_null,
        "absent (quantized checkpoints are not supported)",
    ),
];

/// Checks every top-level key of `value`: honoured by the family (`honoured`), in a no-math
/// list (`NO_MATH_KEYS` plus `extra_no_math`), or a math key at its neutral value.
pub fn check_keys(
    value: &Value,
    model_type: &str,
    honoured: &[&str],
    extra_no_math: &[&str],
    path: &Path,
) -> Result<()> {
    let Some(obj) = value.as_object() else {
        return Err(LeashError::file(
            path,
            "config.json is not a JSON object",
            "config.json must be the Hugging Face model config written by save_pretrained",
        ));
    };
    for (key, v) in obj {
        if honoured.contains(&key.as_str())
            || NO_MATH_KEYS.contains(&key.as_str())
            || extra_no_math.contains(&key.as_str())
        {
            continue;
        }
        if let Some((_, neutral, what)) = NEUTRAL_ONLY.iter().find(|(k, _, _)| *k == key.as_str()) {
            if neutral(v) {
                continue;
            }
            return Err(LeashError::file(
                path,
                format!("config key `{key}` = {v} changes the model's computation and leash does not implement it for {model_type}"),
                format!("leash supports only `{key}` = {what}; use a checkpoint without it or one of leash's supported architectures"),
            ));
        }
        return Err(LeashError::file(
            path,
            format!("config key `{key}` is not known to leash for model_type {model_type}"),
            "leash refuses keys it cannot tell are harmless, so a model is never computed \
             wrong silently; if this key does not change the forward pass, remove it (and report it)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<()> {
        let v: Value = serde_json::from_str(text).unwrap();
        check_keys(&v, "llama", &["hidden_size"], &[], Path::new("config.json"))
    }

    #[test]
    fn honoured_and_no_math_keys_pass() {
        check(r#"{"hidden_size":8,"use_cache":true,"_name_or_path":"x","pretraining_tp":1}"#)
            .unwrap();
    }

    #[test]
    fn unknown_key_is_named() {
        let err = check(r#"{"hidden_size":8,"frobnicate":3}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`frobnicate`"), "{err}");
        assert!(err.contains("hint:"), "{err}");
    }

    #[test]
    fn math_key_only_at_its_neutral_value() {
        check(r#"{"final_logit_softcapping":null,"use_mrope":false}"#).unwrap();
        let err = check(r#"{"final_logit_softcapping":30.0}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`final_logit_softcapping` = 30.0"), "{err}");
    }
}

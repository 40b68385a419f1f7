//! TRL's training chat templates (trl 1.16 `trl/chat_templates/*_training.jinja`,
//! Apache-2.0, copied verbatim into `training_templates/`): when SFT runs with
//! `assistant_only_loss` and the checkpoint's template has no `{% generation %}` markers,
//! TRL's `get_training_chat_template` recognises the template by exact text and swaps in its
//! variant with markers (and prefix-preserving reasoning blocks, for Qwen3), which changes the
//! rendered ids too. leash does the same for these families; any other template without
//! markers is an error, as in TRL.

/// (name, original template, training template).
const KNOWN: [(&str, &str, &str); 8] = [
    (
        "gemma",
        include_str!("training_templates/gemma.jinja"),
        include_str!("training_templates/gemma_training.jinja"),
    ),
    (
        "gemma3",
        include_str!("training_templates/gemma3.jinja"),
        include_str!("training_templates/gemma3_training.jinja"),
    ),
    (
        "llama3",
        include_str!("training_templates/llama3.jinja"),
        include_str!("training_templates/llama3_training.jinja"),
    ),
    (
        "phi3",
        include_str!("training_templates/phi3.jinja"),
        include_str!("training_templates/phi3_training.jinja"),
    ),
    (
        "phi3_5",
        include_str!("training_templates/phi3_5.jinja"),
        include_str!("training_templates/phi3_5_training.jinja"),
    ),
    (
        "qwen2_5",
        include_str!("training_templates/qwen2_5.jinja"),
        include_str!("training_templates/qwen2_5_training.jinja"),
    ),
    (
        "qwen3",
        include_str!("training_templates/qwen3.jinja"),
        include_str!("training_templates/qwen3_training.jinja"),
    ),
    (
        "qwen3_instruct_2507",
        include_str!("training_templates/qwen3_instruct_2507.jinja"),
        include_str!("training_templates/qwen3_instruct_2507_training.jinja"),
    ),
];

/// TRL's training variant of `template` (matched by exact text), with its name.
pub fn training_template_for(template: &str) -> Option<(&'static str, &'static str)> {
    KNOWN
        .iter()
        .find(|(_, original, _)| *original == template)
        .map(|(name, _, training)| (*name, *training))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::template::has_generation_markers;

    #[test]
    fn every_training_variant_has_markers_and_originals_do_not() {
        for (name, original, training) in KNOWN {
            assert!(!has_generation_markers(original), "{name}");
            assert!(has_generation_markers(training), "{name}");
            assert_eq!(training_template_for(original).map(|t| t.0), Some(name));
        }
        assert!(training_template_for("{{ messages }}").is_none());
    }
}

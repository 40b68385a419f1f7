//! Reads JSONL data sets in every layout TRL users bring, one [`Row`] per line:
//! explicit-prompt preference `{"prompt","chosen","rejected"}`, implicit-prompt preference
//! (`chosen`/`rejected` transcripts only, as Anthropic HH: the prompt is their longest common
//! prefix), unpaired `{"prompt","completion","label"}`, prompt-only `{"prompt"}`, and SFT
//! `{"prompt","completion"}`, `{"text"}` or `{"messages"}`. Any text field may instead be a
//! conversation: a list of `{"role","content"}` messages.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{LeashError, Result};

/// One message of a conversation: its role, its text (for length reports) and every field as
/// given (`content`, `tool_calls`, `reasoning_content`, …), which the chat template sees.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: String,
    /// `content` when it is a string; the text parts joined when it is a list of blocks.
    pub content: String,
    pub fields: Map<String, Value>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        let mut fields = Map::new();
        fields.insert("role".into(), role.into());
        fields.insert("content".into(), content.into());
        Message {
            role: role.into(),
            content: content.into(),
            fields,
        }
    }

    /// A message object from the data; None when it has no string `role`.
    fn from_json(item: &Value) -> Option<Message> {
        let fields = item.as_object()?;
        let role = fields.get("role")?.as_str()?.to_string();
        let content = match fields.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(blocks)) => blocks
                .iter()
                .filter_map(|b| b.get("text").and_then(Value::as_str))
                .collect(),
            _ => String::new(),
        };
        Some(Message {
            role,
            content,
            fields: fields.clone(),
        })
    }
}

/// A text field: plain text, or a conversation to render with the chat template.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Text(String),
    Messages(Vec<Message>),
}

impl Content {
    pub fn is_conversation(&self) -> bool {
        matches!(self, Content::Messages(_))
    }
}

/// What one line of a data set holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    Pair {
        prompt: Content,
        chosen: Content,
        rejected: Content,
    },
    Unpaired {
        prompt: Content,
        completion: Content,
        label: bool,
    },
    PromptOnly {
        prompt: Content,
    },
    Completion {
        prompt: Content,
        completion: Content,
    },
    Text {
        text: String,
    },
    Conversation {
        messages: Vec<Message>,
    },
}

impl Example {
    pub fn kind(&self) -> &'static str {
        match self {
            Example::Pair { .. } => "preference (prompt/chosen/rejected)",
            Example::Unpaired { .. } => "unpaired (prompt/completion/label)",
            Example::PromptOnly { .. } => "prompt-only (prompt)",
            Example::Completion { .. } => "prompt-completion (prompt/completion)",
            Example::Text { .. } => "language modelling (text)",
            Example::Conversation { .. } => "conversational (messages)",
        }
    }
}

/// One data row with its 1-based line number and any extra columns (passed to reward commands).
#[derive(Debug, Clone)]
pub struct Row {
    pub line: usize,
    pub example: Example,
    pub extra: Map<String, Value>,
}

const KNOWN: &[&str] = &[
    "prompt",
    "chosen",
    "rejected",
    "completion",
    "label",
    "text",
    "messages",
];

/// Reads every non-blank line of a JSONL file.
pub fn read_jsonl(path: &Path) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for_each_jsonl(path, &mut |line_no, obj| {
        rows.push(parse_row(path, line_no, obj)?);
        Ok(())
    })?;
    if rows.is_empty() {
        return Err(LeashError::file(
            path,
            "the data set has no rows",
            "a JSONL data set needs at least one line",
        ));
    }
    Ok(rows)
}

/// Calls `each` with (1-based line number, object) for every non-blank line of a JSONL file.
pub(crate) fn for_each_jsonl(
    path: &Path,
    each: &mut dyn FnMut(usize, Map<String, Value>) -> Result<()>,
) -> Result<()> {
    let bytes = std::fs::read(path)
        .map_err(|e| LeashError::io(path, e, "check the path exists and is readable"))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        // Name the line, as for every other rejection of a row.
        let at = e.utf8_error().valid_up_to();
        let before = &e.as_bytes()[..at];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let column = at
            - before
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |p| p + 1);
        LeashError::row(
            path,
            line,
            format!("not valid UTF-8 (byte {} of the line)", column + 1),
            "save the file as UTF-8",
        )
    })?;
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|e| {
            LeashError::row(
                path,
                line_no,
                format!("malformed JSON: {e}"),
                "each line must be one JSON object (JSON Lines)",
            )
        })?;
        let Value::Object(obj) = value else {
            return Err(LeashError::row(
                path,
                line_no,
                "line is not a JSON object",
                "each line must be an object such as {\"prompt\": ..., \"chosen\": ..., \"rejected\": ...}",
            ));
        };
        each(line_no, obj)?;
    }
    Ok(())
}

/// One row from its JSON object (a JSONL line, or a Parquet row converted to the same value).
pub(crate) fn parse_row(path: &Path, line: usize, obj: Map<String, Value>) -> Result<Row> {
    let has = |k: &str| obj.contains_key(k);
    let content = |k: &str| content_field(path, line, &obj, k);
    let example = if has("chosen") || has("rejected") {
        let chosen = content("chosen")?;
        let rejected = content("rejected")?;
        if has("prompt") {
            Example::Pair {
                prompt: content("prompt")?,
                chosen,
                rejected,
            }
        } else {
            split_implicit_prompt(path, line, chosen, rejected)?
        }
    } else if has("label") {
        let label = obj
            .get("label")
            .and_then(Value::as_bool)
            .ok_or_else(|| field_error(path, line, "label", "must be true or false"))?;
        Example::Unpaired {
            prompt: content("prompt")?,
            completion: content("completion")?,
            label,
        }
    } else if has("completion") {
        Example::Completion {
            prompt: content("prompt")?,
            completion: content("completion")?,
        }
    } else if has("prompt") {
        Example::PromptOnly {
            prompt: content("prompt")?,
        }
    } else if has("text") {
        match content("text")? {
            Content::Text(text) => Example::Text { text },
            Content::Messages(_) => {
                return Err(field_error(path, line, "text", "must be a string"));
            }
        }
    } else if has("messages") {
        match content("messages")? {
            Content::Messages(messages) => Example::Conversation { messages },
            Content::Text(_) => {
                return Err(field_error(
                    path,
                    line,
                    "messages",
                    "must be a list of {\"role\", \"content\"} objects",
                ));
            }
        }
    } else {
        return Err(LeashError::row(
            path,
            line,
            format!(
                "no recognised fields (found: {})",
                obj.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
            "use prompt/chosen/rejected, prompt/completion/label, prompt, prompt/completion, text or messages",
        ));
    };
    let extra = obj
        .into_iter()
        .filter(|(k, _)| !KNOWN.contains(&k.as_str()))
        .collect();
    Ok(Row {
        line,
        example,
        extra,
    })
}

fn field_error(path: &Path, line: usize, field: &str, what: &str) -> LeashError {
    LeashError::row(
        path,
        line,
        format!("field `{field}` {what}"),
        format!("fix `{field}` on this line"),
    )
}

fn content_field(path: &Path, line: usize, obj: &Map<String, Value>, key: &str) -> Result<Content> {
    let value = obj.get(key).ok_or_else(|| {
        LeashError::row(
            path,
            line,
            format!("missing field `{key}`"),
            format!("every row of this layout needs `{key}`"),
        )
    })?;
    match value {
        Value::String(s) => Ok(Content::Text(s.clone())),
        Value::Array(items) => {
            let mut messages = Vec::with_capacity(items.len());
            for item in items {
                match Message::from_json(item) {
                    Some(m) => messages.push(m),
                    None => {
                        return Err(field_error(
                            path,
                            line,
                            key,
                            "has a message that is not an object with a string `role`",
                        ))
                    }
                }
            }
            Ok(Content::Messages(messages))
        }
        _ => Err(field_error(
            path,
            line,
            key,
            "must be a string or a list of {\"role\", \"content\"} messages",
        )),
    }
}

/// Where two transcripts first differ; None when one is a prefix of the other.
fn first_difference<T: PartialEq>(a: &[T], b: &[T]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Implicit prompt: the longest common prefix of the two transcripts, as TRL's
/// `extract_prompt` does (by message for conversations; by character for text, not splitting
/// off a trailing space from the completions). When one transcript is a prefix of the other,
/// TRL's loop ends without a break and the prompt stops one element short of the shorter one.
fn split_implicit_prompt(
    path: &Path,
    line: usize,
    chosen: Content,
    rejected: Content,
) -> Result<Example> {
    match (chosen, rejected) {
        (Content::Text(c), Content::Text(r)) => {
            let cc: Vec<char> = c.chars().collect();
            let rc: Vec<char> = r.chars().collect();
            let idx = match first_difference(&cc, &rc) {
                Some(i) if i > 0 && cc[i - 1] == ' ' => i - 1,
                Some(i) => i,
                None => cc.len().min(rc.len()).saturating_sub(1),
            };
            let prompt: String = cc[..idx].iter().collect();
            Ok(Example::Pair {
                prompt: Content::Text(prompt),
                chosen: Content::Text(cc[idx..].iter().collect()),
                rejected: Content::Text(rc[idx..].iter().collect()),
            })
        }
        (Content::Messages(c), Content::Messages(r)) => {
            let idx = first_difference(&c, &r).unwrap_or(c.len().min(r.len()).saturating_sub(1));
            if idx == 0 {
                return Err(LeashError::row(
                    path,
                    line,
                    "implicit-prompt row: chosen and rejected share no leading messages",
                    "add a `prompt` field, or start both conversations with the same user turn",
                ));
            }
            Ok(Example::Pair {
                prompt: Content::Messages(c[..idx].to_vec()),
                chosen: Content::Messages(c[idx..].to_vec()),
                rejected: Content::Messages(r[idx..].to_vec()),
            })
        }
        _ => Err(LeashError::row(
            path,
            line,
            "`chosen` and `rejected` mix text and conversation",
            "make both strings or both message lists",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Example> {
        let obj: Map<String, Value> = serde_json::from_str(line).unwrap();
        parse_row(Path::new("d.jsonl"), 3, obj).map(|r| r.example)
    }

    #[test]
    fn implicit_prompt_is_common_prefix() {
        let ex = parse(r#"{"chosen":"Human: hi Assistant: hello there","rejected":"Human: hi Assistant: go away"}"#).unwrap();
        assert_eq!(
            ex,
            Example::Pair {
                prompt: Content::Text("Human: hi Assistant:".into()),
                chosen: Content::Text(" hello there".into()),
                rejected: Content::Text(" go away".into()),
            }
        );
    }

    #[test]
    fn mistyped_field_names_line_and_field() {
        let err = parse(r#"{"prompt":"q","chosen":3,"rejected":"r"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("d.jsonl:3: field `chosen`"), "{err}");
        assert!(err.contains("hint:"), "{err}");
    }

    #[test]
    fn layouts_are_recognised() {
        assert!(matches!(
            parse(r#"{"prompt":"q","completion":"a","label":false}"#).unwrap(),
            Example::Unpaired { label: false, .. }
        ));
        assert!(matches!(
            parse(r#"{"prompt":"q"}"#).unwrap(),
            Example::PromptOnly { .. }
        ));
        assert!(matches!(
            parse(r#"{"text":"t"}"#).unwrap(),
            Example::Text { .. }
        ));
        assert!(matches!(
            parse(r#"{"messages":[{"role":"user","content":"x"}]}"#).unwrap(),
            Example::Conversation { .. }
        ));
    }
}

//! Chat templates: the Jinja template a checkpoint ships (tokenizer_config.json's
//! `chat_template` or `chat_template.jinja`), rendered byte-identically to transformers 5.24's
//! `apply_chat_template` (reference: `utils/chat_template_utils.py`): jinja2 with trim_blocks
//! and lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, its own `tojson`,
//! Python string methods; messages with `None` values dropped and reasoning fields aliased;
//! the named special tokens, `tools` and per-row keyword arguments as variables.
//!
//! `{% generation %}…{% endgeneration %}` (transformers' AssistantTracker extension) becomes a
//! filter block that wraps its output in two noncharacters; rendering cuts them out again and
//! records where they were: the spans `return_assistant_tokens_mask` marks.

use std::path::{Path, PathBuf};

use minijinja::{Environment, Error as JinjaError};
use serde_json::{Map, Value};

use super::jinja_py;
use super::read::Message;
use crate::error::{LeashError, Result};

const OPEN: char = '\u{FDD0}';
const CLOSE: char = '\u{FDD1}';

pub struct ChatTemplate {
    env: Environment<'static>,
    source: PathBuf,
    has_generation: bool,
}

/// What the template sees besides the messages.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions<'a> {
    pub add_generation_prompt: bool,
    /// The tokenizer's named special tokens (bos_token, eos_token, …) that are set.
    pub special_tokens: &'a [(String, String)],
    /// The row's `tools` (None when it has none).
    pub tools: Option<&'a Value>,
    /// The row's `chat_template_kwargs`.
    pub kwargs: Option<&'a Map<String, Value>>,
}

/// A rendered conversation and the byte ranges written inside `{% generation %}` blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub text: String,
    pub generation_spans: Vec<(usize, usize)>,
}

/// Why a render failed: the template's own message and where in the template.
#[derive(Debug, Clone)]
pub struct TemplateFailure {
    pub source: PathBuf,
    pub template_line: Option<usize>,
    pub message: String,
}

impl TemplateFailure {
    /// The failure as an error on data row `line` of `data`.
    pub fn at_row(&self, data: &Path, line: usize) -> LeashError {
        let at = match self.template_line {
            Some(l) => format!("{}, template line {l}", self.source.display()),
            None => self.source.display().to_string(),
        };
        LeashError::row(
            data,
            line,
            format!(
                "the chat template ({at}) rejected this row: {}",
                self.message
            ),
            "change the row to what the template accepts (roles, order, system message), \
             or use a checkpoint whose template supports it",
        )
    }
}

/// Whether the template marks assistant output (`{% generation %}`, any whitespace control).
pub fn has_generation_markers(template: &str) -> bool {
    find_tag(template, 0, "generation").is_some()
}

/// The next `{%[-+]? name [-+]?%}` at or after `from`: (start, end, left sign, right sign).
fn find_tag(src: &str, from: usize, name: &str) -> Option<(usize, usize, String, String)> {
    let mut at = from;
    while let Some(pos) = src[at..].find("{%") {
        let start = at + pos;
        let rest = &src[start + 2..];
        let left: String = rest
            .chars()
            .take(1)
            .filter(|c| *c == '-' || *c == '+')
            .collect();
        let inner = rest[left.len()..].trim_start();
        if let Some(after) = inner.strip_prefix(name) {
            let after_trim = after.trim_start();
            let right: String = after_trim
                .chars()
                .take(1)
                .filter(|c| *c == '-' || *c == '+')
                .collect();
            let word_ends =
                after.len() != after_trim.len() || !after_trim.starts_with(char::is_alphanumeric);
            if word_ends && after_trim[right.len()..].starts_with("%}") {
                let end = src.len() - after_trim.len() + right.len() + 2;
                return Some((start, end, left, right));
            }
        }
        at = start + 2;
    }
    None
}

/// Rewrites generation blocks as `{% filter __leash_generation %}` blocks, keeping each tag's
/// whitespace control, so trim_blocks/lstrip_blocks act on them exactly as on the originals.
fn rewrite_generation(src: &str) -> String {
    let mut out = src.to_string();
    for (name, replacement) in [
        ("generation", "filter __leash_generation"),
        ("endgeneration", "endfilter"),
    ] {
        let mut from = 0;
        while let Some((start, end, l, r)) = find_tag(&out, from, name) {
            let tag = format!("{{%{l} {replacement} {r}%}}");
            out.replace_range(start..end, &tag);
            from = start + tag.len();
        }
    }
    out
}

fn mark_generation(body: String) -> String {
    format!("{OPEN}{body}{CLOSE}")
}

impl ChatTemplate {
    pub fn new(template: String, source: &Path) -> Result<Self> {
        let has_generation = has_generation_markers(&template);
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(jinja_py::python_formatter);
        env.add_function("raise_exception", jinja_py::raise_exception);
        env.add_function("strftime_now", jinja_py::strftime_now);
        env.add_filter("tojson", jinja_py::tojson);
        env.add_filter("__leash_generation", mark_generation);
        env.add_template_owned("chat", rewrite_generation(&template))
            .map_err(|e| {
                LeashError::file(
                    source,
                    format!("chat_template does not parse: {e}"),
                    "fix the Jinja template, or use plain-text prompts instead of conversations",
                )
            })?;
        Ok(ChatTemplate {
            env,
            source: source.to_path_buf(),
            has_generation,
        })
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn has_generation_markers(&self) -> bool {
        self.has_generation
    }

    fn failure(&self, e: &JinjaError) -> TemplateFailure {
        TemplateFailure {
            source: self.source.clone(),
            template_line: e.line(),
            message: e
                .detail()
                .map(str::to_string)
                .unwrap_or_else(|| e.to_string()),
        }
    }

    /// Renders `messages` as transformers' `apply_chat_template(..., tokenize=False)`.
    pub fn render(
        &self,
        messages: &[Message],
        opts: &RenderOptions,
    ) -> std::result::Result<Rendered, TemplateFailure> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| self.failure(&e))?;
        let mut ctx = Map::new();
        for (name, value) in opts.special_tokens {
            ctx.insert(name.clone(), Value::String(value.clone()));
        }
        if let Some(kwargs) = opts.kwargs {
            for (k, v) in kwargs {
                ctx.insert(k.clone(), v.clone());
            }
        }
        let messages: Vec<Value> = messages.iter().map(template_message).collect();
        ctx.insert("messages".into(), Value::Array(messages));
        ctx.insert("tools".into(), opts.tools.cloned().unwrap_or(Value::Null));
        ctx.insert("documents".into(), Value::Null);
        ctx.insert(
            "add_generation_prompt".into(),
            Value::Bool(opts.add_generation_prompt),
        );
        let raw = tmpl
            .render(minijinja::Value::from_serialize(&ctx))
            .map_err(|e| self.failure(&e))?;
        let mut text = String::with_capacity(raw.len());
        let mut spans = Vec::new();
        let mut open = None;
        for c in raw.chars() {
            match c {
                OPEN => open = Some(text.len()),
                CLOSE => {
                    if let Some(start) = open.take() {
                        spans.push((start, text.len()));
                    }
                }
                c => text.push(c),
            }
        }
        Ok(Rendered {
            text,
            generation_spans: spans,
        })
    }
}

/// A message as transformers hands it to the template: keys whose value is None dropped, and
/// a reasoning field (`reasoning_content`, `thinking` or `reasoning`) also under `thinking`
/// (first) and `reasoning_content` (last), as `_alias_reasoning_fields` does.
fn template_message(m: &Message) -> Value {
    let fields: Map<String, Value> = m
        .fields
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let reasoning = ["reasoning_content", "thinking", "reasoning"]
        .iter()
        .find_map(|k| fields.get(*k).cloned());
    match reasoning {
        None => Value::Object(fields),
        Some(r) => {
            let mut out = Map::new();
            out.insert("thinking".into(), r.clone());
            for (k, v) in fields {
                out.insert(k, v);
            }
            out.insert("reasoning_content".into(), r);
            Value::Object(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> Message {
        Message::new(role, content)
    }

    fn render(
        src: &str,
        msgs: &[Message],
        gen: bool,
    ) -> std::result::Result<Rendered, TemplateFailure> {
        let t = ChatTemplate::new(src.into(), Path::new("chat_template.jinja")).unwrap();
        let toks = vec![("bos_token".to_string(), "<s>".to_string())];
        t.render(
            msgs,
            &RenderOptions {
                add_generation_prompt: gen,
                special_tokens: &toks,
                ..Default::default()
            },
        )
    }

    #[test]
    fn python_string_methods_and_generation_prompt() {
        let out = render(
            "{% for m in messages %}<|{{ m.role }}|>{{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
            &[msg("user", " hi ")],
            true,
        )
        .unwrap();
        assert_eq!(out.text, "<|user|>hi\n<|assistant|>");
    }

    #[test]
    fn raise_exception_names_the_message_and_line() {
        let err = render(
            "{{ bos_token }}\n{{ raise_exception('no system role') }}",
            &[],
            false,
        )
        .unwrap_err();
        assert_eq!(err.message, "no system role");
        assert_eq!(err.template_line, Some(2));
        let shown = err.at_row(Path::new("d.jsonl"), 7).to_string();
        assert!(shown.starts_with("d.jsonl:7:"), "{shown}");
        assert!(
            shown.contains("chat_template.jinja, template line 2"),
            "{shown}"
        );
        assert!(shown.contains("hint:"), "{shown}");
    }

    #[test]
    fn generation_blocks_record_spans_and_keep_whitespace_control() {
        let src = "{%- for m in messages %}\n  {%- if m.role == 'assistant' %}\nA:\n    {%- generation %}\n {{ m.content }}!\n    {%- endgeneration %}\n  {%- else %}U:{{ m.content }}\n{% endif %}\n{%- endfor %}";
        let out = render(src, &[msg("user", "q"), msg("assistant", "a")], false).unwrap();
        // Same text as with the tags removed by jinja2 (checked with transformers 5.24).
        assert_eq!(out.text, "U:q\nA: a!");
        assert_eq!(
            &out.text[out.generation_spans[0].0..out.generation_spans[0].1],
            " a!"
        );
        assert!(has_generation_markers(src));
        assert!(!has_generation_markers("{% generations %}"));
    }

    #[test]
    fn tojson_none_and_loop_controls_follow_python() {
        let src = "{{ messages[0] | tojson }}|{{ {'a': [1, 2.5]} | tojson(indent=2) }}|{{ none }}|{{ true }}|{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{{ m.role }}{% break %}{% endfor %}|{{ messages[::-1][0].role }}";
        let out = render(
            src,
            &[msg("user", "<é>"), msg("assistant", "x"), msg("user", "y")],
            false,
        )
        .unwrap();
        // Python: json.dumps({"role": "user", "content": "<é>"}, ensure_ascii=False) etc.
        assert_eq!(
            out.text,
            "{\"role\": \"user\", \"content\": \"<é>\"}|{\n  \"a\": [\n    1,\n    2.5\n  ]\n}|None|True|assistant|user"
        );
    }
}

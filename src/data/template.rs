//! Chat templates: the Jinja template a checkpoint ships (tokenizer_config.json's
//! `chat_template` or `chat_template.jinja`), rendered with minijinja configured as
//! transformers configures jinja2 (trim_blocks, lstrip_blocks, `raise_exception`, Python
//! string methods such as `.strip()`).

use std::path::{Path, PathBuf};

use minijinja::{context, Environment, Error as JinjaError, ErrorKind};

use super::read::Message;
use crate::error::{LeashError, Result};

pub struct ChatTemplate {
    env: Environment<'static>,
    source: PathBuf,
}

fn raise_exception(message: String) -> std::result::Result<String, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

impl ChatTemplate {
    pub fn new(template: String, source: &Path) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", template).map_err(|e| {
            LeashError::file(
                source,
                format!("chat_template does not parse: {e}"),
                "fix the Jinja template, or use plain-text prompts instead of conversations",
            )
        })?;
        Ok(ChatTemplate {
            env,
            source: source.to_path_buf(),
        })
    }

    /// Renders `messages`; `add_generation_prompt` opens an assistant turn,
    /// `continue_final_message` leaves the last message open (no end-of-turn marker).
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| LeashError::file(&self.source, e.to_string(), "fix the chat template"))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
        })
        .map_err(|e| {
            LeashError::file(
                &self.source,
                format!("chat_template failed to render: {e}"),
                "check the conversation's roles match what the template expects",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_chatml_style_template() {
        let t = ChatTemplate::new(
            "{% for m in messages %}<|{{ m.role }}|>{{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}".into(),
            Path::new("tokenizer_config.json"),
        )
        .unwrap();
        let msgs = vec![Message {
            role: "user".into(),
            content: " hi ".into(),
        }];
        assert_eq!(
            t.render(&msgs, true, "", "").unwrap(),
            "<|user|>hi\n<|assistant|>"
        );
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = ChatTemplate::new(
            "{{ raise_exception('no system role') }}".into(),
            Path::new("x"),
        )
        .unwrap();
        let err = t.render(&[], false, "", "").unwrap_err().to_string();
        assert!(err.contains("no system role"), "{err}");
    }
}

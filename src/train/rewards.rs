//! GRPO's prompts and reward functions: each data set row's prompt with its columns, and the
//! built-in rewards or `--reward-cmd` programs that score the sampled completions.

use std::time::Duration;

use serde_json::{Map, Value};

use super::config::TrainConfig;
use crate::data::dataset::read_objects;
use crate::data::tokenizer::TextTokenizer;
use crate::error::Result;
use crate::eval::evaluate::prompts_of_split;
use crate::eval::judge::{builtin_score, score_rows, Item};

/// One prompt of the data set: rendered text, ids, and the row's columns (for reward commands).
pub struct PromptRow {
    pub text: String,
    pub ids: Vec<u32>,
    pub columns: Map<String, Value>,
}

/// Every row's prompt plus its JSON columns, in file order.
pub fn load_prompts(
    path: &std::path::Path,
    split: Option<&str>,
    tok: &TextTokenizer,
) -> Result<Vec<PromptRow>> {
    let listed = prompts_of_split(path, split, tok)?;
    // `prompts` already validated every row as an object with a prompt; these are the same
    // rows' columns as stored (JSONL objects, or Parquet rows converted to them).
    let columns = read_objects(path, split)?;
    Ok(listed
        .into_iter()
        .zip(columns)
        .map(|((text, ids), columns)| PromptRow { text, ids, columns })
        .collect())
}

/// The reward functions of a run, under the names their metrics use.
pub struct Rewards {
    pub names: Vec<String>,
    commands: Vec<Option<String>>,
    pub weights: Vec<f64>,
    timeout: Duration,
}

impl Rewards {
    pub fn from_config(cfg: &TrainConfig) -> Self {
        let mut names: Vec<String> = cfg.reward_funcs.clone();
        let mut commands: Vec<Option<String>> = vec![None; names.len()];
        for (i, cmd) in cfg.reward_cmd.iter().enumerate() {
            names.push(if cfg.reward_cmd.len() == 1 {
                "reward_cmd".into()
            } else {
                format!("reward_cmd_{}", i + 1)
            });
            commands.push(Some(cmd.clone()));
        }
        let weights = cfg
            .reward_weights
            .clone()
            .unwrap_or_else(|| vec![1.0; names.len()]);
        Rewards {
            names,
            commands,
            weights,
            timeout: Duration::from_secs(cfg.reward_timeout),
        }
    }

    /// Scores of each reward function for each completion: (functions × completions).
    pub fn score(&self, rows: &[(&PromptRow, String)]) -> Result<Vec<Vec<f64>>> {
        self.names
            .iter()
            .zip(&self.commands)
            .map(|(name, cmd)| match cmd {
                None => rows
                    .iter()
                    .map(|(p, c)| {
                        builtin_score(
                            name,
                            &Item {
                                prompt: &p.text,
                                completion: c,
                            },
                        )
                    })
                    .collect(),
                Some(cmd) => {
                    let input: Vec<Value> = rows
                        .iter()
                        .map(|(p, c)| {
                            let mut obj = p.columns.clone();
                            obj.insert("prompt".into(), p.text.clone().into());
                            obj.insert("completion".into(), c.clone().into());
                            Value::Object(obj)
                        })
                        .collect();
                    score_rows("reward", cmd, &input, self.timeout)
                }
            })
            .collect()
    }
}

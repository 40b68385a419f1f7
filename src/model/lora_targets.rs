//! Which linear modules a LoRA adapter targets, with PEFT's semantics (peft 0.21
//! `tuners_utils.check_target_module_exists`, `_maybe_include_all_linear_layers`,
//! `_find_minimal_target_modules`):
//! - a JSON **string** in `target_modules` is a regular expression that must match the whole
//!   module path (`re.fullmatch`); the string `all-linear` selects every linear layer but the
//!   output head;
//! - a JSON **list** selects modules whose path equals an entry or ends with `.entry`.
//!
//! PEFT never saves `all-linear`: it writes the module paths it expanded to (condensed to the
//! shortest distinguishing suffixes when there are 20 or more), and so does leash.

use regex::Regex;
use serde::{Deserialize, Serialize};

use super::lora::LinearModule;
use crate::error::{LeashError, Result};

/// PEFT condenses a target list of at least this many entries (`MIN_TARGET_MODULES_FOR_OPTIMIZATION`).
const MIN_TARGETS_TO_CONDENSE: usize = 20;

/// `target_modules` of a PEFT LoRA config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// A regular expression over the full module path, or `all-linear`.
    Pattern(String),
    /// Module names or paths, matched exactly or as a `.`-separated suffix.
    List(Vec<String>),
}

impl TargetModules {
    /// Parses `--lora-target-modules`: `all-linear`; a regular expression (any of
    /// `* + ? [ ] ( ) { } | ^ $ \`; taken whole, commas included, as PEFT takes a string);
    /// or comma-separated module names.
    pub fn from_cli(text: &str) -> TargetModules {
        let text = text.trim();
        if text.eq_ignore_ascii_case("all-linear") {
            return TargetModules::Pattern("all-linear".into());
        }
        if text.contains([
            '*', '+', '?', '[', ']', '(', ')', '{', '}', '|', '^', '$', '\\',
        ]) {
            return TargetModules::Pattern(text.to_string());
        }
        TargetModules::List(
            text.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        )
    }

    fn is_all_linear(&self) -> bool {
        matches!(self, TargetModules::Pattern(p) if p.eq_ignore_ascii_case("all-linear"))
    }
}

/// A compiled [`TargetModules`].
pub struct TargetMatcher<'a> {
    spec: &'a TargetModules,
    regex: Option<Regex>,
}

impl<'a> TargetMatcher<'a> {
    pub fn new(spec: &'a TargetModules) -> Result<Self> {
        let regex = match spec {
            TargetModules::Pattern(p) if !spec.is_all_linear() => {
                Some(Regex::new(&format!("^(?:{p})$")).map_err(|e| {
                    LeashError::usage(
                        format!("target_modules regular expression `{p}` is invalid: {e}"),
                        "PEFT matches a target_modules string against the whole module path \
                         (e.g. `.*\\.(q|v)_proj`); lookaround is not supported",
                    )
                })?)
            }
            _ => None,
        };
        Ok(TargetMatcher { spec, regex })
    }

    /// Whether the linear module at `path` is targeted.
    pub fn matches(&self, path: &str) -> bool {
        match (self.spec, &self.regex) {
            (_, Some(re)) => re.is_match(path),
            (TargetModules::Pattern(_), None) => true, // all-linear
            (TargetModules::List(names), None) => names
                .iter()
                .any(|t| path == t || path.ends_with(&format!(".{t}"))),
        }
    }
}

/// The targeted modules, or an error naming entries that match nothing (PEFT refuses a
/// target list matching no module; leash also names each list entry that matches none).
pub fn select_targets<'m>(
    modules: &'m [LinearModule],
    spec: &TargetModules,
) -> Result<Vec<&'m LinearModule>> {
    let matcher = TargetMatcher::new(spec)?;
    let picked: Vec<&LinearModule> = modules
        .iter()
        .filter(|m| matcher.matches(&m.path))
        .collect();
    let unmatched: Vec<&String> = match spec {
        TargetModules::List(names) => names
            .iter()
            .filter(|t| {
                !modules
                    .iter()
                    .any(|m| m.path == **t || m.path.ends_with(&format!(".{t}")))
            })
            .collect(),
        TargetModules::Pattern(_) => Vec::new(),
    };
    if !unmatched.is_empty() || picked.is_empty() {
        let mut names: Vec<&str> = modules
            .iter()
            .filter_map(|m| m.path.rsplit('.').next())
            .collect();
        names.sort();
        names.dedup();
        let what = match spec {
            TargetModules::List(_) => format!("{unmatched:?}"),
            TargetModules::Pattern(p) => format!("`{p}`"),
        };
        return Err(LeashError::usage(
            format!("--lora-target-modules: {what} match no module of this model"),
            format!(
                "linear modules here: {} (or all-linear, or a regular expression over the full path such as {})",
                names.join(", "),
                modules.first().map(|m| m.path.as_str()).unwrap_or("")
            ),
        ));
    }
    Ok(picked)
}

/// `target_modules` as PEFT writes it into adapter_config.json after injecting the adapter:
/// `all-linear` becomes the targeted module paths; a list of 20 or more entries is condensed
/// to the shortest suffixes that no other module of the model has. `all_modules` are every
/// module path of the model (parents included), as PEFT's `named_modules` lists them.
pub fn saved_target_modules(
    spec: &TargetModules,
    picked: &[&LinearModule],
    all_modules: &[String],
) -> TargetModules {
    let targets: Vec<String> = match spec {
        TargetModules::Pattern(_) if spec.is_all_linear() => {
            picked.iter().map(|m| m.path.clone()).collect()
        }
        TargetModules::Pattern(_) => return spec.clone(),
        TargetModules::List(names) => names.clone(),
    };
    let mut targets = targets;
    targets.sort();
    targets.dedup();
    if targets.len() >= MIN_TARGETS_TO_CONDENSE {
        let others: Vec<&String> = all_modules
            .iter()
            .filter(|n| {
                !targets
                    .iter()
                    .any(|t| *n == t || n.ends_with(&format!(".{t}")))
            })
            .collect();
        let condensed = minimal_suffixes(&targets, &others);
        if condensed.len() < targets.len() {
            targets = condensed;
        }
    }
    TargetModules::List(targets)
}

/// PEFT's `_find_minimal_target_modules`: for each target (in order of its suffix list), the
/// shortest suffix not shared with any other module, unless a chosen suffix already covers it.
fn minimal_suffixes(targets: &[String], others: &[&String]) -> Vec<String> {
    let suffixes = |s: &str| -> Vec<String> {
        let parts: Vec<&str> = s.split('.').collect();
        (0..parts.len())
            .rev()
            .map(|i| parts[i..].join("."))
            .collect()
    };
    let other_suffixes: std::collections::HashSet<String> =
        others.iter().flat_map(|o| suffixes(o.as_str())).collect();
    let mut items: Vec<(&String, Vec<String>)> =
        targets.iter().map(|t| (t, suffixes(t.as_str()))).collect();
    items.sort_by(|a, b| a.1.cmp(&b.1));
    let mut required: Vec<String> = Vec::new();
    for (item, sufs) in items {
        for suffix in sufs {
            if required.contains(&suffix) || other_suffixes.contains(&suffix) {
                continue;
            }
            if !required.iter().any(|r| item.ends_with(&format!(".{r}"))) {
                required.push(suffix);
                break;
            }
        }
    }
    if required.is_empty() {
        return targets.to_vec();
    }
    required.sort();
    required
}

/// Every module path implied by parameter names (`a.b.c.weight` → `a`, `a.b`, `a.b.c`).
pub fn module_paths<'p>(param_names: impl Iterator<Item = &'p String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for name in param_names {
        let parts: Vec<&str> = name.split('.').collect();
        for i in 1..parts.len() {
            out.push(parts[..i].join("."));
        }
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(path: &str) -> LinearModule {
        LinearModule {
            path: path.into(),
            inp: 4,
            out: 4,
        }
    }

    #[test]
    fn cli_forms() {
        assert_eq!(
            TargetModules::from_cli("q_proj, v_proj"),
            TargetModules::List(vec!["q_proj".into(), "v_proj".into()])
        );
        assert_eq!(
            TargetModules::from_cli("All-Linear"),
            TargetModules::Pattern("all-linear".into())
        );
        assert_eq!(
            TargetModules::from_cli(r".*\.(q|v)_proj"),
            TargetModules::Pattern(r".*\.(q|v)_proj".into())
        );
    }

    #[test]
    fn regex_matches_the_whole_path_as_python_fullmatch() {
        let spec = TargetModules::Pattern(r".*layers\.1\..*_proj".into());
        let m = TargetMatcher::new(&spec).unwrap();
        assert!(m.matches("model.layers.1.self_attn.q_proj"));
        assert!(!m.matches("model.layers.0.self_attn.q_proj"));
        let exact = TargetModules::Pattern("q_proj".into());
        assert!(!TargetMatcher::new(&exact)
            .unwrap()
            .matches("model.layers.1.self_attn.q_proj"));
    }

    /// Hand-worked with peft 0.21's `_find_minimal_target_modules` docstring example.
    #[test]
    fn condenses_like_peft() {
        let mut targets: Vec<String> = (0..100)
            .flat_map(|i| {
                [
                    format!("model.decoder.layers.{i}.self_attn.q_proj"),
                    format!("model.decoder.layers.{i}.self_attn.v_proj"),
                ]
            })
            .collect();
        targets.sort();
        let others: Vec<String> = (0..100)
            .map(|i| format!("model.encoder.layers.{i}.self_attn.k_proj"))
            .collect();
        let refs: Vec<&String> = others.iter().collect();
        assert_eq!(minimal_suffixes(&targets, &refs), vec!["q_proj", "v_proj"]);
    }

    #[test]
    fn all_linear_is_saved_as_module_paths() {
        let modules = [
            module("model.layers.0.mlp.up_proj"),
            module("model.layers.0.self_attn.q_proj"),
        ];
        let picked: Vec<&LinearModule> = modules.iter().collect();
        let spec = TargetModules::from_cli("all-linear");
        let saved = saved_target_modules(&spec, &picked, &[]);
        assert_eq!(
            saved,
            TargetModules::List(vec![
                "model.layers.0.mlp.up_proj".into(),
                "model.layers.0.self_attn.q_proj".into()
            ])
        );
        let unknown = select_targets(&modules, &TargetModules::Pattern("nope.*".into()));
        assert!(unknown.unwrap_err().to_string().contains("`nope.*`"));
    }
}

//! Length bias in preference data: `leash data report` (how much longer chosen answers are)
//! and `leash data balance-length` (subsample so chosen is longer in as many pairs as it is
//! shorter, removing length as a shortcut for the preference).

use std::path::Path;

use serde_json::{json, Value};

use super::dataset::read_rows;
use super::read::{Content, Example};
use crate::error::{read_text, LeashError, Result};

fn chars(c: &Content) -> usize {
    match c {
        Content::Text(t) => t.chars().count(),
        Content::Messages(m) => m.iter().map(|x| x.content.chars().count()).sum(),
    }
}

/// (line, chosen length, rejected length) of every preference row, in characters.
fn pair_lengths(path: &Path) -> Result<Vec<(usize, usize, usize)>> {
    let rows = read_rows(path, None)?;
    let mut out = Vec::new();
    for r in rows {
        match &r.example {
            Example::Pair {
                chosen, rejected, ..
            } => out.push((r.line, chars(chosen), chars(rejected))),
            other => {
                return Err(LeashError::row(
                    path,
                    r.line,
                    format!("a {} row is not a preference pair", other.kind()),
                    "length reports need prompt/chosen/rejected rows",
                ))
            }
        }
    }
    Ok(out)
}

/// Length statistics of chosen vs rejected completions.
pub fn length_report(path: &Path) -> Result<Value> {
    Ok(statistics(&pair_lengths(path)?))
}

fn statistics(pairs: &[(usize, usize, usize)]) -> Value {
    let n = pairs.len().max(1) as f64;
    let mean =
        |f: fn(&(usize, usize, usize)) -> usize| pairs.iter().map(|p| f(p) as f64).sum::<f64>() / n;
    let longer = pairs.iter().filter(|p| p.1 > p.2).count() as f64 / n;
    let shorter = pairs.iter().filter(|p| p.1 < p.2).count() as f64 / n;
    json!({
        "pairs": pairs.len(),
        "chosen_mean_chars": mean(|p| p.1),
        "rejected_mean_chars": mean(|p| p.2),
        "chosen_longer_fraction": longer,
        "chosen_shorter_fraction": shorter,
        "length_bias": longer - shorter,
    })
}

/// Writes to `output` every pair where chosen is not longer, plus as many chosen-longer pairs
/// (the first in file order) as there are chosen-shorter ones (or the reverse when chosen is
/// mostly shorter). Returns the report of the balanced file.
pub fn balance_length(input: &Path, output: &Path) -> Result<Value> {
    let pairs = pair_lengths(input)?;
    let longer: Vec<usize> = pairs.iter().filter(|p| p.1 > p.2).map(|p| p.0).collect();
    let shorter: Vec<usize> = pairs.iter().filter(|p| p.1 < p.2).map(|p| p.0).collect();
    let keep_n = longer.len().min(shorter.len());
    let mut keep: Vec<usize> = pairs.iter().filter(|p| p.1 == p.2).map(|p| p.0).collect();
    keep.extend(longer.iter().take(keep_n));
    keep.extend(shorter.iter().take(keep_n));
    keep.sort_unstable();
    let text = read_text(input)?;
    let lines: Vec<&str> = text.lines().collect();
    let body: String = keep
        .iter()
        .filter_map(|&l| lines.get(l - 1))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(output, body)
        .map_err(|e| LeashError::io(output, e, "check the path is writable"))?;
    let kept: Vec<(usize, usize, usize)> = pairs
        .iter()
        .filter(|p| keep.binary_search(&p.0).is_ok())
        .copied()
        .collect();
    let mut report = statistics(&kept);
    let dropped = pairs.len() - keep.len();
    report["input_pairs"] = pairs.len().into();
    report["kept_pairs"] = keep.len().into();
    report["dropped_pairs"] = dropped.into();
    report["note"] = format!(
        "kept {} of {} pairs, dropped {dropped} ({} where chosen is longer, {} where it is shorter); {} pairs had equal lengths",
        keep.len(),
        pairs.len(),
        longer.len() - keep_n,
        shorter.len() - keep_n,
        pairs.len() - longer.len() - shorter.len(),
    )
    .into();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balancing_removes_the_length_bias() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.jsonl");
        let rows = [
            r#"{"prompt":"q","chosen":"long answer","rejected":"no"}"#,
            r#"{"prompt":"q","chosen":"longer one","rejected":"x"}"#,
            r#"{"prompt":"q","chosen":"a","rejected":"bbb"}"#,
            r#"{"prompt":"q","chosen":"long again","rejected":"y"}"#,
        ];
        std::fs::write(&input, rows.join("\n")).unwrap();
        let before = length_report(&input).unwrap();
        assert_eq!(before["chosen_longer_fraction"], 0.75);
        let after = balance_length(&input, &dir.path().join("out.jsonl")).unwrap();
        assert_eq!(after["pairs"], 2);
        assert_eq!(after["length_bias"], 0.0);
        assert_eq!(
            (
                &after["input_pairs"],
                &after["kept_pairs"],
                &after["dropped_pairs"]
            ),
            (&4.into(), &2.into(), &2.into())
        );
        assert_eq!(
            after["note"],
            "kept 2 of 4 pairs, dropped 2 (2 where chosen is longer, 0 where it is shorter); 0 pairs had equal lengths"
        );
    }
}

//! Judges that score completions: an external command (any scorer in any language: JSONL
//! `{prompt, completion}` on stdin, one number per line on stdout), a pairwise command (JSONL
//! `{prompt, completion_a, completion_b}` in, `a` / `b` / `tie` out), and built-in rule judges
//! for the synthetic arithmetic task (polite + correct answers preferred).
//!
//! A command runs as `sh -c CMD` in a process group of its own; on a timeout, a failure or
//! Ctrl-C the whole group is killed, so no scorer (or anything it started) is left running.
//! Scores must be finite numbers: `nan` or `inf` is an error naming the command and row.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::error::{LeashError, Result};

pub const BUILTIN_JUDGES: &[&str] = &["arithmetic", "correct", "format", "polite", "length"];

pub enum Judge {
    Builtin(String),
    Command { cmd: String, timeout: Duration },
}

impl Judge {
    /// The judge the options name: `--judge-cmd` (an external command, killed after
    /// `timeout`) when given, else the built-in `--judge`, which must exist.
    pub fn from_options(builtin: &str, cmd: Option<String>, timeout: Duration) -> Result<Judge> {
        if let Some(cmd) = cmd {
            return Ok(Judge::Command { cmd, timeout });
        }
        if !BUILTIN_JUDGES.contains(&builtin) {
            return Err(LeashError::usage(
                format!("unknown judge `{builtin}`"),
                format!(
                    "built-in judges: {}; or pass --judge-cmd",
                    BUILTIN_JUDGES.join(", ")
                ),
            ));
        }
        Ok(Judge::Builtin(builtin.to_string()))
    }
}

/// One prompt/completion to score.
pub struct Item<'a> {
    pub prompt: &'a str,
    pub completion: &'a str,
}

const POLITE: &[&str] = &[
    "sure",
    "happy to help",
    "good question",
    "of course",
    "glad",
    "please",
    "thanks",
    "anything else",
];
const RUDE: &[&str] = &[
    "obviously",
    "stupid",
    "whatever",
    "figure it out",
    "duh",
    "lazy",
    "ugh",
];

/// The expected answer of "… a op b …" in the prompt, if there is one.
pub fn arithmetic_answer(prompt: &str) -> Option<i64> {
    let tokens: Vec<&str> = prompt.split_whitespace().collect();
    tokens.windows(3).find_map(|w| {
        let clean = |s: &str| {
            s.trim_matches(|c: char| !c.is_ascii_digit() && c != '-')
                .parse::<i64>()
                .ok()
        };
        let (a, b) = (clean(w[0])?, clean(w[2])?);
        match w[1] {
            "+" => Some(a + b),
            "-" => Some(a - b),
            "*" | "x" | "×" => Some(a * b),
            _ => None,
        }
    })
}

fn numbers(text: &str) -> Vec<i64> {
    text.split(|c: char| !(c.is_ascii_digit() || c == '-'))
        .filter_map(|s| s.trim_end_matches('-').parse::<i64>().ok())
        .collect()
}

/// Whether the text states a result as "= N" or "equals N".
fn states_answer(lower: &str) -> bool {
    let words: Vec<&str> = lower.split_whitespace().collect();
    words.windows(2).any(|w| {
        (w[0] == "=" || w[0] == "equals")
            && w[1]
                .trim_end_matches(['.', '!', ','])
                .parse::<i64>()
                .is_ok()
    })
}

/// Built-in rule scores. `correct`: 1 if the completion's last number is the right answer;
/// `polite`: +1 for a polite phrase, −1 for a rude one; `length`: −words/10;
/// `format`: 1 if the answer is stated as "= N" or "equals N" (the data set's house style);
/// `arithmetic`: correct + polite (the demo's judge).
pub fn builtin_score(name: &str, item: &Item) -> Result<f64> {
    let lower = item.completion.to_lowercase();
    let correct = || match (
        arithmetic_answer(item.prompt),
        numbers(item.completion).last(),
    ) {
        (Some(ans), Some(&got)) => (ans == got) as u8 as f64,
        _ => 0.0,
    };
    let polite = || {
        let p = POLITE.iter().any(|w| lower.contains(w)) as u8 as f64;
        let r = RUDE.iter().any(|w| lower.contains(w)) as u8 as f64;
        p - r
    };
    match name {
        "correct" => Ok(correct()),
        "polite" => Ok(polite()),
        "format" => Ok(states_answer(&lower) as u8 as f64),
        "length" => Ok(-(item.completion.split_whitespace().count() as f64) / 10.0),
        "arithmetic" => Ok(correct() + polite()),
        other => Err(LeashError::usage(
            format!("unknown judge `{other}`"),
            format!(
                "built-in judges: {}; or pass --judge-cmd",
                BUILTIN_JUDGES.join(", ")
            ),
        )),
    }
}

/// Runs `sh -c cmd` with `input` on stdin; returns stdout lines. Errors name the command.
fn run_command(cmd: &str, input: String, timeout: Duration) -> Result<Vec<String>> {
    run_command_as("judge", cmd, input, timeout)
}

/// The command's process group, killed (SIGKILL to every member) unless disarmed: on every
/// early return — timeout, failure, Ctrl-C — nothing the command started outlives it.
struct Group<'a> {
    child: &'a mut Child,
    armed: bool,
}

impl Drop for Group<'_> {
    fn drop(&mut self) {
        if self.armed {
            #[cfg(unix)]
            // SAFETY: kill(2) takes no pointers; a negative pid names the process group the
            // child leads (`process_group(0)` at spawn), which exists until it is reaped below.
            unsafe {
                libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL);
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn run_command_as(role: &str, cmd: &str, input: String, timeout: Duration) -> Result<Vec<String>> {
    let fail = |msg: String| {
        LeashError::usage(
            format!("{role} command `{cmd}` {msg}"),
            "run the command by hand on the same JSONL input to see what it does",
        )
    };
    // Ctrl-C must reach this loop (to end the command's group) rather than kill leash alone.
    crate::train::engine::install_ctrl_c();
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command
        .spawn()
        .map_err(|e| fail(format!("could not start: {e}")))?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| fail("has no stdin".into()))?;
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| fail("has no stdout".into()))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        let _ = tx.send(s);
    });
    let mut stderr = child.stderr.take();
    let mut group = Group {
        child: &mut child,
        armed: true,
    };
    let start = Instant::now();
    let timed_out = || {
        fail(format!(
            "did not finish within {} s (timeout; its process group was killed)",
            timeout.as_secs()
        ))
    };
    let status = loop {
        if let Some(status) = group
            .child
            .try_wait()
            .map_err(|e| fail(format!("wait failed: {e}")))?
        {
            break status;
        }
        if crate::train::engine::INTERRUPTED.load(Ordering::SeqCst) {
            return Err(LeashError::Interrupted {
                message: format!("interrupted while the {role} command `{cmd}` ran (its process group was killed)"),
                hint: "rerun the command; nothing was lost that had been written".into(),
            });
        }
        if start.elapsed() > timeout {
            return Err(timed_out());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // Something the command started in the background may still hold its output open.
    let out = rx
        .recv_timeout(timeout.saturating_sub(start.elapsed()))
        .map_err(|_| timed_out())?;
    let _ = writer.join();
    if !status.success() {
        let mut err = String::new();
        if let Some(e) = stderr.as_mut() {
            let _ = e.read_to_string(&mut err);
        }
        return Err(fail(format!("failed ({status}): {}", err.trim())));
    }
    group.armed = false;
    Ok(out.lines().map(str::to_string).collect())
}

/// Runs a scoring command on whole JSON rows (one object per line on stdin) and parses one
/// number per line of its stdout. `role` names it in errors ("judge", "reward").
pub fn score_rows(
    role: &str,
    cmd: &str,
    rows: &[serde_json::Value],
    timeout: Duration,
) -> Result<Vec<f64>> {
    let input: String = rows.iter().map(|r| format!("{r}\n")).collect();
    let lines = run_command_as(role, cmd, input, timeout)?;
    let hint = "print exactly one number per input line, in input order";
    if lines.len() != rows.len() {
        return Err(LeashError::usage(
            format!(
                "{role} command `{cmd}` printed {} lines for {} rows",
                lines.len(),
                rows.len()
            ),
            hint,
        ));
    }
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| match l.trim().parse::<f64>() {
            Ok(v) if v.is_finite() => Ok(v),
            Ok(_) => Err(LeashError::usage(
                format!(
                    "{role} command `{cmd}`: row {} printed {l:?}, not a finite number",
                    i + 1
                ),
                "a score must be a finite number: map failures to a low score (e.g. 0 or -1) instead of nan or inf",
            )),
            Err(_) => Err(LeashError::usage(
                format!(
                    "{role} command `{cmd}`: row {} printed {l:?}, not a number",
                    i + 1
                ),
                hint,
            )),
        })
        .collect()
}

impl Judge {
    /// One score per item.
    pub fn score(&self, items: &[Item]) -> Result<Vec<f64>> {
        match self {
            Judge::Builtin(name) => items.iter().map(|it| builtin_score(name, it)).collect(),
            Judge::Command { cmd, timeout } => {
                let rows: Vec<serde_json::Value> = items
                    .iter()
                    .map(|it| json!({"prompt": it.prompt, "completion": it.completion}))
                    .collect();
                score_rows("judge", cmd, &rows, *timeout)
            }
        }
    }

    /// Pairwise preference per pair: +1 if the first wins, −1 if the second, 0 for a tie.
    pub fn compare(&self, prompts: &[&str], first: &[&str], second: &[&str]) -> Result<Vec<i8>> {
        match self {
            Judge::Command { cmd, timeout } => {
                let input: String = (0..prompts.len())
                    .map(|i| format!("{}\n", json!({"prompt": prompts[i], "completion_a": first[i], "completion_b": second[i]})))
                    .collect();
                let lines = run_command(cmd, input, *timeout)?;
                if lines.len() != prompts.len() {
                    return Err(LeashError::usage(
                        format!(
                            "pairwise judge `{cmd}` printed {} lines for {} pairs",
                            lines.len(),
                            prompts.len()
                        ),
                        "print a, b or tie once per input line",
                    ));
                }
                lines
                    .iter()
                    .enumerate()
                    .map(|(i, l)| match l.trim() {
                        "a" | "A" | "1" => Ok(1),
                        "b" | "B" | "2" => Ok(-1),
                        "tie" | "0" => Ok(0),
                        other => Err(LeashError::usage(
                            format!("pairwise judge `{cmd}`: row {} printed {other:?}", i + 1),
                            "print a, b or tie once per input line",
                        )),
                    })
                    .collect()
            }
            Judge::Builtin(_) => {
                let a: Vec<Item> = (0..prompts.len())
                    .map(|i| Item {
                        prompt: prompts[i],
                        completion: first[i],
                    })
                    .collect();
                let b: Vec<Item> = (0..prompts.len())
                    .map(|i| Item {
                        prompt: prompts[i],
                        completion: second[i],
                    })
                    .collect();
                let (sa, sb) = (self.score(&a)?, self.score(&b)?);
                Ok(sa
                    .iter()
                    .zip(&sb)
                    .map(|(x, y)| (x > y) as i8 - (x < y) as i8)
                    .collect())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judge_options_pick_the_command_or_a_known_builtin() {
        let t = Duration::from_secs(3);
        assert!(matches!(
            Judge::from_options("nope", Some("./judge.sh".into()), t),
            Ok(Judge::Command { cmd, timeout }) if cmd == "./judge.sh" && timeout == t
        ));
        assert!(matches!(
            Judge::from_options("polite", None, t),
            Ok(Judge::Builtin(name)) if name == "polite"
        ));
        let err = Judge::from_options("nope", None, t)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("unknown judge `nope`") && err.contains("--judge-cmd"),
            "{err}"
        );
    }

    #[test]
    fn builtin_rules() {
        let it = |c| Item {
            prompt: "Q: what is 9 * 15?",
            completion: c,
        };
        assert_eq!(arithmetic_answer("Q: quick one, 13 - 1?"), Some(12));
        assert_eq!(
            builtin_score("arithmetic", &it(" Sure! 9 * 15 = 135.")).unwrap(),
            2.0
        );
        assert_eq!(builtin_score("arithmetic", &it(" 134")).unwrap(), 0.0);
        assert_eq!(
            builtin_score("polite", &it(" Obviously 135.")).unwrap(),
            -1.0
        );
        assert!(builtin_score("nope", &it("x")).is_err());
        assert_eq!(builtin_score("format", &it(" 9 * 15 = 135.")).unwrap(), 1.0);
        assert_eq!(
            builtin_score("format", &it(" It equals 135!")).unwrap(),
            1.0
        );
        assert_eq!(builtin_score("format", &it(" 135")).unwrap(), 0.0);
    }

    #[test]
    fn command_judges_and_their_failures() {
        let items = [
            Item {
                prompt: "p",
                completion: "a",
            },
            Item {
                prompt: "p",
                completion: "bb",
            },
        ];
        let t = Duration::from_secs(5);
        let ok = Judge::Command {
            cmd: "while read l; do echo ${#l}; done".into(),
            timeout: t,
        };
        assert_eq!(ok.score(&items).unwrap().len(), 2);
        let short = Judge::Command {
            cmd: "head -n 1 | wc -l".into(),
            timeout: t,
        };
        assert!(short
            .score(&items)
            .unwrap_err()
            .to_string()
            .contains("printed 1 lines for 2 rows"));
        let failing = Judge::Command {
            cmd: "echo boom >&2; exit 3".into(),
            timeout: t,
        };
        let err = failing.score(&items).unwrap_err().to_string();
        assert!(err.contains("failed") && err.contains("boom"), "{err}");
        let hang = Judge::Command {
            cmd: "sleep 5".into(),
            timeout: Duration::from_millis(200),
        };
        assert!(hang
            .score(&items)
            .unwrap_err()
            .to_string()
            .contains("timeout"));
        let nan = Judge::Command {
            cmd: "read l; echo 1; echo nan".into(),
            timeout: t,
        };
        let err = nan.score(&items).unwrap_err().to_string();
        assert!(
            err.contains("judge command")
                && err.contains("row 2")
                && err.contains("not a finite number"),
            "{err}"
        );
        let pair = Judge::Command {
            cmd: "while read l; do echo a; done".into(),
            timeout: t,
        };
        assert_eq!(pair.compare(&["p"], &["x"], &["y"]).unwrap(), vec![1]);
    }
}

//! Progress and log lines on stderr, for every long command (training, eval, generate, logps,
//! merge). On a terminal: an indicatif bar, with log lines printed above it. Off a terminal
//! (nohup, CI, a cluster job log) a bar draws nothing, and indicatif drops the lines printed
//! through it too; so there every line goes straight to stderr, plus a plain progress line
//! at most every [`PLAIN_EVERY`] and at the end. Training runs also append every line to
//! `train.log` in their output folder, whatever stderr is.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressState, ProgressStyle};

use crate::error::{LeashError, Result};

/// How often a plain (non-terminal) progress line is printed.
pub const PLAIN_EVERY: Duration = Duration::from_secs(10);

/// A rate for people: "53.0 steps/s", "4.2 s/step" (never "52.9743/s").
pub fn format_rate(per_sec: f64, unit: &str) -> String {
    if !per_sec.is_finite() || per_sec <= 0.0 {
        return "–".to_string();
    }
    if per_sec >= 100.0 {
        format!("{per_sec:.0} {unit}s/s")
    } else if per_sec >= 1.0 {
        format!("{per_sec:.1} {unit}s/s")
    } else {
        format!("{:.1} s/{unit}", 1.0 / per_sec)
    }
}

/// Seconds as "42 s", "3 min 20 s", "2 h 05 min".
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {:02} s", s / 60, s % 60),
        _ => format!("{} h {:02} min", s / 3600, (s % 3600) / 60),
    }
}

struct Plain {
    pos: u64,
    last_print: Instant,
}

/// One command's progress: `total` items of `unit` (singular: "step", "prompt", "row").
pub struct Progress {
    label: String,
    unit: &'static str,
    total: u64,
    start_pos: u64,
    started: Instant,
    bar: Option<ProgressBar>,
    plain: Mutex<Plain>,
    log: Option<Mutex<(PathBuf, std::fs::File)>>,
}

impl Progress {
    /// A bar when stderr is a terminal, plain lines otherwise.
    pub fn new(label: &str, unit: &'static str, total: u64) -> Self {
        Self::with_terminal(label, unit, total, std::io::stderr().is_terminal())
    }

    /// As [`Progress::new`], deciding explicitly (tests; `LEASH_PLAIN_PROGRESS=1` forces plain).
    pub fn with_terminal(label: &str, unit: &'static str, total: u64, terminal: bool) -> Self {
        let terminal = terminal && std::env::var_os("LEASH_PLAIN_PROGRESS").is_none();
        let bar = terminal.then(|| {
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template(&format!(
                "{label} {{bar:30}} {{pos}}/{{len}} {unit}s  {{rate}}  ETA {{eta}}  {{msg}}"
            ))
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .with_key(
                "rate",
                move |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = w.write_str(&format_rate(s.per_sec(), unit));
                },
            );
            bar.set_style(style);
            bar
        });
        Progress {
            label: label.to_string(),
            unit,
            total,
            start_pos: 0,
            started: Instant::now(),
            bar,
            plain: Mutex::new(Plain {
                pos: 0,
                last_print: Instant::now(),
            }),
            log: None,
        }
    }

    /// Also append every line to `path` (truncated first unless `append`).
    pub fn log_to(mut self, path: &Path, append: bool) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(path)
            .map_err(|e| LeashError::io(path, e, "check the output folder is writable"))?;
        self.log = Some(Mutex::new((path.to_path_buf(), file)));
        Ok(self)
    }

    /// Sets the total and the position work starts from (e.g. the step a run resumes at).
    pub fn set_total(&mut self, total: u64, position: u64) {
        self.total = total;
        self.start_pos = position;
        self.started = Instant::now();
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(position);
            bar.reset_eta();
        }
        if let Ok(mut p) = self.plain.lock() {
            p.pos = position;
        }
    }

    /// One log line: above the bar on a terminal, on its own line otherwise; always in the log.
    pub fn println(&self, line: impl AsRef<str>) {
        let line = line.as_ref();
        match &self.bar {
            Some(bar) if !bar.is_hidden() => bar.println(line),
            _ => eprintln!("{line}"),
        }
        self.write_log(line);
    }

    /// A line for the log file only (e.g. the bar's own progress, which stderr already shows).
    fn write_log(&self, line: &str) {
        if let Some(log) = &self.log {
            if let Ok(mut guard) = log.lock() {
                // A full disk must not kill a run over its log; metrics.jsonl reports write errors.
                let _ = writeln!(guard.1, "{line}").and_then(|_| guard.1.flush());
            }
        }
    }

    /// Advances by `n`; off a terminal prints a progress line at most every [`PLAIN_EVERY`].
    pub fn inc(&self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(n);
            return;
        }
        let Ok(mut p) = self.plain.lock() else { return };
        p.pos += n;
        if p.last_print.elapsed() >= PLAIN_EVERY && p.pos < self.total {
            p.last_print = Instant::now();
            let line = self.status_line(p.pos);
            drop(p);
            eprintln!("{line}");
        }
    }

    /// "label: 12/40 steps (2.1 steps/s, ETA 13 s)".
    fn status_line(&self, pos: u64) -> String {
        let elapsed = self.started.elapsed().as_secs_f64();
        let done = pos.saturating_sub(self.start_pos) as f64;
        let rate = if elapsed > 0.0 { done / elapsed } else { 0.0 };
        let mut line = format!(
            "{}: {pos}/{} {}s ({}",
            self.label,
            self.total,
            self.unit,
            format_rate(rate, self.unit)
        );
        if rate > 0.0 && pos < self.total {
            let eta = Duration::from_secs_f64((self.total - pos) as f64 / rate);
            let _ = write!(line, ", ETA {}", format_duration(eta));
        }
        line.push(')');
        line
    }

    /// A short status message beside the bar (terminal only; plain mode prints lines instead).
    pub fn set_message(&self, msg: String) {
        if let Some(bar) = &self.bar {
            bar.set_message(msg);
        }
    }

    /// Removes the bar; off a terminal prints the final count and time.
    pub fn finish(&self) {
        let pos = match &self.bar {
            Some(bar) => {
                bar.finish_and_clear();
                bar.position()
            }
            None => self.plain.lock().map(|p| p.pos).unwrap_or(self.total),
        };
        let line = format!(
            "{}: {pos}/{} {}s in {}",
            self.label,
            self.total,
            self.unit,
            format_duration(self.started.elapsed())
        );
        if self.bar.is_none() {
            eprintln!("{line}");
        }
        self.write_log(&line);
    }

    /// Leaves the bar where it stopped (the run ends with an error).
    pub fn abandon(&self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_read_like_numbers_people_write() {
        assert_eq!(format_rate(52.9743, "step"), "53.0 steps/s");
        assert_eq!(format_rate(1234.4, "row"), "1234 rows/s");
        assert_eq!(format_rate(0.25, "step"), "4.0 s/step");
        assert_eq!(format_rate(0.0, "step"), "–");
        assert_eq!(format_rate(f64::NAN, "step"), "–");
        assert_eq!(format_duration(Duration::from_secs(200)), "3 min 20 s");
        assert_eq!(format_duration(Duration::from_secs(7500)), "2 h 05 min");
    }

    #[test]
    fn plain_mode_writes_every_line_to_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.log");
        let mut p = Progress::with_terminal("train", "step", 0, false)
            .log_to(&path, false)
            .unwrap();
        p.set_total(3, 1);
        p.println("step 2 | loss 0.5000");
        p.inc(2);
        p.finish();
        let log = std::fs::read_to_string(&path).unwrap();
        assert!(log.starts_with("step 2 | loss 0.5000\n"), "{log}");
        assert!(log.contains("train: 3/3 steps in"), "{log}");
        // Appending keeps the earlier lines (a resumed run).
        let p = Progress::with_terminal("train", "step", 3, false)
            .log_to(&path, true)
            .unwrap();
        p.println("resumed");
        let log = std::fs::read_to_string(&path).unwrap();
        assert!(
            log.contains("step 2") && log.ends_with("resumed\n"),
            "{log}"
        );
    }
}

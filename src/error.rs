//! The library's error type: every user-facing failure names what it was reading (file, line,
//! field) and ends with a `hint:` line that says what to do next.

use std::path::{Path, PathBuf};

/// Errors the library reports to users. `Display` prints the message and then `hint: ...`.
#[derive(Debug, thiserror::Error)]
pub enum LeashError {
    /// A file or folder could not be read or written.
    #[error("{}: {source}\nhint: {hint}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
        hint: String,
    },
    /// A file was read but its content is wrong (config key, tensor, tokenizer...).
    #[error("{}: {message}\nhint: {hint}", path.display())]
    File {
        path: PathBuf,
        message: String,
        hint: String,
    },
    /// One row of a data file is wrong; `line` is 1-based.
    #[error("{}:{line}: {message}\nhint: {hint}", path.display())]
    Row {
        path: PathBuf,
        line: usize,
        message: String,
        hint: String,
    },
    /// An option or combination of options is invalid.
    #[error("{message}\nhint: {hint}")]
    Usage { message: String, hint: String },
    /// Training stopped on purpose (NaN loss, interrupted) after saving what could be saved.
    #[error("{message}\nhint: {hint}")]
    Stopped { message: String, hint: String },
    /// The user pressed Ctrl-C; what could be saved was saved. The binary exits 130.
    #[error("{message}\nhint: {hint}")]
    Interrupted { message: String, hint: String },
    /// The GPU ran out of memory ([`crate::device::out_of_memory`]); the hint says what to lower.
    #[error("{message}\nhint: {hint}")]
    OutOfMemory { message: String, hint: String },
    /// A tensor operation failed: a bug or an unsupported shape, not a user mistake.
    #[error("tensor operation failed: {0}\nhint: this is likely a bug in leash; please report it with the command you ran")]
    Tensor(candle_core::Error),
}

/// Every candle error passes here (`?`): the GPU running out of memory is the user's to fix,
/// so it becomes [`LeashError::OutOfMemory`]; anything else is a tensor failure.
impl From<candle_core::Error> for LeashError {
    fn from(e: candle_core::Error) -> Self {
        let text = e.to_string();
        if crate::device::is_out_of_memory(&text) {
            crate::device::out_of_memory(&text)
        } else {
            LeashError::Tensor(e)
        }
    }
}

pub type Result<T, E = LeashError> = std::result::Result<T, E>;

impl LeashError {
    pub fn io(path: &Path, source: std::io::Error, hint: impl Into<String>) -> Self {
        LeashError::Io {
            path: path.to_path_buf(),
            source,
            hint: hint.into(),
        }
    }

    pub fn file(path: &Path, message: impl Into<String>, hint: impl Into<String>) -> Self {
        LeashError::File {
            path: path.to_path_buf(),
            message: message.into(),
            hint: hint.into(),
        }
    }

    pub fn row(
        path: &Path,
        line: usize,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        LeashError::Row {
            path: path.to_path_buf(),
            line,
            message: message.into(),
            hint: hint.into(),
        }
    }

    pub fn usage(message: impl Into<String>, hint: impl Into<String>) -> Self {
        LeashError::Usage {
            message: message.into(),
            hint: hint.into(),
        }
    }
}

/// Reads a whole file as UTF-8, with an error that names the file.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path)
        .map_err(|e| LeashError::io(path, e, "check the path exists and is readable"))?;
    String::from_utf8(bytes).map_err(|e| {
        LeashError::file(
            path,
            format!("not valid UTF-8 (byte {})", e.utf8_error().valid_up_to()),
            "save the file as UTF-8",
        )
    })
}

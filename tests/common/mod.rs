//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod logps_check;
pub mod lora;
pub mod train_check;

/// The repository the tests read fixtures from: where they were built, or `LEASH_REPO` when a
/// test binary runs elsewhere (scripts/gpu-check.sh on a GPU machine).
pub fn repo() -> PathBuf {
    std::env::var_os("LEASH_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf())
}

pub fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures").join(name)
}

/// The `leash` binary the tests run: the one Cargo built, or `LEASH_BIN` (as [`repo`]).
pub fn leash_bin() -> PathBuf {
    std::env::var_os("LEASH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_leash")))
}

/// Runs the built `leash` binary with `args`.
pub fn leash(args: &[&str]) -> Output {
    Command::new(leash_bin())
        .args(args)
        .output()
        .expect("run leash")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// A writable copy of a fixture folder.
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(fixture(name)).expect("read fixture") {
        let entry = entry.expect("entry");
        if entry.file_type().expect("type").is_file() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
        }
    }
    dir
}

//! Where a data set lives: one JSONL or Parquet file, a folder of shards, or a Hugging Face
//! Hub-style folder with one file set per split (`data/<split>-00000-of-00003.parquet`,
//! `data/<split>.parquet`, `<split>/*.parquet`, or `<split>-*.parquet` at the top), chosen
//! with TRL's `dataset_train_split` / `dataset_test_split`. Every file becomes the JSON objects
//! a JSONL line would hold, parsed by the one row parser in [`super::read`].
//! Reference: the Hub's data-files naming (huggingface `datasets`, "Structure your repository").

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::parquet;
use super::read::{for_each_jsonl, parse_row, Row};
use crate::error::{LeashError, Result};

fn is_parquet(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "parquet")
}

fn is_data_file(path: &Path) -> bool {
    path.is_file() && (is_parquet(path) || path.extension().is_some_and(|e| e == "jsonl"))
}

/// What a `--dataset` path holds.
#[derive(Debug, PartialEq)]
pub enum Layout {
    /// One data set in one or more files, read in name order.
    Files(Vec<PathBuf>),
    /// Hub layout: split name → its files in name order.
    Splits(BTreeMap<String, Vec<PathBuf>>),
}

fn sorted_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| LeashError::io(dir, e, "check the folder exists and is readable"))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_data_file(p))
        .collect();
    files.sort();
    Ok(files)
}

fn sub_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| LeashError::io(dir, e, "check the folder exists and is readable"))?;
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// `train-00000-of-00003.parquet` → `train`; `test.parquet` → `test`.
fn split_of(file: &Path) -> String {
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    stem.split('-').next().unwrap_or_default().to_string()
}

/// `<name>-00000-of-00003` (the shard names `datasets` writes).
fn is_shard_name(file: &Path) -> bool {
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let parts: Vec<&str> = stem.split('-').collect();
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    parts.len() >= 4
        && parts
            .windows(3)
            .any(|w| digits(w[0]) && w[1] == "of" && digits(w[2]))
}

fn group_by_split(files: Vec<PathBuf>, splits: &mut BTreeMap<String, Vec<PathBuf>>) {
    for f in files {
        splits.entry(split_of(&f)).or_default().push(f);
    }
}

/// Works out the layout of a folder.
pub fn layout(dir: &Path) -> Result<Layout> {
    let mut splits = BTreeMap::new();
    let data = dir.join("data");
    if data.is_dir() {
        group_by_split(sorted_files(&data)?, &mut splits);
        for sub in sub_dirs(&data)? {
            add_split_dir(&sub, &mut splits)?;
        }
        return Ok(Layout::Splits(splits));
    }
    let top = sorted_files(dir)?;
    if !top.is_empty() {
        if top.iter().all(|f| is_shard_name(f)) {
            group_by_split(top, &mut splits);
            return Ok(Layout::Splits(splits));
        }
        return Ok(Layout::Files(top));
    }
    for sub in sub_dirs(dir)? {
        add_split_dir(&sub, &mut splits)?;
    }
    Ok(Layout::Splits(splits))
}

fn add_split_dir(sub: &Path, splits: &mut BTreeMap<String, Vec<PathBuf>>) -> Result<()> {
    let files = sorted_files(sub)?;
    if !files.is_empty() {
        let name = sub
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        splits.entry(name).or_default().extend(files);
    }
    Ok(())
}

/// The files of `path` to read: the file itself, a folder's shards, or the files of `split`.
/// `split` None on a Hub folder takes its only split, or `train`.
pub fn files(path: &Path, split: Option<&str>) -> Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    match layout(path)? {
        Layout::Files(files) => Ok(files),
        Layout::Splits(mut splits) => {
            if splits.is_empty() {
                return Err(LeashError::file(
                    path,
                    "the folder holds no .parquet or .jsonl files",
                    "point --dataset at a .jsonl or .parquet file, a folder of shards, or a Hub dataset folder (data/train-00000-of-00001.parquet)",
                ));
            }
            let wanted = match split {
                Some(s) => s.to_string(),
                None if splits.len() == 1 => splits.keys().next().cloned().unwrap_or_default(),
                None => "train".to_string(),
            };
            splits.remove(&wanted).ok_or_else(|| {
                LeashError::file(
                    path,
                    format!(
                        "no split `{wanted}` (the folder has: {})",
                        splits.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                    "choose one with --dataset-train-split / --dataset-test-split (TRL's names)",
                )
            })
        }
    }
}

/// Receives (file, 1-based row or line number in that file, object) for each row.
pub type RowVisitor<'a> = dyn FnMut(&Path, usize, Map<String, Value>) -> Result<()> + 'a;

/// Calls `each` with (file, 1-based row or line number in that file, object) for every row.
pub fn for_each_object(path: &Path, split: Option<&str>, each: &mut RowVisitor) -> Result<()> {
    for file in files(path, split)? {
        if is_parquet(&file) {
            parquet::for_each_object(&file, &mut |pos, obj| {
                each(&file, pos.row, obj).map_err(|e| parquet::row_error(&file, pos, e))
            })?;
        } else {
            for_each_jsonl(&file, &mut |line, obj| each(&file, line, obj))?;
        }
    }
    Ok(())
}

/// Every row of a data set in any layout. For one file, `Row::line` is its line (JSONL) or
/// row (Parquet) number; for a folder it counts rows over all its files, in file order, so
/// later errors that name the folder and a row point at one row.
pub fn read_rows(path: &Path, split: Option<&str>) -> Result<Vec<Row>> {
    let single = !path.is_dir();
    let mut rows = Vec::new();
    for_each_object(path, split, &mut |file, line, obj| {
        let mut row = parse_row(file, line, obj)?;
        if !single {
            row.line = rows.len() + 1;
        }
        rows.push(row);
        Ok(())
    })?;
    if rows.is_empty() {
        return Err(LeashError::file(
            path,
            "the data set has no rows",
            "a data set needs at least one row",
        ));
    }
    Ok(rows)
}

/// Every row's columns as read (for reward commands, which see the data set's own columns).
pub fn read_objects(path: &Path, split: Option<&str>) -> Result<Vec<Map<String, Value>>> {
    let mut out = Vec::new();
    for_each_object(path, split, &mut |_, _, obj| {
        out.push(obj);
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_and_splits() {
        assert!(is_shard_name(Path::new("train-00000-of-00003.parquet")));
        assert!(is_shard_name(Path::new(
            "test_prefs-00000-of-00001-9a1b.parquet"
        )));
        assert!(!is_shard_name(Path::new("part-0.parquet")));
        assert_eq!(
            split_of(Path::new("d/train_prefs-00001-of-00002.parquet")),
            "train_prefs"
        );
        assert_eq!(split_of(Path::new("d/test.parquet")), "test");
    }

    #[test]
    fn layouts_and_missing_split() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("data")).unwrap();
        for f in [
            "train-00000-of-00002.jsonl",
            "train-00001-of-00002.jsonl",
            "test-00000-of-00001.jsonl",
        ] {
            std::fs::write(d.join("data").join(f), "{\"text\": \"x\"}\n").unwrap();
        }
        assert_eq!(files(d, Some("train")).unwrap().len(), 2);
        assert_eq!(files(d, None).unwrap().len(), 2);
        assert_eq!(files(d, Some("test")).unwrap().len(), 1);
        let err = files(d, Some("validation")).unwrap_err().to_string();
        assert!(
            err.contains("no split `validation` (the folder has: test, train)"),
            "{err}"
        );
        assert!(err.contains("--dataset-train-split"), "{err}");

        let shards = tempfile::tempdir().unwrap();
        for f in ["part-1.jsonl", "part-0.jsonl", "notes.txt"] {
            std::fs::write(shards.path().join(f), "{\"text\": \"x\"}\n").unwrap();
        }
        let got = files(shards.path(), Some("train")).unwrap();
        let names: Vec<_> = got
            .iter()
            .map(|p| p.file_name().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["part-0.jsonl", "part-1.jsonl"]);

        let by_dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(by_dir.path().join("test")).unwrap();
        std::fs::write(by_dir.path().join("test/a.jsonl"), "{\"text\": \"x\"}\n").unwrap();
        assert_eq!(files(by_dir.path(), Some("test")).unwrap().len(), 1);
        let err = files(by_dir.path(), Some("train")).unwrap_err().to_string();
        assert!(err.contains("the folder has: test"), "{err}");
    }
}

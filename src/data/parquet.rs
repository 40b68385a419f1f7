//! Reads Parquet files (as the Hugging Face Hub stores data sets) one row group at a time and
//! turns each row into the JSON object a JSONL line of the same data would hold, so every
//! layout the JSONL reader knows works unchanged: strings stay strings, `list<struct<role,
//! content>>` conversations become lists of `{"role","content"}` objects, other columns
//! (scores, ids) pass through for reward commands. Reference: the Parquet format spec
//! (apache/parquet-format) via Apache's `parquet` crate's record API; no Arrow needed.

use std::fs::File;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use ::parquet::file::reader::FileReader;
use ::parquet::file::serialized_reader::SerializedFileReader;
use serde_json::{Map, Value};

use crate::error::{LeashError, Result};

/// Where a row sits in its Parquet file: `row` is 1-based over the whole file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowPos {
    pub row: usize,
    pub row_group: usize,
}

const CORRUPT_HINT: &str = "the file is not a readable Parquet file (truncated download? another format?); \
re-download it, or check it with `python -c \"import pyarrow.parquet as pq; print(pq.read_table('FILE'))\"`";

fn corrupt(path: &Path, what: impl std::fmt::Display) -> LeashError {
    let what = what.to_string();
    let hint = if what.contains("Disabled feature") {
        // A codec leash is built without (zstd, brotli): the file is fine, the compression is not.
        format!(
            "leash reads uncompressed, snappy, gzip and lz4 Parquet; re-save the file with snappy: \
             python -c \"import pyarrow.parquet as pq; pq.write_table(pq.read_table('{0}'), '{0}.snappy.parquet')\"",
            path.display()
        )
    } else {
        CORRUPT_HINT.replace("FILE", &path.display().to_string())
    };
    LeashError::file(path, format!("cannot read Parquet: {what}"), hint)
}

/// Calls `each` with every row of `path` as a JSON object, in file order, holding one row
/// group's column pages at a time. Stops at the first error `each` returns.
pub fn for_each_object(
    path: &Path,
    each: &mut dyn FnMut(RowPos, Map<String, Value>) -> Result<()>,
) -> Result<usize> {
    let file = File::open(path)
        .map_err(|e| LeashError::io(path, e, "check the path exists and is readable"))?;
    // The parquet crate returns errors for the malformed inputs we know of, but a few internal
    // checks still assert; a corrupt file must be an error naming it, never a crash.
    let outcome = catch_unwind(AssertUnwindSafe(|| read_all(path, file, each)));
    match outcome {
        Ok(result) => result,
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the reader failed".into());
            Err(corrupt(path, what))
        }
    }
}

fn read_all(
    path: &Path,
    file: File,
    each: &mut dyn FnMut(RowPos, Map<String, Value>) -> Result<()>,
) -> Result<usize> {
    let reader = SerializedFileReader::new(file).map_err(|e| corrupt(path, e))?;
    let mut row = 0usize;
    for g in 0..reader.num_row_groups() {
        let group = reader.get_row_group(g).map_err(|e| corrupt(path, e))?;
        let rows = group.get_row_iter(None).map_err(|e| corrupt(path, e))?;
        for record in rows {
            let record = record.map_err(|e| corrupt(path, format!("row group {g}: {e}")))?;
            row += 1;
            let object: Map<String, Value> = record
                .get_column_iter()
                .map(|(name, field)| (name.clone(), field.to_json_value()))
                .collect();
            each(RowPos { row, row_group: g }, object)?;
        }
    }
    Ok(row)
}

/// Rewords an error about one parsed row (which names a JSONL line and field) for a Parquet
/// file: its row, row group and column.
pub fn row_error(path: &Path, pos: RowPos, err: LeashError) -> LeashError {
    match err {
        LeashError::Row { message, hint, .. } => LeashError::file(
            path,
            format!(
                "row {} (row group {}): {}",
                pos.row,
                pos.row_group,
                message.replace("field `", "column `")
            ),
            hint.replace("on this line", "in this row")
                .replace("every row", "every row (column)"),
        ),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_parquet_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.parquet");
        std::fs::write(&path, b"{\"prompt\": \"jsonl in disguise\"}\n").unwrap();
        let err = for_each_object(&path, &mut |_, _| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bad.parquet") && err.contains("hint:"),
            "{err}"
        );
    }
}

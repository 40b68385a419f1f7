//! TensorBoard event files (`--report-to tensorboard`): each metrics.jsonl record becomes
//! scalars at its step, under transformers' `TensorBoardCallback` names (`train/loss`,
//! `eval/loss` for `eval_loss`), and the resolved config is logged once as text (`args`).
//! Format, written by hand because it is small: TFRecord framing (length, masked CRC32C of the
//! length, payload, masked CRC32C of the payload) around `Event` protobufs. References:
//! tensorflow/core/util/event.proto, tensorflow/core/framework/summary.proto,
//! tensorflow/core/lib/io/record_writer.cc, tensorboard/plugins/text (plugin_name "text").
//! A reader for the same subset lets tests check what TensorBoard will see.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{LeashError, Result};

// ---------- CRC32C (Castagnoli), as TFRecord frames use ----------

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0x82F6_3B78 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC_TABLE: [u32; 256] = crc_table();

pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC_TABLE[((crc ^ b as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC: a CRC of data that holds CRCs is weak, so it is rotated and offset.
pub fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xA282_EAD8)
}

/// One TFRecord: u64 length, masked CRC of the length bytes, payload, masked CRC of payload.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(payload.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&masked_crc(payload).to_le_bytes());
    out
}

// ---------- protobuf encoding (the few wire types Event needs) ----------

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, ((field as u64) << 3) | wire as u64);
}

fn bytes_field(out: &mut Vec<u8>, field: u32, data: &[u8]) {
    key(out, field, 2);
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// What one summary value holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    Scalar(f32),
    Text(String),
}

/// An `Event` with a summary (or, for the first record of a file, only `file_version`).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub wall_time: f64,
    pub step: i64,
    pub file_version: Option<String>,
    pub values: Vec<(String, Data)>,
}

fn encode_value(tag: &str, data: &Data) -> Vec<u8> {
    let mut v = Vec::new();
    bytes_field(&mut v, 1, tag.as_bytes());
    match data {
        Data::Scalar(x) => {
            key(&mut v, 2, 5); // simple_value: float
            v.extend_from_slice(&x.to_le_bytes());
        }
        Data::Text(text) => {
            // SummaryMetadata { plugin_data { plugin_name: "text" } }
            let mut plugin = Vec::new();
            bytes_field(&mut plugin, 1, b"text");
            let mut meta = Vec::new();
            bytes_field(&mut meta, 1, &plugin);
            bytes_field(&mut v, 9, &meta);
            // TensorProto { dtype: DT_STRING (7), tensor_shape: {} (scalar), string_val }
            let mut tensor = Vec::new();
            key(&mut tensor, 1, 0);
            varint(&mut tensor, 7);
            bytes_field(&mut tensor, 2, &[]);
            bytes_field(&mut tensor, 8, text.as_bytes());
            bytes_field(&mut v, 8, &tensor);
        }
    }
    v
}

pub fn encode_event(e: &Event) -> Vec<u8> {
    let mut out = Vec::new();
    key(&mut out, 1, 1); // wall_time: double
    out.extend_from_slice(&e.wall_time.to_le_bytes());
    key(&mut out, 2, 0); // step: int64
    varint(&mut out, e.step as u64);
    if let Some(v) = &e.file_version {
        bytes_field(&mut out, 3, v.as_bytes());
    }
    if !e.values.is_empty() {
        let mut summary = Vec::new();
        for (tag, data) in &e.values {
            bytes_field(&mut summary, 1, &encode_value(tag, data));
        }
        bytes_field(&mut out, 5, &summary);
    }
    out
}

// ---------- the writer ----------

/// transformers' `rewrite_logs`: `eval_x` → `eval/x`, everything else → `train/x`.
pub fn tag_for(key: &str) -> String {
    match key.strip_prefix("eval_") {
        Some(rest) => format!("eval/{rest}"),
        None => format!("train/{key}"),
    }
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Appends events to one new `events.out.tfevents.*` file.
pub struct EventWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl EventWriter {
    /// A new event file in `dir` (created if missing), named as TensorFlow names them.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| LeashError::io(dir, e, "check the output folder is writable"))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let name = format!(
            "events.out.tfevents.{}.{host}.{}.0",
            now() as u64,
            std::process::id()
        );
        let path = dir.join(name);
        let file = std::fs::File::create(&path)
            .map_err(|e| LeashError::io(&path, e, "check the output folder is writable"))?;
        let mut w = EventWriter { path, file };
        w.write(&Event {
            wall_time: now(),
            step: 0,
            file_version: Some("brain.Event:2".into()),
            values: Vec::new(),
        })?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&mut self, event: &Event) -> Result<()> {
        self.file
            .write_all(&frame(&encode_event(event)))
            .and_then(|_| self.file.flush())
            .map_err(|e| LeashError::io(&self.path, e, "check disk space"))
    }

    /// Every number of a metrics.jsonl record (except `step`) as a scalar at its step.
    pub fn log_record(&mut self, record: &Map<String, Value>) -> Result<()> {
        let step = record.get("step").and_then(Value::as_i64).unwrap_or(0);
        let values: Vec<(String, Data)> = record
            .iter()
            .filter(|(k, _)| k.as_str() != "step")
            .filter_map(|(k, v)| Some((tag_for(k), Data::Scalar(v.as_f64()? as f32))))
            .collect();
        if values.is_empty() {
            return Ok(());
        }
        self.write(&Event {
            wall_time: now(),
            step,
            file_version: None,
            values,
        })
    }

    /// Text at step 0 (transformers logs its arguments as `args`).
    pub fn text(&mut self, tag: &str, text: &str) -> Result<()> {
        self.write(&Event {
            wall_time: now(),
            step: 0,
            file_version: None,
            values: vec![(tag.into(), Data::Text(text.into()))],
        })
    }
}

// ---------- the reader (tests, and anyone checking a run) ----------

/// (field, wire type, payload bytes for wire types 1, 2, 5; the value for varints).
type Field<'a> = (u32, u8, &'a [u8], u64);

struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.buf.get(self.at..end)?;
        self.at = end;
        Some(s)
    }

    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.take(1)?.first()?;
            v |= ((b & 0x7F) as u64) << shift;
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }

    fn field(&mut self) -> Option<Field<'a>> {
        let k = self.varint()?;
        let (field, wire) = ((k >> 3) as u32, (k & 7) as u8);
        match wire {
            0 => Some((field, wire, &[], self.varint()?)),
            1 => Some((field, wire, self.take(8)?, 0)),
            2 => {
                let n = self.varint()? as usize;
                Some((field, wire, self.take(n)?, 0))
            }
            5 => Some((field, wire, self.take(4)?, 0)),
            _ => None,
        }
    }

    fn fields(buf: &'a [u8]) -> Option<Vec<Field<'a>>> {
        let mut c = Cursor { buf, at: 0 };
        let mut out = Vec::new();
        while c.at < buf.len() {
            out.push(c.field()?);
        }
        Some(out)
    }
}

fn decode_value(buf: &[u8]) -> Option<(String, Data)> {
    let (mut tag, mut data) = (String::new(), None);
    for (f, _, bytes, _) in Cursor::fields(buf)? {
        match f {
            1 => tag = String::from_utf8(bytes.to_vec()).ok()?,
            2 => data = Some(Data::Scalar(f32::from_le_bytes(bytes.try_into().ok()?))),
            8 => {
                for (tf, _, tb, _) in Cursor::fields(bytes)? {
                    if tf == 8 {
                        data = Some(Data::Text(String::from_utf8(tb.to_vec()).ok()?));
                    }
                }
            }
            _ => {}
        }
    }
    Some((tag, data?))
}

fn decode_event(buf: &[u8]) -> Option<Event> {
    let mut e = Event {
        wall_time: 0.0,
        step: 0,
        file_version: None,
        values: Vec::new(),
    };
    for (f, _, bytes, v) in Cursor::fields(buf)? {
        match f {
            1 => e.wall_time = f64::from_le_bytes(bytes.try_into().ok()?),
            2 => e.step = v as i64,
            3 => e.file_version = Some(String::from_utf8(bytes.to_vec()).ok()?),
            5 => {
                for (sf, _, sb, _) in Cursor::fields(bytes)? {
                    if sf == 1 {
                        e.values.push(decode_value(sb)?);
                    }
                }
            }
            _ => {}
        }
    }
    Some(e)
}

/// Reads an event file, checking every frame's CRCs.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let bytes =
        std::fs::read(path).map_err(|e| LeashError::io(path, e, "check the path exists"))?;
    let bad = |what: &str| {
        LeashError::file(
            path,
            format!("not a valid event file: {what}"),
            "the file is damaged or was cut short",
        )
    };
    let mut c = Cursor { buf: &bytes, at: 0 };
    let mut events = Vec::new();
    while c.at < bytes.len() {
        let len = c.take(8).ok_or_else(|| bad("truncated length"))?;
        let len_crc = c.take(4).ok_or_else(|| bad("truncated length CRC"))?;
        if masked_crc(len).to_le_bytes() != len_crc {
            return Err(bad("length CRC mismatch"));
        }
        let n = u64::from_le_bytes(len.try_into().map_err(|_| bad("length"))?) as usize;
        let payload = c.take(n).ok_or_else(|| bad("truncated record"))?;
        let crc = c.take(4).ok_or_else(|| bad("truncated record CRC"))?;
        if masked_crc(payload).to_le_bytes() != crc {
            return Err(bad("record CRC mismatch"));
        }
        events.push(decode_event(payload).ok_or_else(|| bad("malformed Event protobuf"))?);
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_values() {
        // RFC 3720 (iSCSI) B.4 and the CRC catalogue's check value for "123456789".
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
    }

    #[test]
    fn varint_encoding_matches_protobuf_docs() {
        // protobuf.dev "Encoding": 150 → 96 01.
        let mut v = Vec::new();
        varint(&mut v, 150);
        assert_eq!(v, [0x96, 0x01]);
    }

    #[test]
    fn events_round_trip_and_corruption_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        let mut rec = Map::new();
        rec.insert("step".into(), 7.into());
        rec.insert("loss".into(), 0.25.into());
        rec.insert("eval_rewards/chosen".into(), (-1.5).into());
        rec.insert("warning".into(), "text is skipped".into());
        w.log_record(&rec).unwrap();
        w.text("args", "{\"beta\": 0.1}").unwrap();
        let events = read_events(w.path()).unwrap();
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        assert_eq!(events[1].step, 7);
        let mut values = events[1].values.clone();
        values.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            values,
            [
                ("eval/rewards/chosen".to_string(), Data::Scalar(-1.5)),
                ("train/loss".to_string(), Data::Scalar(0.25)),
            ]
        );
        assert_eq!(
            events[2].values,
            [("args".to_string(), Data::Text("{\"beta\": 0.1}".into()))]
        );
        let mut bytes = std::fs::read(w.path()).unwrap();
        let last = bytes.len() - 6;
        bytes[last] ^= 1;
        std::fs::write(w.path(), &bytes).unwrap();
        let err = read_events(w.path()).unwrap_err().to_string();
        assert!(err.contains("CRC mismatch"), "{err}");
    }
}

//! Recordings of a watch client ([`crate::client::WatchRecorder`]): in memory, or in a file
//! that another process (a test) reads while the client runs. The watch-history checker
//! (mesh-testkit's `history`) reads them.
//!
//! File format: a sequence of frames `tag: u8, len: u32 (LE), body: [u8; len]`; a truncated
//! last frame (a process killed while writing) is ignored. Bodies are protobuf messages of
//! `mesh.v1` where one fits: `1` Opened (`WatchRequest`), `2` Message (`WatchResponse`),
//! `3` an Upsert or Delete (`Event`, no value for a delete), `4` Synced (`Synced`), `5` Reset
//! (`Reset`), `6` Connected (`revision: i64 LE, resumed: u8`), `7` Disconnected (the error's
//! text, UTF-8), `8` Started (the resume revision, i64 LE).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;

use mesh_core::ClusterName;
use prost::Message;

use crate::client::{Recorded, WatchRecorder, WatchUpdate};
use crate::pb;

/// One recorded step, owned.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A client started from this revision (0: from scratch).
    Started(i64),
    /// A stream opened with this request.
    Opened(pb::WatchRequest),
    /// A message received on the open stream.
    Message(pb::WatchResponse),
    /// An update delivered to the consumer; `Disconnected` is [`Record::Lost`].
    Delivered(WatchUpdate),
    /// The stream was lost (or a connection failed): the error's text.
    Lost(String),
}

impl Record {
    /// The owned form of what the client told its recorder.
    pub fn from_recorded(what: Recorded<'_>) -> Self {
        match what {
            Recorded::Started(r) => Record::Started(r.revision),
            Recorded::Opened(r) => Record::Opened(r.clone()),
            Recorded::Message(m) => Record::Message(m.clone()),
            Recorded::Delivered(WatchUpdate::Disconnected { error }) => {
                Record::Lost(error.to_string())
            }
            Recorded::Delivered(u) => Record::Delivered(u.clone()),
        }
    }
}

/// Keeps every record in memory (in-process tests).
#[derive(Debug, Default)]
pub struct MemoryRecorder {
    records: Mutex<Vec<Record>>,
}

impl MemoryRecorder {
    /// A copy of what was recorded so far.
    pub fn records(&self) -> Vec<Record> {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl WatchRecorder for MemoryRecorder {
    fn record(&self, what: Recorded<'_>) {
        let record = Record::from_recorded(what);
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(record);
    }
}

/// Appends every record to a file, flushed after each one (a reader sees a record as soon
/// as the client has it; a killed process loses nothing it recorded).
#[derive(Debug)]
pub struct FileRecorder {
    out: Mutex<BufWriter<File>>,
}

impl FileRecorder {
    /// Creates (or appends to) `path`.
    pub fn create(path: &Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self {
            out: Mutex::new(BufWriter::new(file)),
        })
    }
}

impl WatchRecorder for FileRecorder {
    fn record(&self, what: Recorded<'_>) {
        let (tag, body) = encode(what);
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
        // A failed write is not the watch's problem: the recording is incomplete, and the
        // checker reports the gap it leaves.
        let _ = out
            .write_all(&[tag])
            .and_then(|()| out.write_all(&len.to_le_bytes()))
            .and_then(|()| out.write_all(&body))
            .and_then(|()| out.flush());
    }
}

fn encode(what: Recorded<'_>) -> (u8, Vec<u8>) {
    match what {
        Recorded::Started(r) => (8, r.revision.to_le_bytes().to_vec()),
        Recorded::Opened(r) => (1, r.encode_to_vec()),
        Recorded::Message(m) => (2, m.encode_to_vec()),
        Recorded::Delivered(u) => match u {
            WatchUpdate::Upsert {
                cluster,
                kind,
                name,
                revision,
                value,
            } => (
                3,
                event(cluster, *kind, name, *revision, Some(value.clone())).encode_to_vec(),
            ),
            WatchUpdate::Delete {
                cluster,
                kind,
                name,
                revision,
            } => (
                3,
                event(cluster, *kind, name, *revision, None).encode_to_vec(),
            ),
            WatchUpdate::Synced { cluster, kind } => (
                4,
                pb::Synced {
                    cluster: cluster.to_string(),
                    kind: *kind as i32,
                }
                .encode_to_vec(),
            ),
            WatchUpdate::Reset { reason } => (
                5,
                pb::Reset {
                    reason: reason.clone(),
                }
                .encode_to_vec(),
            ),
            WatchUpdate::Connected { resumed, revision } => {
                let mut body = revision.to_le_bytes().to_vec();
                body.push(u8::from(*resumed));
                (6, body)
            }
            WatchUpdate::Disconnected { error } => (7, error.to_string().into_bytes()),
        },
    }
}

fn event(
    cluster: &ClusterName,
    kind: pb::Kind,
    name: &str,
    revision: i64,
    value: Option<pb::event::Value>,
) -> pb::Event {
    pb::Event {
        cluster: cluster.to_string(),
        kind: kind as i32,
        name: name.to_owned(),
        revision,
        value,
    }
}

/// Why a recording could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("frame {index} (tag {tag}) at byte {offset}: {message}")]
    Frame {
        index: usize,
        tag: u8,
        offset: usize,
        message: String,
    },
}

/// Reads a file written by [`FileRecorder`] (a truncated last frame is ignored).
pub fn read_file(path: &Path) -> Result<Vec<Record>, ReadError> {
    let bytes = std::fs::read(path).map_err(|source| ReadError::Io {
        path: path.display().to_string(),
        source,
    })?;
    decode_all(&bytes)
}

/// Decodes frames (see the module's documentation).
pub fn decode_all(bytes: &[u8]) -> Result<Vec<Record>, ReadError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while bytes.len() - at >= 5 {
        let tag = bytes[at];
        let len = u32::from_le_bytes(bytes[at + 1..at + 5].try_into().expect("4 bytes")) as usize;
        let Some(body) = bytes.get(at + 5..at + 5 + len) else {
            break; // truncated last frame
        };
        let bad = |message: String| ReadError::Frame {
            index: out.len(),
            tag,
            offset: at,
            message,
        };
        out.push(decode(tag, body).map_err(bad)?);
        at += 5 + len;
    }
    Ok(out)
}

fn decode(tag: u8, body: &[u8]) -> Result<Record, String> {
    let err = |e: prost::DecodeError| e.to_string();
    let cluster = |s: &str| ClusterName::new(s).map_err(|e| format!("cluster {s:?}: {e}"));
    let kind = |k: i32| pb::Kind::try_from(k).map_err(|_| format!("kind {k}"));
    Ok(match tag {
        1 => Record::Opened(pb::WatchRequest::decode(body).map_err(err)?),
        2 => Record::Message(pb::WatchResponse::decode(body).map_err(err)?),
        3 => {
            let e = pb::Event::decode(body).map_err(err)?;
            let (cluster, kind) = (cluster(&e.cluster)?, kind(e.kind)?);
            Record::Delivered(match e.value {
                Some(value) => WatchUpdate::Upsert {
                    cluster,
                    kind,
                    name: e.name,
                    revision: e.revision,
                    value,
                },
                None => WatchUpdate::Delete {
                    cluster,
                    kind,
                    name: e.name,
                    revision: e.revision,
                },
            })
        }
        4 => {
            let s = pb::Synced::decode(body).map_err(err)?;
            Record::Delivered(WatchUpdate::Synced {
                cluster: cluster(&s.cluster)?,
                kind: kind(s.kind)?,
            })
        }
        5 => Record::Delivered(WatchUpdate::Reset {
            reason: pb::Reset::decode(body).map_err(err)?.reason,
        }),
        6 => {
            let [r0, r1, r2, r3, r4, r5, r6, r7, resumed] = body else {
                return Err(format!("Connected: {} bytes, want 9", body.len()));
            };
            Record::Delivered(WatchUpdate::Connected {
                revision: i64::from_le_bytes([*r0, *r1, *r2, *r3, *r4, *r5, *r6, *r7]),
                resumed: *resumed != 0,
            })
        }
        7 => Record::Lost(String::from_utf8_lossy(body).into_owned()),
        8 => Record::Started(i64::from_le_bytes(
            body.try_into()
                .map_err(|_| format!("Started: {} bytes, want 8", body.len()))?,
        )),
        other => return Err(format!("unknown tag {other}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_recording_reads_back_as_recorded_and_a_torn_frame_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("watch.rec");
        let rec = FileRecorder::create(&path).unwrap();
        let memory = MemoryRecorder::default();
        let east: ClusterName = "east".parse().unwrap();
        let request = pb::WatchRequest {
            resume_revision: 7,
            ..Default::default()
        };
        let response = pb::WatchResponse {
            revision: 9,
            payload: Some(pb::watch_response::Payload::Progress(pb::Progress {})),
        };
        let updates = [
            WatchUpdate::Connected {
                resumed: true,
                revision: 7,
            },
            WatchUpdate::Upsert {
                cluster: east.clone(),
                kind: pb::Kind::Node,
                name: "n1".into(),
                revision: 8,
                value: pb::event::Value::Node(pb::Node::default()),
            },
            WatchUpdate::Delete {
                cluster: east.clone(),
                kind: pb::Kind::Node,
                name: "n2".into(),
                revision: 9,
            },
            WatchUpdate::Synced {
                cluster: east,
                kind: pb::Kind::Node,
            },
            WatchUpdate::Reset {
                reason: "compacted".into(),
            },
        ];
        let start = crate::client::ResumePoint {
            revision: 3,
            known: vec![],
        };
        let mut whats = vec![
            Recorded::Started(&start),
            Recorded::Opened(&request),
            Recorded::Message(&response),
        ];
        whats.extend(updates.iter().map(Recorded::Delivered));
        for what in whats {
            rec.record(what);
            memory.record(what);
        }
        drop(rec);
        let mut bytes = std::fs::read(&path).unwrap();
        assert_eq!(decode_all(&bytes).unwrap(), memory.records());
        bytes.extend_from_slice(&[2, 100, 0, 0, 0, 1]);
        assert_eq!(decode_all(&bytes).unwrap(), memory.records());
    }
}

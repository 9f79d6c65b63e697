//! `GET /api/v1/namespaces/{ns}/pods/{name}/log`: container logs as kube-apiserver serves them
//! (through the kubelet): `text/plain`, the message of each log line, with `container`,
//! `follow`, `tailLines`, `sinceSeconds`/`sinceTime`, `timestamps` and `limitBytes`.
//!
//! The API does not know where logs are: the runtime that starts the pods does, and is
//! registered as a [`LogSource`] ([`super::KubeApiHandle::set_log_source`]). Files are in the
//! CRI format of [`crate::pod_logs`]. A followed log is read again every [`FOLLOW_POLL`]
//! (kubelet watches the file with inotify; polling needs no extra dependency and the file is
//! another process's) and ends when the pod is deleted (a store watch on the pod, not a poll).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use super::error::{ApiError, Result};
use super::resources as r;
use super::selector::{FieldSelector, LabelSelector};
use super::store::{Store, WatchEvent, WatchOptions};
use super::util;
use crate::pod_logs;

/// How often a followed log file is read for new lines.
pub const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// Where the container logs of pods are (implemented by the pod runtimes).
pub trait LogSource: Send + Sync + 'static {
    /// The log file of `container` in pod `namespace/pod` with uid `uid`, when this source
    /// keeps logs for it (the file may not exist yet: the container has not started).
    fn container_log(
        &self,
        namespace: &str,
        pod: &str,
        uid: &str,
        container: &str,
    ) -> Option<PathBuf>;
}

/// `PodLogOptions` as query parameters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogOptions {
    pub container: Option<String>,
    pub follow: bool,
    pub previous: bool,
    pub tail_lines: Option<usize>,
    pub since: Option<SystemTime>,
    pub timestamps: bool,
    pub limit_bytes: Option<u64>,
}

impl LogOptions {
    /// Parses and validates the query (`get` looks a parameter up); errors are the real
    /// server's: 400 for a value that does not parse, 422 naming the field for a bad value.
    pub fn parse<'a>(get: impl Fn(&str) -> Option<&'a str>, pod: &str) -> Result<Self> {
        let flag = |k: &str| matches!(get(k), Some("true" | "1"));
        let int = |k: &str| -> Result<Option<i64>> {
            match get(k).filter(|s| !s.is_empty()) {
                None => Ok(None),
                Some(s) => s.parse::<i64>().map(Some).map_err(|_| {
                    ApiError::bad_request(format!("invalid {k} {s:?}: must be an integer"))
                }),
            }
        };
        let invalid = |cause: String| {
            ApiError::unprocessable(format!("PodLogOptions \"{pod}\" is invalid: {cause}"))
        };
        let tail = int("tailLines")?;
        if let Some(n) = tail.filter(|n| *n < 0) {
            return Err(invalid(format!(
                "tailLines: Invalid value: {n}: must be greater than or equal to 0"
            )));
        }
        let limit = int("limitBytes")?;
        if let Some(n) = limit.filter(|n| *n < 1) {
            return Err(invalid(format!(
                "limitBytes: Invalid value: {n}: must be greater than 0"
            )));
        }
        let since_seconds = int("sinceSeconds")?;
        if let Some(n) = since_seconds.filter(|n| *n < 1) {
            return Err(invalid(format!(
                "sinceSeconds: Invalid value: {n}: must be greater than 0"
            )));
        }
        let since_time = match get("sinceTime").filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => Some(util::parse_rfc3339(s).ok_or_else(|| {
                ApiError::bad_request(format!("invalid sinceTime {s:?}: must be RFC 3339"))
            })?),
        };
        let since = match (since_seconds, since_time) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "at most one of `sinceTime` or `sinceSeconds` may be specified".into(),
                ));
            }
            (Some(s), None) => Some(SystemTime::now() - Duration::from_secs(s.unsigned_abs())),
            (None, t) => t,
        };
        Ok(LogOptions {
            container: get("container").filter(|s| !s.is_empty()).map(String::from),
            follow: flag("follow"),
            previous: flag("previous"),
            tail_lines: tail.map(|n| n as usize),
            since,
            timestamps: flag("timestamps"),
            limit_bytes: limit.map(|n| n as u64),
        })
    }
}

/// Which container of `pod` a request is for: the named one, or the only one. A pod with
/// several containers needs a name (kubectl picks the default container itself).
pub fn pick_container(pod: &Value, name: &str, asked: Option<&str>) -> Result<String> {
    let names: Vec<&str> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    match asked {
        Some(c) if names.contains(&c) => Ok(c.to_string()),
        Some(c) => Err(ApiError::bad_request(format!(
            "container {c} is not valid for pod {name}"
        ))),
        None if names.len() == 1 => Ok(names[0].to_string()),
        None => Err(ApiError::bad_request(format!(
            "a container name must be specified for pod {name}, choose one of: [{}]",
            names.join(" ")
        ))),
    }
}

/// Turns CRI log lines into what the client gets: the message (with its timestamp when
/// asked), lines before `since` left out, output cut at `limit_bytes`.
pub struct Renderer {
    since: Option<SystemTime>,
    timestamps: bool,
    left: Option<u64>,
}

impl Renderer {
    pub fn new(o: &LogOptions) -> Self {
        Renderer {
            since: o.since,
            timestamps: o.timestamps,
            left: o.limit_bytes,
        }
    }

    /// Whether `limitBytes` has been reached (nothing more is sent).
    pub fn done(&self) -> bool {
        self.left == Some(0)
    }

    /// Whether a line passes the `since` filter (unparsable lines pass, as text).
    fn selected(&self, line: &str) -> bool {
        match (self.since, pod_logs::parse_cri(line)) {
            (Some(since), Some(l)) => l.time >= since,
            _ => true,
        }
    }

    fn format(&self, line: &str) -> String {
        match pod_logs::parse_cri(line) {
            Some(l) if self.timestamps => format!("{} {}\n", l.timestamp, l.message),
            Some(l) => format!("{}\n", l.message),
            None => format!("{line}\n"),
        }
    }

    /// Renders complete lines (without their newlines), the last `tail` of them when given.
    pub fn render<'a>(
        &mut self,
        lines: impl Iterator<Item = &'a str>,
        tail: Option<usize>,
    ) -> Vec<u8> {
        let selected: Vec<&str> = lines.filter(|l| self.selected(l)).collect();
        let skip = tail.map_or(0, |t| selected.len().saturating_sub(t));
        let mut out = Vec::new();
        for l in &selected[skip..] {
            if self.done() {
                break;
            }
            let mut text = self.format(l).into_bytes();
            if let Some(left) = &mut self.left {
                text.truncate(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= text.len() as u64;
            }
            out.extend_from_slice(&text);
        }
        out
    }
}

/// A log file read incrementally: complete lines only; a partial last line waits for its end.
pub struct LogReader {
    path: PathBuf,
    offset: u64,
    pending: Vec<u8>,
}

impl LogReader {
    pub fn new(path: &Path) -> Self {
        LogReader {
            path: path.to_path_buf(),
            offset: 0,
            pending: Vec::new(),
        }
    }

    /// The complete lines written since the last call (none when the file is missing).
    pub fn read_lines(&mut self) -> Vec<String> {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() {
            return Vec::new();
        }
        self.offset += buf.len() as u64;
        self.pending.extend_from_slice(&buf);
        let Some(end) = self.pending.iter().rposition(|b| *b == b'\n') else {
            return Vec::new();
        };
        let complete: Vec<u8> = self.pending.drain(..=end).collect();
        String::from_utf8_lossy(&complete)
            .lines()
            .map(String::from)
            .collect()
    }
}

/// Follows a log into `tx` until the pod `namespace/name` with `uid` is deleted (or replaced),
/// `limitBytes` is reached, the client goes away or the server shuts down.
#[allow(clippy::too_many_arguments)]
pub async fn follow(
    store: Arc<Store>,
    namespace: String,
    name: String,
    uid: String,
    from_rv: u64,
    mut reader: LogReader,
    mut renderer: Renderer,
    tx: mpsc::Sender<Bytes>,
    mut shutdown: watch::Receiver<bool>,
) {
    let open = |rv: u64| {
        let fields =
            FieldSelector::parse(&format!("metadata.name={name}")).expect("a name selector parses");
        store.watch(
            &r::PODS,
            WatchOptions {
                namespace: Some(namespace.clone()),
                labels: LabelSelector::default(),
                fields,
                resource_version: Some(rv),
                send_initial_events: false,
            },
        )
    };
    let same_pod = |o: &Value| o.pointer("/metadata/uid").and_then(Value::as_str) == Some(&uid);
    let still_there = || {
        store
            .get(&r::PODS, Some(&namespace), &name)
            .is_ok_and(|p| same_pod(&p))
    };
    let mut w = open(from_rv).ok();
    let mut tick = tokio::time::interval(FOLLOW_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let gone = tokio::select! {
            _ = tick.tick() => false,
            ev = async { match &mut w { Some(w) => w.next().await, None => None } } => match ev {
                Some(WatchEvent::Deleted(o)) => same_pod(&o),
                Some(WatchEvent::Added(o) | WatchEvent::Modified(o)) => !same_pod(&o),
                Some(WatchEvent::Bookmark { .. }) => false,
                // The watch ended (closed, or fell behind): decide on the current state.
                Some(WatchEvent::Error(_)) | None => {
                    if still_there() {
                        w = open(store.resource_version()).ok();
                        false
                    } else {
                        true
                    }
                }
            },
            _ = tx.closed() => return,
            _ = shutdown.changed() => return,
        };
        // Lines written up to the deletion still go out.
        let lines = reader.read_lines();
        let out = renderer.render(lines.iter().map(String::as_str), None);
        if !out.is_empty() && tx.send(Bytes::from(out)).await.is_err() {
            return;
        }
        if gone || renderer.done() {
            tracing::debug!(namespace, name, gone, "log follow ended");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn opts(q: &[(&str, &str)]) -> Result<LogOptions> {
        let m: HashMap<&str, &str> = q.iter().copied().collect();
        LogOptions::parse(|k| m.get(k).copied(), "web-1")
    }

    #[test]
    fn options_parse_and_validate_like_the_real_server() {
        let o = opts(&[
            ("container", "web"),
            ("follow", "true"),
            ("tailLines", "3"),
            ("timestamps", "true"),
            ("limitBytes", "100"),
        ])
        .unwrap();
        assert_eq!(o.container.as_deref(), Some("web"));
        assert!(o.follow && o.timestamps && !o.previous);
        assert_eq!((o.tail_lines, o.limit_bytes), (Some(3), Some(100)));
        for (q, code, want) in [
            (("tailLines", "-1"), 422, "tailLines: Invalid value: -1"),
            (("limitBytes", "0"), 422, "limitBytes: Invalid value: 0"),
            (("sinceSeconds", "0"), 422, "sinceSeconds: Invalid value: 0"),
            (("tailLines", "x"), 400, "invalid tailLines \"x\""),
            (("sinceTime", "yesterday"), 400, "invalid sinceTime"),
        ] {
            let e = opts(&[q]).unwrap_err();
            assert_eq!(e.code, code, "{q:?}");
            assert!(e.message.contains(want), "{q:?}: {}", e.message);
        }
        let e = opts(&[("sinceSeconds", "5"), ("sinceTime", "2024-01-01T00:00:00Z")]).unwrap_err();
        assert!(
            e.message.contains("PodLogOptions \"web-1\" is invalid"),
            "{}",
            e.message
        );
    }

    #[test]
    fn containers_are_named_or_the_only_one() {
        let one = serde_json::json!({"spec": {"containers": [{"name": "web"}]}});
        let two = serde_json::json!({"spec": {"containers": [{"name": "web"}, {"name": "side"}]}});
        assert_eq!(pick_container(&one, "p", None).unwrap(), "web");
        assert_eq!(pick_container(&two, "p", Some("side")).unwrap(), "side");
        let e = pick_container(&two, "p", None).unwrap_err();
        assert_eq!(e.code, 400);
        assert_eq!(
            e.message,
            "a container name must be specified for pod p, choose one of: [web side]"
        );
        let e = pick_container(&one, "p", Some("nope")).unwrap_err();
        assert_eq!(e.message, "container nope is not valid for pod p");
    }

    #[test]
    fn rendering_tails_filters_stamps_and_limits() {
        let old = "2020-01-01T00:00:00.000000001Z stdout F old";
        let lines = [
            old,
            "2999-01-01T00:00:00.000000002Z stdout F one",
            "2999-01-01T00:00:00.000000003Z stdout F two",
        ];
        let all = Renderer::new(&LogOptions::default()).render(lines.iter().copied(), None);
        assert_eq!(all, b"old\none\ntwo\n");
        let tail = Renderer::new(&LogOptions::default()).render(lines.iter().copied(), Some(2));
        assert_eq!(tail, b"one\ntwo\n");
        let since = LogOptions {
            since: Some(SystemTime::now()),
            timestamps: true,
            ..Default::default()
        };
        assert_eq!(
            Renderer::new(&since).render(lines.iter().copied(), None),
            b"2999-01-01T00:00:00.000000002Z one\n2999-01-01T00:00:00.000000003Z two\n"
        );
        let limited = LogOptions {
            limit_bytes: Some(6),
            ..Default::default()
        };
        let mut r = Renderer::new(&limited);
        assert_eq!(r.render(lines.iter().copied(), None), b"old\non");
        assert!(r.done());
        assert!(r.render(lines.iter().copied(), None).is_empty());
    }

    #[test]
    fn the_reader_returns_complete_lines_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let mut r = LogReader::new(&path);
        assert!(r.read_lines().is_empty(), "a missing file is no lines yet");
        std::fs::write(&path, "a\nb").unwrap();
        assert_eq!(r.read_lines(), ["a"]);
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"c\nd\n").unwrap();
        assert_eq!(r.read_lines(), ["bc", "d"]);
        assert!(r.read_lines().is_empty());
    }
}

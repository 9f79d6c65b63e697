//! Container logs of lab pods, in the kubelet's CRI log format, so the lab API can serve
//! `kubectl logs` (`tailLines`, `sinceSeconds`, `timestamps`, ... need a time per line).
//!
//! Layout, like kubelet's `/var/log/pods`: `<root>/<namespace>_<pod>_<uid>/<container>.log`,
//! one line per entry: `<RFC3339Nano time> stdout F <message>`. The runtime that starts a pod
//! chooses `<root>` and hands the workload `--log-dir` and the container -> ports map; the
//! workload ([`crate::workload`]) appends one line per request it serves to the log of the
//! container whose port the request arrived on.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use crate::kube_api::util;

/// The log directory of one pod (its uid keeps a re-created pod of the same name apart).
pub fn pod_dir(root: &Path, namespace: &str, pod: &str, uid: &str) -> PathBuf {
    root.join(format!("{namespace}_{pod}_{uid}"))
}

/// The log file of one container in a pod's log directory.
pub fn container_file(pod_dir: &Path, container: &str) -> PathBuf {
    pod_dir.join(format!("{container}.log"))
}

/// One CRI log line (with its newline).
pub fn cri_line(t: SystemTime, message: &str) -> String {
    // One entry is one line: a message with newlines would be split by every reader.
    let message = message.replace('\n', " ");
    format!("{} stdout F {message}\n", util::rfc3339_nanos(t))
}

/// A parsed CRI log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CriLine<'a> {
    /// As written (RFC3339Nano).
    pub timestamp: &'a str,
    pub time: SystemTime,
    pub message: &'a str,
}

/// Parses `<time> <stream> <P|F> <message>` (without the newline).
pub fn parse_cri(line: &str) -> Option<CriLine<'_>> {
    let mut parts = line.splitn(4, ' ');
    let timestamp = parts.next()?;
    let stream = parts.next()?;
    let tag = parts.next()?;
    let message = parts.next().unwrap_or_default();
    if !matches!(stream, "stdout" | "stderr") || !matches!(tag, "F" | "P") {
        return None;
    }
    Some(CriLine {
        timestamp,
        time: util::parse_rfc3339(timestamp)?,
        message,
    })
}

/// Parses a workload `--container NAME=PORT[,PORT...]` argument (`NAME=`: no port).
pub fn parse_container_arg(s: &str) -> Result<(String, Vec<u16>), String> {
    let (name, ports) = s
        .split_once('=')
        .ok_or_else(|| format!("container {s:?}: expected NAME=PORT[,PORT...]"))?;
    if name.is_empty() {
        return Err(format!("container {s:?}: the name is empty"));
    }
    let ports = ports
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u16>()
                .map_err(|_| format!("container {name}: port {p:?} is not a port number"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((name.to_string(), ports))
}

/// The `--container` argument for a container and its ports.
pub fn container_arg(name: &str, ports: &[u16]) -> String {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!("{name}={}", ports.join(","))
}

struct ContainerLog {
    name: String,
    ports: Vec<u16>,
    file: Mutex<File>,
}

/// The per-container logs a workload process writes to.
#[derive(Default)]
pub struct RequestLog {
    containers: Vec<ContainerLog>,
}

impl RequestLog {
    /// Opens (appending, creating `dir`) one log file per container.
    pub fn open(dir: &Path, containers: &[(String, Vec<u16>)]) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let containers = containers
            .iter()
            .map(|(name, ports)| {
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(container_file(dir, name))?;
                Ok(ContainerLog {
                    name: name.clone(),
                    ports: ports.clone(),
                    file: Mutex::new(file),
                })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(RequestLog { containers })
    }

    /// Logs nothing.
    pub fn disabled() -> Self {
        RequestLog::default()
    }

    /// The container a request on `port` belongs to: the first that declares the port, else
    /// the first container (a pod without declared ports is served on port 80).
    pub fn container_for(&self, port: u16) -> Option<&str> {
        self.pick(port).map(|c| c.name.as_str())
    }

    fn pick(&self, port: u16) -> Option<&ContainerLog> {
        self.containers
            .iter()
            .find(|c| c.ports.contains(&port))
            .or_else(|| self.containers.first())
    }

    /// Appends a line to the log of the container serving `port`.
    pub fn record(&self, port: u16, message: &str) {
        if let Some(c) = self.pick(port) {
            Self::write(c, message);
        }
    }

    /// Appends a line to every container's log.
    pub fn record_all(&self, message: &str) {
        for c in &self.containers {
            Self::write(c, message);
        }
    }

    fn write(c: &ContainerLog, message: &str) {
        let line = cri_line(SystemTime::now(), message);
        // One write per line on an O_APPEND file: lines never interleave.
        let mut f = c.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(error) = f.write_all(line.as_bytes()) {
            tracing::warn!(container = %c.name, %error, "writing the container log failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_lines_round_trip() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::new(1_700_000_000, 5);
        let line = cri_line(t, "a\nb");
        assert_eq!(line, "2023-11-14T22:13:20.000000005Z stdout F a b\n");
        let p = parse_cri(line.trim_end()).unwrap();
        assert_eq!(p.message, "a b");
        assert_eq!(p.timestamp, "2023-11-14T22:13:20.000000005Z");
        assert_eq!(
            p.time,
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000)
        );
        assert_eq!(
            parse_cri("2023-11-14T22:13:20Z stdout F ").unwrap().message,
            ""
        );
        assert!(parse_cri("garbage").is_none());
        assert!(parse_cri("2023-11-14T22:13:20Z stdin F x").is_none());
    }

    #[test]
    fn container_args_parse_and_pick_by_port() {
        assert_eq!(
            parse_container_arg("web=80,8080").unwrap(),
            ("web".into(), vec![80, 8080])
        );
        assert_eq!(
            parse_container_arg("side=").unwrap(),
            ("side".into(), vec![])
        );
        assert!(
            parse_container_arg("web")
                .unwrap_err()
                .contains("NAME=PORT")
        );
        assert!(
            parse_container_arg("web=http")
                .unwrap_err()
                .contains("\"http\"")
        );
        assert_eq!(container_arg("web", &[80, 81]), "web=80,81");

        let dir = tempfile::tempdir().unwrap();
        let log = RequestLog::open(
            dir.path(),
            &[("web".into(), vec![8080]), ("admin".into(), vec![9090])],
        )
        .unwrap();
        assert_eq!(log.container_for(9090), Some("admin"));
        assert_eq!(log.container_for(80), Some("web"));
        log.record(9090, "to admin");
        log.record_all("to both");
        let read = |c: &str| std::fs::read_to_string(container_file(dir.path(), c)).unwrap();
        let admin: Vec<_> = read("admin")
            .lines()
            .map(|l| parse_cri(l).unwrap().message.to_string())
            .collect();
        assert_eq!(admin, ["to admin", "to both"]);
        assert_eq!(read("web").lines().count(), 1);
        assert_eq!(RequestLog::disabled().container_for(80), None);
    }
}

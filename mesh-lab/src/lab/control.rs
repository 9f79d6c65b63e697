//! The supervisor's control socket (`<state dir>/control.sock`): JSON lines, one request and
//! one response per line, e.g. `{"op":"status"}`,
//! `{"op":"kill","cluster":"east","component":"agent/east-node1"}`,
//! `{"op":"partition","a":"east","b":"west"}`, `{"op":"heal"}`, `{"op":"shutdown"}`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::runtime::PodPlace;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Kills a component (SIGKILL); it stays down until `start`.
    Kill {
        cluster: String,
        component: String,
    },
    Start {
        cluster: String,
        component: String,
    },
    Partition {
        a: String,
        b: String,
    },
    Heal,
    Shutdown,
    /// Used by `mesh-lab up` once the certificates exist: creates the TLS Secrets and starts
    /// etcd, mesh-apiserver and the agents of every cluster.
    MeshUp,
    /// Where a pod runs (`pod` may be `deploy/NAME`: the first ready pod of the Deployment).
    Pod {
        cluster: String,
        namespace: String,
        pod: String,
    },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<LabStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodPlace>,
}

impl Response {
    pub fn ok() -> Self {
        Response {
            ok: true,
            ..Default::default()
        }
    }

    pub fn error(e: impl std::fmt::Display) -> Self {
        Response {
            ok: false,
            error: Some(e.to_string()),
            ..Default::default()
        }
    }
}

/// What `mesh-lab status` shows.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LabStatus {
    pub lab: String,
    pub supervisor_pid: u32,
    pub kubeconfig: String,
    pub underlay: String,
    /// Pairs of clusters cut from each other.
    pub partitions: Vec<(String, String)>,
    pub components: Vec<Component>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Component {
    pub cluster: String,
    /// `kube-api`, `dns`, `etcd`, `apiserver`, `node/<node>`, `agent/<node>`.
    pub component: String,
    pub pid: Option<u32>,
    /// `running`, `not started`, `killed`, `exited (<status>)`.
    pub state: String,
    pub address: String,
    /// Free text: pods on a node, restarts.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// Sends one request and reads its response.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> anyhow::Result<Response> {
    use anyhow::Context;
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("connecting to the lab supervisor at {}", socket.display()))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut reader = BufReader::new(s);
    let mut resp = String::new();
    reader
        .read_line(&mut resp)
        .context("reading the supervisor's response")?;
    anyhow::ensure!(!resp.is_empty(), "the supervisor closed the connection");
    serde_json::from_str(&resp).context("decoding the supervisor's response")
}

/// Like [`call`], turning `ok: false` into an error.
pub fn call_ok(socket: &Path, req: &Request, timeout: Duration) -> anyhow::Result<Response> {
    let r = call(socket, req, timeout)?;
    if !r.ok {
        anyhow::bail!(r.error.unwrap_or_else(|| "request failed".into()));
    }
    Ok(r)
}

//! What `/readyz` of mesh-apiserver checks (DESIGN.md section 11); the `/metrics`
//! `/healthz` `/readyz` server itself is [`mesh_proto::serve`], shared with the agent.
//!
//! - `/healthz`: the process is alive and its runtime answers.
//! - `/readyz`: etcd is reachable (the index's watch is established), the index has loaded
//!   its first list, and this replica is either the leader or a follower whose index is
//!   ready to serve. Each failing check is named in the body, with 503.

use tokio::sync::watch;

use crate::index::Index;

/// What `/readyz` looks at.
#[derive(Clone)]
pub struct Readiness {
    pub index: Index,
    /// `Some` when this process runs a publisher: whether it holds the leadership.
    pub leader: Option<watch::Receiver<bool>>,
}

// === impl Readiness ===

impl Readiness {
    /// The failing checks; empty when ready.
    pub fn failing(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if !self.index.etcd_connected() {
            out.push("etcd: the index's watch is not established");
        }
        if !self.index.is_loaded() {
            out.push("index: the first list of etcd is not loaded yet");
        }
        // A follower serves from the same index as the leader: it is ready when the index
        // is. The leader flag is reported for operators; it does not gate readiness.
        out
    }
}

impl mesh_proto::serve::Readiness for Readiness {
    fn check(&self) -> Result<String, String> {
        let failing = self.failing();
        let leader = self.leader.as_ref().map(|l| *l.borrow());
        let role = match leader {
            Some(true) => "leader",
            Some(false) => "follower",
            None => "serving only",
        };
        if failing.is_empty() {
            return Ok(format!("ready ({role})\n"));
        }
        let mut body = format!("not ready ({role}):\n");
        for f in failing {
            body.push_str("- ");
            body.push_str(f);
            body.push('\n');
        }
        Err(body)
    }
}

//! `meshctl status [--wait] [--timeout]`: the mesh as one apiserver sees it: clusters and
//! their object counts, peers, how many agents are synced with every cluster, and the nodes
//! marked not reporting (a watch of Node objects only).

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use mesh_proto::pb;
use serde::Serialize;

use crate::conn::ConnArgs;
use crate::inspect::Watched;
use crate::output::{Format, table};
use mesh_core::parse_duration;

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Wait until every cluster is synced, every peer connected and synced, and every agent
    /// synced with every cluster.
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this long (with --wait).
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    timeout: Duration,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Serialize, Debug)]
pub struct StatusView {
    pub cluster: String,
    pub cluster_id: u32,
    pub revision: i64,
    pub leader: bool,
    pub clusters: Vec<ClusterView>,
    pub peers: Vec<PeerView>,
    pub agents: Vec<AgentView>,
    pub agents_synced: usize,
    /// Nodes whose agent stopped reporting (marked by their cluster's publisher; their
    /// backends are demoted, never withdrawn), of every cluster.
    pub nodes_not_reporting: Vec<NodeNotReporting>,
    /// Why the mesh is not ready yet; empty when it is.
    pub not_ready: Vec<String>,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct NodeNotReporting {
    pub cluster: String,
    pub node: String,
    /// Since when it is marked (Unix ms) and for how long as of now.
    pub since_unix_ms: i64,
    pub for_seconds: u64,
}

#[derive(Serialize, Debug)]
pub struct ClusterView {
    pub name: String,
    pub id: u32,
    pub local: bool,
    pub counts: BTreeMap<String, u64>,
    pub synced: bool,
    pub unsynced_kinds: Vec<String>,
}

#[derive(Serialize, Debug)]
pub struct PeerView {
    pub name: String,
    pub address: String,
    pub connected: bool,
    pub synced: bool,
    pub stale_for_seconds: Option<u64>,
    /// The heartbeat interval the importer asks of the peer (`None`: an older apiserver).
    pub heartbeat_interval_ms: Option<i64>,
    /// The bound on the time from losing the peer to marking it stale (3 heartbeats).
    pub loss_detection_ms: Option<i64>,
    pub revision: i64,
    pub reconnects: u64,
    /// Full snapshots this importer took from the peer since it started.
    pub snapshots: u64,
    /// Reconnections that resumed from the last imported revision (no snapshot).
    pub resumes: u64,
    pub last_error: String,
}

#[derive(Serialize, Debug)]
pub struct AgentView {
    pub node: String,
    pub synced_clusters: Vec<String>,
    pub unsynced_clusters: Vec<String>,
    pub map_entries: BTreeMap<String, u64>,
    pub last_error: String,
    pub reported_seconds_ago: Option<u64>,
    /// When the agent process started (Unix ms), so a restart is visible.
    pub started_at_unix_ms: Option<i64>,
    pub uptime_seconds: Option<u64>,
}

pub fn kind_name(kind: i32) -> String {
    match pb::Kind::try_from(kind) {
        Ok(pb::Kind::Config) => "config".into(),
        Ok(pb::Kind::Node) => "nodes".into(),
        Ok(pb::Kind::Identity) => "identities".into(),
        Ok(pb::Kind::Endpoint) => "endpoints".into(),
        Ok(pb::Kind::Service) => "services".into(),
        Ok(pb::Kind::Policy) => "policies".into(),
        _ => format!("kind-{kind}"),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Builds the view and the list of reasons the mesh is not ready.
pub fn view(resp: &pb::StatusResponse) -> StatusView {
    let local = resp.local.clone().unwrap_or_default();
    let now = now_ms();
    let mut not_ready = Vec::new();
    let clusters: Vec<ClusterView> = resp
        .clusters
        .iter()
        .map(|c| {
            let unsynced: Vec<String> = c
                .counts
                .iter()
                .filter(|k| !k.synced)
                .map(|k| kind_name(k.kind))
                .collect();
            if !unsynced.is_empty() {
                not_ready.push(format!(
                    "cluster {}: {} not synced yet",
                    c.cluster,
                    unsynced.join(", ")
                ));
            }
            ClusterView {
                name: c.cluster.clone(),
                id: c.id,
                local: c.local,
                counts: c
                    .counts
                    .iter()
                    .map(|k| (kind_name(k.kind), k.count))
                    .collect(),
                synced: unsynced.is_empty() && !c.counts.is_empty(),
                unsynced_kinds: unsynced,
            }
        })
        .collect();
    let peers: Vec<PeerView> = resp
        .peers
        .iter()
        .map(|p| {
            if !p.connected {
                not_ready.push(format!(
                    "peer {}: not connected{}",
                    p.cluster,
                    if p.last_error.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", p.last_error)
                    }
                ));
            } else if !p.synced {
                not_ready.push(format!(
                    "peer {}: connected, initial sync not complete",
                    p.cluster
                ));
            }
            PeerView {
                name: p.cluster.clone(),
                address: p.address.clone(),
                connected: p.connected,
                synced: p.synced,
                stale_for_seconds: (p.stale_since_unix_ms > 0)
                    .then(|| ((now - p.stale_since_unix_ms).max(0) / 1000) as u64),
                heartbeat_interval_ms: (p.heartbeat_interval_ms > 0)
                    .then_some(p.heartbeat_interval_ms),
                loss_detection_ms: (p.heartbeat_interval_ms > 0)
                    .then(|| p.heartbeat_interval_ms.saturating_mul(3)),
                revision: p.revision,
                reconnects: p.reconnects,
                snapshots: p.snapshots,
                resumes: p.resumes,
                last_error: p.last_error.clone(),
            }
        })
        .collect();
    let all: Vec<&str> = resp.clusters.iter().map(|c| c.cluster.as_str()).collect();
    let agents: Vec<AgentView> = resp
        .agents
        .iter()
        .map(|a| {
            let synced: Vec<String> = a
                .clusters
                .iter()
                .filter(|c| c.synced)
                .map(|c| c.cluster.clone())
                .collect();
            let unsynced: Vec<String> = all
                .iter()
                .filter(|c| !synced.iter().any(|s| s == *c))
                .map(|c| c.to_string())
                .collect();
            if !unsynced.is_empty() {
                not_ready.push(format!(
                    "agent {}: not synced with {}{}",
                    a.node,
                    unsynced.join(", "),
                    if a.last_error.is_empty() {
                        String::new()
                    } else {
                        format!(" (last error: {})", a.last_error)
                    }
                ));
            }
            AgentView {
                node: a.node.clone(),
                synced_clusters: synced,
                unsynced_clusters: unsynced,
                map_entries: a.map_entries.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                last_error: a.last_error.clone(),
                reported_seconds_ago: (a.reported_at_unix_ms > 0)
                    .then(|| ((now - a.reported_at_unix_ms).max(0) / 1000) as u64),
                started_at_unix_ms: (a.started_at_unix_ms > 0).then_some(a.started_at_unix_ms),
                uptime_seconds: (a.started_at_unix_ms > 0)
                    .then(|| ((now - a.started_at_unix_ms).max(0) / 1000) as u64),
            }
        })
        .collect();
    let agents_synced = agents
        .iter()
        .filter(|a| a.unsynced_clusters.is_empty())
        .count();
    StatusView {
        cluster: local.name,
        cluster_id: local.id,
        revision: resp.revision,
        leader: resp.leader,
        clusters,
        peers,
        agents,
        agents_synced,
        nodes_not_reporting: Vec::new(),
        not_ready,
    }
}

/// The nodes of `watched` (Node objects of every cluster) marked not reporting.
pub fn nodes_not_reporting(watched: &Watched, now_ms: i64) -> Vec<NodeNotReporting> {
    watched
        .objects
        .iter()
        .filter_map(|((cluster, _, _), v)| match v {
            pb::event::Value::Node(n) if n.stale_since_unix_ms > 0 => Some(NodeNotReporting {
                cluster: cluster.clone(),
                node: n.name.clone(),
                since_unix_ms: n.stale_since_unix_ms,
                for_seconds: ((now_ms - n.stale_since_unix_ms).max(0) / 1000) as u64,
            }),
            _ => None,
        })
        .collect()
}

/// Reads every cluster's Node objects (a watch of that kind only, until each cluster's Node
/// marker, the server going idle, or `timeout`).
async fn read_nodes(
    conn: &ConnArgs,
    resp: &pb::StatusResponse,
    timeout: Duration,
) -> anyhow::Result<Watched> {
    use tokio_stream::StreamExt;
    let node = pb::Kind::Node as i32;
    let mut expected: std::collections::BTreeSet<String> = resp
        .clusters
        .iter()
        .filter(|c| c.counts.iter().any(|k| k.kind == node && k.synced))
        .map(|c| c.cluster.clone())
        .collect();
    let mut client = conn.connect().await?;
    let mut stream = client
        .watch(pb::WatchRequest {
            kinds: vec![node],
            heartbeat_interval_ms: 500,
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow::anyhow!("watch on {}: {}", conn.server, s.message()))?
        .into_inner();
    let mut watched = Watched::default();
    let read = async {
        while !expected.is_empty() {
            let Some(msg) = stream.next().await else {
                break;
            };
            let msg = msg.map_err(|s| anyhow::anyhow!("watch: {}", s.message()))?;
            if let Some(pb::watch_response::Payload::Synced(s)) = &msg.payload {
                expected.remove(&s.cluster);
            }
            if !watched.apply(msg) {
                break;
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| anyhow::anyhow!("reading the nodes took more than {timeout:?}"))??;
    Ok(watched)
}

/// Whether `resp` (one apiserver's Status) shows `peer` connected and synced; otherwise
/// what is missing and why.
pub fn peer_ready(resp: &pb::StatusResponse, peer: &str) -> Result<(), String> {
    let local = resp.local.as_ref().map(|l| l.name.as_str()).unwrap_or("?");
    let Some(p) = resp.peers.iter().find(|p| p.cluster == peer) else {
        return Err(format!(
            "{local} does not list peer {peer} yet (its apiserver has not picked up the peer Secret)"
        ));
    };
    let error = if p.last_error.is_empty() {
        String::new()
    } else {
        format!(": {}", p.last_error)
    };
    if !p.connected {
        Err(format!("{local} is not connected to {peer}{error}"))
    } else if !p.synced {
        Err(format!(
            "{local} is connected to {peer}, initial sync not complete{error}"
        ))
    } else {
        Ok(())
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes".into() } else { "no".into() }
}

pub fn render(v: &StatusView) -> String {
    let mut s = format!(
        "Cluster:   {} (id {})\nRevision:  {}\nLeader:    {}\n\n",
        v.cluster,
        v.cluster_id,
        v.revision,
        yes_no(v.leader)
    );
    let kinds = [
        "config",
        "nodes",
        "identities",
        "endpoints",
        "services",
        "policies",
    ];
    let mut header = vec!["CLUSTER", "ID", "ORIGIN"];
    header.extend(kinds.iter().map(|k| match *k {
        "config" => "CONFIG",
        "nodes" => "NODES",
        "identities" => "IDENTITIES",
        "endpoints" => "ENDPOINTS",
        "services" => "SERVICES",
        _ => "POLICIES",
    }));
    header.push("SYNCED");
    let rows: Vec<Vec<String>> = v
        .clusters
        .iter()
        .map(|c| {
            let mut row = vec![
                c.name.clone(),
                c.id.to_string(),
                if c.local {
                    "local".into()
                } else {
                    "imported".into()
                },
            ];
            // Policies are never imported: a peer's column is "-", not 0.
            row.extend(kinds.iter().map(|k| match c.counts.get(*k) {
                None if *k == "policies" && !c.local => "-".into(),
                n => n.copied().unwrap_or(0).to_string(),
            }));
            row.push(if c.synced {
                "yes".into()
            } else {
                format!("no ({})", c.unsynced_kinds.join(","))
            });
            row
        })
        .collect();
    s.push_str(&table(&header, &rows));
    s.push('\n');
    if v.peers.is_empty() {
        s.push_str("Peers:     none configured\n");
    } else {
        let rows: Vec<Vec<String>> = v
            .peers
            .iter()
            .map(|p| {
                vec![
                    p.name.clone(),
                    p.address.clone(),
                    yes_no(p.connected),
                    yes_no(p.synced),
                    p.stale_for_seconds
                        .map(|s| format!("{s}s"))
                        .unwrap_or_else(|| "-".into()),
                    match (p.heartbeat_interval_ms, p.loss_detection_ms) {
                        (Some(h), Some(l)) => format!(
                            "{:?} (stale after {:?})",
                            std::time::Duration::from_millis(h as u64),
                            std::time::Duration::from_millis(l as u64)
                        ),
                        _ => "-".into(),
                    },
                    p.revision.to_string(),
                    p.reconnects.to_string(),
                    p.snapshots.to_string(),
                    p.resumes.to_string(),
                    if p.last_error.is_empty() {
                        "-".into()
                    } else {
                        p.last_error.clone()
                    },
                ]
            })
            .collect();
        s.push_str(&table(
            &[
                "PEER",
                "ADDRESS",
                "CONNECTED",
                "SYNCED",
                "STALE",
                "HEARTBEAT",
                "REVISION",
                "RECONNECTS",
                "SNAPSHOTS",
                "RESUMES",
                "LAST ERROR",
            ],
            &rows,
        ));
    }
    s.push('\n');
    s.push_str(&format!(
        "Agents:    {} of {} synced with all clusters\n",
        v.agents_synced,
        v.agents.len()
    ));
    if !v.agents.is_empty() {
        let rows: Vec<Vec<String>> = v
            .agents
            .iter()
            .map(|a| {
                vec![
                    a.node.clone(),
                    if a.unsynced_clusters.is_empty() {
                        "all".into()
                    } else {
                        format!("missing {}", a.unsynced_clusters.join(","))
                    },
                    a.map_entries
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(" "),
                    a.reported_seconds_ago
                        .map(|s| format!("{s}s ago"))
                        .unwrap_or_else(|| "-".into()),
                    a.uptime_seconds
                        .map(|s| format!("{s}s"))
                        .unwrap_or_else(|| "-".into()),
                    if a.last_error.is_empty() {
                        "-".into()
                    } else {
                        a.last_error.clone()
                    },
                ]
            })
            .collect();
        s.push_str(&table(
            &[
                "NODE",
                "SYNCED",
                "MAP ENTRIES",
                "REPORTED",
                "UP",
                "LAST ERROR",
            ],
            &rows,
        ));
    }
    if !v.nodes_not_reporting.is_empty() {
        s.push_str(&format!(
            "\nNodes not reporting: {} (their backends are demoted, not withdrawn)\n",
            v.nodes_not_reporting.len()
        ));
        let rows: Vec<Vec<String>> = v
            .nodes_not_reporting
            .iter()
            .map(|n| {
                vec![
                    n.cluster.clone(),
                    n.node.clone(),
                    format!("{}s", n.for_seconds),
                ]
            })
            .collect();
        s.push_str(&table(&["CLUSTER", "NODE", "NOT REPORTING FOR"], &rows));
    }
    if !v.not_ready.is_empty() {
        s.push_str("\nNot ready:\n");
        for r in &v.not_ready {
            s.push_str(&format!("  - {r}\n"));
        }
    }
    s
}

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let deadline = Instant::now() + args.timeout;
    let mut client = args.conn.connect().await?;
    let mut last_line = String::new();
    loop {
        let resp = client
            .status(pb::StatusRequest {})
            .await
            .map_err(|s| anyhow::anyhow!("status from {}: {}", args.conn.server, s.message()))?
            .into_inner();
        let mut v = view(&resp);
        if !args.wait || v.not_ready.is_empty() {
            // Best effort: the rest of the status stands without it.
            match read_nodes(&args.conn, &resp, Duration::from_secs(5)).await {
                Ok(w) => v.nodes_not_reporting = nodes_not_reporting(&w, now_ms()),
                Err(e) => eprintln!("warning: nodes not read: {e:#}"),
            }
            if args.wait && args.output == Format::Table && !last_line.is_empty() {
                eprintln!();
            }
            match args.output {
                Format::Table => print!("{}", render(&v)),
                Format::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                Format::Yaml => print!("{}", serde_yaml::to_string(&v)?),
            }
            return Ok(());
        }
        if Instant::now() >= deadline {
            eprintln!();
            print!("{}", render(&v));
            anyhow::bail!(
                "timed out after {:?} waiting for the mesh to be ready:\n  - {}",
                args.timeout,
                v.not_ready.join("\n  - ")
            );
        }
        // Progress on one line of stderr, rewritten in place.
        let line = format!(
            "waiting: {} of {} agents synced; {}",
            v.agents_synced,
            v.agents.len(),
            v.not_ready.first().cloned().unwrap_or_default()
        );
        if line != last_line {
            eprint!("\r\x1b[2K{line}");
            last_line = line;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_not_reporting_are_listed_with_how_long() {
        let mut w = Watched::default();
        for (cluster, name, since) in [
            ("east", "e1", 0),
            ("east", "e2", 10_000),
            ("west", "w1", 55_500),
        ] {
            w.objects.insert(
                (cluster.into(), pb::Kind::Node as i32, name.into()),
                pb::event::Value::Node(pb::Node {
                    cluster: cluster.into(),
                    name: name.into(),
                    stale_since_unix_ms: since,
                    ..Default::default()
                }),
            );
        }
        let nodes = nodes_not_reporting(&w, 100_000);
        assert_eq!(
            nodes
                .iter()
                .map(|n| (n.cluster.as_str(), n.node.as_str(), n.for_seconds))
                .collect::<Vec<_>>(),
            [("east", "e2", 90), ("west", "w1", 44)]
        );
        let mut v = view(&pb::StatusResponse::default());
        v.nodes_not_reporting = nodes;
        let text = render(&v);
        assert!(
            text.contains("Nodes not reporting: 2 (their backends are demoted, not withdrawn)"),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.contains("west") && l.contains("w1") && l.contains("44s")),
            "{text}"
        );
    }
}

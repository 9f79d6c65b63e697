//! `meshctl service list` and `meshctl service explain NS/NAME [--node N] [--from C/NS/POD]`:
//! services as every cluster publishes them (global ones, and each cluster's own local-only
//! ones, which its agents translate too), and what a node's agent programs for one of them,
//! with the reason for each left-out backend; with `--from`, which of those backends the
//! client's egress policy lets it reach (the datapath's policy-aware choice,
//! `mesh_core::policy::choose_backends`).
//!
//! `explain` is the agent's decision, not a copy of it: the watched objects go into the
//! agent's own state (`mesh_proto::state::MeshState`), through its sync gate
//! (`MeshState::programmable`), and into the same `mesh_core::select::plan_node` on the same
//! `MeshView` (`mesh_proto::state::mesh_view`) from which `desired::compute` programs the
//! maps. Nodes not reporting (`Node::stale_since`) and stale clusters come into that view the
//! same way. With `--node N` run on node N, the node's quarantines (passive health) are read
//! from its pinned `mesh_quarantine` map and applied with the agent's own
//! `mesh_core::health::apply_quarantine`; elsewhere explain says they were not read.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use mesh_core::health::{BackendAddr, apply_quarantine};
use mesh_core::identity::RESERVED_WORLD;
use mesh_core::policy::{Decision, Outcome, choose_backends};
use mesh_core::select::{
    Claim, Excluded, FrontendPlan, GateInput, NodePlan, SelectedBackend, ServicePlan, SyncGate,
    plan_node,
};
use mesh_core::{ClusterName, GlobalService, IdentityId, Protocol};
use mesh_proto::client::WatchUpdate;
use mesh_proto::pb;
use mesh_proto::state::{Applied, ClusterState, MeshState, mesh_view};
use serde::Serialize;

use crate::conn::ConnArgs;
use crate::inspect::{Watched, read_watch, snapshot};
use crate::output::{Format, table};
use mesh_core::parse_duration;

#[derive(Subcommand)]
pub enum ServiceCommand {
    /// Services (global, and the local cluster's non-global ones), one row per service and
    /// cluster.
    List(ListArgs),
    /// Which backends a node selects for a service and, for each one left out, why.
    Explain(ExplainArgs),
}

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Give up waiting for the snapshot after this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// The service, as NAMESPACE/NAME.
    service: String,
    /// The node whose selection to explain (matters for internalTrafficPolicy Local).
    #[arg(long, default_value = "")]
    node: String,
    /// The cluster the node is in (default: the apiserver's own cluster).
    #[arg(long = "local-cluster", value_name = "CLUSTER")]
    local_cluster: Option<String>,
    /// A client pod, CLUSTER/NAMESPACE/POD (of the local cluster): show which backends its
    /// egress policy allows or denies, by which rule, and where its connections go. The
    /// node defaults to the pod's.
    #[arg(long, value_name = "CLUSTER/NS/POD")]
    from: Option<String>,
    /// Where nodes' pin directories are: run on node N with `--node N`, explain reads the
    /// node's quarantines (passive health) from `<root>/<N>/maps` and applies them as the
    /// agent does; elsewhere it says they were not read.
    #[arg(long, env = "MESH_BPFFS_ROOT", default_value = "/sys/fs/bpf/mesh")]
    bpffs_root: PathBuf,
    /// The node's pin directory (holds `maps/`); overrides --bpffs-root.
    #[arg(long)]
    bpffs_dir: Option<PathBuf>,
    /// Give up waiting for the snapshot after this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

pub async fn run(cmd: ServiceCommand) -> anyhow::Result<()> {
    match cmd {
        ServiceCommand::List(a) => {
            let snap = snapshot(&a.conn, vec![], a.timeout).await?;
            let rows = list_rows(&snap.services);
            match a.output {
                Format::Table => print!("{}", list_table(&rows)),
                Format::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
                Format::Yaml => print!("{}", serde_yaml::to_string(&rows)?),
            }
            Ok(())
        }
        ServiceCommand::Explain(a) => {
            let local = match &a.local_cluster {
                Some(c) => c.clone(),
                None => {
                    let mut client = a.conn.connect().await?;
                    client
                        .info(pb::InfoRequest {})
                        .await
                        .map_err(|s| {
                            anyhow::anyhow!("info from {}: {}", a.conn.server, s.message())
                        })?
                        .into_inner()
                        .name
                }
            };
            let local = ClusterName::new(local.clone())
                .map_err(|e| anyhow::anyhow!("invalid cluster name {local:?}: {e}"))?;
            let (watched, _) = read_watch(&a.conn, vec![], a.timeout).await?;
            let gate = agent_gate(&local);
            // With --from the node defaults to the client's, known only once it is found.
            let quarantines = if a.node.is_empty() && a.from.is_none() && a.bpffs_dir.is_none() {
                Quarantines::NotRead("no --node given (quarantines are per node)".into())
            } else {
                Quarantines::Pinned {
                    root: a.bpffs_root.clone(),
                    dir: a.bpffs_dir.clone(),
                }
            };
            let report = match &a.from {
                None => explain(&watched, &a.node, &a.service, &gate, &quarantines)?,
                Some(from) => {
                    explain_from(&watched, &a.node, &a.service, &gate, from, &quarantines)?
                }
            };
            match a.output {
                Format::Table => print!("{}", render_explain(&report)),
                Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Format::Yaml => print!("{}", serde_yaml::to_string(&report)?),
            }
            Ok(())
        }
    }
}

/// Where `service explain` gets the node's quarantines (passive health) from.
#[derive(Debug, Clone)]
pub enum Quarantines {
    /// Not read, and why (printed as such).
    NotRead(String),
    /// The node's pinned `mesh_quarantine` map: under `dir`, else `<root>/<node>`.
    Pinned { root: PathBuf, dir: Option<PathBuf> },
    /// The quarantines in force on the node, as the pinned map holds them (tests).
    #[cfg(test)]
    Given(BTreeMap<BackendAddr, QuarantineInfo>),
}

/// One quarantine in the node's pinned map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuarantineInfo {
    pub until_unix_ms: u64,
    /// Failed connects since the backend's last success.
    pub failures: u32,
}

// === impl Quarantines ===

impl Quarantines {
    /// The node's quarantines, or why they were not read. The map holds exactly the
    /// quarantines the node's services were last programmed with (the agent writes it in
    /// the same reconcile), so they are applied as they are.
    pub fn read(&self, node: &str) -> Result<BTreeMap<BackendAddr, QuarantineInfo>, String> {
        let dir = match self {
            Quarantines::NotRead(why) => return Err(why.clone()),
            #[cfg(test)]
            Quarantines::Given(q) => return Ok(q.clone()),
            Quarantines::Pinned { dir: Some(d), .. } => d.clone(),
            Quarantines::Pinned { dir: None, .. } if node.is_empty() => {
                return Err("no --node given (quarantines are per node)".into());
            }
            Quarantines::Pinned { root, dir: None } => root.join(node),
        };
        if !dir.join("maps").is_dir() {
            return Err(format!(
                "no pin directory {} here: explain does not run on node {node:?} (run it \
                 there, or give --bpffs-dir)",
                dir.display()
            ));
        }
        let read = mesh_maps::open_pinned_readonly(&dir).and_then(|m| m.quarantines());
        let rows = read.map_err(|e| format!("reading the maps under {}: {e}", dir.display()))?;
        Ok(rows
            .into_iter()
            .filter_map(|q| {
                let protocol = match q.proto {
                    mesh_maps::PROTO_TCP => Protocol::Tcp,
                    mesh_maps::PROTO_UDP => Protocol::Udp,
                    _ => return None,
                };
                Some((
                    BackendAddr {
                        ip: q.ip.into(),
                        port: q.port,
                        protocol,
                    },
                    QuarantineInfo {
                        until_unix_ms: q.until_unix_ms,
                        failures: q.failures,
                    },
                ))
            })
            .collect())
    }
}

/// The sync gate as `explain` assumes it: an agent started more than
/// `--initial-sync-timeout` ago that has not programmed yet, so it programs every synced
/// cluster once its own cluster is synced, and otherwise says what it waits for. (An agent
/// that programmed before and whose own cluster is no longer in the snapshot keeps what it
/// programmed; meshctl cannot see that.)
pub fn agent_gate(local: &ClusterName) -> GateInput<'_> {
    GateInput {
        local_cluster: local,
        deadline_passed: true,
        programming: false,
    }
}

/// One row of `service list`: a service as one cluster publishes it.
#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct ListRow {
    pub service: String,
    pub cluster: String,
    pub frontends: Vec<String>,
    pub ports: Vec<String>,
    /// `false`: a local-only Service (its cluster's agents translate it; never exported).
    pub global: bool,
    pub shared: bool,
    pub affinity: String,
    pub internal_traffic_policy: String,
    pub ready_backends: usize,
    pub total_backends: usize,
}

pub fn list_rows(services: &[GlobalService]) -> Vec<ListRow> {
    let mut rows: Vec<ListRow> = services
        .iter()
        .map(|s| ListRow {
            service: s.key(),
            cluster: s.cluster.to_string(),
            frontends: s.frontends.iter().map(|f| f.to_string()).collect(),
            ports: s.ports.iter().map(port_str).collect(),
            global: s.global,
            shared: s.shared,
            affinity: s.affinity.to_string(),
            internal_traffic_policy: s.internal_traffic_policy.to_string(),
            ready_backends: s.backends.iter().filter(|b| b.conditions.ready).count(),
            total_backends: s.backends.len(),
        })
        .collect();
    rows.sort_by(|a, b| (&a.service, &a.cluster).cmp(&(&b.service, &b.cluster)));
    rows
}

fn list_table(rows: &[ListRow]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.service.clone(),
                r.cluster.clone(),
                dash(r.frontends.join(",")),
                dash(r.ports.join(",")),
                r.global.to_string(),
                r.shared.to_string(),
                r.affinity.clone(),
                r.internal_traffic_policy.clone(),
                format!("{}/{}", r.ready_backends, r.total_backends),
            ]
        })
        .collect();
    table(
        &[
            "SERVICE",
            "CLUSTER",
            "FRONTENDS",
            "PORTS",
            "GLOBAL",
            "SHARED",
            "AFFINITY",
            "POLICY",
            "READY/TOTAL",
        ],
        &cells,
    )
}

fn dash(s: String) -> String {
    if s.is_empty() { "-".into() } else { s }
}

fn port_str(p: &mesh_core::ServicePort) -> String {
    if p.name.is_empty() {
        format!("{}/{}", p.port, p.protocol)
    } else {
        format!("{}/{}({})", p.port, p.protocol, p.name)
    }
}

/// What `service explain` prints.
#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct Explanation {
    pub service: String,
    pub local_cluster: String,
    pub node: String,
    /// `false`: the local Service is not global; only local backends are used.
    pub global: bool,
    pub frontends: Vec<String>,
    pub affinity: String,
    pub internal_traffic_policy: String,
    /// Why the node's agent programs nothing yet (its sync gate); the selection shown is
    /// then over every cluster seen, and the maps keep what they held.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// Clusters seen but never synced: the agent leaves their backends out.
    pub clusters_left_out: Vec<String>,
    pub ports: Vec<ExplainedPort>,
    pub excluded: Vec<ExcludedRow>,
    /// Every (ClusterIP, port) of the service and what the node's maps hold for it.
    pub programmed: Vec<ProgrammedFrontend>,
    /// Values the agent rejects (and so does not use), with the reason.
    pub invalid: Vec<String>,
    /// Whether the node's quarantines (passive health) were read and applied to
    /// `programmed`; when not, why.
    pub quarantines_read: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quarantines_not_read: Option<String>,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct ExplainedPort {
    pub frontend: String,
    pub tier: String,
    pub used_failover: bool,
    /// The backends are of stale clusters: no fresh one of the tier (stale demotion).
    pub stale: bool,
    pub backends: Vec<SelectedRow>,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct SelectedRow {
    pub cluster: String,
    pub address: String,
    pub node: String,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct ExcludedRow {
    pub cluster: String,
    pub ip: String,
    /// The frontend port it was left out for, or `*` for all of them.
    pub port: String,
    pub reason: String,
}

/// One frontend (ClusterIP, port, protocol) of the service.
#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct ProgrammedFrontend {
    /// `IP:PORT/PROTOCOL` (`[IP]:PORT/PROTOCOL` for IPv6).
    pub frontend: String,
    /// Whether this service holds the frontend (first Service wins a ClusterIP).
    pub held: bool,
    /// The claim holding it: `NS/NAME port ...`.
    pub held_by: String,
    #[serde(skip)]
    pub protocol: Protocol,
    /// Later claims on the same frontend, not programmed (when this service holds it).
    pub losers: Vec<String>,
    /// What the frontend forwards to: the holder's selected backends of the frontend's
    /// address family. Empty: connections are refused.
    pub backends: Vec<MapBackend>,
    /// This service's selected backends left out of this frontend for their address family.
    pub other_family: Vec<String>,
    /// Backends of this frontend the node quarantined (passive health): left out while
    /// others remain, kept when every one is quarantined (never the last usable ones).
    pub quarantined: Vec<QuarantinedRow>,
    /// With `--from`: the client's egress decision for each of `backends` and where its
    /// connections go.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressChoice>,
}

/// What the client's egress policy makes of one frontend's backends
/// (`mesh_core::policy::choose_backends`, the datapath's policy-aware choice).
#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct EgressChoice {
    /// `CLUSTER/NS/POD (IP, identity N)`.
    pub client: String,
    pub backends: Vec<BackendVerdict>,
    /// Where the client's connections go, in words.
    pub outcome: String,
    /// `any` (egress not enforced), `allowed` (some backends), `refused` (none).
    pub result: String,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct BackendVerdict {
    pub cluster: String,
    pub ip: IpAddr,
    pub port: u16,
    /// The backend address's identity, as the node's ipcache gives it (world when unknown).
    pub identity: u32,
    pub decision: Decision,
    /// The decision in words: the rule (its JSON path) or the default deny and its policies.
    pub explanation: String,
}

/// A backend the node quarantined, as explain shows it.
#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct QuarantinedRow {
    pub cluster: String,
    pub ip: IpAddr,
    pub port: u16,
    /// Seconds until the quarantine ends (rounded up), as of the explanation.
    pub remaining_secs: u64,
    pub until_unix_ms: u64,
    /// Failed connects since its last success.
    pub failures: u32,
    /// `false`: kept, because every backend of the frontend is quarantined.
    pub left_out: bool,
}

// === impl QuarantinedRow ===

impl QuarantinedRow {
    fn describe(&self) -> String {
        let what = format!(
            "{}/{} quarantined on this node for {}s after {} failed connect{}",
            self.cluster,
            SocketAddr::new(self.ip, self.port),
            self.remaining_secs,
            self.failures,
            if self.failures == 1 { "" } else { "s" }
        );
        if self.left_out {
            format!("{what}: left out")
        } else {
            format!(
                "{what}: kept, every backend of this frontend is quarantined (never the last usable ones)"
            )
        }
    }
}

#[derive(Serialize, Debug, PartialEq, Eq, Clone)]
pub struct MapBackend {
    pub cluster: String,
    pub ip: IpAddr,
    pub port: u16,
    pub node: String,
}

/// Feeds what the watch delivered into the state of an agent of `local`, as the agent's
/// watch would; returns it with the values it rejects.
pub fn agent_state(watched: &Watched, local: &ClusterName) -> (MeshState, Vec<String>) {
    let mut state = MeshState::new(local.clone());
    let mut invalid = Vec::new();
    let parse = |cluster: &str, kind: i32| {
        let cluster = ClusterName::new(cluster).ok()?;
        let kind = pb::Kind::try_from(kind)
            .ok()
            .filter(|k| *k != pb::Kind::Unspecified)?;
        Some((cluster, kind))
    };
    for ((cluster, kind, name), value) in &watched.objects {
        let Some((cluster, kind)) = parse(cluster, *kind) else {
            invalid.push(format!("{cluster}/{kind}/{name}: unknown cluster or kind"));
            continue;
        };
        let update = WatchUpdate::Upsert {
            cluster,
            kind,
            name: name.clone(),
            revision: watched.revision,
            value: value.clone(),
        };
        if let Applied::Rejected { error, .. } = state.apply(update) {
            invalid.push(error.to_string());
        }
    }
    for (cluster, kind) in &watched.synced {
        if let Some((cluster, kind)) = parse(cluster, *kind) {
            state.apply(WatchUpdate::Synced { cluster, kind });
        }
    }
    (state, invalid)
}

/// Explains `NS/NAME` on `node` of `gate.local_cluster`: the node plan the agent programs
/// from what was watched, under the sync gate `gate`, with the node's `quarantines` applied
/// to each frontend as the agent applies them (`mesh_core::health::apply_quarantine`).
pub fn explain(
    watched: &Watched,
    node: &str,
    key: &str,
    gate: &GateInput<'_>,
    quarantines: &Quarantines,
) -> anyhow::Result<Explanation> {
    let Some((ns, name)) = key.split_once('/') else {
        anyhow::bail!("expected NAMESPACE/NAME, got {key:?}");
    };
    let local = gate.local_cluster;
    let (state, invalid) = agent_state(watched, local);
    let clusters_left_out = match state.sync_gate(gate) {
        SyncGate::Program { left_out, .. } => left_out.iter().map(ToString::to_string).collect(),
        SyncGate::Wait(_) => Vec::new(),
    };
    // While the gate waits nothing new is programmed; show the selection over everything
    // seen, so the operator sees what the agent will do once it opens.
    let (clusters, waiting): (BTreeMap<ClusterName, &ClusterState>, _) =
        match state.programmable(gate) {
            Ok(clusters) => (clusters, None),
            Err(waiting) => (
                state
                    .clusters()
                    .iter()
                    .map(|(n, c)| (n.clone(), &c.state))
                    .collect(),
                Some(waiting.to_string()),
            ),
        };
    let plan = plan_node(&mesh_view(&clusters, local), node);
    let Some(svc_plan) = plan.service(ns, name) else {
        let id = (ns.to_owned(), name.to_owned());
        if state
            .cluster(local)
            .is_some_and(|c| c.state.services.contains_key(&id))
        {
            anyhow::bail!(
                "service {key} exists in cluster {local}, but cluster {local} is not \
                 synced: the agent programs nothing from it yet"
            );
        }
        let elsewhere: Vec<String> = state
            .clusters()
            .iter()
            .filter(|(_, c)| c.state.services.contains_key(&id))
            .map(|(n, _)| n.to_string())
            .collect();
        if elsewhere.is_empty() {
            anyhow::bail!("service {key} does not exist in any cluster");
        }
        anyhow::bail!(
            "service {key} does not exist in cluster {local} (it exists only in {}): \
             frontends come only from the local Service, so it is not reachable by ClusterIP \
             from {local}; create the Service in {local} too",
            elsewhere.join(", ")
        );
    };
    let svc = &clusters[local].services[&(ns.to_owned(), name.to_owned())];
    // The agent programs IPv4 frontends only (mesh is IPv4-only; it drops IPv6 ones with
    // reason ipv6), so explain shows what the maps hold.
    let mut programmed: Vec<ProgrammedFrontend> = svc_plan
        .frontends
        .iter()
        .filter(|f| !f.frontend.vip.is_ipv6())
        .map(|f| programmed_frontend(&plan, svc_plan, f))
        .collect();
    let (quarantines_read, quarantines_not_read) = match quarantines.read(node) {
        Ok(q) => {
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            for f in &mut programmed {
                quarantine_frontend(f, &q, now_ms);
            }
            (true, None)
        }
        Err(why) => (false, Some(why)),
    };
    Ok(Explanation {
        waiting,
        clusters_left_out,
        programmed,
        invalid,
        quarantines_read,
        quarantines_not_read,
        ..explanation(key, local, node, svc, svc_plan)
    })
}

/// Applies the node's quarantines to one frontend's backends with the agent's function, and
/// lists the quarantined ones.
fn quarantine_frontend(
    f: &mut ProgrammedFrontend,
    q: &BTreeMap<BackendAddr, QuarantineInfo>,
    now_ms: u64,
) {
    let protocol = f.protocol;
    let addr = |b: &MapBackend| BackendAddr {
        ip: b.ip,
        port: b.port,
        protocol,
    };
    let (kept, out) = apply_quarantine(&f.backends, addr, q);
    let row = |b: &MapBackend, left_out: bool| {
        let info = q[&addr(b)];
        QuarantinedRow {
            cluster: b.cluster.clone(),
            ip: b.ip,
            port: b.port,
            remaining_secs: info.until_unix_ms.saturating_sub(now_ms).div_ceil(1000),
            until_unix_ms: info.until_unix_ms,
            failures: info.failures,
            left_out,
        }
    };
    f.quarantined = out
        .iter()
        .map(|b| row(b, true))
        .chain(
            kept.iter()
                .filter(|b| q.contains_key(&addr(b)))
                .map(|b| row(b, false)),
        )
        .collect();
    f.backends = kept;
}

/// [`explain`] for the connections of client pod `from` (`CLUSTER/NS/POD`, of the local
/// cluster): per programmed frontend, the client's egress decision for each backend the map
/// holds and where its connections go, from `mesh_core::policy::choose_backends` over the
/// compiled policy of `MeshState::compile_policy` (what the agent programs). A backend's
/// identity is its address's in the node's ipcache: the endpoint's, else the longest CIDR
/// identity prefix holding it, else world. `node` defaults to the client's node.
pub fn explain_from(
    watched: &Watched,
    node: &str,
    key: &str,
    gate: &GateInput<'_>,
    from: &str,
    quarantines: &Quarantines,
) -> anyhow::Result<Explanation> {
    let local = gate.local_cluster;
    let loaded = crate::policy::load(watched, local)?;
    let (cluster, client) = crate::policy::find_pod(&loaded.state, "--from", from)?;
    if cluster != local.as_str() {
        anyhow::bail!(
            "--from {from:?}: the client must be in cluster {local}: egress is decided at the \
             client's node with its own cluster's policies, which only that cluster's \
             apiserver serves (run this against cluster {cluster}'s apiserver)"
        );
    }
    let node = if node.is_empty() {
        client.node.as_str()
    } else {
        node
    };
    let mut e = explain(watched, node, key, gate, quarantines)?;
    let client_name = format!("{from} ({}, identity {})", client.ip, client.identity.0);
    let identity_of = |ip: IpAddr| -> IdentityId { ipcache_identity(&loaded, local, node, ip) };
    for f in &mut e.programmed {
        let backends: Vec<(IdentityId, u16)> = f
            .backends
            .iter()
            .map(|b| (identity_of(b.ip), b.port))
            .collect();
        let choice = choose_backends(
            &loaded.view.compiled,
            client.identity,
            f.protocol,
            &backends,
        );
        let (outcome, result) = match &choice.outcome {
            Outcome::AnyBackend => (
                "egress not enforced for this client: any backend, as without policy".to_string(),
                "any",
            ),
            Outcome::Allowed { backends: allowed } => {
                let names: Vec<String> = allowed
                    .iter()
                    .map(|&i| {
                        let b = &f.backends[i];
                        format!("{}/{}", b.cluster, SocketAddr::new(b.ip, b.port))
                    })
                    .collect();
                let denied = f.backends.len() - allowed.len();
                (
                    format!(
                        "connections go to the allowed backend{} {}{}",
                        if allowed.len() == 1 { "" } else { "s" },
                        names.join(", "),
                        if denied > 0 {
                            format!(" ({denied} denied, skipped: never refused on them)")
                        } else {
                            String::new()
                        }
                    ),
                    "allowed",
                )
            }
            Outcome::Refused => (
                "no backend allowed: connect() is refused at once (EPERM)".to_string(),
                "refused",
            ),
        };
        f.egress = Some(EgressChoice {
            client: client_name.clone(),
            backends: f
                .backends
                .iter()
                .zip(backends)
                .zip(choice.decisions)
                .map(|((b, (identity, _)), decision)| BackendVerdict {
                    cluster: b.cluster.clone(),
                    ip: b.ip,
                    port: b.port,
                    identity: identity.0,
                    explanation: crate::policy::decision_text(&decision),
                    decision,
                })
                .collect(),
            outcome,
            result: result.into(),
        });
    }
    Ok(e)
}

/// The identity the node's ipcache gives `ip`, as the agent's ipcache builder
/// (`mesh_agent::ipcache::IpcacheBuilder`: clusters' entries, then policy CIDRs) builds it: clusters whose config is known, the local cluster first
/// (the first owner of an address keeps it), in each its nodes' addresses (host for this
/// node, remote-node otherwise) then its endpoints with an identity in the cluster's range;
/// else the longest CIDR identity prefix holding it; else world.
fn ipcache_identity(
    loaded: &crate::policy::Loaded,
    local: &ClusterName,
    node: &str,
    ip: IpAddr,
) -> IdentityId {
    use mesh_core::identity::{RESERVED_HOST, RESERVED_REMOTE_NODE};
    let clusters = loaded.state.clusters();
    let order = clusters
        .get_key_value(local)
        .into_iter()
        .chain(clusters.iter().filter(|(n, _)| *n != local))
        .filter(|(n, _)| !loaded.left_out.contains(&n.to_string()));
    for (name, c) in order {
        let Some(config) = &c.state.config else {
            continue;
        };
        for n in c.state.nodes.values() {
            if n.internal_ips.contains(&ip) {
                let this_node = name == local && n.name == node;
                return IdentityId(if this_node {
                    RESERVED_HOST
                } else {
                    RESERVED_REMOTE_NODE
                });
            }
        }
        if let Some(ep) = c.state.endpoints.get(&ip)
            && ep.identity.check_range(name, config.id).is_ok()
        {
            return ep.identity;
        }
    }
    loaded
        .view
        .identities
        .cidrs()
        .filter(|(_, net)| net.contains(&ip))
        .max_by_key(|(_, net)| net.prefix_len())
        .map_or(IdentityId(RESERVED_WORLD), |(id, _)| id)
}

fn explanation(
    key: &str,
    local: &ClusterName,
    node: &str,
    svc: &GlobalService,
    plan: &ServicePlan,
) -> Explanation {
    let sel = &plan.selection;
    Explanation {
        service: key.to_string(),
        local_cluster: local.to_string(),
        node: node.to_string(),
        global: svc.global,
        frontends: sel.frontends.iter().map(|f| f.to_string()).collect(),
        affinity: svc.affinity.to_string(),
        internal_traffic_policy: svc.internal_traffic_policy.to_string(),
        waiting: None,
        clusters_left_out: Vec::new(),
        ports: sel
            .ports
            .iter()
            .map(|p| ExplainedPort {
                frontend: port_str(&p.frontend),
                tier: p.tier.to_string(),
                used_failover: p.used_failover,
                stale: p.stale,
                backends: p
                    .backends
                    .iter()
                    .map(|b| SelectedRow {
                        cluster: b.cluster.to_string(),
                        address: format!("{}:{}", b.ip, b.port),
                        node: b.node.clone(),
                    })
                    .collect(),
            })
            .collect(),
        excluded: sel.excluded.iter().map(excluded_row).collect(),
        programmed: Vec::new(),
        invalid: Vec::new(),
        quarantines_read: false,
        quarantines_not_read: None,
    }
}

fn programmed_frontend(plan: &NodePlan, svc: &ServicePlan, f: &FrontendPlan) -> ProgrammedFrontend {
    let map_backend = |b: &SelectedBackend| MapBackend {
        cluster: b.cluster.to_string(),
        ip: b.ip,
        port: b.port,
        node: b.node.clone(),
    };
    let (held_by, losers, backends) = match &f.claim {
        Claim::Won { losers } => (
            svc.claimant(f).to_string(),
            losers.iter().map(ToString::to_string).collect(),
            svc.backends(f).map(map_backend).collect(),
        ),
        Claim::Lost { winner } => {
            let backends = plan
                .owner(&f.frontend)
                .map(|(o, of)| o.backends(of).map(map_backend).collect())
                .unwrap_or_default();
            (winner.to_string(), Vec::new(), backends)
        }
    };
    ProgrammedFrontend {
        frontend: f.frontend.to_string(),
        protocol: f.frontend.protocol,
        held: matches!(f.claim, Claim::Won { .. }),
        held_by,
        losers,
        backends,
        other_family: svc
            .other_family(f)
            .map(|b| format!("{}/{}:{}", b.cluster, b.ip, b.port))
            .collect(),
        quarantined: Vec::new(),
        egress: None,
    }
}

fn excluded_row(e: &Excluded) -> ExcludedRow {
    ExcludedRow {
        cluster: e.cluster.to_string(),
        ip: e.ip.to_string(),
        port: e.port.as_ref().map(port_str).unwrap_or_else(|| "*".into()),
        reason: e.reason.to_string(),
    }
}

pub fn render_explain(e: &Explanation) -> String {
    let mut s = if e.global {
        format!(
            "Service {} as node {:?} of cluster {} selects it (affinity {}, internalTrafficPolicy {})\n",
            e.service, e.node, e.local_cluster, e.affinity, e.internal_traffic_policy
        )
    } else {
        format!(
            "Service {} as node {:?} of cluster {} selects it (not global: local backends only, \
             translated by the node's socket LB; internalTrafficPolicy {})\n",
            e.service, e.node, e.local_cluster, e.internal_traffic_policy
        )
    };
    if let Some(waiting) = &e.waiting {
        s.push_str(&format!(
            "Not programmed yet: {waiting}; the node's maps keep what they held\n"
        ));
    }
    if !e.clusters_left_out.is_empty() {
        s.push_str(&format!(
            "Clusters left out (never synced): {}\n",
            e.clusters_left_out.join(", ")
        ));
    }
    s.push_str(&format!("Frontends: {}\n", dash(e.frontends.join(", "))));
    for p in &e.ports {
        s.push('\n');
        let failover = if p.used_failover { ", failover" } else { "" };
        let stale = if p.stale {
            ", stale clusters or lost nodes only: no fresh backend"
        } else {
            ""
        };
        s.push_str(&format!(
            "Port {} (tier {}{failover}{stale}):\n",
            p.frontend, p.tier
        ));
        if p.backends.is_empty() {
            s.push_str("  no backend: connections to this port are refused\n");
            continue;
        }
        let rows: Vec<Vec<String>> = p
            .backends
            .iter()
            .map(|b| {
                vec![
                    b.cluster.clone(),
                    b.address.clone(),
                    b.node.clone(),
                    p.tier.clone(),
                    if p.used_failover { "yes" } else { "no" }.to_string(),
                ]
            })
            .collect();
        for line in table(&["CLUSTER", "BACKEND", "NODE", "TIER", "FAILOVER"], &rows).lines() {
            s.push_str("  ");
            s.push_str(line);
            s.push('\n');
        }
    }
    for f in &e.programmed {
        s.push('\n');
        let backends = if f.backends.is_empty() {
            "no backend: connections are refused".to_string()
        } else {
            f.backends
                .iter()
                .map(|b| format!("{}/{}", b.cluster, SocketAddr::new(b.ip, b.port)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if f.held {
            s.push_str(&format!("Frontend {} forwards to {backends}\n", f.frontend));
            for l in &f.losers {
                s.push_str(&format!(
                    "  also claimed by {l}: first Service wins a ClusterIP, that claim is not programmed\n"
                ));
            }
        } else {
            s.push_str(&format!(
                "Frontend {} is held by {} (first Service wins a ClusterIP): it forwards to {backends}, not to this service's selection\n",
                f.frontend, f.held_by
            ));
        }
        if !f.other_family.is_empty() {
            s.push_str(&format!(
                "  left out for their address family: {}\n",
                f.other_family.join(", ")
            ));
        }
        for q in &f.quarantined {
            s.push_str(&format!("  {}\n", q.describe()));
        }
        if let Some(eg) = &f.egress {
            s.push_str(&format!("  Egress policy of {}:\n", eg.client));
            let rows: Vec<Vec<String>> = eg
                .backends
                .iter()
                .map(|b| {
                    vec![
                        b.cluster.clone(),
                        SocketAddr::new(b.ip, b.port).to_string(),
                        b.identity.to_string(),
                        b.decision.verdict.to_string().to_uppercase(),
                        b.explanation.clone(),
                    ]
                })
                .collect();
            for line in table(&["CLUSTER", "BACKEND", "IDENTITY", "VERDICT", "WHY"], &rows).lines()
            {
                s.push_str("    ");
                s.push_str(line);
                s.push('\n');
            }
            s.push_str(&format!("  => {}\n", eg.outcome));
        }
    }
    if let Some(why) = &e.quarantines_not_read {
        s.push_str(&format!(
            "\nQuarantines (passive health) not read: {why}; the node may leave out backends \
             whose connects failed\n"
        ));
    } else if e.quarantines_read && e.programmed.iter().all(|f| f.quarantined.is_empty()) {
        s.push_str("\nNo backend of this service is quarantined on this node.\n");
    }
    for i in &e.invalid {
        s.push_str(&format!("Invalid value skipped: {i}\n"));
    }
    s.push('\n');
    // The selection's exclusions; quarantines (above) are the node's, after selection.
    let quarantine_left_out = e
        .programmed
        .iter()
        .any(|f| f.quarantined.iter().any(|q| q.left_out));
    if e.excluded.is_empty() && quarantine_left_out {
        s.push_str("No other backend left out.\n");
    } else if e.excluded.is_empty() {
        s.push_str("No backend left out.\n");
    } else {
        s.push_str("Left out:\n");
        let rows: Vec<Vec<String>> = e
            .excluded
            .iter()
            .map(|x| {
                vec![
                    x.cluster.clone(),
                    x.ip.clone(),
                    x.port.clone(),
                    x.reason.clone(),
                ]
            })
            .collect();
        for line in table(&["CLUSTER", "BACKEND", "PORT", "REASON"], &rows).lines() {
            s.push_str("  ");
            s.push_str(line);
            s.push('\n');
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::{Affinity, Backend, BackendConditions, Protocol, ServicePort, TrafficPolicy};
    // Every kind a cluster's own readers get (the policy marker of a remote cluster is
    // simply not needed).
    use mesh_proto::state::LOCAL_KINDS as KINDS;

    fn port(name: &str, protocol: Protocol, port: u16) -> ServicePort {
        ServicePort {
            name: name.into(),
            protocol,
            port,
        }
    }

    const READY: BackendConditions = BackendConditions {
        ready: true,
        serving: true,
        terminating: false,
    };
    const NOT_READY: BackendConditions = BackendConditions {
        ready: false,
        serving: false,
        terminating: false,
    };

    const TERMINATING_SERVING: BackendConditions = BackendConditions {
        ready: false,
        serving: true,
        terminating: true,
    };
    const TERMINATING: BackendConditions = BackendConditions {
        ready: false,
        serving: false,
        terminating: true,
    };

    fn backend(ip: &str, node: &str, conditions: BackendConditions) -> Backend {
        Backend {
            ip: ip.parse().unwrap(),
            ports: vec![port("http", Protocol::Tcp, 8080)],
            node: node.into(),
            zone: String::new(),
            conditions,
        }
    }

    /// What a watch of an apiserver holding `services` delivers: each service, and every
    /// kind of every cluster synced.
    fn watched(services: &[GlobalService]) -> Watched {
        let mut w = Watched::default();
        for s in services {
            w.objects.insert(
                (s.cluster.to_string(), pb::Kind::Service as i32, s.key()),
                pb::event::Value::Service(s.into()),
            );
            for kind in KINDS {
                w.synced.insert((s.cluster.to_string(), kind as i32));
            }
        }
        w
    }

    fn svc(cluster: &str, backends: Vec<Backend>) -> GlobalService {
        GlobalService {
            cluster: ClusterName::new(cluster).unwrap(),
            namespace: "default".into(),
            name: "web".into(),
            global: true,
            shared: true,
            affinity: Affinity::None,
            internal_traffic_policy: TrafficPolicy::Cluster,
            ports: vec![port("http", Protocol::Tcp, 80)],
            frontends: vec!["10.96.0.10".parse().unwrap()],
            backends,
        }
    }

    /// One case: the services of every cluster, the node, and the expected selection and
    /// left-out rows as (cluster, ip, reason substring).
    struct Case {
        name: &'static str,
        services: Vec<GlobalService>,
        node: &'static str,
        selected: Vec<(&'static str, &'static str)>,
        excluded: Vec<(&'static str, &'static str, &'static str)>,
    }

    #[test]
    fn explain_gives_the_reason_for_each_left_out_backend() {
        let with = |mut s: GlobalService, f: &dyn Fn(&mut GlobalService)| {
            f(&mut s);
            s
        };
        let cases = vec![
            Case {
                name: "affinity local keeps local, leaves remote out",
                services: vec![
                    with(svc("east", vec![backend("10.1.0.1", "e1", READY)]), &|s| {
                        s.affinity = Affinity::Local
                    }),
                    svc("west", vec![backend("10.2.0.1", "w1", READY)]),
                ],
                node: "e1",
                selected: vec![("east", "10.1.0.1:8080")],
                excluded: vec![("west", "10.2.0.1", "affinity local")],
            },
            Case {
                name: "affinity remote keeps remote, leaves local out",
                services: vec![
                    with(svc("east", vec![backend("10.1.0.1", "e1", READY)]), &|s| {
                        s.affinity = Affinity::Remote
                    }),
                    svc("west", vec![backend("10.2.0.1", "w1", READY)]),
                ],
                node: "e1",
                selected: vec![("west", "10.2.0.1:8080")],
                excluded: vec![("east", "10.1.0.1", "affinity remote")],
            },
            Case {
                name: "not ready",
                services: vec![
                    svc(
                        "east",
                        vec![
                            backend("10.1.0.1", "e1", READY),
                            backend("10.1.0.2", "e1", NOT_READY),
                        ],
                    ),
                    svc("west", vec![backend("10.2.0.1", "w1", NOT_READY)]),
                ],
                node: "e1",
                selected: vec![("east", "10.1.0.1:8080")],
                excluded: vec![
                    ("east", "10.1.0.2", "not ready"),
                    ("west", "10.2.0.1", "not ready"),
                ],
            },
            Case {
                name: "not shared",
                services: vec![
                    svc("east", vec![backend("10.1.0.1", "e1", READY)]),
                    with(svc("west", vec![backend("10.2.0.1", "w1", READY)]), &|s| {
                        s.shared = false
                    }),
                ],
                node: "e1",
                selected: vec![("east", "10.1.0.1:8080")],
                excluded: vec![("west", "10.2.0.1", "does not share")],
            },
            Case {
                name: "internalTrafficPolicy Local",
                services: vec![
                    with(
                        svc(
                            "east",
                            vec![
                                backend("10.1.0.1", "e1", READY),
                                backend("10.1.0.2", "e2", READY),
                            ],
                        ),
                        &|s| s.internal_traffic_policy = TrafficPolicy::Local,
                    ),
                    svc("west", vec![backend("10.2.0.1", "w1", READY)]),
                ],
                node: "e1",
                selected: vec![("east", "10.1.0.1:8080")],
                excluded: vec![
                    (
                        "east",
                        "10.1.0.2",
                        "internalTrafficPolicy Local: on node \"e2\"",
                    ),
                    ("west", "10.2.0.1", "remote backends are never used"),
                ],
            },
            Case {
                name: "port mismatch",
                services: vec![
                    svc("east", vec![backend("10.1.0.1", "e1", READY)]),
                    svc(
                        "west",
                        vec![Backend {
                            ports: vec![port("grpc", Protocol::Tcp, 9090)],
                            ..backend("10.2.0.1", "w1", READY)
                        }],
                    ),
                ],
                node: "e1",
                selected: vec![("east", "10.1.0.1:8080")],
                excluded: vec![("west", "10.2.0.1", "no port named \"http\" with protocol")],
            },
            Case {
                name: "terminating: not serving, and serving but not needed",
                services: vec![svc(
                    "east",
                    vec![
                        backend("10.1.0.1", "e1", READY),
                        backend("10.1.0.2", "e1", TERMINATING_SERVING),
                        backend("10.1.0.3", "e1", TERMINATING),
                    ],
                )],
                node: "e1",
                selected: vec![("east", "10.1.0.1:8080")],
                excluded: vec![
                    (
                        "east",
                        "10.1.0.2",
                        "terminating: used only when no backend is ready",
                    ),
                    ("east", "10.1.0.3", "terminating and not serving"),
                ],
            },
            Case {
                name: "affinity local fails over to remote",
                services: vec![
                    with(
                        svc("east", vec![backend("10.1.0.1", "e1", NOT_READY)]),
                        &|s| s.affinity = Affinity::Local,
                    ),
                    svc("west", vec![backend("10.2.0.1", "w1", READY)]),
                ],
                node: "e1",
                selected: vec![("west", "10.2.0.1:8080")],
                excluded: vec![("east", "10.1.0.1", "not ready")],
            },
        ];
        let east = ClusterName::new("east").unwrap();
        for c in cases {
            let e = explain(
                &watched(&c.services),
                c.node,
                "default/web",
                &agent_gate(&east),
                &Quarantines::NotRead("not asked".into()),
            )
            .unwrap_or_else(|err| panic!("{}: {err:#}", c.name));
            assert_eq!(e.ports.len(), 1, "{}", c.name);
            let selected: Vec<(String, String)> = e.ports[0]
                .backends
                .iter()
                .map(|b| (b.cluster.clone(), b.address.clone()))
                .collect();
            let want: Vec<(String, String)> = c
                .selected
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
            assert_eq!(selected, want, "{}: selected", c.name);
            assert_eq!(
                e.excluded.len(),
                c.excluded.len(),
                "{}: left out {:?}",
                c.name,
                e.excluded
            );
            for (cluster, ip, reason) in &c.excluded {
                assert!(
                    e.excluded
                        .iter()
                        .any(|x| x.cluster == *cluster && x.ip == *ip && x.reason.contains(reason)),
                    "{}: no row ({cluster}, {ip}, ..{reason}..) in {:?}",
                    c.name,
                    e.excluded
                );
            }
            // The table names every left-out backend with its reason.
            let text = render_explain(&e);
            for (_, ip, reason) in &c.excluded {
                assert!(
                    text.lines().any(|l| l.contains(ip) && l.contains(reason)),
                    "{}: table lacks {ip} / {reason}:\n{text}",
                    c.name
                );
            }
            if c.name.contains("fails over") {
                assert!(e.ports[0].used_failover, "{}", c.name);
                assert!(text.contains("failover"), "{text}");
            }
        }
    }

    #[test]
    fn explain_shows_a_stale_cluster_demoted_and_used_when_nothing_fresh_is_left() {
        let east = ClusterName::new("east").unwrap();
        let stale_since = std::time::SystemTime::now() - std::time::Duration::from_secs(12);
        let with_link = |services: &[GlobalService]| {
            let mut w = watched(services);
            let link = mesh_proto::convert::PeerLink {
                cluster: ClusterName::new("west").unwrap(),
                stale_since,
            };
            w.objects.insert(
                ("west".into(), pb::Kind::Link as i32, String::new()),
                pb::event::Value::Link((&link).into()),
            );
            w
        };
        let west = svc("west", vec![backend("10.2.0.1", "w1", READY)]);
        let e = explain(
            &with_link(&[
                svc("east", vec![backend("10.1.0.1", "e1", READY)]),
                west.clone(),
            ]),
            "e1",
            "default/web",
            &agent_gate(&east),
            &Quarantines::NotRead("not asked".into()),
        )
        .unwrap();
        let text = render_explain(&e);
        assert_eq!(e.ports[0].backends.len(), 1, "{text}");
        assert_eq!(e.ports[0].backends[0].cluster, "east");
        assert!(!e.ports[0].stale);
        let row = text
            .lines()
            .find(|l| l.contains("10.2.0.1"))
            .unwrap_or_else(|| panic!("no row for the demoted backend:\n{text}"));
        // 12 s ago, as of the moment explain ran (a slow machine may add a second).
        assert!(
            row.contains("demoted: cluster west stale for 12s")
                || row.contains("demoted: cluster west stale for 13s"),
            "{text}"
        );
        // Nothing fresh and ready: the stale cluster carries the traffic, and says so.
        let e = explain(
            &with_link(&[
                svc("east", vec![backend("10.1.0.1", "e1", NOT_READY)]),
                west,
            ]),
            "e1",
            "default/web",
            &agent_gate(&east),
            &Quarantines::NotRead("not asked".into()),
        )
        .unwrap();
        assert_eq!(e.ports[0].backends[0].cluster, "west");
        assert!(e.ports[0].stale);
        assert!(
            render_explain(&e).contains("stale clusters or lost nodes only: no fresh backend"),
            "{}",
            render_explain(&e)
        );
    }

    /// Adds node `name` of `cluster` to `w`, not reporting for `secs` seconds if given.
    fn with_node(w: &mut Watched, cluster: &str, name: &str, secs: Option<u64>) {
        let node = mesh_core::Node {
            cluster: ClusterName::new(cluster).unwrap(),
            name: name.into(),
            internal_ips: vec![],
            pod_cidrs: vec![],
            stale_since: secs.map(|s| SystemTime::now() - Duration::from_secs(s)),
        };
        w.objects.insert(
            (cluster.into(), pb::Kind::Node as i32, name.into()),
            pb::event::Value::Node((&node).into()),
        );
    }

    #[test]
    fn explain_shows_a_node_not_reporting_demoted_and_used_when_nothing_fresh_is_left() {
        let east = ClusterName::new("east").unwrap();
        let mut w = watched(&[svc(
            "east",
            vec![
                backend("10.1.0.1", "e1", READY),
                backend("10.1.0.2", "e2", READY),
            ],
        )]);
        with_node(&mut w, "east", "e1", None);
        with_node(&mut w, "east", "e2", Some(12));
        let e = explain(
            &w,
            "e1",
            "default/web",
            &agent_gate(&east),
            &no_quarantines(),
        )
        .unwrap();
        let text = render_explain(&e);
        assert_eq!(e.ports[0].backends.len(), 1, "{text}");
        assert_eq!(e.ports[0].backends[0].address, "10.1.0.1:8080");
        let row = text
            .lines()
            .find(|l| l.contains("10.1.0.2"))
            .unwrap_or_else(|| panic!("no row for the demoted backend:\n{text}"));
        assert!(
            row.contains("demoted: node e2 not reporting for 12s")
                || row.contains("demoted: node e2 not reporting for 13s"),
            "{text}"
        );
        // The only ready backend is on the lost node: used, and said so.
        let mut w = watched(&[svc(
            "east",
            vec![
                backend("10.1.0.1", "e1", NOT_READY),
                backend("10.1.0.2", "e2", READY),
            ],
        )]);
        with_node(&mut w, "east", "e2", Some(12));
        let e = explain(
            &w,
            "e1",
            "default/web",
            &agent_gate(&east),
            &no_quarantines(),
        )
        .unwrap();
        assert_eq!(e.ports[0].backends[0].address, "10.1.0.2:8080");
        assert!(e.ports[0].stale);
        assert!(
            render_explain(&e).contains("stale clusters or lost nodes only: no fresh backend"),
            "{}",
            render_explain(&e)
        );
    }

    fn no_quarantines() -> Quarantines {
        Quarantines::NotRead("not asked".into())
    }

    fn quarantine(
        ip: &str,
        port: u16,
        in_secs: u64,
        failures: u32,
    ) -> (BackendAddr, QuarantineInfo) {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        (
            BackendAddr {
                ip: ip.parse().unwrap(),
                port,
                protocol: Protocol::Tcp,
            },
            QuarantineInfo {
                until_unix_ms: now_ms + in_secs * 1000,
                failures,
            },
        )
    }

    #[test]
    fn explain_applies_the_nodes_quarantines_as_the_agent_does() {
        let east = ClusterName::new("east").unwrap();
        let w = watched(&[svc(
            "east",
            vec![
                backend("10.1.0.1", "e1", READY),
                backend("10.1.0.2", "e2", READY),
            ],
        )]);
        // One of two quarantined: left out of the frontend.
        let q = Quarantines::Given(BTreeMap::from([quarantine("10.1.0.2", 8080, 9, 3)]));
        let e = explain(&w, "e1", "default/web", &agent_gate(&east), &q).unwrap();
        let text = render_explain(&e);
        assert!(e.quarantines_read, "{text}");
        let f = &e.programmed[0];
        assert_eq!(f.backends.len(), 1, "{text}");
        assert_eq!(f.backends[0].ip.to_string(), "10.1.0.1");
        assert_eq!(f.quarantined.len(), 1);
        assert!(f.quarantined[0].left_out);
        assert!(
            text.contains("east/10.1.0.2:8080 quarantined on this node for 9s after 3 failed connects: left out")
                || text.contains("east/10.1.0.2:8080 quarantined on this node for 8s after 3 failed connects: left out"),
            "{text}"
        );
        assert!(
            text.contains("Frontend 10.96.0.10:80/TCP forwards to east/10.1.0.1:8080\n"),
            "{text}"
        );
        // The summary does not contradict the quarantine line.
        assert!(text.contains("\nNo other backend left out.\n"), "{text}");
        assert!(!text.contains("No backend left out."), "{text}");
        // The selection itself is unchanged: quarantine is the node's, after selection.
        assert_eq!(e.ports[0].backends.len(), 2);

        // Both quarantined: both kept (never the last usable ones), and said so.
        let q = Quarantines::Given(BTreeMap::from([
            quarantine("10.1.0.1", 8080, 5, 1),
            quarantine("10.1.0.2", 8080, 9, 3),
        ]));
        let e = explain(&w, "e1", "default/web", &agent_gate(&east), &q).unwrap();
        let f = &e.programmed[0];
        assert_eq!(f.backends.len(), 2);
        assert_eq!(f.quarantined.len(), 2);
        assert!(f.quarantined.iter().all(|r| !r.left_out));
        assert!(
            render_explain(&e).contains("kept, every backend of this frontend is quarantined"),
            "{}",
            render_explain(&e)
        );
        // Another port's quarantine does not apply; nothing quarantined is said too.
        let q = Quarantines::Given(BTreeMap::from([quarantine("10.1.0.2", 9090, 9, 3)]));
        let e = explain(&w, "e1", "default/web", &agent_gate(&east), &q).unwrap();
        assert_eq!(e.programmed[0].backends.len(), 2);
        assert!(
            render_explain(&e).contains("No backend of this service is quarantined on this node.")
        );
        assert!(render_explain(&e).contains("\nNo backend left out.\n"));

        // Not read: said so, and nothing is applied.
        let e = explain(
            &w,
            "e1",
            "default/web",
            &agent_gate(&east),
            &no_quarantines(),
        )
        .unwrap();
        assert!(!e.quarantines_read);
        assert!(
            render_explain(&e).contains("Quarantines (passive health) not read: not asked"),
            "{}",
            render_explain(&e)
        );
        // Pinned, but explain does not run on the node: the pin directory is named.
        let pinned = Quarantines::Pinned {
            root: "/nonexistent/mesh".into(),
            dir: None,
        };
        let e = explain(&w, "e1", "default/web", &agent_gate(&east), &pinned).unwrap();
        let why = e.quarantines_not_read.unwrap();
        assert!(
            why.contains("/nonexistent/mesh/e1") && why.contains("does not run on node \"e1\""),
            "{why}"
        );
        let e = explain(&w, "", "default/web", &agent_gate(&east), &pinned).unwrap();
        assert!(e.quarantines_not_read.unwrap().contains("no --node given"));
    }

    /// `Quarantines::Pinned` against a real pinned `mesh_quarantine` map, written by the
    /// agent's own datapath (as `meshctl bpf lb list`'s tests do): explain run "on the
    /// node" reads and applies it. Needs root (bpffs, cgroup, eBPF); nextest's
    /// `unprivileged` profile leaves it out.
    #[test]
    fn explain_reads_the_quarantines_pinned_on_the_node() {
        use mesh_agent::datapath::{Datapath, DatapathConfig, layout, unpin_dir};
        use std::process::Command;
        mesh_testkit::require_root("meshctl's pinned quarantine test");
        let cgroup = std::path::Path::new("/sys/fs/cgroup/unified")
            .join(format!("meshctl-explain-test-{}", std::process::id()));
        std::fs::create_dir(&cgroup).unwrap_or_else(|e| panic!("create cgroup {cgroup:?}: {e}"));
        let bpffs = tempfile::Builder::new()
            .prefix("meshctl-explain-bpffs")
            .tempdir()
            .unwrap();
        // Cleans up even when an assertion fails.
        struct Cleanup(std::path::PathBuf, std::path::PathBuf);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = unpin_dir(&self.1.join("mesh").join("e1"));
                let _ = Command::new("umount").arg(&self.1).status();
                let _ = std::fs::remove_dir(&self.0);
            }
        }
        let _cleanup = Cleanup(cgroup.clone(), bpffs.path().to_owned());
        let st = Command::new("mount")
            .args(["-t", "bpf", "bpf", bpffs.path().to_str().unwrap()])
            .status()
            .unwrap();
        assert!(st.success(), "mount bpffs");
        let root = bpffs.path().join("mesh");
        let mut dp = Datapath::open(DatapathConfig::new(root.join("e1"), &cgroup)).unwrap();
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        dp.set_quarantines(&BTreeMap::from([(
            layout::HealthKey {
                ip: u32::from(std::net::Ipv4Addr::new(10, 1, 0, 2)).to_be(),
                port: 8080u16.to_be(),
                proto: 6,
                pad: 0,
            },
            layout::QuarantineValue {
                until_unix_ms: now_ms + 20_000,
                failures: 4,
                level: 2,
            },
        )]))
        .unwrap();

        let east = ClusterName::new("east").unwrap();
        let w = watched(&[svc(
            "east",
            vec![
                backend("10.1.0.1", "e1", READY),
                backend("10.1.0.2", "e2", READY),
            ],
        )]);
        let pinned = Quarantines::Pinned { root, dir: None };
        let e = explain(&w, "e1", "default/web", &agent_gate(&east), &pinned).unwrap();
        let text = render_explain(&e);
        assert!(e.quarantines_read, "{text}");
        let f = &e.programmed[0];
        assert_eq!(
            f.backends
                .iter()
                .map(|b| b.ip.to_string())
                .collect::<Vec<_>>(),
            ["10.1.0.1"],
            "{text}"
        );
        assert!(
            text.contains("east/10.1.0.2:8080 quarantined on this node for 20s after 4 failed connects: left out")
                || text.contains("east/10.1.0.2:8080 quarantined on this node for 19s after 4 failed connects: left out"),
            "{text}"
        );
        // Another node's explanation on this host: its pins are not here.
        let e = explain(&w, "e2", "default/web", &agent_gate(&east), &pinned).unwrap();
        assert!(
            e.quarantines_not_read
                .as_deref()
                .is_some_and(|w| w.contains("does not run on node \"e2\"")),
            "{:?}",
            e.quarantines_not_read
        );
        dp.close();
    }

    #[test]
    fn explain_names_a_service_missing_locally() {
        let east = ClusterName::new("east").unwrap();
        let services = watched(&[svc("west", vec![backend("10.2.0.1", "w1", READY)])]);
        let gate = agent_gate(&east);
        let err = explain(
            &services,
            "e1",
            "default/web",
            &gate,
            &Quarantines::NotRead("not asked".into()),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("default/web"), "{err}");
        assert!(err.contains("does not exist in cluster east"), "{err}");
        assert!(err.contains("only in west"), "{err}");
        assert!(err.contains("not reachable by ClusterIP"), "{err}");
        let err = explain(
            &services,
            "e1",
            "default/nope",
            &gate,
            &Quarantines::NotRead("not asked".into()),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("does not exist in any cluster"), "{err}");
        assert!(
            explain(
                &services,
                "e1",
                "nope",
                &gate,
                &Quarantines::NotRead("not asked".into())
            )
            .is_err()
        );
    }

    #[test]
    fn explain_names_who_holds_each_frontend_and_what_it_forwards_to() {
        let east = ClusterName::new("east").unwrap();
        let mut a = svc("east", vec![backend("10.1.0.1", "e1", READY)]);
        a.namespace = "a".into();
        a.frontends.push("fd00:96::10".parse().unwrap());
        a.backends.push(backend("fd00:1::1", "e1", READY));
        let mut b = svc("east", vec![backend("10.1.0.2", "e1", READY)]);
        b.namespace = "b".into();
        let w = watched(&[a, b]);
        let gate = agent_gate(&east);

        let e = explain(
            &w,
            "e1",
            "a/web",
            &gate,
            &Quarantines::NotRead("not asked".into()),
        )
        .unwrap();
        let rows: Vec<(&str, bool, &str, Vec<String>)> = e
            .programmed
            .iter()
            .map(|f| {
                let backends = f
                    .backends
                    .iter()
                    .map(|b| SocketAddr::new(b.ip, b.port).to_string())
                    .collect();
                (f.frontend.as_str(), f.held, f.held_by.as_str(), backends)
            })
            .collect();
        // The IPv6 frontend is not shown as programmed: the agent leaves it out (IPv4-only).
        assert_eq!(
            rows,
            [(
                "10.96.0.10:80/TCP",
                true,
                "a/web port \"http\" 80/TCP",
                vec!["10.1.0.1:8080".to_string()]
            ),]
        );
        assert_eq!(e.programmed[0].losers, ["b/web port \"http\" 80/TCP"]);
        assert_eq!(e.programmed[0].other_family, ["east/fd00:1::1:8080"]);
        let text = render_explain(&e);
        assert!(
            text.contains("also claimed by b/web port \"http\" 80/TCP: first Service wins"),
            "{text}"
        );
        assert!(
            text.contains("left out for their address family: east/fd00:1::1:8080"),
            "{text}"
        );

        // The loser: held by a/web, forwarding to a/web's backends, not its own.
        let e = explain(
            &w,
            "e1",
            "b/web",
            &gate,
            &Quarantines::NotRead("not asked".into()),
        )
        .unwrap();
        let f = &e.programmed[0];
        assert!(!f.held);
        assert_eq!(f.held_by, "a/web port \"http\" 80/TCP");
        assert_eq!(f.backends.len(), 1);
        assert_eq!(f.backends[0].ip.to_string(), "10.1.0.1");
        // Its own selection is still shown.
        assert_eq!(e.ports[0].backends[0].address, "10.1.0.2:8080");
        let text = render_explain(&e);
        assert!(
            text.contains(
                "Frontend 10.96.0.10:80/TCP is held by a/web port \"http\" 80/TCP (first Service wins a ClusterIP)"
            ),
            "{text}"
        );
    }

    #[test]
    fn explain_reports_the_sync_gate() {
        let east = ClusterName::new("east").unwrap();
        let mut w = watched(&[
            svc("east", vec![backend("10.1.0.1", "e1", READY)]),
            svc("west", vec![backend("10.2.0.1", "w1", READY)]),
        ]);
        // west never finished its sync: left out, named.
        w.synced.retain(|(c, _)| c != "west");
        let e = explain(
            &w,
            "e1",
            "default/web",
            &agent_gate(&east),
            &Quarantines::NotRead("not asked".into()),
        )
        .unwrap();
        assert_eq!(e.waiting, None);
        assert_eq!(e.clusters_left_out, ["west"]);
        assert_eq!(e.programmed[0].backends.len(), 1, "{e:?}");
        assert!(render_explain(&e).contains("Clusters left out (never synced): west"));

        // The local cluster not synced: the agent waits, and says for what.
        w.synced.clear();
        let e = explain(
            &w,
            "e1",
            "default/web",
            &agent_gate(&east),
            &Quarantines::NotRead("not asked".into()),
        )
        .unwrap();
        assert_eq!(
            e.waiting.as_deref(),
            Some("waiting for the initial sync of cluster east")
        );
        let text = render_explain(&e);
        assert!(
            text.contains("Not programmed yet: waiting for the initial sync of cluster east"),
            "{text}"
        );
    }

    #[test]
    fn list_one_row_per_service_and_cluster() {
        let services = vec![
            svc("west", vec![backend("10.2.0.1", "w1", READY)]),
            svc(
                "east",
                vec![
                    backend("10.1.0.1", "e1", READY),
                    backend("10.1.0.2", "e1", NOT_READY),
                ],
            ),
        ];
        let rows = list_rows(&services);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].cluster, "east");
        assert_eq!((rows[0].ready_backends, rows[0].total_backends), (1, 2));
        let t = list_table(&rows);
        assert!(t.starts_with("SERVICE"), "{t}");
        assert!(
            t.contains("default/web   east      10.96.0.10   80/TCP(http)"),
            "{t}"
        );
        assert!(t.contains("1/2"), "{t}");
    }

    /// The agent's maps and `service explain` agree on generated meshes: the same watch
    /// stream goes to the agent's state (as its watch loop applies it), its sync gate and
    /// `desired::compute`, and to `explain`; every frontend the agent programs is explained
    /// with exactly the backends it programs, and nothing else is.
    mod agreement {
        use std::collections::BTreeSet;

        use mesh_agent::desired::{self, BackendKey};
        use mesh_core::select::Frontend;
        use proptest::prelude::*;

        use super::*;

        const CLUSTERS: [&str; 4] = ["local", "east", "west", "north"];
        const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
        const SERVICES: [(&str, &str); 3] = [("a", "web"), ("b", "web"), ("a", "api")];
        /// Two ports of one protocol and number under different names, to collide.
        const PORTS: [(&str, Protocol, u16); 3] = [
            ("http", Protocol::Tcp, 80),
            ("alt", Protocol::Tcp, 80),
            ("dns", Protocol::Udp, 53),
        ];

        fn vips() -> Vec<IpAddr> {
            ["10.96.0.1", "10.96.0.2", "fd00:96::1"]
                .iter()
                .map(|v| v.parse().unwrap())
                .collect()
        }

        fn conditions() -> impl Strategy<Value = BackendConditions> {
            (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
                |(ready, serving, terminating)| BackendConditions {
                    ready,
                    serving,
                    terminating,
                },
            )
        }

        fn service_ports(target: bool) -> impl Strategy<Value = Vec<ServicePort>> {
            proptest::sample::subsequence(PORTS.to_vec(), 0..=3).prop_flat_map(move |ps| {
                ps.into_iter()
                    .map(|(n, proto, port)| {
                        let ports = if target {
                            8000u16..8003
                        } else {
                            port..port + 1
                        };
                        ports.prop_map(move |p| ServicePort {
                            name: n.into(),
                            protocol: proto,
                            port: p,
                        })
                    })
                    .collect::<Vec<_>>()
            })
        }

        /// Backends of cluster number `c`: a small address pool (duplicates and IPv6
        /// happen; the first cluster's pool overlaps the second's).
        fn backends(c: u8) -> impl Strategy<Value = Vec<Backend>> {
            proptest::collection::vec(
                (
                    0u8..5,
                    any::<bool>(),
                    proptest::sample::select(NODES.to_vec()),
                    conditions(),
                    service_ports(true),
                ),
                0..5,
            )
            .prop_map(move |v| {
                v.into_iter()
                    .map(|(host, v6, node, conditions, ports)| Backend {
                        ip: if v6 {
                            format!("fd00:{}::{host}", c / 2 + 1).parse().unwrap()
                        } else {
                            IpAddr::from([10, c / 2 + 1, 0, host])
                        },
                        ports,
                        node: node.into(),
                        zone: String::new(),
                        conditions,
                    })
                    .collect()
            })
        }

        fn service(
            c: u8,
            ns: &'static str,
            name: &'static str,
        ) -> impl Strategy<Value = GlobalService> {
            (
                any::<bool>(),
                proptest::sample::select(vec![Affinity::None, Affinity::Local, Affinity::Remote]),
                proptest::sample::select(vec![TrafficPolicy::Cluster, TrafficPolicy::Local]),
                service_ports(false),
                proptest::sample::subsequence(vips(), 0..=3),
                backends(c),
            )
                .prop_map(
                    move |(shared, affinity, policy, ports, frontends, backends)| GlobalService {
                        cluster: ClusterName::new(CLUSTERS[usize::from(c)]).unwrap(),
                        namespace: ns.into(),
                        name: name.into(),
                        global: true,
                        shared,
                        affinity,
                        internal_traffic_policy: policy,
                        ports,
                        frontends,
                        backends,
                    },
                )
        }

        /// One cluster: its services (a subset of the pool) and which kinds synced.
        fn cluster(c: u8) -> impl Strategy<Value = (Vec<GlobalService>, Vec<pb::Kind>)> {
            let services = SERVICES.map(|(ns, n)| proptest::option::of(service(c, ns, n)));
            let synced = prop_oneof![
                3 => Just(KINDS.to_vec()),
                1 => proptest::sample::subsequence(KINDS.to_vec(), 0..KINDS.len()),
            ];
            (services, synced).prop_map(|(s, synced)| (s.into_iter().flatten().collect(), synced))
        }

        #[derive(Debug, Clone)]
        struct Mesh {
            clusters: Vec<(Vec<GlobalService>, Vec<pb::Kind>)>,
            node: &'static str,
            deadline_passed: bool,
            programming: bool,
            /// Bit `c * 3 + n`: node `NODES[n]` of cluster `c` not reporting.
            lost_nodes: u16,
            /// Backends the node quarantined: (address pool `c / 2 + 1`, host, port, UDP).
            quarantined: BTreeSet<(u8, u8, u16, bool)>,
        }

        fn mesh() -> impl Strategy<Value = Mesh> {
            (
                proptest::collection::vec(any::<()>(), 1..=4)
                    .prop_flat_map(|v| (0..v.len() as u8).map(cluster).collect::<Vec<_>>()),
                proptest::sample::select(NODES.to_vec()),
                any::<bool>(),
                any::<bool>(),
                0u16..(1 << 12),
                proptest::collection::btree_set(
                    (1u8..=2, 0u8..5, 8000u16..8003, any::<bool>()),
                    0..6,
                ),
            )
                .prop_map(
                    |(clusters, node, deadline_passed, programming, lost_nodes, quarantined)| {
                        Mesh {
                            clusters,
                            node,
                            deadline_passed,
                            programming,
                            lost_nodes,
                            quarantined,
                        }
                    },
                )
        }

        /// The node's quarantines of `mesh`, keyed as the agent keys them.
        fn quarantines<Q>(mesh: &Mesh, q: impl Fn(u64) -> Q) -> BTreeMap<BackendAddr, Q> {
            mesh.quarantined
                .iter()
                .enumerate()
                .map(|(i, &(pool, host, port, udp))| {
                    let addr = BackendAddr {
                        ip: IpAddr::from([10, pool, 0, host]),
                        port,
                        protocol: if udp { Protocol::Udp } else { Protocol::Tcp },
                    };
                    (addr, q(i as u64))
                })
                .collect()
        }

        /// The watch stream an apiserver sends for `mesh`: a snapshot of every service,
        /// then the Synced markers.
        fn stream(mesh: &Mesh) -> Vec<pb::WatchResponse> {
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64;
            // Every node of every cluster, some not reporting (marked by their publisher).
            let nodes = (0..mesh.clusters.len()).flat_map(|c| {
                NODES.iter().enumerate().map(move |(n, node)| {
                    let lost = mesh.lost_nodes & (1 << (c * NODES.len() + n)) != 0;
                    pb::Event {
                        kind: pb::Kind::Node as i32,
                        cluster: CLUSTERS[c].into(),
                        name: (*node).into(),
                        revision: 1,
                        value: Some(pb::event::Value::Node(pb::Node {
                            cluster: CLUSTERS[c].into(),
                            name: (*node).into(),
                            internal_ips: vec![format!("192.168.{c}.{n}")],
                            pod_cidrs: vec![],
                            stale_since_unix_ms: if lost { now_ms - 5_000 } else { 0 },
                        })),
                    }
                })
            });
            let events = mesh
                .clusters
                .iter()
                .flat_map(|(services, _)| services)
                .map(|s| pb::Event {
                    kind: pb::Kind::Service as i32,
                    cluster: s.cluster.to_string(),
                    name: s.key(),
                    revision: 1,
                    value: Some(pb::event::Value::Service(s.into())),
                })
                .chain(nodes)
                .collect();
            let mut msgs = vec![pb::WatchResponse {
                revision: 1,
                payload: Some(pb::watch_response::Payload::Events(pb::Events { events })),
            }];
            for (c, (_, kinds)) in mesh.clusters.iter().enumerate() {
                for kind in kinds {
                    msgs.push(pb::WatchResponse {
                        revision: 1,
                        payload: Some(pb::watch_response::Payload::Synced(pb::Synced {
                            cluster: CLUSTERS[c].into(),
                            kind: *kind as i32,
                        })),
                    });
                }
            }
            msgs
        }

        /// What the agent's watch loop hands its state for `msgs` (as the resumable client
        /// turns them into updates).
        fn updates(msgs: &[pb::WatchResponse]) -> Vec<WatchUpdate> {
            let mut out = Vec::new();
            for m in msgs {
                match &m.payload {
                    Some(pb::watch_response::Payload::Events(evs)) => {
                        for e in &evs.events {
                            out.push(WatchUpdate::Upsert {
                                cluster: ClusterName::new(e.cluster.clone()).unwrap(),
                                kind: pb::Kind::try_from(e.kind).unwrap(),
                                name: e.name.clone(),
                                revision: e.revision,
                                value: e.value.clone().unwrap(),
                            });
                        }
                    }
                    Some(pb::watch_response::Payload::Synced(s)) => {
                        out.push(WatchUpdate::Synced {
                            cluster: ClusterName::new(s.cluster.clone()).unwrap(),
                            kind: pb::Kind::try_from(s.kind).unwrap(),
                        });
                    }
                    _ => unreachable!("the generated stream has only events and markers"),
                }
            }
            out
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn explain_reports_what_the_agent_programs(mesh in mesh()) {
                let local = ClusterName::new("local").unwrap();
                let gate = GateInput {
                    local_cluster: &local,
                    deadline_passed: mesh.deadline_passed,
                    programming: mesh.programming,
                };
                let msgs = stream(&mesh);

                // The agent.
                let mut state = MeshState::new(local.clone());
                for u in updates(&msgs) {
                    let applied = state.apply(u);
                    prop_assert!(!matches!(applied, Applied::Rejected { .. }), "{applied:?}");
                }
                let agent_quarantines = quarantines(&mesh, |i| mesh_core::health::Quarantine {
                    until_ns: 1_000_000_000 * (i + 1),
                    failures: i + 1,
                    level: 1,
                });
                let agent = state.programmable(&gate).map(|clusters| {
                    let mut d = desired::compute(&clusters, &local, mesh.node).0;
                    desired::apply_quarantine(&mut d, &agent_quarantines);
                    d
                });
                // What the node's pinned map holds for the same quarantines.
                let pinned = Quarantines::Given(quarantines(&mesh, |i| QuarantineInfo {
                    until_unix_ms: 4_000_000_000_000 + i,
                    failures: i as u32 + 1,
                }));

                // meshctl.
                let mut watched = Watched::default();
                for m in msgs {
                    prop_assert!(watched.apply(m));
                }
                let mut explained: BTreeMap<String, BTreeSet<(IpAddr, u16)>> = BTreeMap::new();
                for (ns, name) in SERVICES {
                    let key = format!("{ns}/{name}");
                    let exists = mesh.clusters[0].0.iter().any(|s| s.key() == key);
                    let e = match explain(&watched, mesh.node, &key, &gate, &pinned) {
                        Ok(e) => e,
                        Err(err) => {
                            // Only a service that is not local, or whose cluster the gate
                            // leaves out (so the agent has no frontend from it).
                            let err = err.to_string();
                            prop_assert!(
                                !exists || (err.contains("is not synced")
                                    && agent.as_ref().is_ok_and(|d| d.services.is_empty())),
                                "{key}: {err}"
                            );
                            continue;
                        }
                    };
                    prop_assert!(exists, "{key} explained but not local");
                    let waiting = agent.as_ref().err().map(ToString::to_string);
                    prop_assert_eq!(&e.waiting, &waiting);
                    for f in &e.programmed {
                        let backends: BTreeSet<(IpAddr, u16)> =
                            f.backends.iter().map(|b| (b.ip, b.port)).collect();
                        if let Some(before) = explained.insert(f.frontend.clone(), backends.clone()) {
                            // Another service's explanation of the same frontend (a loser's
                            // shows the holder's backends): the same.
                            prop_assert_eq!(before, backends, "{}", f.frontend);
                        }
                    }
                }
                let Ok(desired) = agent else {
                    return Ok(());
                };
                let programmed: BTreeMap<String, BTreeSet<(IpAddr, u16)>> = desired
                    .services
                    .iter()
                    .map(|(k, v)| {
                        let f = Frontend { vip: k.vip, port: k.port, protocol: k.proto };
                        let b: BTreeSet<(IpAddr, u16)> = v
                            .iter()
                            .map(|b: &BackendKey| {
                                assert_eq!(b.proto, k.proto);
                                (b.ip, b.port)
                            })
                            .collect();
                        (f.to_string(), b)
                    })
                    .collect();
                prop_assert_eq!(explained, programmed);
            }
        }
    }
}

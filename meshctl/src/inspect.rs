//! `meshctl inspect [KIND]`: what an apiserver publishes, read over its gRPC Watch: a
//! snapshot of every cluster's nodes, identities, endpoints and global services, and the
//! serving cluster's network policies.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use mesh_proto::convert::WatchedObject;
use mesh_proto::pb::{self, watch_response::Payload};
use serde::Serialize;
use tokio_stream::StreamExt;

use crate::conn::ConnArgs;
use crate::output::{Format, table};
use crate::status::kind_name;
use mesh_core::parse_duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum What {
    All,
    Clusters,
    Nodes,
    Identities,
    Endpoints,
    Services,
    Policies,
}

#[derive(Args)]
pub struct InspectArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// What to show.
    #[arg(value_enum, default_value_t = What::All)]
    what: What,
    /// Only these clusters (repeatable; default: all the caller may read).
    #[arg(long = "from", value_name = "CLUSTER")]
    from: Vec<String>,
    /// Give up waiting for the snapshot after this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

/// Objects by kind, each sorted by (cluster, name).
#[derive(Serialize, Default, Debug)]
pub struct Snapshot {
    pub revision: i64,
    pub clusters: Vec<mesh_core::ClusterConfig>,
    pub nodes: Vec<mesh_core::Node>,
    pub identities: Vec<IdentityRow>,
    pub endpoints: Vec<EndpointRow>,
    pub services: Vec<mesh_core::GlobalService>,
    /// Network policies (only the serving cluster's own: peers never serve theirs).
    pub policies: Vec<mesh_core::policy::PolicyRef>,
    /// (cluster, kind) pairs whose initial sync was not complete.
    pub unsynced: Vec<String>,
    /// Values that could not be decoded, with the reason.
    pub invalid: Vec<String>,
}

#[derive(Serialize, Debug)]
pub struct IdentityRow {
    pub cluster: String,
    #[serde(flatten)]
    pub identity: mesh_core::model::Identity,
}

#[derive(Serialize, Debug)]
pub struct EndpointRow {
    pub cluster: String,
    #[serde(flatten)]
    pub endpoint: mesh_core::Endpoint,
}

/// What one read of the Watch stream delivered: the objects as they stand after it, and
/// the `Synced` markers received. [`Watched::apply`] is fed the stream's messages in order.
#[derive(Debug, Default)]
pub struct Watched {
    pub revision: i64,
    /// Values by (cluster, kind, name) as sent (not yet decoded).
    pub objects: BTreeMap<(String, i32, String), pb::event::Value>,
    /// (cluster, kind) whose `Synced` marker arrived.
    pub synced: BTreeSet<(String, i32)>,
}

// === impl Watched ===

impl Watched {
    /// Applies one message; `false` once the server is idle (a `Progress` heartbeat: the
    /// snapshot is over, and what has not synced will not soon).
    pub fn apply(&mut self, msg: pb::WatchResponse) -> bool {
        self.revision = msg.revision;
        match msg.payload {
            Some(Payload::Events(evs)) => {
                for e in evs.events {
                    let key = (e.cluster, e.kind, e.name);
                    match e.value {
                        Some(v) => self.objects.insert(key, v),
                        None => self.objects.remove(&key),
                    };
                }
            }
            Some(Payload::Synced(s)) => {
                self.synced.insert((s.cluster, s.kind));
            }
            Some(Payload::Progress(_)) => return false,
            Some(Payload::Reset(_)) => {
                self.objects.clear();
                self.synced.clear();
            }
            None => {}
        }
        true
    }
}

/// Reads the Watch stream until each (cluster, kind) the apiserver reports as synced has sent
/// its Synced marker (or the server goes idle, or the timeout passes). Returns what was read
/// and the (cluster, kind) pairs still expected.
pub async fn read_watch(
    conn: &ConnArgs,
    clusters: Vec<String>,
    timeout: Duration,
) -> anyhow::Result<(Watched, BTreeSet<(String, i32)>)> {
    let mut client = conn.connect().await?;
    let status = client
        .status(pb::StatusRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("status from {}: {}", conn.server, s.message()))?
        .into_inner();
    let mut expected: BTreeSet<(String, i32)> = status
        .clusters
        .iter()
        .filter(|c| clusters.is_empty() || clusters.contains(&c.cluster))
        .flat_map(|c| {
            c.counts
                .iter()
                .filter(|k| k.synced)
                .map(|k| (c.cluster.clone(), k.kind))
                .collect::<Vec<_>>()
        })
        .collect();
    let mut stream = client
        .watch(pb::WatchRequest {
            clusters,
            kinds: vec![],
            resume_revision: 0,
            heartbeat_interval_ms: 0,
        })
        .await
        .map_err(|s| anyhow::anyhow!("watch on {}: {}", conn.server, s.message()))?
        .into_inner();

    let mut watched = Watched::default();
    let read = async {
        while !expected.is_empty() {
            let Some(msg) = stream.next().await else {
                anyhow::bail!("the apiserver closed the watch before the snapshot was complete");
            };
            let msg = msg.map_err(|s| anyhow::anyhow!("watch: {}", s.message()))?;
            if let Some(Payload::Synced(s)) = &msg.payload {
                expected.remove(&(s.cluster.clone(), s.kind));
            }
            if !watched.apply(msg) {
                break;
            }
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(r) => r?,
        Err(_) => eprintln!("warning: snapshot not complete after {timeout:?}"),
    }
    Ok((watched, expected))
}

/// Reads a snapshot: every object, until each (cluster, kind) the apiserver reports as
/// synced has sent its Synced marker (or the timeout passes).
pub async fn snapshot(
    conn: &ConnArgs,
    clusters: Vec<String>,
    timeout: Duration,
) -> anyhow::Result<Snapshot> {
    let (watched, expected) = read_watch(conn, clusters, timeout).await?;
    let mut snap = Snapshot {
        revision: watched.revision,
        ..Snapshot::default()
    };
    snap.unsynced = expected
        .iter()
        .map(|(c, k)| format!("{c}/{}", kind_name(*k)))
        .collect();
    for ((cluster, _, name), value) in watched.objects {
        match WatchedObject::try_from(value) {
            Ok(WatchedObject::Config(c)) => snap.clusters.push(c),
            Ok(WatchedObject::Node(n)) => snap.nodes.push(n),
            Ok(WatchedObject::Identity(identity)) => {
                snap.identities.push(IdentityRow { cluster, identity })
            }
            Ok(WatchedObject::Endpoint(endpoint)) => {
                snap.endpoints.push(EndpointRow { cluster, endpoint })
            }
            Ok(WatchedObject::Service(s)) => snap.services.push(s),
            Ok(WatchedObject::Policy(p)) => snap.policies.push(p.policy.reference),
            // A peer's link state is shown by `meshctl status` (stale for ...).
            Ok(WatchedObject::Link(_)) => {}
            Err(e) => snap.invalid.push(format!("{cluster}/{name}: {e}")),
        }
    }
    Ok(snap)
}

pub fn render(snap: &Snapshot, what: What) -> String {
    let mut out = String::new();
    let mut section = |title: &str, header: &[&str], rows: Vec<Vec<String>>| {
        if what == What::All {
            out.push_str(&format!("{title}:\n"));
        }
        if rows.is_empty() {
            out.push_str("  (none)\n");
        } else {
            out.push_str(&table(header, &rows));
        }
        if what == What::All {
            out.push('\n');
        }
    };
    let show = |w: What| what == What::All || what == w;
    if show(What::Clusters) {
        let rows = snap
            .clusters
            .iter()
            .map(|c| {
                vec![
                    c.name.to_string(),
                    c.id.to_string(),
                    join(&c.pod_cidrs),
                    c.service_cidr
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| "-".into()),
                    c.version.clone(),
                ]
            })
            .collect();
        section(
            "Clusters",
            &["CLUSTER", "ID", "POD CIDRS", "SERVICE CIDR", "VERSION"],
            rows,
        );
    }
    if show(What::Nodes) {
        let rows = snap
            .nodes
            .iter()
            .map(|n| {
                vec![
                    n.cluster.to_string(),
                    n.name.clone(),
                    join(&n.internal_ips),
                    join(&n.pod_cidrs),
                ]
            })
            .collect();
        section(
            "Nodes",
            &["CLUSTER", "NODE", "INTERNAL IPS", "POD CIDRS"],
            rows,
        );
    }
    if show(What::Identities) {
        let rows = snap
            .identities
            .iter()
            .map(|i| {
                vec![
                    i.cluster.clone(),
                    i.identity.id.to_string(),
                    i.identity.labels.iter().collect::<Vec<_>>().join(" "),
                ]
            })
            .collect();
        section("Identities", &["CLUSTER", "ID", "LABELS"], rows);
    }
    if show(What::Endpoints) {
        let rows = snap
            .endpoints
            .iter()
            .map(|e| {
                let ep = &e.endpoint;
                vec![
                    e.cluster.clone(),
                    ep.ip.to_string(),
                    ep.identity.to_string(),
                    ep.host_ip
                        .map(|h| h.to_string())
                        .unwrap_or_else(|| "-".into()),
                    ep.node.clone(),
                    format!("{}/{}", ep.namespace, ep.pod),
                ]
            })
            .collect();
        section(
            "Endpoints",
            &["CLUSTER", "IP", "IDENTITY", "HOST IP", "NODE", "POD"],
            rows,
        );
    }
    if show(What::Services) {
        let rows = snap
            .services
            .iter()
            .map(|s| {
                let ready = s.backends.iter().filter(|b| b.conditions.ready).count();
                vec![
                    s.cluster.to_string(),
                    s.key(),
                    if s.shared { "yes".into() } else { "no".into() },
                    s.affinity.to_string(),
                    s.internal_traffic_policy.to_string(),
                    join(&s.frontends),
                    s.ports
                        .iter()
                        .map(|p| {
                            if p.name.is_empty() {
                                format!("{}/{}", p.port, p.protocol)
                            } else {
                                format!("{}:{}/{}", p.name, p.port, p.protocol)
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(","),
                    format!("{ready}/{}", s.backends.len()),
                ]
            })
            .collect();
        section(
            "Global services",
            &[
                "CLUSTER",
                "SERVICE",
                "SHARED",
                "AFFINITY",
                "TRAFFIC POLICY",
                "FRONTENDS",
                "PORTS",
                "READY/BACKENDS",
            ],
            rows,
        );
    }
    if show(What::Policies) {
        let rows = snap
            .policies
            .iter()
            .map(|p| vec![p.cluster.to_string(), p.kind.to_string(), p.object()])
            .collect();
        section("Network policies", &["CLUSTER", "KIND", "POLICY"], rows);
    }
    if !snap.unsynced.is_empty() {
        out.push_str(&format!("Not synced yet: {}\n", snap.unsynced.join(", ")));
    }
    for i in &snap.invalid {
        out.push_str(&format!("Invalid value skipped: {i}\n"));
    }
    out
}

fn join<T: ToString>(items: &[T]) -> String {
    if items.is_empty() {
        return "-".into();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

pub async fn run(args: InspectArgs) -> anyhow::Result<()> {
    let snap = snapshot(&args.conn, args.from.clone(), args.timeout)
        .await
        .context("reading the apiserver's snapshot")?;
    match args.output {
        Format::Table => print!("{}", render(&snap, args.what)),
        Format::Json => println!("{}", serde_json::to_string_pretty(&snap)?),
        Format::Yaml => print!("{}", serde_yaml::to_string(&snap)?),
    }
    Ok(())
}

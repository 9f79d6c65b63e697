//! `meshctl bpf lb list`, `meshctl bpf ipcache list|get IP` and `meshctl flows`: what is in a
//! node's pinned maps (DESIGN.md section 9), read-only, like `cilium bpf lb list`. Run on the
//! node, as root.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use ipnet::IpNet;
use mesh_maps::policy::{PolicyCounterKey, PolicyDump, PolicyMaps};
use mesh_maps::sys::Access;
use mesh_maps::{
    DatapathDump, FlowCounters, PROTO_TCP, PROTO_UDP, PinnedMaps, layout, open_pinned_readonly,
};
use serde::Serialize;

use crate::output::{Format, table};

#[derive(Args, Clone)]
pub struct PinArgs {
    /// The node's pin directory (holds `maps/`); overrides --bpffs-root and --node.
    #[arg(long)]
    bpffs_dir: Option<PathBuf>,
    /// Where nodes' pin directories are: `--node N` reads `<root>/<N>`. In a mesh-lab lab,
    /// `eval "$(mesh-lab env CLUSTER)"` sets it to `/sys/fs/bpf/mesh-lab/<LAB>/<CLUSTER>`.
    #[arg(long, env = "MESH_BPFFS_ROOT", default_value = "/sys/fs/bpf/mesh")]
    bpffs_root: PathBuf,
    /// The node whose maps to read (its pin directory under --bpffs-root).
    #[arg(long, env = "NODE_NAME")]
    node: Option<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

impl PinArgs {
    fn dir(&self) -> anyhow::Result<PathBuf> {
        Ok(match (&self.bpffs_dir, &self.node) {
            (Some(d), _) => d.clone(),
            (None, Some(n)) => self.bpffs_root.join(n),
            (None, None) => anyhow::bail!("give --node NAME (or --bpffs-dir DIR)"),
        })
    }

    /// The node's policy maps, read-only.
    fn open_policy(&self) -> anyhow::Result<PolicyMaps> {
        let dir = self.dir()?;
        PolicyMaps::open_pinned(&dir.join("maps"), Access::ReadOnly)
            .with_context(|| format!("opening the pinned policy maps under {}", dir.display()))
    }

    fn open(&self) -> anyhow::Result<PinnedMaps> {
        let dir = self.dir()?;
        open_pinned_readonly(&dir).with_context(|| {
            let mut msg = format!("opening the pinned maps under {}", dir.display());
            if self.bpffs_dir.is_none() {
                let nodes = node_dirs(&self.bpffs_root);
                msg += &if nodes.is_empty() {
                    format!(
                        "; no node pin directories under {} (in a lab: eval \"$(mesh-lab env CLUSTER)\" sets MESH_BPFFS_ROOT)",
                        self.bpffs_root.display()
                    )
                } else {
                    format!(
                        "; nodes under {}: {}",
                        self.bpffs_root.display(),
                        nodes.join(", ")
                    )
                };
            }
            msg
        })
    }
}

/// The node directories under a bpffs root (those holding `maps/`), sorted.
fn node_dirs(root: &std::path::Path) -> Vec<String> {
    let mut nodes: Vec<String> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("maps").is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    nodes.sort();
    nodes
}

#[derive(Subcommand)]
pub enum BpfCommand {
    /// Load-balancing maps: frontends and their backends.
    #[command(subcommand)]
    Lb(LbCommand),
    /// The ipcache: prefix -> identity, tunnel endpoint, cluster.
    #[command(subcommand)]
    Ipcache(IpcacheCommand),
    /// The network-policy maps: each local identity's verdict entries and counters.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Every policy entry of every local identity, with the rule and its counter.
    List(PinArgs),
}

#[derive(Subcommand)]
pub enum LbCommand {
    /// Every frontend with its backends.
    List(PinArgs),
}

#[derive(Subcommand)]
pub enum IpcacheCommand {
    /// Every prefix.
    List(PinArgs),
    /// The entry an address matches (longest prefix).
    Get {
        ip: Ipv4Addr,
        #[command(flatten)]
        pin: PinArgs,
    },
}

pub fn run(cmd: BpfCommand) -> anyhow::Result<()> {
    match cmd {
        BpfCommand::Lb(LbCommand::List(p)) => {
            let maps = p.open()?;
            let mut rows = lb_rows(&maps.dump()?);
            rows.extend(quarantine_rows(&maps.quarantines()?));
            emit(p.output, &rows, || {
                let cells: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        let cluster = r.cluster_id.map_or("-".into(), |c| c.to_string());
                        vec![r.service.clone(), r.backend.clone(), cluster]
                    })
                    .collect();
                table(
                    &["SERVICE ADDRESS", "BACKEND ADDRESS", "CLUSTER ID"],
                    &cells,
                )
            })
        }
        BpfCommand::Policy(PolicyCommand::List(p)) => {
            let maps = p.open_policy()?;
            let rows = policy_rows(&maps.dump()?, &maps.counters()?);
            emit(p.output, &rows, || policy_table(&rows))
        }
        BpfCommand::Ipcache(IpcacheCommand::List(p)) => {
            let rows = ipcache_rows(&p.open()?.dump()?);
            emit(p.output, &rows, || ipcache_table(&rows))
        }
        BpfCommand::Ipcache(IpcacheCommand::Get { ip, pin }) => {
            let rows = ipcache_rows(&pin.open()?.dump()?);
            let best = rows
                .into_iter()
                .filter(|r| {
                    r.prefix
                        .parse::<IpNet>()
                        .is_ok_and(|n| n.contains(&std::net::IpAddr::V4(ip)))
                })
                .max_by_key(|r| {
                    r.prefix
                        .parse::<IpNet>()
                        .map(|n| n.prefix_len())
                        .unwrap_or(0)
                });
            let Some(best) = best else {
                anyhow::bail!("{ip} matches no ipcache entry (identity world)");
            };
            let rows = vec![best];
            emit(pin.output, &rows, || ipcache_table(&rows))
        }
    }
}

pub fn run_flows(p: PinArgs) -> anyhow::Result<()> {
    let flows = p.open()?.flows()?;
    let rows: Vec<FlowRow> = flows
        .iter()
        .map(|(k, v)| FlowRow {
            src_identity: k.src,
            dst_identity: k.dst,
            packets: v.packets,
            bytes: v.bytes,
        })
        .collect();
    emit(p.output, &rows, || {
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.src_identity.to_string(),
                    r.dst_identity.to_string(),
                    r.packets.to_string(),
                    r.bytes.to_string(),
                ]
            })
            .collect();
        table(
            &["SRC IDENTITY", "DST IDENTITY", "PACKETS", "BYTES"],
            &cells,
        )
    })
}

fn emit<T: Serialize>(
    format: Format,
    rows: &T,
    table: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    match format {
        Format::Table => print!("{}", table()),
        Format::Json => println!("{}", serde_json::to_string_pretty(rows)?),
        Format::Yaml => print!("{}", serde_yaml::to_string(rows)?),
    }
    Ok(())
}

#[derive(Serialize, Debug)]
pub struct LbRow {
    /// `vip:port/proto`
    pub service: String,
    /// `ip:port (backend id)`, or `N (master)` / `(refused: no backend)`.
    pub backend: String,
    pub slot: u16,
    pub backend_id: Option<u32>,
    /// The backend's cluster (its ClusterId: the maps hold no names, and reading them from
    /// an apiserver would make this command need one).
    pub cluster_id: Option<u16>,
    /// Set on the rows of quarantined backends (passive health).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quarantined_until_unix_ms: Option<u64>,
}

/// One row per service slot: the master entry (with its count, or "refused" when 0), then
/// each backend slot with the backend's address, id and cluster id.
pub fn lb_rows(dump: &DatapathDump) -> Vec<LbRow> {
    dump.services
        .iter()
        .map(|(k, v)| {
            let service = format!("{}:{}/{}", k.vip, k.port, proto_name(k.proto));
            if k.slot == 0 {
                let backend = if v.count == 0 {
                    "0 (master): refused, no backend".to_string()
                } else {
                    format!("{} (master)", v.count)
                };
                return LbRow {
                    service,
                    backend,
                    slot: 0,
                    backend_id: None,
                    cluster_id: None,
                    quarantined_until_unix_ms: None,
                };
            }
            let backend = match dump.backends.get(&v.backend_id) {
                Some(b) => format!("{}:{} ({})", b.ip, b.port, v.backend_id),
                None => format!("missing backend ({})", v.backend_id),
            };
            LbRow {
                service,
                backend,
                slot: k.slot,
                backend_id: Some(v.backend_id),
                cluster_id: dump.backends.get(&v.backend_id).map(|b| b.cluster_id),
                quarantined_until_unix_ms: None,
            }
        })
        .collect()
}

/// One row per backend the node's agent quarantined (passive health): out of every
/// service slot until `quarantined_until_unix_ms`.
pub fn quarantine_rows(q: &[mesh_maps::QuarantinedBackend]) -> Vec<LbRow> {
    q.iter()
        .map(|b| {
            let until = chrono_like_utc(b.until_unix_ms);
            LbRow {
                service: "(quarantined on this node)".into(),
                backend: format!(
                    "{}:{}/{} until {until} ({} failed connects)",
                    b.ip,
                    b.port,
                    proto_name(b.proto),
                    b.failures
                ),
                slot: 0,
                backend_id: None,
                cluster_id: None,
                quarantined_until_unix_ms: Some(b.until_unix_ms),
            }
        })
        .collect()
}

/// `HH:MM:SSZ` of a Unix time in milliseconds (UTC).
fn chrono_like_utc(ms: u64) -> String {
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02}Z", (s / 3600) % 24, (s / 60) % 60, s % 60)
}

#[derive(Serialize, Debug)]
pub struct IpcacheRow {
    pub prefix: String,
    pub identity: u32,
    pub tunnel_endpoint: Option<Ipv4Addr>,
    pub cluster_id: u16,
    pub flags: u32,
}

pub fn ipcache_rows(dump: &DatapathDump) -> Vec<IpcacheRow> {
    dump.ipcache
        .iter()
        .map(|(net, v)| IpcacheRow {
            prefix: net.to_string(),
            identity: v.identity,
            tunnel_endpoint: v.tunnel_endpoint,
            cluster_id: v.cluster_id,
            flags: v.flags,
        })
        .collect()
}

fn ipcache_table(rows: &[IpcacheRow]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.prefix.clone(),
                r.identity.to_string(),
                r.tunnel_endpoint
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| "-".into()),
                r.cluster_id.to_string(),
                format!("{:#x}", r.flags),
            ]
        })
        .collect();
    table(
        &[
            "PREFIX",
            "IDENTITY",
            "TUNNEL ENDPOINT",
            "CLUSTER ID",
            "FLAGS",
        ],
        &cells,
    )
}

#[derive(Serialize, Debug)]
pub struct FlowRow {
    pub src_identity: u32,
    pub dst_identity: u32,
    pub packets: u64,
    pub bytes: u64,
}

/// One row of `meshctl bpf policy list`.
#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct PolicyRow {
    pub identity: u32,
    pub direction: &'static str,
    /// Default deny in this direction.
    pub enforced: bool,
    /// Remote identity; None = any.
    pub remote: Option<u32>,
    /// `8080/TCP`, `0-65535/ANY`, ...
    pub port: String,
    pub verdict: &'static str,
    /// The rule's name, or `default deny`.
    pub rule: String,
    /// Connections (egress) or first packets (ingress) counted with this verdict.
    pub packets: u64,
}

fn proto_name(p: u8) -> String {
    match p {
        0 => "ANY".into(),
        PROTO_TCP => "TCP".into(),
        PROTO_UDP => "UDP".into(),
        132 => "SCTP".into(),
        n => n.to_string(),
    }
}

/// The rows of `bpf policy list`: each endpoint's entries (per direction, from its table),
/// then the default-deny verdicts counted for it.
pub fn policy_rows(
    dump: &PolicyDump,
    counters: &std::collections::BTreeMap<PolicyCounterKey, FlowCounters>,
) -> Vec<PolicyRow> {
    let count = |local: u32, dir: u8, remote: Option<u32>, rule: u32, verdict: u8| -> u64 {
        counters
            .iter()
            .filter(|(k, _)| {
                k.local == local
                    && k.direction == dir
                    && k.rule == rule
                    && k.verdict == verdict
                    && remote.is_none_or(|r| r == k.remote)
            })
            .map(|(_, c)| c.packets)
            .sum()
    };
    let mut rows = Vec::new();
    for (&identity, ep) in &dump.endpoints {
        for (dir, name, table, flag) in [
            (
                layout::DIRECTION_INGRESS,
                "ingress",
                ep.ingress_table,
                layout::POLICY_F_INGRESS_ENFORCED,
            ),
            (
                layout::DIRECTION_EGRESS,
                "egress",
                ep.egress_table,
                layout::POLICY_F_EGRESS_ENFORCED,
            ),
        ] {
            let enforced = ep.flags & flag != 0;
            if table != 0 {
                for (k, v) in dump.entries.range(
                    mesh_maps::policy::PolicyEntryKey {
                        table,
                        remote: 0,
                        proto: 0,
                        port: 0,
                        prefix_len: 0,
                    }..,
                ) {
                    if k.table != table {
                        break;
                    }
                    let span = 1u32 << (16 - u32::from(k.prefix_len));
                    let last = u32::from(k.port) + span - 1;
                    let port = if span == 1 {
                        k.port.to_string()
                    } else {
                        format!("{}-{last}", k.port)
                    };
                    let remote = (k.remote != 0).then_some(k.remote);
                    rows.push(PolicyRow {
                        identity,
                        direction: name,
                        enforced,
                        remote,
                        port: format!("{port}/{}", proto_name(k.proto)),
                        verdict: if v.verdict == layout::VERDICT_DENY {
                            "deny"
                        } else {
                            "allow"
                        },
                        rule: dump
                            .rules
                            .get(&v.rule)
                            .cloned()
                            .unwrap_or_else(|| format!("rule {:#x}", v.rule)),
                        packets: count(identity, dir, remote, v.rule, v.verdict),
                    });
                }
            }
            if enforced {
                rows.push(PolicyRow {
                    identity,
                    direction: name,
                    enforced,
                    remote: None,
                    port: "0-65535/ANY".into(),
                    verdict: "deny",
                    rule: "default deny".into(),
                    packets: count(identity, dir, None, layout::RULE_NONE, layout::VERDICT_DENY),
                });
            }
        }
    }
    rows
}

fn policy_table(rows: &[PolicyRow]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.identity.to_string(),
                r.direction.to_owned(),
                if r.enforced { "yes" } else { "no" }.to_owned(),
                r.remote.map_or("any".into(), |i| i.to_string()),
                r.port.clone(),
                r.verdict.to_owned(),
                r.packets.to_string(),
                r.rule.clone(),
            ]
        })
        .collect();
    table(
        &[
            "IDENTITY",
            "DIRECTION",
            "DEFAULT DENY",
            "REMOTE",
            "PORT",
            "VERDICT",
            "PACKETS",
            "RULE",
        ],
        &cells,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarantined_backends_are_listed_with_their_end_and_failures() {
        let rows = quarantine_rows(&[mesh_maps::QuarantinedBackend {
            ip: Ipv4Addr::new(10, 1, 1, 11),
            port: 8080,
            proto: PROTO_TCP,
            // 1970-01-02 03:04:05 UTC
            until_unix_ms: ((24 + 3) * 3600 + 4 * 60 + 5) * 1000,
            failures: 3,
            level: 1,
        }]);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].service, "(quarantined on this node)");
        assert_eq!(
            rows[0].backend,
            "10.1.1.11:8080/TCP until 03:04:05Z (3 failed connects)"
        );
        let json = serde_json::to_value(&rows[0]).unwrap();
        assert_eq!(json["quarantined_until_unix_ms"], 97_445_000);
        // Slot rows do not carry the field.
        let dump = DatapathDump::default();
        assert!(lb_rows(&dump).is_empty());
    }
}

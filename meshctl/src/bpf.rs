//! `meshctl bpf lb list`, `meshctl bpf ipcache list|get IP` and `meshctl flows`: what is in a
//! node's pinned maps (DESIGN.md section 9), read-only, like `cilium bpf lb list`. Run on the
//! node, as root.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use ipnet::IpNet;
use mesh_maps::{DatapathDump, PROTO_TCP, PROTO_UDP, PinnedMaps, open_pinned_readonly};
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
    fn open(&self) -> anyhow::Result<PinnedMaps> {
        let dir = match (&self.bpffs_dir, &self.node) {
            (Some(d), _) => d.clone(),
            (None, Some(n)) => self.bpffs_root.join(n),
            (None, None) => anyhow::bail!("give --node NAME (or --bpffs-dir DIR)"),
        };
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
            let rows = lb_rows(&p.open()?.dump()?);
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
}

fn proto_name(p: u8) -> String {
    match p {
        PROTO_TCP => "TCP".into(),
        PROTO_UDP => "UDP".into(),
        other => other.to_string(),
    }
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
            }
        })
        .collect()
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

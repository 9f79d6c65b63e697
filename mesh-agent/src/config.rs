//! Command line and environment configuration of mesh-agent.
//!
//! Every flag has a `MESH_*` environment fallback. [`Args::validate`] turns the raw flags into
//! [`Settings`], with errors that name the flag and the value.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use mesh_core::{ClusterName, parse_duration};
use mesh_proto::tls::{ClientEndpoint, ClientTls, TlsError};

/// Errors in the configuration. Each names the flag and the offending value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--cluster-name: {0}")]
    ClusterName(#[source] mesh_core::Error),
    #[error("--node-name {0:?}: must be non-empty, without '/', at most 253 characters")]
    NodeName(String),
    #[error(
        "TLS is required: pass --tls-ca, --tls-cert and --tls-key (missing: {missing}), or \
         --insecure to reach a mesh-apiserver on a loopback address in plaintext"
    )]
    MissingTls { missing: String },
    #[error("TLS material for --apiserver {address}: {source}")]
    Tls {
        address: String,
        #[source]
        source: TlsError,
    },
    #[error("{flag}: must be greater than zero")]
    Zero { flag: &'static str },
    #[error(
        "--hubble-advertise-address is required when --hubble-listen-address {0} is a \
         wildcard address: the relay needs an address it can dial"
    )]
    HubbleAdvertise(SocketAddr),
}

pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// How the agent routes traffic to pods on other nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Routing {
    /// A route per remote pod CIDR via its node's IP (netlink, in the agent's network
    /// namespace).
    #[default]
    Native,
    /// Something else routes pod traffic; the agent installs no route.
    None,
}

pub use mesh_proto::cli::{LogArgs, LogFormat};

/// mesh-agent: watches the local mesh-apiserver and programs the node's eBPF maps.
#[derive(Debug, Clone, Parser)]
#[command(name = "mesh-agent", version, about)]
pub struct Args {
    /// Name of this node (as in the cluster's Node objects).
    #[arg(long, env = "MESH_NODE_NAME")]
    pub node_name: String,

    /// Name of this node's cluster.
    #[arg(long, env = "MESH_CLUSTER_NAME")]
    pub cluster_name: String,

    /// Address (`host:port`) of the local mesh-apiserver.
    #[arg(long, env = "MESH_APISERVER")]
    pub apiserver: String,

    /// Name the apiserver's certificate is verified against (default: the host of
    /// --apiserver).
    #[arg(long, env = "MESH_APISERVER_SERVER_NAME")]
    pub apiserver_server_name: Option<String>,

    /// The agent's certificate is `spiffe://<cluster>.mesh/agent/<node>`; `--insecure` talks
    /// plaintext to an apiserver on a loopback address.
    #[command(flatten)]
    pub tls: mesh_proto::cli::TlsArgs,

    /// cgroup v2 directory whose processes get socket load balancing.
    #[arg(long, env = "MESH_CGROUP_PATH", default_value = "/sys/fs/cgroup")]
    pub cgroup_path: PathBuf,

    /// bpffs directory for this node's pinned maps and links
    /// (default `/sys/fs/bpf/mesh/<node>`).
    #[arg(long, env = "MESH_BPFFS_DIR")]
    pub bpffs_dir: Option<PathBuf>,

    /// Interface to count flows per identity pair on (ingress and egress).
    #[arg(long, env = "MESH_FLOW_IFACE")]
    pub flow_iface: Option<String>,

    /// Serve Hubble's Observer API (this node's flows) on this address, with mutual TLS and
    /// the node certificate (it must carry serverAuth: `meshctl cert issue --agent` does).
    /// Off when unset. Plaintext only with --insecure, on loopback.
    #[arg(long, env = "MESH_HUBBLE_LISTEN_ADDRESS")]
    pub hubble_listen_address: Option<SocketAddr>,

    /// The `host:port` the apiserver's relay dials to reach this node's Observer API
    /// (default: --hubble-listen-address, when it is not a wildcard address).
    #[arg(long, env = "MESH_HUBBLE_ADVERTISE_ADDRESS")]
    pub hubble_advertise_address: Option<String>,

    /// Flows the node keeps for GetFlows (Hubble's ring size).
    #[arg(
        long,
        env = "MESH_HUBBLE_EVENT_BUFFER_CAPACITY",
        default_value_t = 4095
    )]
    pub hubble_event_buffer_capacity: usize,

    /// Flow records per second per CPU the datapath may write (new connections and drops);
    /// 0 turns flow events off. Records over the rate are counted as lost.
    #[arg(long, env = "MESH_FLOW_EVENT_RATE", default_value_t = 20_000)]
    pub flow_event_rate: u32,

    /// Flow records a CPU may write in a burst above the rate.
    #[arg(long, env = "MESH_FLOW_EVENT_BURST", default_value_t = 2_000)]
    pub flow_event_burst: u32,

    /// How often the datapath's per-backend connect counters are read (passive health).
    #[arg(long, env = "MESH_HEALTH_INTERVAL", default_value = "200ms", value_parser = parse_duration)]
    pub health_interval: Duration,

    /// The first quarantine of a backend whose connects fail; each further one in a row
    /// doubles, up to --quarantine-max.
    #[arg(long, env = "MESH_QUARANTINE_BASE", default_value = "2s", value_parser = parse_duration)]
    pub quarantine_base: Duration,

    /// The longest quarantine.
    #[arg(long, env = "MESH_QUARANTINE_MAX", default_value = "60s", value_parser = parse_duration)]
    pub quarantine_max: Duration,

    /// When a TCP backend's quarantine period is over, the agent connects to it itself; the
    /// quarantine ends only when that probe connects within this time (else the next,
    /// doubled period starts), so no client connect is spent on a dead backend.
    #[arg(long, env = "MESH_QUARANTINE_PROBE_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub quarantine_probe_timeout: Duration,

    /// Routing mode.
    #[arg(long, env = "MESH_ROUTING", value_enum, default_value_t = Routing::Native)]
    pub routing: Routing,

    /// /metrics, /healthz, /readyz listen address.
    #[arg(long, env = "MESH_METRICS_LISTEN", default_value = "127.0.0.1:9964")]
    pub metrics_listen: SocketAddr,

    /// How often the agent reports its status to the apiserver.
    #[arg(long, env = "MESH_STATUS_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub status_interval: Duration,

    /// The longest a watch update waits for others to be applied with it. After a reconcile
    /// the agent cools down for 4x its duration (at least 1 ms), at most this: a change after the cool-down
    /// reconciles at once, changes during it wait for its end together (`pace.rs`).
    #[arg(long, env = "MESH_DEBOUNCE", default_value = "5ms", value_parser = parse_duration)]
    pub debounce: Duration,

    /// Re-read the maps from the kernel and repair any drift this often.
    #[arg(long, env = "MESH_RESYNC_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub resync_interval: Duration,

    /// After this long, the agent programs the clusters that are synced even if some
    /// cluster it has seen data of is not (the local cluster must always be synced).
    #[arg(long, env = "MESH_INITIAL_SYNC_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub initial_sync_timeout: Duration,

    /// The apiserver's watch heartbeat interval (no message for three: reconnect).
    #[arg(long, env = "MESH_HEARTBEAT_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,

    /// Record every message the watch client receives and every update it delivers to this
    /// file (for tests: the watch-history checker reads it; see `mesh_proto::record`).
    #[arg(long, env = "MESH_WATCH_RECORD", hide = true)]
    pub watch_record: Option<PathBuf>,

    #[command(flatten)]
    pub log: LogArgs,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node: String,
    pub cluster: ClusterName,
    pub endpoint: ClientEndpoint,
    pub pin_dir: PathBuf,
    pub cgroup_path: PathBuf,
    pub flow_iface: Option<String>,
    pub routing: Routing,
    pub metrics_listen: SocketAddr,
    pub status_interval: Duration,
    pub debounce: Duration,
    pub resync_interval: Duration,
    pub initial_sync_timeout: Duration,
    pub heartbeat_interval: Duration,
    /// `--watch-record`.
    pub watch_record: Option<PathBuf>,
    pub flows: FlowConfig,
    pub health_interval: Duration,
    pub health: mesh_core::health::HealthConfig,
    /// `--quarantine-probe-timeout`.
    pub probe_timeout: Duration,
}

/// Flow visibility settings.
#[derive(Debug, Clone)]
pub struct FlowConfig {
    /// Where to serve the Observer API, and the address the relay dials.
    pub listen: Option<(SocketAddr, String)>,
    /// The Observer server's TLS (the node certificate); `None` with --insecure.
    pub tls: Option<mesh_proto::tls::ServerTlsFiles>,
    pub capacity: usize,
    pub rate: u32,
    pub burst: u32,
}

// === impl Args ===

impl Args {
    pub fn validate(&self) -> Result<Settings> {
        let cluster: ClusterName = self
            .cluster_name
            .parse()
            .map_err(ConfigError::ClusterName)?;
        let node = self.node_name.clone();
        if node.is_empty() || node.contains('/') || node.len() > 253 {
            return Err(ConfigError::NodeName(node));
        }
        for (flag, d) in [
            ("--status-interval", self.status_interval),
            ("--resync-interval", self.resync_interval),
            ("--heartbeat-interval", self.heartbeat_interval),
            ("--health-interval", self.health_interval),
            ("--quarantine-base", self.quarantine_base),
            ("--quarantine-probe-timeout", self.quarantine_probe_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Zero { flag });
            }
        }
        let mut endpoint = if self.tls.insecure {
            ClientEndpoint::plaintext(self.apiserver.clone())
        } else {
            let files = self
                .tls
                .files()
                .map_err(|missing| ConfigError::MissingTls {
                    missing: missing.join(", "),
                })?;
            let tls =
                ClientTls::from_files(&files.ca, &files.cert, &files.key, Some(cluster.clone()))
                    .map_err(|source| ConfigError::Tls {
                        address: self.apiserver.clone(),
                        source,
                    })?;
            ClientEndpoint::new(self.apiserver.clone(), tls)
        };
        endpoint.server_name = self.apiserver_server_name.clone();
        if self.hubble_event_buffer_capacity == 0 {
            return Err(ConfigError::Zero {
                flag: "--hubble-event-buffer-capacity",
            });
        }
        let listen = match self.hubble_listen_address {
            None => None,
            Some(addr) => {
                let advertise = match &self.hubble_advertise_address {
                    Some(a) => a.clone(),
                    None if addr.ip().is_unspecified() => {
                        return Err(ConfigError::HubbleAdvertise(addr));
                    }
                    None => addr.to_string(),
                };
                Some((addr, advertise))
            }
        };
        let server_tls = match (&listen, self.tls.insecure) {
            (Some(_), false) => {
                let files = self
                    .tls
                    .files()
                    .map_err(|missing| ConfigError::MissingTls {
                        missing: missing.join(", "),
                    })?;
                Some(mesh_proto::tls::ServerTlsFiles {
                    cert: files.cert,
                    key: files.key,
                    ca: files.ca,
                })
            }
            _ => None,
        };
        let pin_dir = self
            .bpffs_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/sys/fs/bpf/mesh").join(&node));
        Ok(Settings {
            node,
            cluster,
            endpoint,
            pin_dir,
            cgroup_path: self.cgroup_path.clone(),
            flow_iface: self.flow_iface.clone(),
            routing: self.routing,
            metrics_listen: self.metrics_listen,
            status_interval: self.status_interval,
            debounce: self.debounce,
            resync_interval: self.resync_interval,
            initial_sync_timeout: self.initial_sync_timeout,
            heartbeat_interval: self.heartbeat_interval,
            watch_record: self.watch_record.clone(),
            health_interval: self.health_interval,
            health: mesh_core::health::HealthConfig {
                base: self.quarantine_base,
                max: self.quarantine_max.max(self.quarantine_base),
                probe: true,
            },
            probe_timeout: self.quarantine_probe_timeout,
            flows: FlowConfig {
                listen,
                tls: server_tls,
                capacity: self.hubble_event_buffer_capacity,
                rate: self.flow_event_rate,
                burst: self.flow_event_burst,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec![
            "mesh-agent",
            "--node-name",
            "node-1",
            "--cluster-name",
            "east",
            "--apiserver",
            "127.0.0.1:7443",
        ];
        v.extend_from_slice(extra);
        Args::try_parse_from(v).unwrap()
    }

    #[test]
    fn tls_is_required_unless_insecure() {
        let err = args(&["--tls-ca", "/x"]).validate().unwrap_err();
        assert!(err.to_string().contains("--tls-cert, --tls-key"), "{err}");
        let s = args(&["--insecure"]).validate().unwrap();
        assert!(s.endpoint.tls.is_none());
        assert_eq!(s.pin_dir, PathBuf::from("/sys/fs/bpf/mesh/node-1"));
        assert_eq!(s.routing, Routing::Native);
    }

    #[test]
    fn bad_names_and_durations_are_refused() {
        let mut a = args(&["--insecure"]);
        a.cluster_name = "Bad_Name".into();
        assert!(
            a.validate()
                .unwrap_err()
                .to_string()
                .starts_with("--cluster-name")
        );
        let mut a = args(&["--insecure"]);
        a.node_name = "a/b".into();
        assert!(matches!(a.validate(), Err(ConfigError::NodeName(_))));
        let a = args(&[
            "--insecure",
            "--debounce",
            "250ms",
            "--resync-interval",
            "2m",
        ]);
        assert_eq!(a.debounce, Duration::from_millis(250));
        assert_eq!(a.resync_interval, Duration::from_secs(120));
        let e = Args::try_parse_from(["mesh-agent", "--status-interval", "3d"]).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("--status-interval") && e.contains("\"3d\""),
            "{e}"
        );
    }
}

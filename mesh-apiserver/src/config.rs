//! Command line and environment configuration of mesh-apiserver.
//!
//! Every flag has a `MESH_*` environment fallback. Flag groups that other binaries reuse
//! (TLS, etcd, kube, logging) are `#[command(flatten)]` structs defined once, here.
//! [`Args::validate`] turns the raw flags into a [`Settings`] whose values passed the
//! domain checks of mesh-core, with errors that name the flag and the value.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser};
use ipnet::IpNet;
use mesh_core::{ClusterId, ClusterName, parse_duration};
use mesh_proto::keys::Keys;
use mesh_proto::pb;

/// Errors in the configuration. Each names the flag and the offending value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--cluster-name: {0}")]
    ClusterName(#[source] mesh_core::Error),
    #[error("--cluster-id: {0}")]
    ClusterId(#[source] mesh_core::Error),
    #[error("{flag}: {source}")]
    Cidr {
        flag: &'static str,
        #[source]
        source: mesh_core::Error,
    },
    #[error("--etcd-endpoints: at least one endpoint is required")]
    NoEtcdEndpoints,
    #[error("--etcd-prefix {0:?}: must be non-empty and end with '/'")]
    EtcdPrefix(String),
    #[error(
        "--etcd-max-txn-ops {0}: must be between 1 and {max}",
        max = crate::store::MAX_TXN_OPS
    )]
    EtcdMaxTxnOps(usize),
    #[error(
        "TLS is required: pass --tls-cert, --tls-key and --tls-ca (missing: {missing}), or \
         --insecure for a plaintext listener on a loopback address"
    )]
    MissingTls { missing: String },
    #[error(
        "--insecure refuses to serve plaintext on {addr}: plaintext is only allowed on a \
         loopback address (127.0.0.0/8 or ::1)"
    )]
    InsecureNonLoopback { addr: SocketAddr },
    #[error("{flag}: must be greater than zero")]
    Zero { flag: &'static str },
    // === peer importer (peer.rs) ===
    #[error(transparent)]
    Peers(#[from] crate::peer::ImporterError),
}

pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// mesh-apiserver: publishes this cluster into etcd and serves the mesh over mutual-TLS gRPC.
#[derive(Debug, Clone, Parser)]
#[command(name = "mesh-apiserver", version, about)]
pub struct Args {
    #[command(flatten)]
    pub cluster: ClusterArgs,

    /// gRPC listen address.
    #[arg(long, env = "MESH_LISTEN", default_value = "0.0.0.0:7443")]
    pub listen: SocketAddr,

    /// Metrics and health (/metrics, /healthz, /readyz) listen address.
    #[arg(long, env = "MESH_METRICS_LISTEN", default_value = "127.0.0.1:9962")]
    pub metrics_listen: SocketAddr,

    #[command(flatten)]
    pub tls: ListenTlsArgs,

    #[command(flatten)]
    pub etcd: EtcdArgs,

    #[command(flatten)]
    pub kube: KubeArgs,

    #[command(flatten)]
    pub log: LogArgs,

    #[command(flatten)]
    pub serve: ServeArgs,

    // === peer importer (peer.rs) ===
    #[command(flatten)]
    pub peers: crate::peer::PeerArgs,

    /// How long an identity no pod uses is kept before it is released.
    #[arg(long, env = "MESH_IDENTITY_GC_GRACE", default_value = "5m", value_parser = parse_duration)]
    pub identity_gc_grace: Duration,

    /// A node whose agent has not reported for this many of its status intervals
    /// (`AgentStatus.status_interval_ms`) is marked not reporting on its Node object, and
    /// selection demotes its backends (never withdraws them).
    #[arg(long, env = "MESH_NODE_STALE_INTERVALS", default_value_t = 3)]
    pub node_stale_intervals: u32,
}

/// The serving cluster's identity.
#[derive(Debug, Clone, ClapArgs)]
pub struct ClusterArgs {
    /// This cluster's name (`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`, at most 32 characters).
    #[arg(long, env = "MESH_CLUSTER_NAME")]
    pub cluster_name: String,

    /// This cluster's ID, 1..=255, unique within the mesh.
    #[arg(long, env = "MESH_CLUSTER_ID")]
    pub cluster_id: u32,

    /// Pod CIDRs of this cluster (repeat or comma-separate).
    #[arg(long, env = "MESH_POD_CIDR", value_delimiter = ',', required = true)]
    pub pod_cidr: Vec<String>,

    /// Service CIDR of this cluster.
    #[arg(long, env = "MESH_SERVICE_CIDR")]
    pub service_cidr: Option<String>,
}

/// The listener's TLS: the shared flag group plus what only a server has.
#[derive(Debug, Clone, Default, ClapArgs)]
pub struct ListenTlsArgs {
    #[command(flatten)]
    pub files: mesh_proto::cli::TlsArgs,

    /// Directory of peer CAs, one `<cluster>.crt` per peer cluster; watched and applied live.
    #[arg(long, env = "MESH_PEER_CA_DIR")]
    pub peer_ca_dir: Option<PathBuf>,

    /// How often certificate files are checked for changes.
    #[arg(long, env = "MESH_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub tls_reload_interval: Duration,
}

/// etcd connection.
#[derive(Debug, Clone, ClapArgs)]
pub struct EtcdArgs {
    /// etcd endpoints (repeat or comma-separate), e.g. http://127.0.0.1:2379.
    #[arg(
        long,
        env = "MESH_ETCD_ENDPOINTS",
        value_delimiter = ',',
        required = true
    )]
    pub etcd_endpoints: Vec<String>,

    /// Key prefix of every mesh key in etcd.
    #[arg(long, env = "MESH_ETCD_PREFIX", default_value = mesh_proto::keys::DEFAULT_PREFIX)]
    pub etcd_prefix: String,

    /// Operations per etcd transaction to ask for; start etcd with --max-txn-ops of at
    /// least this (etcd's default is 128). The apiserver probes etcd at start and lowers it
    /// to what etcd accepts, with a warning: larger transactions make large imports about
    /// twice as cheap for etcd.
    #[arg(long, env = "MESH_ETCD_MAX_TXN_OPS", default_value_t = crate::store::DEFAULT_TXN_OPS)]
    pub etcd_max_txn_ops: usize,
}

/// Kubernetes client. Without --kubeconfig: the in-cluster config, else the default
/// kubeconfig.
#[derive(Debug, Clone, Default, ClapArgs)]
pub struct KubeArgs {
    /// Path of a kubeconfig file.
    #[arg(long, env = "MESH_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Context of the kubeconfig to use.
    #[arg(long, env = "MESH_KUBE_CONTEXT")]
    pub kube_context: Option<String>,
}

pub use mesh_proto::cli::{LogArgs, LogFormat};

/// Watch serving knobs.
#[derive(Debug, Clone, ClapArgs)]
pub struct ServeArgs {
    /// Progress heartbeat interval on idle watch streams whose client asks for none (clients
    /// of this version ask for their own: an agent its --heartbeat-interval, a peer importer
    /// its --peer-heartbeat-interval, which bounds how fast a lost peer is marked stale).
    #[arg(long, env = "MESH_HEARTBEAT_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,

    /// Recent events kept for resuming streams without a new snapshot.
    #[arg(long, env = "MESH_HISTORY_EVENTS", default_value_t = 100_000)]
    pub history_events: usize,

    /// Batches buffered per stream before a stalled stream is cut from live delivery.
    #[arg(long, env = "MESH_STREAM_BUFFER", default_value_t = 1024)]
    pub stream_buffer: usize,

    /// Agent status reports expire after this long without a new report.
    #[arg(long, env = "MESH_AGENT_STATUS_TTL", default_value = "30s", value_parser = parse_duration)]
    pub agent_status_ttl: Duration,

    /// Largest gRPC request message decoded, in bytes (every method of mesh.v1.Mesh). A
    /// bigger one is refused with OUT_OF_RANGE from its 5-byte frame header, before its
    /// body is read. The biggest legitimate request is an agent's status report.
    #[arg(long, env = "MESH_MAX_REQUEST_BYTES", default_value_t = crate::grpc::MAX_REQUEST_BYTES)]
    pub max_request_bytes: usize,

    /// Watch streams open at once, over all connections; one more is refused with
    /// RESOURCE_EXHAUSTED. An idle stream costs a few KiB; a stalled one at most its
    /// --stream-buffer batches (shared with the history) and one encoded message.
    #[arg(long, env = "MESH_MAX_WATCH_STREAMS", default_value_t = 10_000)]
    pub max_watch_streams: usize,

    /// HTTP/2 streams (calls) open at once on one connection (SETTINGS_MAX_CONCURRENT_STREAMS);
    /// a client asking for more waits for one to end.
    #[arg(long, env = "MESH_MAX_STREAMS_PER_CONNECTION", default_value_t = 1024)]
    pub max_streams_per_connection: u32,
}

impl Default for ServeArgs {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(5),
            history_events: 100_000,
            stream_buffer: 1024,
            agent_status_ttl: Duration::from_secs(30),
            max_request_bytes: crate::grpc::MAX_REQUEST_BYTES,
            max_watch_streams: 10_000,
            max_streams_per_connection: 1024,
        }
    }
}

/// How the gRPC listener is secured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Security {
    Tls {
        cert: PathBuf,
        key: PathBuf,
        ca: PathBuf,
        peer_ca_dir: Option<PathBuf>,
        reload_interval: Duration,
    },
    /// Plaintext on loopback (`--insecure`).
    Insecure,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub cluster_name: ClusterName,
    pub cluster_id: ClusterId,
    pub pod_cidrs: Vec<IpNet>,
    pub service_cidr: Option<IpNet>,
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub security: Security,
    pub etcd_endpoints: Vec<String>,
    /// `--etcd-max-txn-ops` (in `1..=MAX_TXN_OPS`).
    pub etcd_max_txn_ops: usize,
    pub keys: Keys,
    pub kube: KubeArgs,
    pub serve: ServeArgs,
    pub identity_gc_grace: Duration,
    /// `--node-stale-intervals` (at least 1).
    pub node_stale_intervals: u32,
    /// Peer importer flags (peer.rs).
    pub peers: crate::peer::PeerArgs,
}

// === impl Args ===

impl Args {
    /// Checks every flag; errors name the flag and the value.
    pub fn validate(&self) -> Result<Settings> {
        let c = &self.cluster;
        let cluster_name =
            ClusterName::new(c.cluster_name.clone()).map_err(ConfigError::ClusterName)?;
        let cluster_id = ClusterId::new(c.cluster_id).map_err(ConfigError::ClusterId)?;
        let pod_cidrs = c
            .pod_cidr
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(|s| {
                mesh_core::cidr::parse_cidr(s).map_err(|source| ConfigError::Cidr {
                    flag: "--pod-cidr",
                    source,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let service_cidr = c
            .service_cidr
            .as_deref()
            .map(|s| {
                mesh_core::cidr::parse_cidr(s.trim()).map_err(|source| ConfigError::Cidr {
                    flag: "--service-cidr",
                    source,
                })
            })
            .transpose()?;

        let etcd_endpoints: Vec<String> = self
            .etcd
            .etcd_endpoints
            .iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        if etcd_endpoints.is_empty() {
            return Err(ConfigError::NoEtcdEndpoints);
        }
        let prefix = &self.etcd.etcd_prefix;
        if prefix.is_empty() || !prefix.ends_with('/') {
            return Err(ConfigError::EtcdPrefix(prefix.clone()));
        }
        let txn_ops = self.etcd.etcd_max_txn_ops;
        if !(1..=crate::store::MAX_TXN_OPS).contains(&txn_ops) {
            return Err(ConfigError::EtcdMaxTxnOps(txn_ops));
        }

        let security = self.tls.security(self.listen)?;

        for (flag, d) in [
            ("--heartbeat-interval", self.serve.heartbeat_interval),
            ("--agent-status-ttl", self.serve.agent_status_ttl),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Zero { flag });
            }
        }
        if self.node_stale_intervals == 0 {
            return Err(ConfigError::Zero {
                flag: "--node-stale-intervals",
            });
        }
        if self.serve.history_events == 0 {
            return Err(ConfigError::Zero {
                flag: "--history-events",
            });
        }
        for (flag, n) in [
            ("--stream-buffer", self.serve.stream_buffer),
            ("--max-request-bytes", self.serve.max_request_bytes),
            ("--max-watch-streams", self.serve.max_watch_streams),
            (
                "--max-streams-per-connection",
                self.serve.max_streams_per_connection as usize,
            ),
        ] {
            if n == 0 {
                return Err(ConfigError::Zero { flag });
            }
        }

        // === peer importer (peer.rs) ===
        self.peers.options()?;
        self.peers.source(None)?;

        Ok(Settings {
            cluster_name,
            cluster_id,
            pod_cidrs,
            service_cidr,
            listen: self.listen,
            metrics_listen: self.metrics_listen,
            security,
            etcd_endpoints,
            etcd_max_txn_ops: txn_ops,
            keys: Keys::new(prefix.clone()),
            kube: self.kube.clone(),
            serve: self.serve.clone(),
            identity_gc_grace: self.identity_gc_grace,
            node_stale_intervals: self.node_stale_intervals,
            peers: self.peers.clone(),
        })
    }
}

// === impl ListenTlsArgs ===

impl ListenTlsArgs {
    /// The listener security for `listen`: TLS with all three files, or `--insecure` on a
    /// loopback address.
    pub fn security(&self, listen: SocketAddr) -> Result<Security> {
        if self.files.insecure {
            if !listen.ip().is_loopback() {
                return Err(ConfigError::InsecureNonLoopback { addr: listen });
            }
            return Ok(Security::Insecure);
        }
        match self.files.files() {
            Ok(files) => Ok(Security::Tls {
                cert: files.cert,
                key: files.key,
                ca: files.ca,
                peer_ca_dir: self.peer_ca_dir.clone(),
                reload_interval: self.tls_reload_interval,
            }),
            Err(missing) => Err(ConfigError::MissingTls {
                missing: missing.join(", "),
            }),
        }
    }
}

// === impl Settings ===

impl Settings {
    /// The serving cluster's config as mesh-core's type (for the publisher).
    pub fn core_cluster_config(&self) -> mesh_core::ClusterConfig {
        let pb = self.cluster_config();
        mesh_core::ClusterConfig {
            name: self.cluster_name.clone(),
            id: self.cluster_id,
            pod_cidrs: self.pod_cidrs.clone(),
            service_cidr: self.service_cidr,
            capabilities: pb.capabilities,
            version: pb.version,
        }
    }

    /// The serving cluster's config as served by `Info`.
    pub fn cluster_config(&self) -> pb::ClusterConfig {
        pb::ClusterConfig {
            name: self.cluster_name.to_string(),
            id: self.cluster_id.get().into(),
            pod_cidrs: self.pod_cidrs.iter().map(|c| c.to_string()).collect(),
            service_cidr: self.service_cidr.map(|c| c.to_string()),
            capabilities: vec!["watch-resume".into(), "batched-events".into()],
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Args {
        let mut argv = vec![
            "mesh-apiserver",
            "--cluster-name",
            "east",
            "--cluster-id",
            "3",
            "--pod-cidr",
            "10.1.0.0/16,10.2.0.0/16",
            "--etcd-endpoints",
            "http://127.0.0.1:2379",
        ];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).expect("parsing")
    }

    fn err(extra: &[&str]) -> String {
        parse(extra).validate().unwrap_err().to_string()
    }

    #[test]
    fn valid_insecure_on_loopback() {
        let s = parse(&["--insecure", "--listen", "127.0.0.1:7443"])
            .validate()
            .unwrap();
        assert_eq!(s.security, Security::Insecure);
        assert_eq!(s.pod_cidrs.len(), 2);
        assert_eq!(s.keys.prefix(), "mesh/v1/");
        assert_eq!(s.cluster_config().id, 3);
    }

    #[test]
    fn insecure_on_non_loopback_is_refused() {
        let e = err(&["--insecure", "--listen", "0.0.0.0:7443"]);
        assert!(
            e.contains("--insecure refuses to serve plaintext on 0.0.0.0:7443"),
            "{e}"
        );
    }

    #[test]
    fn tls_files_are_required_without_insecure() {
        let e = err(&["--tls-cert", "/x.crt"]);
        assert!(e.contains("missing: --tls-key, --tls-ca"), "{e}");
    }

    #[test]
    fn domain_checks_name_the_flag_and_value() {
        let e = parse(&["--insecure", "--listen", "127.0.0.1:1"]);
        let mut bad = e.clone();
        bad.cluster.cluster_name = "Bad_Name".into();
        let m = bad.validate().unwrap_err().to_string();
        assert!(
            m.starts_with("--cluster-name") && m.contains("\"Bad_Name\""),
            "{m}"
        );
        let mut bad = e.clone();
        bad.cluster.cluster_id = 0;
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .starts_with("--cluster-id")
        );
        let mut bad = e.clone();
        bad.cluster.pod_cidr = vec!["10.1.0.1/16".into()];
        let m = bad.validate().unwrap_err().to_string();
        assert!(
            m.starts_with("--pod-cidr") && m.contains("10.1.0.1/16"),
            "{m}"
        );
        let mut bad = e.clone();
        bad.etcd.etcd_prefix = "mesh".into();
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("--etcd-prefix")
        );
        assert_eq!(e.validate().unwrap().etcd_max_txn_ops, 1024);
        for n in [0, crate::store::MAX_TXN_OPS + 1] {
            let mut bad = e.clone();
            bad.etcd.etcd_max_txn_ops = n;
            let m = bad.validate().unwrap_err().to_string();
            assert_eq!(
                m,
                format!("--etcd-max-txn-ops {n}: must be between 1 and 16384"),
                "{m}"
            );
        }
    }

    #[test]
    fn durations() {
        let a = parse(&[
            "--heartbeat-interval",
            "1m30s",
            "--tls-reload-interval",
            "500ms",
        ]);
        assert_eq!(a.serve.heartbeat_interval, Duration::from_secs(90));
        assert_eq!(a.tls.tls_reload_interval, Duration::from_millis(500));
        // The grammar is mesh_core::duration's; clap's error names the flag, ours the value.
        let mut argv = vec![
            "mesh-apiserver",
            "--cluster-name",
            "east",
            "--cluster-id",
            "3",
        ];
        argv.extend([
            "--pod-cidr",
            "10.1.0.0/16",
            "--etcd-endpoints",
            "http://127.0.0.1:2379",
        ]);
        argv.extend(["--heartbeat-interval", "5d"]);
        let e = Args::try_parse_from(argv).unwrap_err().to_string();
        assert!(
            e.contains("--heartbeat-interval") && e.contains("\"5d\""),
            "{e}"
        );
    }

    #[test]
    fn env_fallback() {
        // clap reads env at parse time; use a variable only this test sets.
        let cmd = <Args as clap::CommandFactory>::command();
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_id() == "history_events")
            .unwrap();
        assert_eq!(arg.get_env().unwrap(), "MESH_HISTORY_EVENTS");
    }
}

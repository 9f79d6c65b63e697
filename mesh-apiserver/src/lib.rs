//! mesh-apiserver: watches its cluster, publishes into etcd, serves over mutual-TLS gRPC.
//!
//! Serving side (gRPC, index, config, metrics, health): `config`, `index`, `grpc`,
//! `metrics`, `health`, `run`. Publishing side (Kubernetes -> etcd): `kube_source`,
//! `identity`, `store`, `publisher`, `leader`.
//!
//! [`run`] wires them: etcd client (retried with backoff), the serving index (one etcd
//! watch), the gRPC server (mutual TLS, or plaintext on loopback with `--insecure`),
//! `/metrics` + `/healthz` + `/readyz`, and the publisher; it stops gracefully on SIGTERM
//! or SIGINT.

pub mod config;
pub mod etcd_write;
pub mod grpc;
pub mod health;
pub mod identity;
pub mod index;
pub mod kube_source;
pub mod leader;
pub mod liveness;
pub mod metrics;
pub mod peer;
pub mod publisher;
pub mod relay;
pub mod store;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mesh_core::{Backoff, ClusterName};
use mesh_proto::tls::{self, ServerTls, ServerTlsFiles};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

pub use config::{Args, Settings};

use crate::config::Security;
use crate::grpc::{Authenticator, MeshService, ServeConfig};
use crate::index::{Index, IndexConfig};
use crate::metrics::Metrics;

/// Errors that stop the apiserver.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid configuration")]
    Config(#[from] config::ConfigError),
    #[error("TLS setup of the gRPC listener")]
    Tls(#[from] tls::TlsError),
    #[error("binding the gRPC listener {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server")]
    Serve(#[source] tonic::transport::Error),
    #[error(transparent)]
    Health(#[from] mesh_proto::serve::HealthError),
    #[error("Kubernetes client configuration: {0}")]
    KubeConfig(String),
    #[error("publisher")]
    Publisher(#[from] publisher::Error),
    #[error("shut down before etcd could be reached")]
    Shutdown,
}

/// What [`start`] runs besides the serving side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartOptions {
    /// Run the publisher (needs a Kubernetes API). Tests of the serving side turn it off.
    pub publisher: bool,
}

impl Default for StartOptions {
    fn default() -> Self {
        Self { publisher: true }
    }
}

/// A running apiserver.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub index: Index,
    pub metrics: Metrics,
    /// The TLS state (to add peer CAs at runtime); `None` with `--insecure`.
    pub tls: Option<Arc<ServerTls>>,
    shutdown: CancellationToken,
    tasks: JoinSet<Result<(), RunError>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("grpc_addr", &self.grpc_addr)
            .field("metrics_addr", &self.metrics_addr)
            .finish_non_exhaustive()
    }
}

// === impl Running ===

impl Running {
    /// Stops every task and waits for them.
    pub async fn shutdown(mut self) -> Result<(), RunError> {
        self.shutdown.cancel();
        let mut first = Ok(());
        while let Some(r) = self.tasks.join_next().await {
            if let Ok(Err(e)) = r
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        first
    }

    /// Waits until `shutdown` is cancelled or a task fails; then stops everything.
    pub async fn wait(mut self) -> Result<(), RunError> {
        let failed = loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break None,
                r = self.tasks.join_next() => match r {
                    Some(Ok(Err(e))) => {
                        error!(error = %e, "a component failed; shutting down");
                        break Some(e);
                    }
                    Some(Err(join)) if join.is_panic() => {
                        error!(error = %join, "a component panicked; shutting down");
                        break None;
                    }
                    Some(_) => continue,
                    None => break None,
                },
            }
        };
        let rest = self.shutdown().await;
        match failed {
            Some(e) => Err(e),
            None => rest,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub use mesh_proto::serve::init_tracing;

/// Validates `args`, starts everything and runs until SIGTERM or SIGINT.
pub async fn run(args: Args) -> Result<(), RunError> {
    let settings = args.validate()?;
    let shutdown = CancellationToken::new();
    let running = start(settings, StartOptions::default(), shutdown.clone()).await?;
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("signal received; shutting down");
        signals.cancel();
    });
    running.wait().await
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Connects to etcd, retrying with capped backoff until it answers or `shutdown`.
pub async fn connect_etcd(
    endpoints: &[String],
    shutdown: &CancellationToken,
) -> Result<etcd_client::Client, RunError> {
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true);
    let mut backoff =
        Backoff::equal_jitter(Duration::from_millis(200), Duration::from_secs(10)).retries();
    loop {
        let attempt = async {
            let mut c = etcd_client::Client::connect(endpoints, Some(opts.clone())).await?;
            c.status().await?;
            Ok::<_, etcd_client::Error>(c)
        };
        match attempt.await {
            Ok(c) => {
                info!(?endpoints, "connected to etcd");
                return Ok(c);
            }
            Err(error) => {
                let delay = backoff.next_delay(rand::random());
                warn!(%error, ?endpoints, ?delay, "etcd unreachable; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(RunError::Shutdown),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

async fn kube_client(kube: &config::KubeArgs) -> Result<kube::Client, RunError> {
    let err = |e: &dyn std::fmt::Display| RunError::KubeConfig(e.to_string());
    let opts = kube::config::KubeConfigOptions {
        context: kube.kube_context.clone(),
        ..Default::default()
    };
    let cfg = match (&kube.kubeconfig, &kube.kube_context) {
        (Some(path), _) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| RunError::KubeConfig(format!("reading {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &opts)
                .await
                .map_err(|e| err(&e))?
        }
        (None, Some(_)) => kube::Config::from_kubeconfig(&opts)
            .await
            .map_err(|e| err(&e))?,
        (None, None) => kube::Config::infer().await.map_err(|e| err(&e))?,
    };
    kube::Client::try_from(cfg).map_err(|e| err(&e))
}

/// How often the index's size is compared for [`release_memory_after_large_changes`].
const MEMORY_CHECK_INTERVAL: Duration = Duration::from_millis(250);
/// A change of at least this many objects in the index (a peer arriving or leaving, a
/// first load) is followed by giving the memory freed on the way back to the system.
const LARGE_CHANGE_OBJECTS: usize = 4096;

/// Gives the memory freed back to the system (`mesh_proto::serve::release_freed_memory`)
/// once a large change of the index is over: it grew or shrank by at least
/// [`LARGE_CHANGE_OBJECTS`] since the last time, and by less than 1/16 of that in the last
/// [`MEMORY_CHECK_INTERVAL`]. The importer's and the feeder's transient allocations of a
/// large change (decoded snapshots, transactions, listing pages) would otherwise stay in the
/// RSS. Churn that replaces objects does not trigger it.
async fn release_memory_after_large_changes(
    index: Index,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let mut tick = tokio::time::interval(MEMORY_CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut released, mut previous) = (0usize, 0usize);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let now = index.with_state(|st| st.len());
        let settled = now.abs_diff(previous) < LARGE_CHANGE_OBJECTS / 16;
        previous = now;
        if settled && now.abs_diff(released) >= LARGE_CHANGE_OBJECTS {
            let t = std::time::Instant::now();
            mesh_proto::serve::release_freed_memory();
            debug!(
                objects = now,
                was = released,
                ms = t.elapsed().as_secs_f64() * 1e3,
                "freed memory released"
            );
            released = now;
        }
    }
}

/// Starts the apiserver from validated settings. Listeners are bound before this returns
/// (port 0 gets a free port: see [`Running::grpc_addr`]).
pub async fn start(
    settings: Settings,
    opts: StartOptions,
    shutdown: CancellationToken,
) -> Result<Running, RunError> {
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let mut tasks = JoinSet::new();

    // Bind first: a bad address or an --insecure non-loopback address fails fast.
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|source| RunError::Bind {
            addr: settings.listen,
            source,
        })?;
    let grpc_addr = listener.local_addr().map_err(|source| RunError::Bind {
        addr: settings.listen,
        source,
    })?;
    let (auth, server_tls) = match &settings.security {
        Security::Insecure => {
            tls::check_insecure_bind(grpc_addr)?;
            warn!(addr = %grpc_addr, "serving plaintext gRPC (--insecure, loopback only)");
            (Authenticator::Insecure, None)
        }
        Security::Tls {
            cert,
            key,
            ca,
            peer_ca_dir,
            reload_interval,
        } => {
            let files = ServerTlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            };
            let tls = ServerTls::from_files(settings.cluster_name.clone(), &files)?;
            let reload = tls.clone().watch_files(files, *reload_interval);
            let stop = shutdown.clone();
            tasks.spawn(
                async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = reload => {}
                    }
                    Ok(())
                }
                .instrument(info_span!("tls_reload")),
            );
            if let Some(dir) = peer_ca_dir {
                // Registered before serving, then kept in sync.
                let mut applied = BTreeMap::new();
                sync_peer_cas(dir, &tls, &mut applied);
                let dir = dir.clone();
                let tls = tls.clone();
                let every = *reload_interval;
                let stop = shutdown.clone();
                tasks.spawn(
                    async move {
                        watch_peer_cas(&dir, &tls, applied, every, &stop).await;
                        Ok(())
                    }
                    .instrument(info_span!("peer_cas")),
                );
            }
            (Authenticator::Tls(tls.clone()), Some(tls))
        }
    };

    let etcd = connect_etcd(&settings.etcd_endpoints, &shutdown).await?;
    // Shared by every writer of this etcd (publisher, importer); a failed probe keeps the
    // asked size, and a refused transaction probes again (etcd_write::TxnOps).
    let txn_ops = store::TxnOps::new(settings.etcd_max_txn_ops);
    let kv = etcd.kv_client();
    let probe = txn_ops.probe(&kv, settings.keys.prefix());
    match tokio::time::timeout(Duration::from_secs(10), probe).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => {
            warn!(%error, ops = txn_ops.get(), "cannot probe etcd's transaction size limit")
        }
        Err(_) => warn!(
            ops = txn_ops.get(),
            "etcd did not answer the transaction size probe in 10 s"
        ),
    }

    let mut index_cfg = IndexConfig::new(settings.keys.clone());
    index_cfg.history_events = settings.serve.history_events;
    index_cfg.subscriber_buffer = settings.serve.stream_buffer;
    index_cfg.progress_interval = settings.serve.heartbeat_interval;
    let (index, feeder) = Index::start(etcd.clone(), index_cfg, metrics.clone(), shutdown.clone());
    tasks.spawn(async move {
        let _ = feeder.await;
        Ok(())
    });
    tasks.spawn(release_memory_after_large_changes(
        index.clone(),
        shutdown.clone(),
    ));

    // The publisher (leader election + Kubernetes -> etcd).
    let (leader_rx, leader_keep) = if opts.publisher {
        let mut pcfg = publisher::PublisherConfig::new(settings.core_cluster_config());
        pcfg.prefix = settings.keys.prefix().to_owned();
        pcfg.identity_gc_grace = settings.identity_gc_grace;
        pcfg.node_stale_intervals = settings.node_stale_intervals;
        pcfg.max_txn_ops = txn_ops.clone();
        let publisher = publisher::Publisher::new(pcfg, &mut registry);
        let leader = publisher.is_leader().receiver();
        let kube = kube_client(&settings.kube).await?;
        let etcd = etcd.clone();
        let stop = shutdown.clone();
        tasks.spawn(async move {
            publisher
                .run(etcd, kube, stop)
                .await
                .map_err(RunError::Publisher)
        });
        (leader, None)
    } else {
        let (tx, rx) = watch::channel(false);
        (rx, Some(tx))
    };

    let mut peer_set = None;
    // === peer importer (peer.rs): needs TLS (its client identity is the serving cert);
    // peers come from --peers-dir, else from the Secret when Kubernetes is configured.
    if let (Security::Tls { cert, key, .. }, Some(tls)) = (&settings.security, &server_tls) {
        let kube = match (&settings.peers.peers_dir, opts.publisher) {
            (None, true) => Some(kube_client(&settings.kube).await?),
            _ => None,
        };
        let source = settings
            .peers
            .source(kube)
            .map_err(config::ConfigError::from)?;
        if let Some(source) = source {
            let cfg = peer::ImporterConfig {
                etcd: etcd.clone(),
                keys: settings.keys.clone(),
                local: settings.core_cluster_config(),
                server_tls: Some(tls.clone()),
                identity: peer::ClientIdentity {
                    cert: cert.clone(),
                    key: key.clone(),
                },
                source,
                is_leader: leader_rx.clone(),
                options: peer::ImporterOptions {
                    max_txn_ops: txn_ops.clone(),
                    ..settings
                        .peers
                        .options()
                        .map_err(config::ConfigError::from)?
                },
            };
            let importer = peer::Importer::spawn(cfg, &mut registry, shutdown.clone());
            peer_set = Some(importer.peers());
            let stop = shutdown.clone();
            tasks.spawn(async move {
                stop.cancelled().await;
                importer.shutdown().await;
                Ok(())
            });
        }
    }

    let mut serve_cfg = ServeConfig::new(settings.cluster_config(), settings.keys.clone());
    serve_cfg.heartbeat_interval = settings.serve.heartbeat_interval;
    serve_cfg.agent_status_ttl = settings.serve.agent_status_ttl;
    serve_cfg.max_request_bytes = settings.serve.max_request_bytes;
    serve_cfg.max_watch_streams = settings.serve.max_watch_streams;
    let svc = MeshService::new(
        serve_cfg,
        index.clone(),
        etcd.clone(),
        auth,
        metrics.clone(),
        leader_rx.clone(),
        shutdown.clone(),
    );
    // The flow relay (relay/): Hubble's Observer on the same port, same TLS and roles.
    let relay_identity = match &settings.security {
        Security::Insecure => None,
        Security::Tls { cert, key, ca, .. } => Some(relay::RelayIdentity {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }),
    };
    let relay = relay::Relay::new(
        relay::RelayConfig::new(
            settings.cluster_name.clone(),
            settings.keys.clone(),
            relay_identity,
        ),
        svc.clone(),
        etcd,
        peer_set,
    );

    let registry = Arc::new(registry);
    let readiness = health::Readiness {
        index: index.clone(),
        leader: opts.publisher.then_some(leader_rx),
    };
    let (metrics_addr, health_fut) = mesh_proto::serve::bind_health(
        settings.metrics_listen,
        registry,
        readiness,
        shutdown.clone(),
    )
    .await?;
    tasks.spawn(async move { health_fut.await.map_err(RunError::from) });

    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // tonic leaves HTTP/2's concurrent streams unbounded unless told.
        .max_concurrent_streams(Some(settings.serve.max_streams_per_connection))
        .add_service(svc.into_server())
        .add_service(relay.into_server());
    let stop = shutdown.clone();
    match &server_tls {
        None => {
            let incoming = tls::plain_incoming(listener)?;
            tasks.spawn(
                async move {
                    server
                        .serve_with_incoming_shutdown(incoming, stop.cancelled())
                        .await
                        .map_err(RunError::Serve)
                }
                .instrument(info_span!("grpc", addr = %grpc_addr)),
            );
        }
        Some(tls) => {
            let incoming =
                tls::tls_incoming(listener, tls.clone(), tls::IncomingOptions::default());
            tasks.spawn(
                async move {
                    server
                        .serve_with_incoming_shutdown(incoming, stop.cancelled())
                        .await
                        .map_err(RunError::Serve)
                }
                .instrument(info_span!("grpc", addr = %grpc_addr)),
            );
        }
    }
    // Keeps the serve-only leader flag's sender alive for the server's lifetime.
    if let Some(tx) = leader_keep {
        let stop = shutdown.clone();
        tasks.spawn(async move {
            stop.cancelled().await;
            drop(tx);
            Ok(())
        });
    }
    info!(
        cluster = %settings.cluster_name,
        grpc = %grpc_addr,
        metrics = %metrics_addr,
        tls = server_tls.is_some(),
        "mesh-apiserver started"
    );
    Ok(Running {
        grpc_addr,
        metrics_addr,
        index,
        metrics,
        tls: server_tls,
        shutdown,
        tasks,
    })
}

/// Reads `<cluster>.crt` files of `dir`; unreadable or misnamed files are logged and
/// skipped.
fn read_peer_cas(dir: &Path) -> BTreeMap<ClusterName, (PathBuf, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(error) => {
            warn!(dir = %dir.display(), %error, "cannot read the peer CA directory");
            return out;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(stem) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".crt"))
        else {
            continue;
        };
        let cluster = match ClusterName::new(stem) {
            Ok(c) => c,
            Err(error) => {
                warn!(path = %path.display(), %error, "skipping a peer CA file not named <cluster>.crt");
                continue;
            }
        };
        match std::fs::read(&path) {
            Ok(pem) => {
                out.insert(cluster, (path, pem));
            }
            Err(error) => warn!(path = %path.display(), %error, "cannot read a peer CA file"),
        }
    }
    out
}

/// Makes the trust store's peer CAs equal to the files of `dir`; `applied` remembers what
/// was registered from it.
fn sync_peer_cas(dir: &Path, tls: &ServerTls, applied: &mut BTreeMap<ClusterName, Vec<u8>>) {
    let now = read_peer_cas(dir);
    for (cluster, (path, pem)) in &now {
        if applied.get(cluster) == Some(pem) {
            continue;
        }
        let r = tls::parse_certs(pem, &path.display().to_string())
            .and_then(|certs| tls.add_peer_ca(cluster.clone(), certs));
        match r {
            Ok(()) => {
                info!(%cluster, path = %path.display(), "peer CA registered");
                applied.insert(cluster.clone(), pem.clone());
            }
            Err(error) => {
                error!(%cluster, path = %path.display(), %error, "invalid peer CA; not registered")
            }
        }
    }
    let gone: Vec<ClusterName> = applied
        .keys()
        .filter(|c| !now.contains_key(*c))
        .cloned()
        .collect();
    for cluster in gone {
        match tls.remove_peer_ca(&cluster) {
            Ok(_) => info!(%cluster, "peer CA removed"),
            Err(error) => warn!(%cluster, %error, "cannot remove peer CA"),
        }
        applied.remove(&cluster);
    }
}

/// Keeps the trust store's peer CAs equal to the files of `dir`, checking every `every`.
async fn watch_peer_cas(
    dir: &Path,
    tls: &ServerTls,
    mut applied: BTreeMap<ClusterName, Vec<u8>>,
    every: Duration,
    stop: &CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        sync_peer_cas(dir, tls, &mut applied);
    }
}

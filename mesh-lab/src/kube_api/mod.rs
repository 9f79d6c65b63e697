//! A Kubernetes-compatible API server for the lab: enough of the real kube-apiserver's
//! behaviour that kubectl and kube-rs work against it unchanged.
//!
//! Start it in-process with [`KubeApi::start`]; the handle gives the address, a kubeconfig,
//! the credentials for a `kube::Client`, and the [`Store`] for in-process controllers (the
//! lab's kubelet and controllers write through the same validation and watch machinery).
//!
//! What it does, like the real server:
//! - HTTPS only (rustls), with a generated CA and a bearer token; `/version`, `/healthz`,
//!   `/readyz`, `/livez` are public.
//! - Namespaces, Pods, Services, Nodes, Secrets, ConfigMaps, Endpoints, ServiceAccounts,
//!   Events (core; `events.k8s.io/v1` is a view of the same objects), EndpointSlices,
//!   Deployments and ReplicaSets (scale subresource), Leases, NetworkPolicies (with
//!   kube-apiserver's defaults and validation); status subresources.
//! - CustomResourceDefinitions: a CRD makes new resource types (see [`crd`]): discovery,
//!   several versions, OpenAPI v3 schema validation and pruning ([`schema`]), printer
//!   columns, status subresource, `fieldValidation`, schemas published for `kubectl explain`.
//! - get, list (label and field selectors on any field; `limit`/`continue` paging over a
//!   consistent snapshot, see [`paging`]), watch (one global resourceVersion,
//!   resume from a bounded history, 410 Expired as an ERROR event, bookmarks, streaming
//!   lists), create (generateName, uid, timestamps, generation), update with optimistic
//!   concurrency, merge / JSON / strategic merge patches and server-side apply (creates when
//!   missing), delete (finalizers hold an object until removed; namespace deletion
//!   cascades), deletecollection, server-side dry run.
//! - No-op writes keep the resourceVersion; `metadata.generation` follows spec changes;
//!   main-resource writes keep the status of types with a status subresource.
//! - Services get ClusterIPs from the configured CIDR and NodePorts; defaults for Pods,
//!   Deployments, Secrets (`stringData`), Namespaces.
//! - Aggregated and legacy discovery, minimal OpenAPI v3 (enough for `kubectl apply`),
//!   Tables for `kubectl get`.
//! - Pod logs (`kubectl logs [-f]`) from the files of a registered [`LogSource`].
//!
//! What it does not do: persistence (objects live in memory), graceful deletion (without
//! finalizers a delete is immediate, pods included; a namespace delete removes everything
//! in it at once), server-side apply field ownership (apply merges like a
//! strategic merge patch and never removes fields), OpenAPI schemas of built-in types (no
//! `kubectl explain` or unknown-field errors for them), CRD conversion webhooks, defaults and
//! CEL rules, the scale subresource of CRDs, protobuf (it reports version 1.31 so the kubectl dispatcher runs
//! a JSON-speaking kubectl), controllers
//! (Deployments do not create pods: the lab plays controllers through the store).

mod crd;
mod discovery;
mod error;
mod events_view;
pub mod logs;
mod netpol;
pub mod paging;
pub mod patch;
pub mod resources;
pub mod schema;
pub mod selector;
mod server;
pub mod store;
mod table;
mod tls;
pub(crate) mod util;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use ipnet::IpNet;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument;

pub use error::{ApiError, FieldError};
pub use logs::LogSource;
pub use patch::PatchType;
pub use resources::{ResourceType, Subresource};
pub use selector::{FieldSelector, LabelSelector};
pub use store::{
    Event, EventType, Page, PageRequest, Store, StoreConfig, Watch, WatchEvent, WatchOptions,
};

/// Failures to start the API server.
#[derive(Debug, thiserror::Error)]
pub enum KubeApiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("generating certificates: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Tls(#[source] rustls::Error),
    #[error("creating built-in object {name}: {source}")]
    Bootstrap {
        name: String,
        // Boxed: an inline ApiError makes every Result of this enum large.
        #[source]
        source: Box<ApiError>,
    },
}

/// Configuration of one API server.
#[derive(Clone, Debug)]
pub struct KubeApiConfig {
    /// Where to listen; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Holds `ca.crt`, `ca.key`, `token`, `server.crt` and `kubeconfig`. The CA and token are
    /// reused when present, so kubeconfigs stay valid across restarts.
    pub dir: PathBuf,
    /// Cluster name (certificate names, logs).
    pub cluster: String,
    /// Name of the kubeconfig's cluster, user and context (`<lab>-<cluster>` in the lab).
    pub context: String,
    /// Service ClusterIPs are allocated from here.
    pub service_cidr: IpNet,
    /// Changes kept for watches to resume from.
    pub watch_history: usize,
    /// Interval of periodic BOOKMARK events on watches that allow them.
    pub bookmark_interval: Duration,
    /// Extra SANs (IPs or DNS names) for the serving certificate.
    pub extra_sans: Vec<String>,
}

impl KubeApiConfig {
    /// Defaults: 127.0.0.1 with a free port, service CIDR 10.96.0.0/16, context = cluster.
    pub fn new(dir: impl Into<PathBuf>, cluster: impl Into<String>) -> Self {
        let cluster = cluster.into();
        KubeApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir: dir.into(),
            context: cluster.clone(),
            cluster,
            service_cidr: "10.96.0.0/16".parse().expect("valid CIDR"),
            watch_history: 10_000,
            bookmark_interval: Duration::from_secs(60),
            extra_sans: Vec::new(),
        }
    }
}

/// What a client needs to connect: server URL, CA and bearer token.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub url: String,
    pub ca_pem: String,
    pub token: String,
}

/// Entry point.
pub struct KubeApi;

impl KubeApi {
    /// Generates (or loads) the certificates, binds, writes the kubeconfig, creates the
    /// built-in namespaces (`default`, `kube-system`, `kube-public`, `kube-node-lease`) and
    /// the `default/kubernetes` Service, and serves until the handle is dropped or shut down.
    pub async fn start(config: KubeApiConfig) -> Result<KubeApiHandle, KubeApiError> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| KubeApiError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| KubeApiError::Bind {
            addr: config.listen,
            source,
        })?;
        let material = tls::prepare(&config.dir, &config.cluster, addr, &config.extra_sans)?;
        let host = if addr.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            addr.ip().to_string()
        };
        let url = match addr {
            SocketAddr::V6(_) if !addr.ip().is_unspecified() => {
                format!("https://[{host}]:{}", addr.port())
            }
            _ => format!("https://{host}:{}", addr.port()),
        };
        let kubeconfig = tls::write_kubeconfig(
            &config.dir,
            &config.context,
            &url,
            &material.ca_pem,
            &material.token,
        )?;

        let store = Arc::new(Store::new(StoreConfig {
            service_cidr: config.service_cidr,
            history: config.watch_history,
            ..StoreConfig::default()
        }));
        bootstrap(&store, &config, addr)?;

        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let log_source = Arc::new(std::sync::RwLock::new(None));
        let server = Arc::new(server::Server {
            store: store.clone(),
            log_source: log_source.clone(),
            token: material.token.clone(),
            bookmark_interval: config.bookmark_interval,
            shutdown: shutdown_rx.clone(),
        });
        let acceptor = tokio_rustls::TlsAcceptor::from(material.server_config.clone());
        let span = tracing::info_span!("kube_api", cluster = %config.cluster, %addr);
        let task =
            tokio::spawn(accept_loop(listener, acceptor, server, shutdown_rx).instrument(span));
        tracing::info!(cluster = %config.cluster, %addr, kubeconfig = %kubeconfig.display(), "kube-api serving");
        Ok(KubeApiHandle {
            addr,
            url,
            kubeconfig,
            context: config.context,
            ca_pem: material.ca_pem,
            token: material.token,
            store,
            log_source,
            shutdown: shutdown_tx,
            task: Some(task),
        })
    }
}

fn bootstrap(store: &Store, config: &KubeApiConfig, addr: SocketAddr) -> Result<(), KubeApiError> {
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        store
            .create(
                &resources::NAMESPACES,
                None,
                json!({"metadata": {"name": ns}}),
            )
            .map_err(|source| KubeApiError::Bootstrap {
                name: ns.into(),
                source: Box::new(source),
            })?;
    }
    let first_ip = config
        .service_cidr
        .hosts()
        .next()
        .map(|ip| ip.to_string())
        .unwrap_or_default();
    let svc = json!({
        "metadata": {"name": "kubernetes", "labels": {"component": "apiserver", "provider": "kubernetes"}},
        "spec": {"clusterIP": first_ip, "ports": [{"name": "https", "port": 443, "targetPort": addr.port()}]},
    });
    store
        .create(&resources::SERVICES, Some("default"), svc)
        .map_err(|source| KubeApiError::Bootstrap {
            name: "default/kubernetes".into(),
            source: Box::new(source),
        })?;
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    server: Arc<server::Server>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Dropping the set (when this task ends or is aborted) aborts every connection.
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (tcp, peer) = tokio::select! {
            _ = shutdown.changed() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let server = server.clone();
        conns.spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(error) => {
                    tracing::debug!(%peer, %error, "TLS handshake failed");
                    return;
                }
            };
            let svc = hyper::service::service_fn(move |req| {
                let server = server.clone();
                async move { Ok::<_, std::convert::Infallible>(server.handle(req).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(error) = builder.serve_connection(TokioIo::new(tls), svc).await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    tracing::info!("kube-api stopped");
}

/// A running API server. Dropping it stops the server.
pub struct KubeApiHandle {
    addr: SocketAddr,
    url: String,
    kubeconfig: PathBuf,
    context: String,
    ca_pem: String,
    token: String,
    store: Arc<Store>,
    log_source: server::LogSourceSlot,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl KubeApiHandle {
    /// Where pod logs are (the runtime that starts the pods): `GET .../pods/NAME/log` reads
    /// them. Without one, a log request says the container has no log.
    pub fn set_log_source(&self, source: Arc<dyn LogSource>) {
        *self.log_source.write().unwrap_or_else(|e| e.into_inner()) = Some(source);
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// Name of the kubeconfig's context (and of its cluster and user entries).
    pub fn context(&self) -> &str {
        &self.context
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// URL, CA and token, e.g. to build a `kube::Config`.
    pub fn credentials(&self) -> Credentials {
        Credentials {
            url: self.url.clone(),
            ca_pem: self.ca_pem.clone(),
            token: self.token.clone(),
        }
    }

    /// Direct access to the objects, for in-process controllers.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Stops accepting, ends open connections and watches, and waits for the server task.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for KubeApiHandle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

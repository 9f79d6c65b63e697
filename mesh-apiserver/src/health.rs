//! `/metrics`, `/healthz` and `/readyz` (DESIGN.md section 11), served by axum on
//! `--metrics-listen`.
//!
//! - `/healthz`: the process is alive and its runtime answers.
//! - `/readyz`: etcd is reachable (the index's watch is established), the index has loaded
//!   its first list, and this replica is either the leader or a follower whose index is
//!   ready to serve. Each failing check is named in the body, with 503.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::index::Index;

/// Errors of the health server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding the metrics listener {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving metrics and health: {0}")]
    Serve(#[source] std::io::Error),
}

/// What `/readyz` looks at.
#[derive(Clone)]
pub struct Readiness {
    pub index: Index,
    /// `Some` when this process runs a publisher: whether it holds the leadership.
    pub leader: Option<watch::Receiver<bool>>,
}

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

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    ready: Readiness,
}

/// The router (exposed for tests).
pub fn router(registry: Arc<Registry>, ready: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { registry, ready })
}

async fn metrics(State(st): State<AppState>) -> Response {
    match crate::metrics::encode(&st.registry) {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}\n"),
        )
            .into_response(),
    }
}

async fn readyz(State(st): State<AppState>) -> Response {
    let failing = st.ready.failing();
    let leader = st.ready.leader.as_ref().map(|l| *l.borrow());
    let role = match leader {
        Some(true) => "leader",
        Some(false) => "follower",
        None => "serving only",
    };
    if failing.is_empty() {
        (StatusCode::OK, format!("ready ({role})\n")).into_response()
    } else {
        let mut body = format!("not ready ({role}):\n");
        for f in failing {
            body.push_str("- ");
            body.push_str(f);
            body.push('\n');
        }
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

/// Binds `addr`; returns the bound address and the serving future (ends on `shutdown`).
pub async fn bind(
    addr: SocketAddr,
    registry: Arc<Registry>,
    ready: Readiness,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, impl Future<Output = Result<(), Error>>), Error> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| Error::Bind { addr, source })?;
    info!(addr = %local, "serving /metrics, /healthz, /readyz");
    let app = router(registry, ready);
    let fut = async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
            .map_err(|e| {
                warn!(error = %e, "metrics server failed");
                Error::Serve(e)
            })
    };
    Ok((local, fut))
}

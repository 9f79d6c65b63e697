//! Plumbing of the long-running binaries (mesh-apiserver, mesh-agent), defined once: tracing
//! initialisation and the `/metrics` `/healthz` `/readyz` server.
//!
//! Behind the `serve` feature: meshctl depends on this crate without it, so the CLI builds
//! without axum and tracing-subscriber.
//!
//! - `/metrics`: the registry in the OpenMetrics text format.
//! - `/healthz`: the process is alive and its runtime answers (always `ok`).
//! - `/readyz`: whatever the binary's [`Readiness`] says: 200 with its body when ready, 503
//!   with a body naming each failing check otherwise.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cli::{LogArgs, LogFormat};

/// Initialises tracing on stderr: level from `RUST_LOG` (default `info`), text or JSON.
/// A second call (tests starting several components in one process) is a no-op.
pub fn init_tracing(log: &LogArgs) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match log.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// What `/readyz` answers, decided by each binary.
pub trait Readiness: Clone + Send + Sync + 'static {
    /// `Ok(body)`: ready (200). `Err(body)`: not ready (503); the body names what fails.
    fn check(&self) -> Result<String, String>;
}

/// Errors of the health server.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("binding the metrics listener {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving metrics and health: {0}")]
    Serve(#[source] std::io::Error),
}

#[derive(Clone)]
struct AppState<R> {
    registry: Arc<Registry>,
    ready: R,
}

/// The router (exposed for tests).
pub fn health_router<R: Readiness>(registry: Arc<Registry>, ready: R) -> Router {
    Router::new()
        .route("/metrics", get(metrics::<R>))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz::<R>))
        .with_state(AppState { registry, ready })
}

async fn metrics<R: Readiness>(State(st): State<AppState<R>>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &st.registry) {
        Ok(()) => (
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

async fn readyz<R: Readiness>(State(st): State<AppState<R>>) -> Response {
    match st.ready.check() {
        Ok(body) => (StatusCode::OK, body).into_response(),
        Err(body) => (StatusCode::SERVICE_UNAVAILABLE, body).into_response(),
    }
}

/// Binds `addr`; returns the bound address and the serving future (ends on `shutdown`).
pub async fn bind_health<R: Readiness>(
    addr: SocketAddr,
    registry: Arc<Registry>,
    ready: R,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, impl Future<Output = Result<(), HealthError>>), HealthError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| HealthError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| HealthError::Bind { addr, source })?;
    info!(addr = %local, "serving /metrics, /healthz, /readyz");
    let app = health_router(registry, ready);
    let fut = async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
            .map_err(|e| {
                warn!(error = %e, "metrics server failed");
                HealthError::Serve(e)
            })
    };
    Ok((local, fut))
}

pub use alloc::release_freed_memory;

mod alloc {
    #![allow(unsafe_code)]

    /// Gives the memory the process freed back to the system. The mesh's long-running
    /// binaries allocate with mimalloc (ARCHITECTURE.md, *allocator*), which keeps freed
    /// pages for reuse: after a large change (an initial sync, a peer arriving or leaving)
    /// the transient allocations on the way (decoded messages, plans, write buffers) would
    /// otherwise stay in the RSS for good. Collects the calling thread's heap and the
    /// process's arenas; cheap: it did not show in a `perf` profile of the agent's 512k sync.
    pub fn release_freed_memory() {
        // SAFETY: mi_collect only walks the allocator's own state; no pointer is passed.
        unsafe { libmimalloc_sys::mi_collect(true) };
    }
}

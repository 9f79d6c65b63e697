//! The workload every lab pod runs (`mesh-lab workload`): an HTTP/1.1 server on the pod's
//! container ports answering every path with JSON naming who answered:
//! `{"cluster","namespace","pod","node","ip","reply"}` (from `MESH_LAB_*` env; `reply` from the
//! arguments after `--`, else `MESH_LAB_REPLY`, parsed as JSON when it is JSON, else a string).
//!
//! `GET /healthz` answers 200 (503 after `POST /healthz/fail`, 200 again after
//! `POST /healthz/ok`), for readiness probes and for tests and demos that need a backend to
//! turn unready without dying.
//!
//! Every request except a `GET`/`HEAD /healthz` (the kubelet probes every second; those lines
//! would bury the traffic) is logged to its container's log ([`RequestLog`]) as
//! `<time> <client address> "<METHOD> <path>" <status> <reply>`: what `kubectl logs` shows.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

pub use crate::pod_logs::RequestLog;

/// Failures of the workload server.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("no address to listen on")]
    NoListen,
}

/// Who this workload is and what it answers.
#[derive(Clone, Debug, PartialEq)]
pub struct Identity {
    pub cluster: String,
    pub namespace: String,
    pub pod: String,
    pub node: String,
    /// Empty: the address the request arrived on.
    pub ip: String,
    pub reply: Value,
}

impl Identity {
    /// From `MESH_LAB_CLUSTER`, `MESH_LAB_NAMESPACE`, `MESH_LAB_POD`, `MESH_LAB_NODE`,
    /// `MESH_LAB_POD_IP`; `reply` from `args` when given, else `MESH_LAB_REPLY`.
    pub fn from_env(args: &[String]) -> Self {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        let raw = if args.is_empty() {
            std::env::var("MESH_LAB_REPLY").ok()
        } else {
            Some(args.join(" "))
        };
        Identity {
            cluster: var("MESH_LAB_CLUSTER"),
            namespace: var("MESH_LAB_NAMESPACE"),
            pod: var("MESH_LAB_POD"),
            node: var("MESH_LAB_NODE"),
            ip: var("MESH_LAB_POD_IP"),
            reply: raw.map(|r| parse_reply(&r)).unwrap_or(Value::Null),
        }
    }
}

/// JSON when the text is JSON, else the text as a string.
pub fn parse_reply(raw: &str) -> Value {
    serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()))
}

struct Shared {
    id: Identity,
    healthy: AtomicBool,
    log: RequestLog,
}

/// Serves on every address until `shutdown` completes, then stops accepting and returns.
/// Requests are logged to `log`.
pub async fn serve(
    listen: &[SocketAddr],
    id: Identity,
    log: RequestLog,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkloadError> {
    if listen.is_empty() {
        return Err(WorkloadError::NoListen);
    }
    let shared = Arc::new(Shared {
        id,
        healthy: AtomicBool::new(true),
        log,
    });
    let mut accept = JoinSet::new();
    for addr in listen {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|source| WorkloadError::Bind {
                addr: *addr,
                source,
            })?;
        let bound = l.local_addr().unwrap_or(*addr);
        tracing::info!(addr = %bound, "workload listening");
        shared.log.record(
            bound.port(),
            &format!(
                "{} serving {bound}",
                crate::kube_api::util::rfc3339_millis(std::time::SystemTime::now())
            ),
        );
        accept.spawn(accept_loop(l, shared.clone()));
    }
    shutdown.await;
    tracing::info!("workload shutting down");
    accept.shutdown().await;
    Ok(())
}

async fn accept_loop(l: TcpListener, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (tcp, peer) = match l.accept().await {
            Ok(x) => x,
            Err(error) => {
                tracing::debug!(%error, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        let local = tcp.local_addr().ok();
        let shared = shared.clone();
        conns.spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(respond(&shared, local, peer, req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn respond(
    shared: &Shared,
    local: Option<SocketAddr>,
    peer: SocketAddr,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let (resp, body) = reply(shared, local, &req);
    let probe =
        matches!(*req.method(), Method::GET | Method::HEAD) && req.uri().path() == "/healthz";
    if !probe {
        let t = std::time::SystemTime::now();
        shared.log.record(
            local.map_or(0, |a| a.port()),
            &format!(
                "{} {peer} \"{} {}\" {} {}",
                crate::kube_api::util::rfc3339_millis(t),
                req.method(),
                req.uri(),
                resp.status().as_u16(),
                body.trim_end()
            ),
        );
    }
    resp
}

/// The response and its body text (for the log).
fn reply(
    shared: &Shared,
    local: Option<SocketAddr>,
    req: &Request<hyper::body::Incoming>,
) -> (Response<Full<Bytes>>, String) {
    let text = |code: StatusCode, body: &str| {
        let body = format!("{body}\n");
        Response::builder()
            .status(code)
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from(body.clone())))
            .map(|r| (r, body))
            .expect("valid response")
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz") => {
            if shared.healthy.load(Ordering::Relaxed) {
                text(StatusCode::OK, "ok")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "unhealthy")
            }
        }
        (&Method::POST, "/healthz/fail") => {
            shared.healthy.store(false, Ordering::Relaxed);
            tracing::info!("health set to failing");
            text(StatusCode::OK, "failing")
        }
        (&Method::POST, "/healthz/ok") => {
            shared.healthy.store(true, Ordering::Relaxed);
            tracing::info!("health set to ok");
            text(StatusCode::OK, "ok")
        }
        _ => {
            let id = &shared.id;
            let ip = if id.ip.is_empty() {
                local.map(|a| a.ip().to_string()).unwrap_or_default()
            } else {
                id.ip.clone()
            };
            let body = json!({
                "cluster": id.cluster,
                "namespace": id.namespace,
                "pod": id.pod,
                "node": id.node,
                "ip": ip,
                "reply": id.reply,
            });
            let body = format!("{body}\n");
            Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.clone())))
                .map(|r| (r, body))
                .expect("valid response")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_json_when_they_parse() {
        assert_eq!(
            parse_reply(r#"{"planet":"Alderaan"}"#),
            json!({"planet": "Alderaan"})
        );
        assert_eq!(parse_reply("42"), json!(42));
        assert_eq!(parse_reply("hello there"), json!("hello there"));
    }
}

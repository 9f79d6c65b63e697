//! The cluster DNS of one lab cluster: a small authoritative server for `cluster.local`
//! over UDP and TCP, answering from the cluster's [`Store`] at query time (so answers follow
//! the objects live, with no cache to go stale).
//!
//! - `<svc>.<ns>.svc.cluster.local` A: the ClusterIP; for a headless Service the addresses of
//!   its ready endpoints (EndpointSlices); for ExternalName a CNAME.
//! - `<a-b-c-d>.<ns>.pod.cluster.local` A: `a.b.c.d` (CoreDNS's "pods insecure").
//! - Existing names without data of the asked type (AAAA, the `svc` and namespace levels):
//!   NOERROR with no answer; unknown names in `cluster.local`: NXDOMAIN; both with the zone's
//!   SOA (negative TTL 5 s). Names outside `cluster.local`: REFUSED (the lab network is
//!   closed: there is nothing to forward to).
//!
//! Short names (`<svc>`, `<svc>.<ns>`) are the client's search list at work (the lab's pod
//! resolv.conf has `search <ns>.svc.cluster.local svc.cluster.local cluster.local`).
//!
//! In a lab cluster this server is the `coredns` pod of `kube-system` (labels
//! `k8s-app=kube-dns`, behind the `kube-dns` Service whose ClusterIP pods use as their
//! nameserver): the runtime binds it inside that pod's network namespace, at the pod IP, so
//! it is an endpoint with CoreDNS's identity like in a real cluster.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, CNAME, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::controllers::{arr_at, str_at};
use crate::kube_api::resources as r;
use crate::kube_api::selector::LabelSelector;
use crate::kube_api::store::Store;

pub const ZONE: &str = "cluster.local";
/// TTL of answers and of negative answers (CoreDNS's kubernetes plugin default).
pub const TTL: u32 = 5;

/// Failures to start the DNS server.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("binding DNS {proto} {addr}: {source}")]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Entry point.
pub struct DnsServer;

/// A running server; dropping it stops it.
pub struct DnsHandle {
    addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl DnsServer {
    /// Serves `cluster.local` from `store` on `addr`, UDP and TCP on the same port (port 0:
    /// a free port, the same for both).
    pub async fn start(store: Arc<Store>, addr: SocketAddr) -> Result<DnsHandle, DnsError> {
        let (udp, tcp) = bind_pair(addr).await?;
        let local = udp.local_addr().map_err(|source| DnsError::Bind {
            proto: "udp",
            addr,
            source,
        })?;
        let span = tracing::info_span!("dns", addr = %local);
        let udp_task = tokio::spawn(serve_udp(udp, store.clone()).instrument(span.clone()));
        let tcp_task = tokio::spawn(serve_tcp(tcp, store).instrument(span));
        tracing::info!(addr = %local, "cluster DNS serving");
        Ok(DnsHandle {
            addr: local,
            tasks: vec![udp_task, tcp_task],
        })
    }
}

impl DnsServer {
    /// Serves `cluster.local` from `store` on sockets bound elsewhere (e.g. inside a pod's
    /// network namespace, which a socket keeps after the binding thread leaves it).
    pub fn serve(
        store: Arc<Store>,
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
    ) -> Result<DnsHandle, DnsError> {
        let local = udp.local_addr().map_err(|source| DnsError::Bind {
            proto: "udp",
            addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            source,
        })?;
        let wrap = |proto, source| DnsError::Bind {
            proto,
            addr: local,
            source,
        };
        udp.set_nonblocking(true).map_err(|e| wrap("udp", e))?;
        tcp.set_nonblocking(true).map_err(|e| wrap("tcp", e))?;
        let udp = UdpSocket::from_std(udp).map_err(|e| wrap("udp", e))?;
        let tcp = TcpListener::from_std(tcp).map_err(|e| wrap("tcp", e))?;
        let span = tracing::info_span!("dns", addr = %local);
        let udp_task = tokio::spawn(serve_udp(udp, store.clone()).instrument(span.clone()));
        let tcp_task = tokio::spawn(serve_tcp(tcp, store).instrument(span));
        tracing::info!(addr = %local, "cluster DNS serving");
        Ok(DnsHandle {
            addr: local,
            tasks: vec![udp_task, tcp_task],
        })
    }
}

async fn bind_pair(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), DnsError> {
    let mut last = None;
    // With port 0 the UDP port may be taken for TCP: try a few.
    for _ in 0..16 {
        let udp = UdpSocket::bind(addr)
            .await
            .map_err(|source| DnsError::Bind {
                proto: "udp",
                addr,
                source,
            })?;
        let bound = udp.local_addr().map_err(|source| DnsError::Bind {
            proto: "udp",
            addr,
            source,
        })?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(source) if addr.port() == 0 => last = Some(source),
            Err(source) => {
                return Err(DnsError::Bind {
                    proto: "tcp",
                    addr: bound,
                    source,
                });
            }
        }
    }
    Err(DnsError::Bind {
        proto: "tcp",
        addr,
        source: last.unwrap_or_else(|| std::io::Error::other("no free port")),
    })
}

impl DnsHandle {
    /// The bound address (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving.
    pub async fn shutdown(mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

impl Drop for DnsHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn serve_udp(sock: UdpSocket, store: Arc<Store>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(error) => {
                tracing::debug!(%error, "udp receive failed");
                continue;
            }
        };
        let Some(resp) = handle(&store, &buf[..n], true) else {
            continue;
        };
        if let Err(error) = sock.send_to(&resp, peer).await {
            tracing::debug!(%peer, %error, "udp send failed");
        }
    }
}

async fn serve_tcp(listener: TcpListener, store: Arc<Store>) {
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(error) => {
                tracing::debug!(%error, "tcp accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let store = store.clone();
        tokio::spawn(async move {
            if let Err(error) = serve_conn(conn, &store).await {
                tracing::debug!(%peer, %error, "tcp connection ended");
            }
        });
    }
}

async fn serve_conn(mut conn: TcpStream, store: &Store) -> std::io::Result<()> {
    loop {
        let len = match conn.read_u16().await {
            Ok(l) => l as usize,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut msg = vec![0u8; len];
        conn.read_exact(&mut msg).await?;
        if let Some(resp) = handle(store, &msg, false) {
            let l = u16::try_from(resp.len())
                .map_err(|_| std::io::Error::other("response too large"))?;
            conn.write_u16(l).await?;
            conn.write_all(&resp).await?;
        }
    }
}

/// What a name resolves to.
#[derive(Debug, PartialEq)]
enum Answer {
    Refused,
    NxDomain,
    /// The name exists; these are its A records (possibly none).
    A(Vec<Ipv4Addr>),
    Cname(String),
}

/// Answers one wire-format query; `None` for garbage that is not worth a reply.
pub fn handle(store: &Store, wire: &[u8], udp: bool) -> Option<Vec<u8>> {
    let req = match Message::from_vec(wire) {
        Ok(m) => m,
        Err(error) => {
            tracing::debug!(%error, "undecodable DNS message");
            // Echo the id with FORMERR when there is a header to echo.
            if wire.len() >= 2 {
                let id = u16::from_be_bytes([wire[0], wire[1]]);
                return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
                    .to_vec()
                    .ok();
            }
            return None;
        }
    };
    if req.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut resp = Message::new(req.metadata.id, MessageType::Response, req.metadata.op_code);
    resp.metadata = Metadata::response_from_request(&req.metadata);
    resp.metadata.authoritative = true;
    if let Some(e) = &req.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(1232.min(e.max_payload().max(512)));
        resp.edns = Some(edns);
    }
    let max = if udp {
        req.edns
            .as_ref()
            .map(|e| e.max_payload().clamp(512, 1232))
            .unwrap_or(512) as usize
    } else {
        usize::MAX
    };
    if req.metadata.op_code != OpCode::Query || req.queries.len() != 1 {
        resp.metadata.response_code = ResponseCode::NotImp;
        return resp.to_vec().ok();
    }
    let q = req.queries[0].clone();
    resp.add_query(q.clone());
    let qname = q.name.to_lowercase().to_string();
    let answer = lookup(store, qname.trim_end_matches('.'));
    tracing::debug!(name = %qname, qtype = %q.query_type, ?answer, "query");
    match answer {
        Answer::Refused => resp.metadata.response_code = ResponseCode::Refused,
        Answer::NxDomain => {
            resp.metadata.response_code = ResponseCode::NXDomain;
            resp.add_authority(soa());
        }
        Answer::A(ips) => {
            if matches!(q.query_type, RecordType::A | RecordType::ANY) && !ips.is_empty() {
                for ip in ips {
                    resp.add_answer(Record::from_rdata(q.name.clone(), TTL, RData::A(A(ip))));
                }
            } else if q.query_type == RecordType::SOA && qname.trim_end_matches('.') == ZONE {
                resp.add_answer(soa());
            } else {
                resp.add_authority(soa());
            }
        }
        Answer::Cname(target) => match Name::from_ascii(format!("{target}.")) {
            Ok(t) => {
                resp.add_answer(Record::from_rdata(
                    q.name.clone(),
                    TTL,
                    RData::CNAME(CNAME(t)),
                ));
            }
            Err(_) => resp.metadata.response_code = ResponseCode::ServFail,
        },
    }
    let mut out = resp.to_vec().ok()?;
    if out.len() > max {
        resp.metadata.truncation = true;
        resp.answers.clear();
        resp.authorities.clear();
        out = resp.to_vec().ok()?;
    }
    Some(out)
}

fn soa() -> Record {
    let zone = Name::from_ascii(format!("{ZONE}.")).expect("valid zone");
    let mname = Name::from_ascii(format!("ns.dns.{ZONE}.")).expect("valid name");
    let rname = Name::from_ascii(format!("hostmaster.{ZONE}.")).expect("valid name");
    let serial = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        & 0xffff_ffff) as u32;
    Record::from_rdata(
        zone,
        TTL,
        RData::SOA(SOA::new(mname, rname, serial, 7200, 1800, 86400, TTL)),
    )
}

/// Resolves a lower-case name without the trailing dot.
fn lookup(store: &Store, name: &str) -> Answer {
    let rest = if name == ZONE {
        ""
    } else if let Some(r) = name.strip_suffix(&format!(".{ZONE}")) {
        r
    } else {
        return Answer::Refused;
    };
    let labels: Vec<&str> = if rest.is_empty() {
        Vec::new()
    } else {
        rest.split('.').collect()
    };
    let ns_exists = |ns: &str| store.get(&r::NAMESPACES, None, ns).is_ok();
    match labels.as_slice() {
        [] | ["svc"] | ["pod"] => Answer::A(Vec::new()),
        [ns, "svc"] | [ns, "pod"] if ns_exists(ns) => Answer::A(Vec::new()),
        [svc, ns, "svc"] => match store.get(&r::SERVICES, Some(ns), svc) {
            Ok(s) => service_answer(store, &s),
            Err(_) => Answer::NxDomain,
        },
        [ip, ns, "pod"] if ns_exists(ns) => match ip.replace('-', ".").parse::<Ipv4Addr>() {
            Ok(a) => Answer::A(vec![a]),
            Err(_) => Answer::NxDomain,
        },
        _ => Answer::NxDomain,
    }
}

fn service_answer(store: &Store, svc: &Value) -> Answer {
    if str_at(svc, "/spec/type") == "ExternalName" {
        let target = str_at(svc, "/spec/externalName").trim_end_matches('.');
        return if target.is_empty() {
            Answer::A(Vec::new())
        } else {
            Answer::Cname(target.to_string())
        };
    }
    let cip = str_at(svc, "/spec/clusterIP");
    if !cip.is_empty() && cip != "None" {
        return Answer::A(cip.parse().ok().into_iter().collect());
    }
    // Headless: the ready endpoints.
    let ns = svc
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let name = svc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let Ok(sel) = LabelSelector::parse(&format!("kubernetes.io/service-name={name}")) else {
        return Answer::A(Vec::new());
    };
    let (slices, _) = store.list(&r::ENDPOINTSLICES, Some(ns), &sel, &Default::default());
    let publish_not_ready =
        svc.pointer("/spec/publishNotReadyAddresses") == Some(&Value::Bool(true));
    let mut ips: Vec<Ipv4Addr> = slices
        .iter()
        .filter(|s| str_at(s, "/addressType") == "IPv4")
        .flat_map(|s| arr_at(s, "/endpoints").cloned().collect::<Vec<_>>())
        .filter(|e| {
            publish_not_ready || e.pointer("/conditions/ready") != Some(&Value::Bool(false))
        })
        .flat_map(|e| {
            arr_at(&e, "/addresses")
                .filter_map(|a| a.as_str()?.parse().ok())
                .collect::<Vec<_>>()
        })
        .collect();
    ips.sort();
    ips.dedup();
    Answer::A(ips)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube_api::store::StoreConfig;
    use serde_json::json;

    #[test]
    fn names_in_and_out_of_the_zone() {
        let s = Store::new(StoreConfig::default());
        s.create(&r::NAMESPACES, None, json!({"metadata": {"name": "a"}}))
            .unwrap();
        s.create(&r::SERVICES, Some("a"), json!({"metadata": {"name": "web"}, "spec": {"clusterIP": "10.96.0.20", "ports": [{"port": 80}]}}))
            .unwrap();
        s.create(&r::SERVICES, Some("a"), json!({"metadata": {"name": "ext"}, "spec": {"type": "ExternalName", "externalName": "db.example.org."}}))
            .unwrap();
        assert_eq!(
            lookup(&s, "web.a.svc.cluster.local"),
            Answer::A(vec!["10.96.0.20".parse().unwrap()])
        );
        assert_eq!(
            lookup(&s, "ext.a.svc.cluster.local"),
            Answer::Cname("db.example.org".into())
        );
        assert_eq!(lookup(&s, "nope.a.svc.cluster.local"), Answer::NxDomain);
        assert_eq!(lookup(&s, "a.svc.cluster.local"), Answer::A(vec![]));
        assert_eq!(lookup(&s, "b.svc.cluster.local"), Answer::NxDomain);
        assert_eq!(
            lookup(&s, "10-1-2-3.a.pod.cluster.local"),
            Answer::A(vec!["10.1.2.3".parse().unwrap()])
        );
        assert_eq!(lookup(&s, "x.y.web.a.svc.cluster.local"), Answer::NxDomain);
        assert_eq!(lookup(&s, "example.com"), Answer::Refused);
        assert_eq!(lookup(&s, "notcluster.local"), Answer::Refused);
        assert_eq!(handle(&s, &[1], true), None);
    }
}

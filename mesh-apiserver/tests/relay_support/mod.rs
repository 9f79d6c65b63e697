//! A test Observer server standing in for an agent's (real gRPC over real mutual TLS, with
//! the agent's node certificate), serving Flow values the test builds; and Flow builders.
//! Shared by mesh-apiserver's relay tests and meshctl's observe tests (`#[path]`).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use futures::Stream;
use mesh_apiserver::{Args, Running, StartOptions};
use mesh_core::ClusterName;
use mesh_proto::flows::FlowFilters;
use mesh_proto::hubble::flow::{
    CiliumEventType, DropReason, Endpoint, Flow, Ip, Layer4, Policy, Service, Tcp,
    TrafficDirection, Verdict, layer4,
};
use mesh_proto::hubble::observer::get_flows_response::ResponseTypes;
use mesh_proto::hubble::observer::observer_client::ObserverClient;
use mesh_proto::hubble::observer::observer_server::{Observer, ObserverServer};
use mesh_proto::hubble::observer::*;
use mesh_proto::keys::Keys;
use mesh_proto::pb;
use mesh_proto::peer_entry::{PeerSpec, render_entry};
use mesh_proto::tls::{self, ClientEndpoint, ClientTls, Role, ServerTls, TlsIdentity, TrustStore};
use mesh_testkit::certs::TestCa;
use mesh_testkit::etcd::Etcd;
use prost::Message;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// A running test agent Observer server.
pub struct TestAgent {
    pub node: String,
    pub addr: SocketAddr,
    flows: Arc<Mutex<Vec<Flow>>>,
    live: broadcast::Sender<Flow>,
    /// Callers seen, as `Caller` strings.
    pub callers: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
    server: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl TestAgent {
    /// Serves `flows` as node `node` of `ca`'s cluster, on a free loopback port.
    pub async fn start(ca: &TestCa, node: &str, flows: Vec<Flow>) -> TestAgent {
        let cert = ca.issue(&format!("agent/{node}"));
        let identity =
            TlsIdentity::from_pem(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes()).unwrap();
        let cluster: ClusterName = ca.cluster.parse().unwrap();
        let trust = TrustStore::new(
            cluster.clone(),
            tls::parse_certs(ca.cert_pem.as_bytes(), "ca").unwrap(),
        )
        .unwrap();
        let server_tls = ServerTls::new(identity, trust).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (live, _) = broadcast::channel(1024);
        let svc = Svc {
            tls: server_tls.clone(),
            flows: Arc::new(Mutex::new(flows)),
            live: live.clone(),
            callers: Arc::default(),
        };
        let flows = svc.flows.clone();
        let callers = svc.callers.clone();
        let stop = CancellationToken::new();
        let incoming = tls::tls_incoming(listener, server_tls, tls::IncomingOptions::default());
        let s = stop.clone();
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(ObserverServer::new(svc))
                .serve_with_incoming_shutdown(incoming, s.cancelled())
                .await;
        });
        TestAgent {
            node: node.into(),
            addr,
            flows,
            live,
            callers,
            stop,
            server: Mutex::new(Some(server)),
        }
    }

    /// Records a new flow and sends it to followers.
    pub fn emit(&self, f: Flow) {
        self.flows.lock().unwrap().push(f.clone());
        let _ = self.live.send(f);
    }

    /// Stops serving, and returns once the server has closed its connections (its
    /// graceful shutdown sends them GOAWAY): a client's next request cannot reach it.
    pub async fn stop(&self) {
        self.stop.cancel();
        let server = self.server.lock().unwrap().take();
        if let Some(server) = server {
            tokio::time::timeout(Duration::from_secs(10), server)
                .await
                .expect("the test agent's server did not stop within 10 s")
                .expect("the test agent's server task");
        }
    }
}

#[derive(Clone)]
struct Svc {
    tls: Arc<ServerTls>,
    flows: Arc<Mutex<Vec<Flow>>>,
    live: broadcast::Sender<Flow>,
    callers: Arc<Mutex<Vec<String>>>,
}

impl Svc {
    /// As the agent authorizes: callers of its own cluster (apiserver replicas, operators).
    fn auth<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let caller = self.tls.authenticate(req)?;
        self.callers.lock().unwrap().push(caller.to_string());
        match caller.role {
            Role::Replica | Role::Operator { .. } => Ok(()),
            _ => Err(Status::permission_denied(format!(
                "{caller} may not read flows"
            ))),
        }
    }
}

fn ns(t: &Option<prost_types::Timestamp>) -> i128 {
    t.as_ref().map_or(0, |t| {
        i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos)
    })
}

type FlowStream = Pin<Box<dyn Stream<Item = Result<GetFlowsResponse, Status>> + Send>>;
type Opaque<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn response(f: Flow) -> GetFlowsResponse {
    GetFlowsResponse {
        node_name: f.node_name.clone(),
        time: f.time,
        response_types: Some(ResponseTypes::Flow(f)),
    }
}

#[tonic::async_trait]
impl Observer for Svc {
    type GetFlowsStream = FlowStream;

    async fn get_flows(
        &self,
        req: Request<GetFlowsRequest>,
    ) -> Result<Response<FlowStream>, Status> {
        self.auth(&req)?;
        let r = req.into_inner();
        let filters = FlowFilters::new(&r.whitelist, &r.blacklist)?;
        let in_time = |f: &Flow| {
            (r.since.is_none() || ns(&f.time) >= ns(&r.since))
                && (r.until.is_none() || ns(&f.time) <= ns(&r.until))
        };
        let mut live = self.live.subscribe();
        let mut got: Vec<Flow> = self
            .flows
            .lock()
            .unwrap()
            .iter()
            .filter(|f| filters.matches(f) && in_time(f))
            .cloned()
            .collect();
        let n = r.number as usize;
        if n > 0 && got.len() > n {
            got = if r.first {
                got[..n].to_vec()
            } else {
                got[got.len() - n..].to_vec()
            };
        }
        let follow = r.follow;
        let s = async_stream::stream! {
            for f in got {
                yield Ok(response(f));
            }
            if follow {
                while let Ok(f) = live.recv().await {
                    if filters.matches(&f) {
                        yield Ok(response(f));
                    }
                }
            }
        };
        Ok(Response::new(Box::pin(s)))
    }

    type GetAgentEventsStream = Opaque<GetAgentEventsResponse>;
    async fn get_agent_events(
        &self,
        _: Request<GetAgentEventsRequest>,
    ) -> Result<Response<Self::GetAgentEventsStream>, Status> {
        Err(Status::unimplemented("no agent events"))
    }

    type GetDebugEventsStream = Opaque<GetDebugEventsResponse>;
    async fn get_debug_events(
        &self,
        _: Request<GetDebugEventsRequest>,
    ) -> Result<Response<Self::GetDebugEventsStream>, Status> {
        Err(Status::unimplemented("no debug events"))
    }

    async fn get_nodes(
        &self,
        _: Request<GetNodesRequest>,
    ) -> Result<Response<GetNodesResponse>, Status> {
        Err(Status::unimplemented("an agent lists no nodes"))
    }

    async fn server_status(
        &self,
        req: Request<ServerStatusRequest>,
    ) -> Result<Response<ServerStatusResponse>, Status> {
        self.auth(&req)?;
        let n = self.flows.lock().unwrap().len() as u64;
        Ok(Response::new(ServerStatusResponse {
            num_flows: n,
            max_flows: 4096,
            seen_flows: n,
            uptime_ns: 1,
            num_connected_nodes: None,
            num_unavailable_nodes: None,
            unavailable_nodes: vec![],
            version: "test-agent".into(),
        }))
    }
}

// ---------------------------------------------------------------- flows

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

pub fn ts(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms / 1000,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

pub fn endpoint(cluster: &str, ns: &str, pod: &str, app: &str, identity: u32) -> Endpoint {
    Endpoint {
        id: 0,
        identity,
        cluster_name: cluster.into(),
        namespace: ns.into(),
        labels: vec![
            format!("k8s:app={app}"),
            format!("k8s:io.cilium.k8s.policy.cluster={cluster}"),
            format!("k8s:io.kubernetes.pod.namespace={ns}"),
        ],
        pod_name: pod.into(),
        workloads: vec![],
    }
}

/// What a test flow is.
#[derive(Clone)]
pub struct FlowSpec {
    pub ms: i64,
    /// `cluster/node` of the record.
    pub node: String,
    pub direction: TrafficDirection,
    pub source: Endpoint,
    pub source_ip: String,
    pub source_port: u32,
    pub destination: Endpoint,
    pub destination_ip: String,
    pub destination_port: u32,
    pub service: Option<(String, String)>,
    pub verdict: Verdict,
    pub drop_reason: DropReason,
    pub denied_by: Vec<Policy>,
    pub uuid: String,
}

impl FlowSpec {
    /// x-wing (east, 10.1.1.5) connecting to a rebel-base pod of `dst_cluster` at `dst_ip`:80
    /// through service default/rebel-base, seen at the client's node (egress at connect).
    pub fn egress(ms: i64, node: &str, dst_cluster: &str, dst_ip: &str) -> FlowSpec {
        FlowSpec {
            ms,
            node: node.into(),
            direction: TrafficDirection::Egress,
            source: endpoint("east", "default", "x-wing", "x-wing", 0x1_0100),
            source_ip: "10.1.1.5".into(),
            source_port: 0,
            destination: endpoint(dst_cluster, "default", "rebel-base", "rebel-base", 0x2_0100),
            destination_ip: dst_ip.into(),
            destination_port: 80,
            service: Some(("default".into(), "rebel-base".into())),
            verdict: Verdict::Forwarded,
            drop_reason: DropReason::Unknown,
            denied_by: vec![],
            uuid: format!("{node}-{ms}"),
        }
    }

    /// The server's side of [`FlowSpec::egress`] (ingress at the first packet).
    pub fn ingress(ms: i64, node: &str, dst_cluster: &str, dst_ip: &str) -> FlowSpec {
        FlowSpec {
            direction: TrafficDirection::Ingress,
            source_port: 40000 + (ms % 20000) as u32,
            service: None,
            ..Self::egress(ms, node, dst_cluster, dst_ip)
        }
    }

    pub fn denied(mut self, policy_ns: &str, policy: &str) -> FlowSpec {
        self.verdict = Verdict::Dropped;
        self.drop_reason = DropReason::PolicyDeny;
        self.denied_by = vec![Policy {
            name: policy.into(),
            namespace: policy_ns.into(),
            kind: "CiliumNetworkPolicy".into(),
            ..Default::default()
        }];
        self
    }

    pub fn build(self) -> Flow {
        let dropped = self.verdict == Verdict::Dropped;
        let event_type = if dropped {
            1
        } else if self.direction == TrafficDirection::Egress {
            7
        } else {
            4
        };
        let ingress = self.direction == TrafficDirection::Ingress;
        Flow {
            time: Some(ts(self.ms)),
            uuid: self.uuid,
            verdict: self.verdict as i32,
            drop_reason: if dropped { self.drop_reason as u32 } else { 0 },
            drop_reason_desc: if dropped { self.drop_reason as i32 } else { 0 },
            ip: Some(Ip {
                source: self.source_ip,
                destination: self.destination_ip,
                ip_version: 1,
                encrypted: false,
            }),
            l4: Some(Layer4 {
                protocol: Some(layer4::Protocol::Tcp(Tcp {
                    source_port: self.source_port,
                    destination_port: self.destination_port,
                    flags: None,
                })),
            }),
            source: Some(self.source),
            destination: Some(self.destination),
            r#type: 1,
            node_name: self.node,
            event_type: Some(CiliumEventType {
                r#type: event_type,
                sub_type: 0,
            }),
            destination_service: self
                .service
                .map(|(namespace, name)| Service { name, namespace }),
            traffic_direction: self.direction as i32,
            is_reply: Some(false),
            ingress_denied_by: if ingress {
                self.denied_by.clone()
            } else {
                vec![]
            },
            egress_denied_by: if ingress { vec![] } else { self.denied_by },
            ..Default::default()
        }
    }
}

/// The uuids of the flows in `items`, in order.
pub fn uuids(items: &[GetFlowsResponse]) -> Vec<String> {
    items
        .iter()
        .filter_map(|r| match &r.response_types {
            Some(ResponseTypes::Flow(f)) => Some(f.uuid.clone()),
            _ => None,
        })
        .collect()
}

/// The node names of the NODE_UNAVAILABLE events in `items`.
pub fn unavailable(items: &[GetFlowsResponse]) -> Vec<String> {
    items
        .iter()
        .filter_map(|r| match &r.response_types {
            Some(ResponseTypes::NodeStatus(s)) => Some(s.node_names.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

pub const STEP: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------- clusters

/// One cluster: a real etcd and the real apiserver (serving side, mutual TLS, no
/// publisher), its peers read from a directory.
pub struct Cluster {
    pub name: String,
    pub ca: TestCa,
    pub dir: tempfile::TempDir,
    pub etcd: Etcd,
    running: Option<Running>,
    shutdown: CancellationToken,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Cluster {
    /// A cluster whose apiserver (serving side, mutual TLS) reads its peers from a
    /// directory (re-read every 100 ms).
    pub async fn start(name: &str, id: u32, pod_cidr: &str) -> Cluster {
        let ca = TestCa::new(name);
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = ca.issue("apiserver").write(dir.path(), "apiserver");
        let ca_path = ca.write(dir.path());
        let peers = dir.path().join("peers");
        std::fs::create_dir(&peers).unwrap();
        let etcd = Etcd::start();
        let argv: Vec<String> = [
            "mesh-apiserver",
            "--cluster-name",
            name,
            "--cluster-id",
            &id.to_string(),
            "--pod-cidr",
            pod_cidr,
            "--etcd-endpoints",
            &etcd.endpoint(),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--tls-ca",
            ca_path.to_str().unwrap(),
            "--peers-dir",
            peers.to_str().unwrap(),
            "--peers-dir-interval",
            "100ms",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let settings = Args::try_parse_from(argv).unwrap().validate().unwrap();
        let shutdown = CancellationToken::new();
        let running = mesh_apiserver::start(
            settings,
            StartOptions { publisher: false },
            shutdown.clone(),
        )
        .await
        .expect("apiserver starts");
        running.index.wait_loaded().await.unwrap();
        Cluster {
            name: name.into(),
            ca,
            dir,
            etcd,
            running: Some(running),
            shutdown,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.running.as_ref().unwrap().grpc_addr
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), r.shutdown()).await;
        }
    }

    /// Makes `other` a peer of this cluster (its address and CA in the peers directory).
    pub fn peer_with(&self, other: &Cluster) {
        let spec = PeerSpec {
            name: other.name.parse().unwrap(),
            address: other.addr().to_string(),
            ca_pem: other.ca.cert_pem.clone(),
            server_name: None,
        };
        std::fs::write(
            self.dir
                .path()
                .join("peers")
                .join(format!("{}.yaml", other.name)),
            render_entry(&spec),
        )
        .unwrap();
    }

    /// An agent status record, as the agent reports it.
    pub async fn report(&self, node: &str, observer_address: &str) {
        let mut etcd = etcd_client::Client::connect([self.etcd.endpoint()], None)
            .await
            .unwrap();
        let status = pb::AgentStatus {
            node: node.into(),
            observer_address: observer_address.into(),
            ..Default::default()
        };
        etcd.put(Keys::default().agent(node), status.encode_to_vec(), None)
            .await
            .unwrap();
    }

    /// An Observer client of this cluster's apiserver with `who`'s certificate of `ca`.
    /// Writes an operator certificate for meshctl: (CA, cert, key) paths.
    pub fn operator_files(&self) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
        let (cert, key) = self
            .ca
            .issue("operator/admin")
            .write(self.dir.path(), "operator");
        (
            self.dir.path().join(format!("{}-ca.crt", self.name)),
            cert,
            key,
        )
    }

    pub async fn client_as(&self, ca: &TestCa, who: &str) -> ObserverClient<Channel> {
        let cert = ca.issue(who);
        let id = TlsIdentity::from_pem(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes()).unwrap();
        let roots = tls::parse_certs(self.ca.cert_pem.as_bytes(), "ca").unwrap();
        let name: ClusterName = self.name.parse().unwrap();
        let client_tls = ClientTls::new(roots, id, Some(name)).unwrap();
        let ch = tls::connect_channel(&ClientEndpoint::new(self.addr().to_string(), client_tls))
            .await
            .expect("connects to the relay");
        ObserverClient::new(ch)
    }
}

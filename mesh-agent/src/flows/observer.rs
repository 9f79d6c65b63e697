//! The agent's Hubble Observer API: `GetFlows`, `ServerStatus` and `GetNodes` over this
//! node's flow ring, served with mutual TLS and the node certificate. Callers must belong to
//! the agent's cluster: its apiserver (the relay) or an operator; other agents and peers are
//! refused.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::Stream;
use mesh_proto::flows::FlowFilters;
use mesh_proto::hubble::flow::{Flow, LostEvent, LostEventSource};
use mesh_proto::hubble::observer::{
    self as obs, GetFlowsRequest, GetFlowsResponse, get_flows_response::ResponseTypes,
    observer_server::Observer,
};
use mesh_proto::hubble::relay::NodeState;
use mesh_proto::tls::{Role, ServerTls};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::ring::{FlowRing, RingItem, select};

/// The Observer service of one agent.
#[derive(Clone)]
pub struct AgentObserver {
    ring: Arc<FlowRing>,
    /// `cluster/node`, as flows name it.
    node_name: String,
    address: String,
    /// `None`: plaintext (tests on loopback only).
    tls: Option<Arc<ServerTls>>,
    started: Instant,
}

impl AgentObserver {
    pub fn new(
        ring: Arc<FlowRing>,
        node_name: String,
        address: String,
        tls: Option<Arc<ServerTls>>,
    ) -> Self {
        Self {
            ring,
            node_name,
            address,
            tls,
            started: Instant::now(),
        }
    }

    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(tls) = &self.tls else {
            return Ok(());
        };
        let caller = tls.authenticate(request).map_err(Status::from)?;
        match caller.role {
            Role::Replica | Role::Operator { .. } => Ok(()),
            Role::Agent { .. } | Role::Peer => Err(Status::permission_denied(format!(
                "{caller} may not read this node's flows: only the apiserver of cluster {} and \
                 its operators may",
                tls.trust().local_cluster()
            ))),
        }
    }

    fn response(
        &self,
        item: ResponseTypes,
        time: Option<prost_types::Timestamp>,
    ) -> GetFlowsResponse {
        GetFlowsResponse {
            response_types: Some(item),
            node_name: self.node_name.clone(),
            time,
        }
    }
}

fn to_system_time(t: &prost_types::Timestamp) -> Result<SystemTime, Status> {
    SystemTime::try_from(*t)
        .map_err(|e| Status::invalid_argument(format!("invalid timestamp: {e}")))
}

fn flow_time(f: &Flow) -> Option<SystemTime> {
    f.time.as_ref().and_then(|t| SystemTime::try_from(*t).ok())
}

type FlowStream = Pin<Box<dyn Stream<Item = Result<GetFlowsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Observer for AgentObserver {
    type GetFlowsStream = FlowStream;
    type GetAgentEventsStream =
        Pin<Box<dyn Stream<Item = Result<obs::GetAgentEventsResponse, Status>> + Send>>;
    type GetDebugEventsStream =
        Pin<Box<dyn Stream<Item = Result<obs::GetDebugEventsResponse, Status>> + Send>>;

    async fn get_flows(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowsStream>, Status> {
        self.authorize(&request)?;
        let req = request.into_inner();
        if req.first && req.follow {
            return Err(Status::invalid_argument(
                "GetFlows: `first` and `follow` cannot be combined",
            ));
        }
        let filters = FlowFilters::new(&req.whitelist, &req.blacklist)?;
        let since = req.since.as_ref().map(to_system_time).transpose()?;
        let until = req.until.as_ref().map(to_system_time).transpose()?;
        let in_window = move |f: &Flow| {
            let t = flow_time(f);
            since.is_none_or(|s| t.is_some_and(|t| t >= s))
                && until.is_none_or(|u| t.is_some_and(|t| t <= u))
        };
        // Subscribe before the snapshot: what arrives in between is in the broadcast, and
        // numbers tell what the snapshot already had.
        let mut live = req.follow.then(|| self.ring.subscribe());
        let snapshot = self.ring.snapshot();
        let last = snapshot.last().map_or(0, |(n, _)| *n);
        let selected: Vec<Arc<Flow>> = select(&snapshot, req.number, req.first, |(_, f)| {
            in_window(f) && filters.matches(f)
        })
        .into_iter()
        .map(|(_, f)| f.clone())
        .collect();

        let (tx, rx) = mpsc::channel(256);
        let this = self.clone();
        tokio::spawn(async move {
            for f in selected {
                let time = f.time;
                let item = this.response(ResponseTypes::Flow((*f).clone()), time);
                if tx.send(Ok(item)).await.is_err() {
                    return;
                }
            }
            let Some(live) = live.as_mut() else { return };
            let deadline = until.map(|u| {
                tokio::time::Instant::now()
                    + u.duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO)
            });
            loop {
                let next = async {
                    match deadline {
                        Some(d) => tokio::time::timeout_at(d, live.recv()).await.ok(),
                        None => Some(live.recv().await),
                    }
                };
                let item = tokio::select! {
                    _ = tx.closed() => return,
                    item = next => item,
                };
                let msg = match item {
                    None => return, // past `until`
                    Some(Ok(RingItem::Flow(n, f))) => {
                        if n <= last || !in_window(&f) || !filters.matches(&f) {
                            continue;
                        }
                        let time = f.time;
                        this.response(ResponseTypes::Flow((*f).clone()), time)
                    }
                    Some(Ok(RingItem::Lost(e))) => {
                        let now = prost_types::Timestamp::from(SystemTime::now());
                        this.response(ResponseTypes::LostEvents(e), Some(now))
                    }
                    Some(Err(broadcast::error::RecvError::Lagged(k))) => {
                        let now = prost_types::Timestamp::from(SystemTime::now());
                        this.response(
                            ResponseTypes::LostEvents(LostEvent {
                                source: LostEventSource::ObserverEventsQueue as i32,
                                num_events_lost: k,
                                cpu: None,
                            }),
                            Some(now),
                        )
                    }
                    Some(Err(broadcast::error::RecvError::Closed)) => return,
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_agent_events(
        &self,
        _request: Request<obs::GetAgentEventsRequest>,
    ) -> Result<Response<Self::GetAgentEventsStream>, Status> {
        Err(Status::unimplemented(
            "mesh agents serve flows only: GetAgentEvents is not implemented",
        ))
    }

    async fn get_debug_events(
        &self,
        _request: Request<obs::GetDebugEventsRequest>,
    ) -> Result<Response<Self::GetDebugEventsStream>, Status> {
        Err(Status::unimplemented(
            "mesh agents serve flows only: GetDebugEvents is not implemented",
        ))
    }

    async fn get_nodes(
        &self,
        request: Request<obs::GetNodesRequest>,
    ) -> Result<Response<obs::GetNodesResponse>, Status> {
        self.authorize(&request)?;
        Ok(Response::new(obs::GetNodesResponse {
            nodes: vec![obs::Node {
                name: self.node_name.clone(),
                version: version(),
                address: self.address.clone(),
                state: NodeState::NodeConnected as i32,
                tls: Some(obs::Tls {
                    enabled: self.tls.is_some(),
                    server_name: String::new(),
                }),
                uptime_ns: self.started.elapsed().as_nanos() as u64,
                num_flows: self.ring.len() as u64,
                max_flows: self.ring.capacity() as u64,
                seen_flows: self.ring.seen(),
            }],
        }))
    }

    async fn server_status(
        &self,
        request: Request<obs::ServerStatusRequest>,
    ) -> Result<Response<obs::ServerStatusResponse>, Status> {
        self.authorize(&request)?;
        Ok(Response::new(obs::ServerStatusResponse {
            num_flows: self.ring.len() as u64,
            max_flows: self.ring.capacity() as u64,
            seen_flows: self.ring.seen(),
            uptime_ns: self.started.elapsed().as_nanos() as u64,
            num_connected_nodes: Some(1),
            num_unavailable_nodes: Some(0),
            unavailable_nodes: vec![],
            version: version(),
        }))
    }
}

fn version() -> String {
    format!("mesh-agent {}", env!("CARGO_PKG_VERSION"))
}

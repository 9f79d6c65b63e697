//! Flow visibility on a node (DESIGN.md section 15).
//!
//! The datapath writes a record for each new connection and each drop to the `mesh_events`
//! ring buffer (bpf/events.h). [`run_reader`] drains it as records arrive, decorates each
//! with what the agent knows ([`decorate::FlowContext`], rebuilt after reconciles when
//! records need it: the reader asks and waits for it), and pushes the resulting Hubble
//! flow into the node's bounded [`ring::FlowRing`], which [`observer::AgentObserver`]
//! serves over Hubble's Observer API to the apiserver's relay and to operators. Every flow
//! also feeds the flow metrics; records the datapath could not write (ring full, rate
//! limited) are counted and reported to followers as lost events.

pub mod decorate;
pub mod observer;
pub mod ring;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use mesh_maps::layout::FlowEvent;
use mesh_proto::hubble::flow::{DropReason, Flow, LostEvent, LostEventSource, Verdict};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::datapath::{EventControl, EventCounters, EventMaps, boottime_ns};
pub use decorate::{FlowContext, decorate};
pub use ring::FlowRing;

/// The context the reader decorates with; replaced whole when the agent rebuilds it.
pub type SharedContext = Arc<RwLock<Arc<FlowContext>>>;

/// Labels of `mesh_agent_flows_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowLabels {
    pub source_cluster: String,
    pub destination_cluster: String,
    pub source_namespace: String,
    pub destination_namespace: String,
    pub direction: String,
    pub verdict: String,
    pub drop_reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LostLabels {
    pub source: String,
}

/// Distinct namespaces a flow metric label takes before the rest are reported as `other`:
/// the label set stays bounded however many namespaces the mesh has.
pub const NAMESPACE_LABEL_VALUES: usize = 64;

/// The flow metrics.
#[derive(Clone, Debug)]
pub struct FlowMetrics {
    /// Flows by source and destination cluster and namespace, direction, verdict and drop
    /// reason.
    pub flows: Family<FlowLabels, Counter>,
    /// Records lost before they became flows, by where (`ring_full`, `rate_limited`).
    pub lost: Family<LostLabels, Counter>,
    /// Flows held in the node's ring.
    pub ring_flows: Gauge,
    namespaces: Arc<Mutex<HashSet<String>>>,
}

impl FlowMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let this = Self {
            flows: Family::default(),
            lost: Family::default(),
            ring_flows: Gauge::default(),
            namespaces: Arc::default(),
        };
        registry.register(
            "mesh_agent_flows",
            "Flows seen on this node, by source and destination cluster and namespace, \
             direction, verdict and drop reason (namespaces beyond the first 64 are `other`)",
            this.flows.clone(),
        );
        registry.register(
            "mesh_agent_flow_events_lost",
            "Datapath flow records not delivered, by cause (ring_full: the agent did not keep \
             up; rate_limited: over the per-CPU rate)",
            this.lost.clone(),
        );
        registry.register(
            "mesh_agent_flow_ring_flows",
            "Flows held in the node's flow ring",
            this.ring_flows.clone(),
        );
        this
    }

    fn namespace(&self, ns: &str) -> String {
        if ns.is_empty() {
            return String::new();
        }
        let mut seen = self.namespaces.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(ns) {
            return ns.to_owned();
        }
        if seen.len() < NAMESPACE_LABEL_VALUES {
            seen.insert(ns.to_owned());
            return ns.to_owned();
        }
        "other".into()
    }

    /// Counts `flow`.
    pub fn observe(&self, flow: &Flow) {
        let src = flow.source.as_ref();
        let dst = flow.destination.as_ref();
        let verdict = Verdict::try_from(flow.verdict).unwrap_or(Verdict::Unknown);
        let reason = DropReason::try_from(flow.drop_reason_desc).unwrap_or(DropReason::Unknown);
        let labels = FlowLabels {
            source_cluster: src.map(|e| e.cluster_name.clone()).unwrap_or_default(),
            destination_cluster: dst.map(|e| e.cluster_name.clone()).unwrap_or_default(),
            source_namespace: self.namespace(src.map_or("", |e| e.namespace.as_str())),
            destination_namespace: self.namespace(dst.map_or("", |e| e.namespace.as_str())),
            direction: match flow.traffic_direction {
                1 => "ingress",
                2 => "egress",
                _ => "unknown",
            }
            .into(),
            verdict: verdict.as_str_name().to_ascii_lowercase(),
            drop_reason: if verdict == Verdict::Dropped {
                reason.as_str_name().to_owned()
            } else {
                String::new()
            },
        };
        self.flows.get_or_create(&labels).inc();
    }
}

/// Settings of the flow pipeline.
#[derive(Debug, Clone)]
pub struct FlowSettings {
    /// Records per second per CPU the datapath may write (0: events off).
    pub rate: u32,
    pub burst: u32,
    /// How often the datapath counters are read for losses.
    pub stats_interval: Duration,
}

/// A 128-bit random id in UUID (version 4) form.
fn new_uuid() -> String {
    let b: [u8; 16] = rand::random();
    let mut b = b;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Reports the growth of the datapath's loss counters to the ring's followers and the
/// metrics.
fn report_losses(
    control: &EventControl,
    last: &mut EventCounters,
    ring: &FlowRing,
    metrics: &FlowMetrics,
) {
    let now = match control.counters() {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "reading the flow event counters failed");
            return;
        }
    };
    let full = now.lost_ring_full.saturating_sub(last.lost_ring_full);
    let limited = now.rate_limited.saturating_sub(last.rate_limited);
    for (source, n) in [("ring_full", full), ("rate_limited", limited)] {
        if n > 0 {
            metrics
                .lost
                .get_or_create(&LostLabels {
                    source: source.into(),
                })
                .inc_by(n);
        }
    }
    if full + limited > 0 {
        ring.lost(LostEvent {
            source: LostEventSource::PerfEventRingBuffer as i32,
            num_events_lost: full + limited,
            cpu: None,
        });
    }
    *last = now;
}

/// Configures the datapath's event rate, then drains the ring buffer into `ring` until
/// `shutdown`.
pub async fn run_reader(
    maps: EventMaps,
    settings: FlowSettings,
    ctx: SharedContext,
    ring: Arc<FlowRing>,
    metrics: FlowMetrics,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let EventMaps {
        ring: events,
        mut control,
    } = maps;
    if let Err(e) = control.configure(settings.rate, settings.burst) {
        warn!(error = %e, "configuring the flow event rate failed; events stay as they were");
    }
    // Losses before this agent started are not this agent's to report.
    let mut last = control.counters().unwrap_or_default();
    let mut events = crate::datapath::async_ring(events)?;
    let mut tick = tokio::time::interval(settings.stats_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The datapath wakes this reader only once MESH_EVENT_WAKEUP_BYTES wait (bpf/mesh.h):
    // below that, records are read on this timer.
    let mut drain_tick = tokio::time::interval(DRAIN_INTERVAL);
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Records read while the context was superseded (see `FlowContext::superseded`), and
    // since when they wait.
    let mut pending: Vec<FlowEvent> = Vec::new();
    let mut held_since: Option<std::time::Instant> = None;
    let mut drain = |rb: &mut aya::maps::RingBuf<aya::maps::MapData>| {
        while let Some(item) = rb.next() {
            match FlowEvent::from_bytes(&item) {
                Some(ev) => pending.push(ev),
                None => warn!(len = item.len(), "flow record of unexpected size; skipped"),
            }
        }
        if pending.is_empty() {
            return;
        }
        let ctx = ctx.read().unwrap_or_else(|e| e.into_inner()).clone();
        if ctx.is_superseded() && pending.len() < MAX_PENDING {
            // Ask the agent for a context as new as the maps, and decorate with it (the
            // drain timer comes back), unless that takes too long.
            ctx.want_fresh();
            let since = *held_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() < MAX_HOLD {
                return;
            }
        }
        held_since = None;
        let (now_boot, now_wall) = (boottime_ns(), SystemTime::now());
        let n = pending.len();
        for ev in pending.drain(..) {
            let time = decorate::wall_time(ev.time_ns, now_boot, now_wall);
            let flow = decorate(&ev, &ctx, time, new_uuid());
            metrics.observe(&flow);
            ring.push(flow);
        }
        debug!(records = n, "flow records read");
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {
                report_losses(&control, &mut last, &ring, &metrics);
                metrics.ring_flows.set(ring.len() as i64);
            }
            _ = drain_tick.tick() => drain(events.get_mut()),
            guard = events.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut());
                guard.clear_ready();
            }
        }
    }
}

/// The longest the reader holds records back while the agent rebuilds a superseded flow
/// context (it rebuilds within the agent's flow context interval, 100 ms, of being asked).
pub const MAX_HOLD: Duration = Duration::from_millis(300);

/// The most records the reader holds back (beyond, it decorates with what it has).
pub const MAX_PENDING: usize = 65_536;

/// How often the reader drains the flow ring without being woken (the datapath wakes it
/// only for a batch: `MESH_EVENT_WAKEUP_BYTES` in bpf/mesh.h): the most a flow waits to be
/// read.
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(10);

/// Why the Observer server stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Tls(#[from] mesh_proto::tls::TlsError),
    #[error("serving the Observer API: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves the Observer API on `listener` until `shutdown`; without `tls` only on loopback.
pub async fn serve_observer(
    listener: tokio::net::TcpListener,
    observer: observer::AgentObserver,
    tls: Option<Arc<mesh_proto::tls::ServerTls>>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let svc = mesh_proto::hubble::observer::observer_server::ObserverServer::new(observer);
    let router = tonic::transport::Server::builder().add_service(svc);
    match tls {
        Some(tls) => {
            let incoming = mesh_proto::tls::tls_incoming(
                listener,
                tls,
                mesh_proto::tls::IncomingOptions::default(),
            );
            router
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
                .await?;
        }
        None => {
            let incoming = mesh_proto::tls::plain_incoming(listener)?;
            router
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;

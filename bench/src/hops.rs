//! Where a propagation / failover sample's time goes (issue 17 part 5): the bench observes
//! every hop of the path from outside, with no bench-only code in the components.
//!
//! - **Kubernetes watch**: the bench's own watch on the lab API's store (when the API emitted
//!   the change to its watchers, the publisher's among them);
//! - **etcd**: the bench's own etcd watch on the Service's key in each cluster's etcd (when
//!   the publisher's / importer's write committed);
//! - **index**: the bench's own gRPC `Watch` (mTLS, an agent certificate of that cluster)
//!   on each apiserver, filtered to the source cluster's Services (when the index published
//!   it to its streams);
//! - **maps**: the sample's own poll of the pinned maps (the end of the sample);
//! - **agent reconcile**: the agent's `mesh_agent_reconcile_duration_seconds` (sum and count
//!   read before and after the sample: the mean of the reconciles the change caused). It is
//!   part of the last hop (agent -> maps), printed beside it.
//!
//! A hop is the difference between two consecutive points. Each point is when the bench's
//! observer task ran with the news, so a point can be late by a scheduling delay (the
//! bench, the lab API and the observers share the runtime) and a hop can then read 0 (the
//! later point caught up): hops are a breakdown of the end-to-end figure, not independent
//! measurements. The last hop includes the maps' read interval (up to `--poll-interval-us`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use mesh_lab::kube_api::{Store, WatchEvent, WatchOptions, resources};
use mesh_proto::keys::Keys;
use mesh_proto::pb::{self, Kind, watch_response::Payload};
use mesh_proto::tls::{self, ClientEndpoint, ClientTls, TlsIdentity};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::cluster::Cluster;
use crate::env;
use crate::report::{Distribution, SampleTable};

/// How long after the maps showed a change the bench waits for an observer that has not
/// seen it yet (it then counts as missing for that sample).
const LATE: Duration = Duration::from_secs(1);

/// One observation point: a channel of the times its observer saw a change.
struct Point {
    name: String,
    rx: mpsc::UnboundedReceiver<Instant>,
}

/// The per-hop breakdown of a run's samples.
pub struct Hops {
    points: Vec<Point>,
    agent_metrics: SocketAddr,
    tasks: JoinSet<()>,
    /// Per sample: (direction, point times relative to the write, end, reconcile).
    rows: Vec<Row>,
    /// Reconcile figures read before the current sample: (sum in seconds, count).
    before: Option<(f64, f64)>,
}

struct Row {
    label: &'static str,
    points: Vec<Option<Duration>>,
    end: Duration,
    reconcile: Option<Duration>,
}

impl Cluster {
    /// A client of this cluster's apiserver with an agent certificate of its CA.
    pub fn client_endpoint(&self, who: &str) -> Result<ClientEndpoint> {
        let ca = tls::parse_certs(self.ca.cert_pem.as_bytes(), "ca")?;
        let cert = self.ca.issue(&format!("agent/{who}"));
        let id = TlsIdentity::from_pem(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes())?;
        Ok(ClientEndpoint::new(
            self.grpc.to_string(),
            ClientTls::new(ca, id, Some(self.name.parse()?))?,
        ))
    }
}

// === impl Hops ===

impl Hops {
    pub fn new(agent_metrics: SocketAddr) -> Self {
        Hops {
            points: Vec::new(),
            agent_metrics,
            tasks: JoinSet::new(),
            rows: Vec::new(),
            before: None,
        }
    }

    fn point(&mut self, name: String) -> mpsc::UnboundedSender<Instant> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.points.push(Point { name, rx });
        tx
    }

    /// Adds a point: changes of `namespace`'s EndpointSlices in the lab API's `store`.
    pub fn kube_watch(&mut self, name: &str, store: &Store, namespace: &str) -> Result<()> {
        let tx = self.point(name.to_owned());
        let mut watch = store
            .watch(
                &resources::ENDPOINTSLICES,
                WatchOptions {
                    namespace: Some(namespace.to_owned()),
                    resource_version: Some(store.resource_version()),
                    ..Default::default()
                },
            )
            .map_err(|e| anyhow!("watching EndpointSlices in the lab API: {e:?}"))?;
        self.tasks.spawn(async move {
            while let Some(ev) = watch.next().await {
                if matches!(ev, WatchEvent::Modified(_)) && tx.send(Instant::now()).is_err() {
                    return;
                }
            }
        });
        Ok(())
    }

    /// Adds a point: writes of `cluster`'s Service `service` (`ns/name`) in `etcd`.
    pub async fn etcd_key(
        &mut self,
        name: &str,
        etcd: &Cluster,
        cluster: &str,
        service: &str,
    ) -> Result<()> {
        let tx = self.point(name.to_owned());
        let key = Keys::default().object(cluster, Kind::Service, service);
        let mut client = etcd.etcd_client().await?;
        let mut stream = client
            .watch(key.clone(), None)
            .await
            .with_context(|| format!("watching {key} in {}'s etcd", etcd.name))?;
        self.tasks.spawn(async move {
            let _client = client;
            while let Ok(Some(resp)) = stream.message().await {
                if !resp.events().is_empty() && tx.send(Instant::now()).is_err() {
                    return;
                }
            }
        });
        Ok(())
    }

    /// Adds a point: `cluster`'s Services as `apiserver`'s index streams them (a gRPC Watch).
    pub async fn index_watch(
        &mut self,
        name: &str,
        apiserver: &Cluster,
        cluster: &str,
    ) -> Result<()> {
        let tx = self.point(name.to_owned());
        let ep = apiserver.client_endpoint("bench-hops")?;
        let mut client = tls::connect(&ep)
            .await
            .with_context(|| format!("connecting to {}'s apiserver", apiserver.name))?;
        let mut stream = client
            .watch(pb::WatchRequest {
                clusters: vec![cluster.to_owned()],
                kinds: vec![Kind::Service as i32],
                ..Default::default()
            })
            .await
            .with_context(|| format!("watching {}'s apiserver", apiserver.name))?
            .into_inner();
        let (ready_tx, ready_rx) = oneshot::channel();
        self.tasks.spawn(async move {
            let mut ready = Some(ready_tx);
            while let Ok(Some(resp)) = stream.message().await {
                let now = Instant::now();
                match resp.payload {
                    // The snapshot ends with the first Synced.
                    Some(Payload::Synced(_)) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    // A change after the snapshot (the receiver gone: the run is over).
                    Some(Payload::Events(e))
                        if ready.is_none() && !e.events.is_empty() && tx.send(now).is_err() =>
                    {
                        return;
                    }
                    _ => {}
                }
            }
        });
        ready_rx.await.with_context(|| {
            format!(
                "the gRPC watch of {}'s apiserver ended before its snapshot",
                apiserver.name
            )
        })
    }

    fn reconcile_totals(&self) -> Option<(f64, f64)> {
        let body = env::http_get(self.agent_metrics, "/metrics").ok()?;
        let sum = env::metric(&body, "mesh_agent_reconcile_duration_seconds_sum")?;
        let count = env::metric(&body, "mesh_agent_reconcile_duration_seconds_count")?;
        Some((sum, count))
    }

    /// Before a sample's write: forgets what the observers saw since the last sample.
    pub fn before_sample(&mut self) {
        for p in &mut self.points {
            while p.rx.try_recv().is_ok() {}
        }
        self.before = self.reconcile_totals();
    }

    /// After a sample: `t0` the write, `end` when the maps showed it (`None`: timed out, no
    /// row). Collects the observers' first sighting after `t0`.
    pub async fn after_sample(&mut self, label: &'static str, t0: Instant, end: Option<Instant>) {
        let Some(end) = end else { return };
        let deadline = tokio::time::Instant::from_std(Instant::now() + LATE);
        let mut points = Vec::with_capacity(self.points.len());
        for p in &mut self.points {
            let seen = loop {
                match tokio::time::timeout_at(deadline, p.rx.recv()).await {
                    Ok(Some(t)) if t >= t0 => break Some(t.duration_since(t0)),
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break None,
                }
            };
            points.push(seen);
        }
        // The agent records a reconcile's duration after its last write, so the maps can
        // show the change a moment before the histogram counts it: read again until it
        // does (bounded by the same deadline).
        let reconcile = match self.before.take() {
            Some((s0, c0)) => loop {
                match self.reconcile_totals() {
                    Some((s1, c1)) if c1 > c0 => {
                        break Some(Duration::from_secs_f64(((s1 - s0) / (c1 - c0)).max(0.0)));
                    }
                    Some(_) if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_micros(200)).await
                    }
                    _ => break None,
                }
            },
            None => None,
        };
        self.rows.push(Row {
            label,
            points,
            end: end.saturating_duration_since(t0),
            reconcile,
        });
    }

    /// Hop names: from the write to the first point, between points, last point to maps.
    fn hop_names(&self, source: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut from = source.to_owned();
        for p in &self.points {
            names.push(format!("{from} -> {}", p.name));
            from = p.name.clone();
        }
        names.push(format!("{from} -> maps (agent)"));
        names
    }

    /// Per row: each hop's duration (`None` when a point of it is missing).
    fn row_hops(row: &Row) -> Vec<Option<Duration>> {
        let mut out = Vec::with_capacity(row.points.len() + 1);
        let mut prev = Some(Duration::ZERO);
        for p in row.points.iter().copied().chain([Some(row.end)]) {
            out.push(match (prev, p) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a)),
                _ => None,
            });
            prev = p;
        }
        out
    }

    /// The p50/p99 of every hop over all samples (samples missing the hop count as timeouts),
    /// the agent's reconcile, and the per-sample table.
    pub fn finish(self, source: &str) -> (Vec<Distribution>, SampleTable) {
        let names = self.hop_names(source);
        let mut per_hop: Vec<Vec<Duration>> = vec![Vec::new(); names.len()];
        let mut missing = vec![0usize; names.len()];
        let mut reconciles = Vec::new();
        let mut rows = Vec::with_capacity(self.rows.len());
        for (i, r) in self.rows.iter().enumerate() {
            let hops = Self::row_hops(r);
            let mut cells = vec![(i + 1).to_string(), r.label.to_owned(), ms(Some(r.end))];
            for (h, d) in hops.iter().enumerate() {
                match d {
                    Some(d) => per_hop[h].push(*d),
                    None => missing[h] += 1,
                }
                cells.push(ms(*d));
            }
            cells.push(ms(r.reconcile));
            reconciles.extend(r.reconcile);
            rows.push(cells);
        }
        let mut dists: Vec<Distribution> = names
            .iter()
            .zip(&per_hop)
            .zip(&missing)
            .map(|((n, d), m)| Distribution::new(n, d, *m, None))
            .collect();
        let unmeasured = self.rows.len() - reconciles.len();
        dists.push(Distribution::new(
            "(of which the agent's reconcile)",
            &reconciles,
            unmeasured,
            None,
        ));
        let mut columns = vec!["#".to_owned(), "change".to_owned(), "total".to_owned()];
        columns.extend(self.points.iter().map(|p| format!("-> {}", p.name)));
        columns.push("-> maps".to_owned());
        columns.push("reconcile".to_owned());
        (dists, SampleTable { columns, rows })
    }
}

fn ms(d: Option<Duration>) -> String {
    d.map_or_else(
        || "-".to_owned(),
        |d| format!("{:.2}", d.as_secs_f64() * 1e3),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hops_are_differences_of_consecutive_points() {
        let ms = Duration::from_millis;
        let row = Row {
            label: "x",
            points: vec![Some(ms(1)), None, Some(ms(4)), Some(ms(3))],
            end: ms(6),
            reconcile: None,
        };
        assert_eq!(
            Hops::row_hops(&row),
            vec![Some(ms(1)), None, None, Some(Duration::ZERO), Some(ms(3))]
        );
    }
}

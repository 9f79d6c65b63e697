//! The watch-history checker on the agent's stream (issue 16 parts 2 and 3): churn written
//! into etcd while faults are injected, the agent's own recording (`--watch-record`) checked
//! against etcd's history, and the agent's pinned maps checked against the maps computed
//! from etcd's state by the agent's own pure function (`desired::compute`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mesh_agent::desired::{self, BackendInfo, BackendKey, DesiredState, ServiceKey};
use mesh_agent::reconcile::from_dump;
use mesh_core::select::GateInput;
use mesh_proto::client::WatchUpdate;
use mesh_proto::keys::{Keys, PUBLISHED_KINDS};
use mesh_proto::record::{self, Record};
use mesh_proto::state::MeshState;
use mesh_testkit::history::churn::{Churn, ChurnCluster};
use mesh_testkit::history::{self, History, Verdict, View, ViewState};

use super::Mesh;

/// Where the agent records its watch.
pub fn record_path(mesh: &Mesh) -> PathBuf {
    mesh.dir.path().join("agent-watch.rec")
}

/// Starts the agent recording its watch to [`record_path`] (appended across restarts).
pub fn start_recorded_agent(mesh: &mut Mesh) {
    let path = record_path(mesh);
    mesh.start_agent(&["--watch-record", path.to_str().unwrap()]);
}

pub fn records(mesh: &Mesh) -> Vec<Record> {
    record::read_file(&record_path(mesh)).unwrap_or_default()
}

// === churn ===

/// Churn in both clusters of [`super::two_clusters`]: `default/churn` (ClusterIP 10.96.0.20
/// in east, 10.97.0.20 in west), pods on node-2 (east, 10.1.3.x) and w1 (west, 10.2.3.x).
pub fn start_churn(mesh: &Mesh, seed: u64) -> Churn {
    let cluster = |name: &str, id: u32, node: &str, host: u8, vip: [u8; 4]| ChurnCluster {
        name: name.into(),
        id,
        node: node.into(),
        node_ip: mesh.net.host(host),
        vip: vip.into(),
        pods: [10, id as u8, 3],
    };
    Churn::start(
        mesh.etcd.endpoint(),
        mesh.keys.clone(),
        vec![
            cluster("east", 1, "node-2", 3, [10, 96, 0, 20]),
            cluster("west", 2, "w1", 4, [10, 97, 0, 20]),
        ],
        seed,
    )
}

// === checking ===

/// Reads etcd's history (all of it, or after `earlier`'s end when given).
pub async fn read_history(mesh: &Mesh, earlier: Option<&History>) -> History {
    let mut kv = etcd_client::Client::connect([mesh.etcd.endpoint()], None)
        .await
        .expect("etcd client");
    let later = History::read(&mut kv).await.expect("etcd's history");
    match earlier {
        Some(e) => {
            let mut h = e.clone();
            h.extend(later);
            h
        }
        None => later,
    }
}

/// The maps the agent must hold for `view` (every cluster synced), by the agent's own
/// pure function.
pub fn expected_maps(view: &ViewState) -> DesiredState {
    let local: mesh_core::ClusterName = "east".parse().unwrap();
    let mut state = MeshState::new(local.clone());
    let mut clusters = BTreeSet::new();
    for ((cluster, kind, name), value) in view {
        let cluster: mesh_core::ClusterName = cluster.parse().unwrap();
        clusters.insert(cluster.clone());
        state.apply(WatchUpdate::Upsert {
            cluster,
            kind: *kind,
            name: name.clone(),
            revision: 0,
            value: value.clone(),
        });
    }
    for cluster in clusters {
        for kind in PUBLISHED_KINDS {
            state.apply(WatchUpdate::Synced {
                cluster: cluster.clone(),
                kind,
            });
        }
    }
    let gate = GateInput {
        local_cluster: &local,
        deadline_passed: true,
        programming: true,
    };
    let clusters = state.programmable(&gate).expect("every cluster synced");
    desired::compute(&clusters, &local, "node-1").0
}

/// The agent's pinned maps in the form of [`DesiredState`].
pub fn actual_maps(mesh: &Mesh) -> Result<DesiredState, String> {
    let (state, foreign) = from_dump(&mesh.dump());
    if !foreign.is_empty() {
        return Err(format!("entries the agent never writes: {foreign:?}"));
    }
    let mut out = DesiredState::default();
    let by_id: BTreeMap<u32, (BackendKey, BackendInfo)> = state
        .backends
        .iter()
        .map(|(id, b)| (*id, (b.key, b.info)))
        .collect();
    for (key, slots) in &state.services {
        let count = slots
            .count
            .ok_or_else(|| format!("{key:?}: slots without a master entry"))?;
        if slots.slots.len() != usize::from(count) {
            return Err(format!(
                "{key:?}: {} slots for count {count}",
                slots.slots.len()
            ));
        }
        let mut backends = Vec::new();
        for (slot, id) in &slots.slots {
            let (b, _) = by_id
                .get(id)
                .ok_or_else(|| format!("{key:?} slot {slot}: no backend {id}"))?;
            backends.push(*b);
        }
        backends.sort();
        backends.dedup();
        std::sync::Arc::make_mut(&mut out.services).insert(
            ServiceKey {
                vip: key.vip,
                port: key.port,
                proto: key.proto,
            },
            backends,
        );
    }
    out.backends = std::sync::Arc::new(by_id.into_values().collect());
    out.ipcache = state.ipcache;
    Ok(out)
}

/// Where the maps differ from the expected ones (empty: equal).
pub fn maps_diff(got: &DesiredState, want: &DesiredState) -> String {
    let mut parts = Vec::new();
    let services: BTreeSet<&ServiceKey> = got.services.keys().chain(want.services.keys()).collect();
    for s in services {
        if got.services.get(s) != want.services.get(s) {
            parts.push(format!(
                "service {}:{}: maps {:?}, etcd {:?}",
                s.vip,
                s.port,
                got.services.get(s).map(|b| ips(b)),
                want.services.get(s).map(|b| ips(b))
            ));
        }
    }
    if got.backends != want.backends {
        parts.push(format!(
            "backends: maps {} entries, etcd {}",
            got.backends.len(),
            want.backends.len()
        ));
    }
    let prefixes: BTreeSet<_> = got.ipcache.keys().chain(want.ipcache.keys()).collect();
    for p in prefixes {
        if got.ipcache.get(p) != want.ipcache.get(p) {
            parts.push(format!(
                "ipcache {p}: maps {:?}, etcd {:?}",
                got.ipcache.get(p),
                want.ipcache.get(p)
            ));
        }
    }
    parts.truncate(8);
    parts.join("; ")
}

fn ips(b: &[BackendKey]) -> Vec<IpAddr> {
    b.iter().map(|b| b.ip).collect()
}

/// Waits (churn stopped) until the agent's stream holds etcd's current state and its maps
/// equal the maps computed from it; then checks the whole recording and prints the verdict.
/// `earlier`: the history read before a compaction (its events are gone from etcd).
pub async fn converge_and_check(mesh: &Mesh, what: &str, earlier: Option<&History>) -> Verdict {
    let keys = Keys::default();
    let deadline = Instant::now() + super::CONVERGE;
    loop {
        let history = read_history(mesh, earlier).await;
        let recs = records(mesh);
        let stream_ok = history::converged(&recs, &history, &keys, &View::Own);
        let want = history
            .view_at(&keys, &View::Own, history.current())
            .expect("the current state");
        let expected = expected_maps(&want);
        let maps = actual_maps(mesh).map(|got| maps_diff(&got, &expected));
        if stream_ok && maps.as_ref().is_ok_and(|d| d.is_empty()) {
            let verdict = history::check(
                &format!("agent node-1 ({what})"),
                &recs,
                &history,
                &keys,
                &View::Own,
            );
            println!("{verdict}");
            println!(
                "maps of node-1 ({what}): equal to the maps computed from etcd at revision {} \
                 ({} services, {} backends, {} ipcache entries)",
                history.current(),
                expected.services.len(),
                expected.backends.len(),
                expected.ipcache.len()
            );
            return verdict;
        }
        if Instant::now() >= deadline {
            let verdict = history::check(
                &format!("agent node-1 ({what})"),
                &recs,
                &history,
                &keys,
                &View::Own,
            );
            let log = mesh.agent.as_ref().map(|a| a.log()).unwrap_or_default();
            panic!(
                "{what}: not converged after {:?}\n{verdict}\nmaps: {maps:?}\nagent log (tail):\n{}",
                super::CONVERGE,
                tail(&log, 40)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Waits until the recording has a record matching `pred` after the first `from` records.
pub async fn await_record(mesh: &Mesh, from: usize, what: &str, pred: impl Fn(&Record) -> bool) {
    let deadline = Instant::now() + super::CONVERGE;
    loop {
        if records(mesh).iter().skip(from).any(&pred) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not recorded within {:?}",
            super::CONVERGE
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until churn committed `n` more changes.
pub async fn await_churn(churn: &Churn, n: u64) {
    churn.wait_ops(n, super::CONVERGE).await;
}

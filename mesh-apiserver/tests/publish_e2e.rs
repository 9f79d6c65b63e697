//! End to end through the whole apiserver: kubectl -> the lab's Kubernetes API ->
//! `mesh_apiserver::start` (publisher -> etcd -> index) -> gRPC Watch, read with the
//! resumable client of mesh-proto.

mod publish_common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use clap::Parser;
use mesh_apiserver::{Args, StartOptions};
use mesh_proto::client::{WatchOptions, WatchUpdate, connect_fn, spawn_watch};
use mesh_proto::pb::{self, mesh_client::MeshClient};
use mesh_testkit::etcd::Etcd;
use publish_common::*;
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(30);

/// What a watch client holds, built only from the updates it received.
#[derive(Default)]
struct Seen {
    objects: BTreeMap<(pb::Kind, String), pb::event::Value>,
    synced: BTreeSet<pb::Kind>,
    log: Vec<String>,
}

impl Seen {
    fn apply(&mut self, u: WatchUpdate) {
        match u {
            WatchUpdate::Upsert {
                cluster,
                kind,
                name,
                value,
                ..
            } if cluster.as_str() == CLUSTER => {
                self.log.push(format!("upsert {kind:?} {name}"));
                self.objects.insert((kind, name), value);
            }
            WatchUpdate::Delete {
                cluster,
                kind,
                name,
                ..
            } if cluster.as_str() == CLUSTER => {
                self.log.push(format!("delete {kind:?} {name}"));
                self.objects.remove(&(kind, name));
            }
            WatchUpdate::Synced { cluster, kind } if cluster.as_str() == CLUSTER => {
                self.log.push(format!("synced {kind:?}"));
                self.synced.insert(kind);
            }
            other => self.log.push(format!("{other:?}")),
        }
    }

    fn service(&self, ns: &str, name: &str) -> Option<&pb::GlobalService> {
        match self
            .objects
            .get(&(pb::Kind::Service, format!("{ns}/{name}")))?
        {
            pb::event::Value::Service(s) => Some(s),
            _ => None,
        }
    }

    fn has(&self, kind: pb::Kind, name: &str) -> bool {
        self.objects.contains_key(&(kind, name.to_string()))
    }

    fn backends(&self, ns: &str, name: &str) -> usize {
        self.service(ns, name)
            .map(|s| s.backends.len())
            .unwrap_or(0)
    }
}

async fn until(
    watch: &mut mesh_proto::client::Watch,
    seen: &mut Seen,
    what: &str,
    pred: impl Fn(&Seen) -> bool,
) {
    let deadline = Instant::now() + T;
    while !pred(seen) {
        match tokio::time::timeout_at(deadline, watch.recv()).await {
            Ok(Some(u)) => seen.apply(u),
            Ok(None) => panic!("watch ended while waiting for {what}"),
            Err(_) => panic!(
                "timed out waiting for {what}; received:\n{}",
                seen.log.join("\n")
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_changes_arrive_on_the_grpc_watch() {
    init_logs();
    let etcd = Etcd::start();
    let lab = Lab::start().await;
    lab.namespace("shop").await;
    lab.node("n1", "192.168.0.1", "10.0.1.0/24").await;
    lab.global_service("shop", "web", json!({})).await;
    lab.pod("shop", "web-1", "web", "10.0.1.1", "n1", "192.168.0.1")
        .await;
    lab.pod("shop", "web-2", "web", "10.0.1.2", "n1", "192.168.0.1")
        .await;
    lab.slice("shop", "web", &["10.0.1.1", "10.0.1.2"], "n1")
        .await;

    let kubeconfig = lab.api.kubeconfig_path().to_str().unwrap().to_string();
    let endpoint = etcd.endpoint();
    let id = CLUSTER_ID.to_string();
    let args = Args::try_parse_from([
        "mesh-apiserver",
        "--cluster-name",
        CLUSTER,
        "--cluster-id",
        &id,
        "--pod-cidr",
        "10.0.0.0/16",
        "--etcd-endpoints",
        &endpoint,
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--insecure",
        "--kubeconfig",
        &kubeconfig,
        "--heartbeat-interval",
        "1s",
    ])
    .expect("args");
    let shutdown = CancellationToken::new();
    let running = mesh_apiserver::start(
        args.validate().expect("settings"),
        StartOptions::default(),
        shutdown.clone(),
    )
    .await
    .expect("apiserver starts");
    let addr = running.grpc_addr;

    let connect =
        connect_fn(move || async move { MeshClient::connect(format!("http://{addr}")).await });
    let options = WatchOptions {
        heartbeat_interval: Duration::from_secs(1),
        ..Default::default()
    };
    let mut watch = spawn_watch(connect, pb::WatchRequest::default(), options);
    let mut seen = Seen::default();

    until(
        &mut watch,
        &mut seen,
        "the snapshot and every Synced marker",
        |s| {
            // The cluster's own reader: policies too.
            mesh_proto::keys::PUBLISHED_KINDS
                .iter()
                .all(|k| s.synced.contains(k))
                && s.backends("shop", "web") == 2
                && s.has(pb::Kind::Endpoint, "10.0.1.1")
                && s.has(pb::Kind::Endpoint, "10.0.1.2")
                && s.has(pb::Kind::Node, "n1")
                && s.has(pb::Kind::Config, "")
        },
    )
    .await;
    let ep = match &seen.objects[&(pb::Kind::Endpoint, "10.0.1.1".to_string())] {
        pb::event::Value::Endpoint(e) => e.clone(),
        other => panic!("{other:?}"),
    };
    assert!(
        seen.has(pb::Kind::Identity, &ep.identity.to_string()),
        "the endpoint's identity was not delivered: {:?}",
        seen.objects.keys()
    );

    // Scale up.
    lab.pod("shop", "web-3", "web", "10.0.1.3", "n1", "192.168.0.1")
        .await;
    lab.slice("shop", "web", &["10.0.1.1", "10.0.1.2", "10.0.1.3"], "n1")
        .await;
    until(
        &mut watch,
        &mut seen,
        "the third endpoint and backend",
        |s| s.has(pb::Kind::Endpoint, "10.0.1.3") && s.backends("shop", "web") == 3,
    )
    .await;

    // shared=false
    lab.kubectl(
        &[
            "annotate",
            "service",
            "web",
            "-n",
            "shop",
            "service.cilium.io/shared=false",
        ],
        None,
    )
    .await;
    until(&mut watch, &mut seen, "shared=false", |s| {
        s.service("shop", "web").is_some_and(|s| !s.shared)
    })
    .await;

    // A pod deleted.
    lab.kubectl(
        &["delete", "pod", "web-1", "-n", "shop", "--wait=false"],
        None,
    )
    .await;
    lab.slice("shop", "web", &["10.0.1.2", "10.0.1.3"], "n1")
        .await;
    until(
        &mut watch,
        &mut seen,
        "the deleted pod's endpoint and backend gone",
        |s| !s.has(pb::Kind::Endpoint, "10.0.1.1") && s.backends("shop", "web") == 2,
    )
    .await;
    assert!(
        seen.log.iter().any(|l| l == "delete Endpoint 10.0.1.1"),
        "{:?}",
        seen.log
    );

    // The service deleted.
    lab.kubectl(
        &["delete", "service", "web", "-n", "shop", "--wait=false"],
        None,
    )
    .await;
    until(&mut watch, &mut seen, "the service deleted", |s| {
        s.service("shop", "web").is_none()
    })
    .await;
    assert!(
        seen.log.iter().any(|l| l == "delete Service shop/web"),
        "{:?}",
        seen.log
    );

    drop(watch);
    running.shutdown().await.expect("clean shutdown");
}

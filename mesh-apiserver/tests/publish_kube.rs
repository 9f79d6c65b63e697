//! The publisher end to end on its side: kubectl -> the lab's Kubernetes API -> publisher ->
//! a real etcd. Every change is made with the real kubectl.

mod publish_common;

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use mesh_proto::keys::Keys;
use mesh_proto::pb;
use mesh_testkit::etcd::Etcd;
use prost::Message;
use publish_common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_service_and_every_later_change_reach_etcd() {
    init_logs();
    let etcd = Etcd::start();
    let client = connect(&etcd).await;
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

    let _p = Running::start(
        &client,
        lab.client().await,
        publisher_config("p1", Duration::from_secs(1)),
    );
    let prefix = format!("{PREFIX}clusters/{CLUSTER}/");

    let s = wait_until(&client, &prefix, T, "the initial sync", |s| {
        s.all_synced() && s.backend_ips("shop", "web").len() == 2 && s.endpoints().len() == 2
    })
    .await;
    let cfg = s.config().expect("config");
    assert_eq!((cfg.name.as_str(), cfg.id), (CLUSTER, CLUSTER_ID));
    let node = s.node("n1").expect("node n1");
    assert_eq!(node.internal_ips, vec!["192.168.0.1"]);
    assert_eq!(node.pod_cidrs, vec!["10.0.1.0/24"]);
    let svc = s.service("shop", "web").unwrap();
    assert!(svc.shared);
    assert_eq!(svc.affinity, pb::Affinity::None as i32);
    assert_eq!(
        svc.frontends.len(),
        1,
        "ClusterIP allocated by the API: {svc:?}"
    );
    assert_eq!(svc.ports.len(), 1);
    assert_eq!(
        (svc.ports[0].name.as_str(), svc.ports[0].port),
        ("http", 80)
    );
    let b = &svc.backends[0];
    assert_eq!((b.ports[0].name.as_str(), b.ports[0].port), ("http", 8080));
    assert!(b.ready && b.serving && !b.terminating);
    assert_eq!((b.node.as_str(), b.zone.as_str()), ("n1", "z1"));
    let e1 = s.endpoint("10.0.1.1").unwrap();
    let e2 = s.endpoint("10.0.1.2").unwrap();
    assert_eq!(e1.identity, e2.identity, "same labels, same identity");
    assert_eq!(e1.host_ip.as_deref(), Some("192.168.0.1"));
    assert_eq!(
        (e1.node.as_str(), e1.namespace.as_str(), e1.pod.as_str()),
        ("n1", "shop", "web-1")
    );
    let ids = s.identities();
    let web_id = e1.identity;
    assert_eq!(ids.keys().copied().collect::<Vec<_>>(), vec![web_id]);
    assert_eq!(web_id >> 16, CLUSTER_ID, "identity in the cluster's range");
    assert!(ids[&web_id].labels.contains(&"k8s:app=web".to_string()));
    assert!(
        ids[&web_id]
            .labels
            .contains(&"k8s:io.kubernetes.pod.namespace=shop".to_string())
    );

    // Scale up: a third pod and its slice entry.
    lab.pod("shop", "web-3", "web", "10.0.1.3", "n1", "192.168.0.1")
        .await;
    lab.slice("shop", "web", &["10.0.1.1", "10.0.1.2", "10.0.1.3"], "n1")
        .await;
    wait_until(&client, &prefix, T, "the third backend and endpoint", |s| {
        s.backend_ips("shop", "web").len() == 3
            && s.endpoint("10.0.1.3").is_some_and(|e| e.identity == web_id)
    })
    .await;

    // shared: "false"
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
    wait_until(&client, &prefix, T, "shared=false", |s| {
        s.service("shop", "web").is_some_and(|s| !s.shared)
    })
    .await;

    // A pod with other labels gets its own identity; deleting it removes its endpoint and,
    // after the grace period, its identity. web-1 goes too (pod and slice entry).
    lab.pod("shop", "db-1", "db", "10.0.1.9", "n1", "192.168.0.1")
        .await;
    let s = wait_until(&client, &prefix, T, "the db endpoint", |s| {
        s.endpoint("10.0.1.9").is_some()
    })
    .await;
    let db_id = s.endpoint("10.0.1.9").unwrap().identity;
    assert_ne!(db_id, web_id);
    assert!(s.identities().contains_key(&db_id));
    lab.kubectl(
        &[
            "delete",
            "pod",
            "db-1",
            "web-1",
            "-n",
            "shop",
            "--wait=false",
        ],
        None,
    )
    .await;
    lab.slice("shop", "web", &["10.0.1.2", "10.0.1.3"], "n1")
        .await;
    let s = wait_until(
        &client,
        &prefix,
        T,
        "deleted pods gone and the unused identity collected",
        |s| {
            s.endpoint("10.0.1.9").is_none()
                && s.endpoint("10.0.1.1").is_none()
                && !s.identities().contains_key(&db_id)
                && s.backend_ips("shop", "web") == vec!["10.0.1.2", "10.0.1.3"]
        },
    )
    .await;
    assert!(
        s.identities().contains_key(&web_id),
        "an identity still in use was collected"
    );
    let index = list(&client, &Keys::new(PREFIX).identity_index_prefix())
        .await
        .0;
    assert_eq!(
        index.len(),
        1,
        "the collected identity's index entry remains: {index:?}"
    );

    // Service deleted.
    lab.kubectl(
        &["delete", "service", "web", "-n", "shop", "--wait=false"],
        None,
    )
    .await;
    wait_until(&client, &prefix, T, "the service removed", |s| {
        s.services().is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_publishes_exactly_the_current_state_without_blinking() {
    init_logs();
    let etcd = Etcd::start();
    let client = connect(&etcd).await;
    let lab = Lab::start().await;
    lab.namespace("shop").await;
    lab.node("n1", "192.168.0.1", "10.0.1.0/24").await;
    for (svc, ip) in [("a", "10.0.1.1"), ("b", "10.0.1.2")] {
        lab.global_service("shop", svc, json!({})).await;
        lab.pod("shop", &format!("{svc}-1"), svc, ip, "n1", "192.168.0.1")
            .await;
        lab.slice("shop", svc, &[ip], "n1").await;
    }
    let prefix = format!("{PREFIX}clusters/{CLUSTER}/");
    let grace = Duration::from_secs(1);

    let p1 = Running::start(&client, lab.client().await, publisher_config("p1", grace));
    let before = wait_until(&client, &prefix, T, "the first publisher's sync", |s| {
        s.all_synced() && s.services().len() == 2 && s.endpoints().len() == 2
    })
    .await;
    // Abrupt stop.
    p1.task.abort();
    let _ = (&mut { p1 }.task).await;

    // While it is down: b's service and pod go, c arrives.
    lab.kubectl(
        &["delete", "service", "b", "-n", "shop", "--wait=false"],
        None,
    )
    .await;
    lab.kubectl(
        &[
            "delete",
            "endpointslice",
            "b-slice",
            "-n",
            "shop",
            "--wait=false",
        ],
        None,
    )
    .await;
    lab.kubectl(
        &["delete", "pod", "b-1", "-n", "shop", "--wait=false"],
        None,
    )
    .await;
    lab.global_service("shop", "c", json!({})).await;
    lab.pod("shop", "c-1", "c", "10.0.1.3", "n1", "192.168.0.1")
        .await;
    lab.slice("shop", "c", &["10.0.1.3"], "n1").await;

    // Record every change the second publisher makes.
    let (_, rev) = list(&client, &prefix).await;
    let mut watch = client
        .clone()
        .watch(
            prefix.clone(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(rev + 1),
            ),
        )
        .await
        .unwrap();

    let _p2 = Running::start(&client, lab.client().await, publisher_config("p2", grace));
    let b_identity = before.endpoint("10.0.1.2").unwrap().identity;
    let after = wait_until(&client, &prefix, T, "exactly the current state", |s| {
        s.services() == vec!["shop/a", "shop/c"]
            && s.endpoints() == vec!["10.0.1.1", "10.0.1.3"]
            && !s.identities().contains_key(&b_identity)
    })
    .await;

    // Exactly the expected key set: nothing left over, nothing missing.
    let keys = Keys::new(PREFIX);
    let mut expected: BTreeSet<String> = BTreeSet::new();
    expected.insert(keys.object(CLUSTER, pb::Kind::Config, ""));
    expected.insert(keys.object(CLUSTER, pb::Kind::Node, "n1"));
    for ip in ["10.0.1.1", "10.0.1.3"] {
        expected.insert(keys.object(CLUSTER, pb::Kind::Endpoint, ip));
    }
    // The lab API's default/kubernetes is published too, local-only (for the cluster's own
    // agents' socket LB; never presented to peers).
    assert_eq!(after.local_services(), vec!["default/kubernetes"]);
    for svc in ["default/kubernetes", "shop/a", "shop/c"] {
        expected.insert(keys.object(CLUSTER, pb::Kind::Service, svc));
    }
    let a_id = after.endpoint("10.0.1.1").unwrap().identity;
    let c_id = after.endpoint("10.0.1.3").unwrap().identity;
    assert_ne!(a_id, c_id, "two label sets share an identity");
    for id in [a_id, c_id] {
        expected.insert(keys.object(CLUSTER, pb::Kind::Identity, &id.to_string()));
    }
    for kind in mesh_proto::keys::PUBLISHED_KINDS {
        expected.insert(keys.synced(CLUSTER, kind));
    }
    let actual: BTreeSet<String> = after.raw.keys().cloned().collect();
    assert_eq!(actual, expected, "\n{}", after.describe());
    assert_eq!(
        before.endpoint("10.0.1.1").unwrap().identity,
        a_id,
        "an identity changed across the restart"
    );
    let index = list(&client, &keys.identity_index_prefix()).await.0;
    assert_eq!(index.len(), 2, "identity index: {:?}", index.keys());
    assert_eq!(after.backend_ips("shop", "c"), vec!["10.0.1.3"]);

    // No blink: nothing that still exists was deleted on the way, and unchanged objects
    // were not even rewritten.
    let unchanged: HashSet<String> = [
        keys.object(CLUSTER, pb::Kind::Service, "shop/a"),
        keys.object(CLUSTER, pb::Kind::Endpoint, "10.0.1.1"),
        keys.object(CLUSTER, pb::Kind::Node, "n1"),
        keys.object(CLUSTER, pb::Kind::Config, ""),
    ]
    .into();
    let (_, now) = list(&client, &prefix).await;
    let mut deleted = Vec::new();
    'outer: loop {
        let m = watch.message().await.unwrap().expect("watch open");
        for e in m.events() {
            let kv = e.kv().unwrap();
            let key = kv.key_str().unwrap().to_string();
            assert!(
                !unchanged.contains(&key),
                "unchanged {key} was written on restart ({:?})",
                e.event_type()
            );
            if e.event_type() == EventType::Delete {
                assert!(
                    !expected.contains(&key),
                    "{key} was deleted although it still exists (blink)"
                );
                deleted.push(key);
            }
            if kv.mod_revision() >= now {
                break 'outer;
            }
        }
        if m.header().is_some_and(|h| h.revision() >= now) {
            break;
        }
    }
    deleted.sort();
    assert!(
        deleted.contains(&keys.object(CLUSTER, pb::Kind::Service, "shop/b")),
        "b's service was not swept: {deleted:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_reported_and_skipped_without_stopping_the_watch() {
    init_logs();
    let etcd = Etcd::start();
    let client = connect(&etcd).await;
    let lab = Lab::start().await;
    lab.namespace("shop").await;
    lab.node("n1", "192.168.0.1", "10.0.1.0/24").await;
    lab.global_service("shop", "web", json!({"service.cilium.io/affinity": "loca"}))
        .await;
    // An object that does not decode as a Pod (hostNetwork is a bool), before the start (in
    // the initial list) and after it (in the watch).
    let store = lab.api.store();
    let pods = mesh_lab::kube_api::resources::by_kind("v1", "Pod").unwrap();
    let bad = |name: &str| {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": "shop", "name": name, "labels": {"app": "x"}},
               "spec": {"hostNetwork": "yes", "containers": [{"name": "c", "image": "busybox:1"}]}})
    };
    store
        .create(pods, Some("shop"), bad("broken-1"))
        .expect("creating a malformed pod");
    lab.pod("shop", "good-1", "web", "10.0.1.1", "n1", "192.168.0.1")
        .await;

    let p = Running::start(
        &client,
        lab.client().await,
        publisher_config("p1", Duration::from_secs(60)),
    );
    let prefix = format!("{PREFIX}clusters/{CLUSTER}/");
    let s = wait_until(
        &client,
        &prefix,
        T,
        "the initial sync despite a malformed pod",
        |s| {
            s.all_synced() && s.endpoint("10.0.1.1").is_some() && s.service("shop", "web").is_some()
        },
    )
    .await;
    let svc = s.service("shop", "web").unwrap();
    assert_eq!(
        svc.affinity,
        pb::Affinity::None as i32,
        "an invalid affinity must mean none"
    );
    assert!(
        p.metrics
            .decode_failures(mesh_apiserver::kube_source::ResourceKind::Pod)
            >= 1
    );

    store
        .create(pods, Some("shop"), bad("broken-2"))
        .expect("creating a malformed pod");
    lab.pod("shop", "good-2", "web", "10.0.1.2", "n1", "192.168.0.1")
        .await;
    wait_until(
        &client,
        &prefix,
        T,
        "a pod created after a malformed one",
        |s| s.endpoint("10.0.1.2").is_some(),
    )
    .await;
    assert!(
        p.metrics
            .decode_failures(mesh_apiserver::kube_source::ResourceKind::Pod)
            >= 2
    );
    let logs = captured_logs();
    for name in ["shop/broken-1", "shop/broken-2"] {
        assert!(
            logs.lines()
                .any(|l| l.contains("cannot be decoded") && l.contains(name) && l.contains("Pod")),
            "no log line names the undecodable {name}"
        );
    }
    assert!(
        logs.lines()
            .any(|l| l.contains("invalid service annotation")
                && l.contains("shop/web")
                && l.contains("service.cilium.io/affinity")),
        "no log line names the service and the annotation"
    );

    // A Warning Event names the annotation; it is created once, not on every change.
    let events = || async {
        let out = lab
            .kubectl(&["get", "events", "-n", "shop", "-o", "json"], None)
            .await;
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["reason"] == "InvalidAnnotation")
            .cloned()
            .collect::<Vec<_>>()
    };
    eventually(T, "the InvalidAnnotation event", || async {
        !events().await.is_empty()
    })
    .await;
    let ev = &events().await[0];
    assert_eq!(ev["type"], "Warning");
    assert_eq!(ev["involvedObject"]["kind"], "Service");
    assert_eq!(ev["involvedObject"]["name"], "web");
    let msg = ev["message"].as_str().unwrap();
    assert!(
        msg.contains("service.cilium.io/affinity") && msg.contains("loca"),
        "{msg}"
    );

    lab.kubectl(
        &["annotate", "service", "web", "-n", "shop", "unrelated=1"],
        None,
    )
    .await;
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
    wait_until(&client, &prefix, T, "the service change", |s| {
        s.service("shop", "web").is_some_and(|s| !s.shared)
    })
    .await;
    assert_eq!(
        events().await.len(),
        1,
        "the same problem was reported again"
    );
    assert_eq!(p.metrics.annotation_problems(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_publishes_and_a_standby_takes_over() {
    init_logs();
    let etcd = Etcd::start();
    let client = connect(&etcd).await;
    let lab = Lab::start().await;
    lab.namespace("shop").await;
    lab.node("n1", "192.168.0.1", "10.0.1.0/24").await;
    lab.global_service("shop", "web", json!({})).await;
    lab.pod("shop", "web-1", "web", "10.0.1.1", "n1", "192.168.0.1")
        .await;
    lab.slice("shop", "web", &["10.0.1.1"], "n1").await;
    let prefix = format!("{PREFIX}clusters/{CLUSTER}/");
    let grace = Duration::from_secs(60);

    let mut a = Running::start(&client, lab.client().await, publisher_config("a", grace));
    let mut b = Running::start(&client, lab.client().await, publisher_config("b", grace));
    wait_until(&client, &prefix, T, "the leader's sync", |s| {
        s.all_synced() && s.endpoint("10.0.1.1").is_some()
    })
    .await;
    assert!(a.is_leader.get() ^ b.is_leader.get(), "exactly one leader");
    let leader_name = if a.is_leader.get() { "a" } else { "b" };
    let leader_key = list(&client, &Keys::new(PREFIX).leader()).await.0;
    let holder = String::from_utf8(leader_key.values().next().unwrap().clone()).unwrap();
    assert_eq!(holder, leader_name, "the leader key names another replica");
    let (leader, standby) = if leader_name == "a" {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    assert!(leader.metrics.txns() > 0);
    assert_eq!(standby.metrics.txns(), 0, "the standby wrote to etcd");

    // Kill the leader's task: the standby takes over and publishes the next change.
    leader.task.abort();
    tokio::time::timeout(T, standby.is_leader.wait_for(true))
        .await
        .expect("the standby became leader");
    lab.pod("shop", "web-2", "web", "10.0.1.2", "n1", "192.168.0.1")
        .await;
    lab.slice("shop", "web", &["10.0.1.1", "10.0.1.2"], "n1")
        .await;
    wait_until(
        &client,
        &prefix,
        T,
        "the change published by the new leader",
        |s| s.endpoint("10.0.1.2").is_some() && s.backend_ips("shop", "web").len() == 2,
    )
    .await;
    assert!(standby.metrics.txns() > 0);

    // The new leader loses its lease behind its back: it stops, campaigns again, and the
    // next change is still published.
    let mut etcd_client = client.clone();
    let leader_kv = etcd_client
        .get(Keys::new(PREFIX).leader(), None)
        .await
        .unwrap();
    let (lease, rev) = (
        leader_kv.kvs()[0].lease(),
        leader_kv.kvs()[0].create_revision(),
    );
    etcd_client.lease_revoke(lease).await.unwrap();
    wait_until(
        &client,
        &Keys::new(PREFIX).leader(),
        T,
        "a new leader term",
        |s| !s.raw.is_empty(),
    )
    .await;
    let again = etcd_client
        .get(Keys::new(PREFIX).leader(), None)
        .await
        .unwrap();
    assert_ne!(
        again.kvs()[0].create_revision(),
        rev,
        "the old term survived its lease"
    );
    lab.pod("shop", "web-3", "web", "10.0.1.3", "n1", "192.168.0.1")
        .await;
    wait_until(&client, &prefix, T, "a change after the lease loss", |s| {
        s.endpoint("10.0.1.3").is_some()
    })
    .await;
    assert!(standby.is_leader.get());
}

/// DESIGN.md section 14: identities carry their Namespace's labels, so a namespaceSelector
/// works in every cluster; `kubectl label namespace` re-labels (re-allocates) the identities
/// of its pods. The lab API serves no policy type yet: that is an empty list, not a failure,
/// and the policy kind is still marked synced (agents wait for that marker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_labels_reach_identities_and_absent_policy_types_do_not_block_sync() {
    init_logs();
    let etcd = Etcd::start();
    let client = connect(&etcd).await;
    let lab = Lab::start().await;
    lab.namespace("shop").await;
    lab.node("n1", "192.168.0.1", "10.0.1.0/24").await;
    lab.pod("shop", "web-1", "web", "10.0.1.1", "n1", "192.168.0.1")
        .await;
    let _p = Running::start(
        &client,
        lab.client().await,
        publisher_config("p1", Duration::from_secs(1)),
    );
    let prefix = format!("{PREFIX}clusters/{CLUSTER}/");
    let label = |s: &publish_common::State, key: &str| {
        let id = s.endpoint("10.0.1.1")?.identity;
        let labels = s.identities().get(&id)?.labels.clone();
        let want = format!("k8s:io.cilium.k8s.namespace.labels.{key}=");
        labels
            .iter()
            .find_map(|l| l.strip_prefix(&want).map(str::to_owned))
    };
    let s = wait_until(&client, &prefix, T, "the initial sync", |s| {
        s.all_synced() && s.endpoint("10.0.1.1").is_some()
    })
    .await;
    assert_eq!(
        label(&s, "kubernetes.io/metadata.name").as_deref(),
        Some("shop"),
        "{}",
        s.describe()
    );
    assert_eq!(label(&s, "team"), None);
    let before = s.endpoint("10.0.1.1").unwrap().identity;

    lab.kubectl(&["label", "namespace", "shop", "team=blue"], None)
        .await;
    let s = wait_until(&client, &prefix, T, "the identity re-labelled", |s| {
        label(s, "team").as_deref() == Some("blue")
    })
    .await;
    let after = s.endpoint("10.0.1.1").unwrap().identity;
    assert_ne!(before, after, "new labels, new identity");
    let logs = captured_logs();
    assert!(
        logs.contains("does not serve this policy type"),
        "the absent policy types are logged"
    );
}

/// Issue #12 part 4 through the users' tool: NetworkPolicy (a built-in lab resource) and
/// CiliumNetworkPolicy (after `kubectl apply` of the CRD mesh ships, once the publisher is
/// already running: a type that appears later is picked up) applied with kubectl reach etcd
/// as the agents read them; an invalid one gets a Warning Event and changes nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_applied_with_kubectl_are_published_and_invalid_ones_reported() {
    init_logs();
    let etcd = Etcd::start();
    let client = connect(&etcd).await;
    let lab = Lab::start().await;
    lab.namespace("shop").await;
    lab.apply(&json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"namespace": "shop", "name": "web-from-shop"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                 "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "shop"}}}]}]}
    }))
    .await;
    let _p = Running::start(
        &client,
        lab.client().await,
        publisher_config("p1", Duration::from_secs(1)),
    );
    let prefix = format!("{PREFIX}clusters/{CLUSTER}/");
    let keys = Keys::new(PREFIX);
    let key = |kind, ns: Option<&str>, name: &str| {
        keys.object(
            CLUSTER,
            pb::Kind::Policy,
            &mesh_proto::keys::policy_name(kind, ns, name),
        )
    };
    use mesh_core::policy::PolicyKind;
    let np = key(PolicyKind::NetworkPolicy, Some("shop"), "web-from-shop");
    let cnp = key(PolicyKind::CiliumNetworkPolicy, Some("shop"), "x-wing-out");
    let s = wait_until(
        &client,
        &prefix,
        T,
        "the NetworkPolicy and every marker",
        |s| s.all_synced() && s.raw.contains_key(&np),
    )
    .await;
    let v = <pb::Policy as prost::Message>::decode(s.raw[&np].as_slice()).unwrap();
    let parsed = mesh_proto::convert::PolicyObject::try_from(v).expect("agents parse it");
    assert_eq!(parsed.policy.reference.object(), "shop/web-from-shop");

    // The CRD appears after the publisher started (the type was absent until now).
    let crd = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/crds/ciliumnetworkpolicies.yaml"
    ))
    .unwrap();
    lab.kubectl(&["apply", "-f", "-"], Some(&crd)).await;
    lab.apply(&json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"namespace": "shop", "name": "x-wing-out"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "x-wing"}},
                 "egress": [{"toEndpoints": [{"matchLabels": {
                     "app": "rebel-base", "io.cilium.k8s.policy.cluster": "west"}}]}]}
    }))
    .await;
    wait_until(&client, &prefix, T, "the CiliumNetworkPolicy", |s| {
        s.raw.contains_key(&cnp)
    })
    .await;

    // Invalid for mesh, though the CRD's schema accepts it (as Cilium's does): a spec that
    // selects nothing. Not published, reported, and the others stay.
    lab.apply(&json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"namespace": "shop", "name": "broken"},
        "spec": {"ingress": [{"fromEntities": ["world"]}]}
    }))
    .await;
    let events = || async {
        let out = lab
            .kubectl(&["get", "events", "-n", "shop", "-o", "json"], None)
            .await;
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["reason"] == "InvalidPolicy")
            .cloned()
            .collect::<Vec<_>>()
    };
    eventually(T, "the InvalidPolicy event", || async {
        !events().await.is_empty()
    })
    .await;
    let ev = &events().await[0];
    assert_eq!(ev["type"], "Warning");
    assert_eq!(ev["involvedObject"]["kind"], "CiliumNetworkPolicy");
    assert_eq!(ev["involvedObject"]["name"], "broken");
    let msg = ev["message"].as_str().unwrap();
    assert!(
        msg.contains("shop/broken") && msg.contains("spec: needs endpointSelector"),
        "{msg}"
    );
    let (raw, _) = list(&client, &prefix).await;
    let s = publish_common::State::new(raw);
    assert!(s.raw.contains_key(&np) && s.raw.contains_key(&cnp));
    assert!(
        !s.raw
            .contains_key(&key(PolicyKind::NetworkPolicy, Some("shop"), "broken"))
    );

    // Deleted with kubectl: gone from etcd.
    lab.kubectl(
        &["delete", "networkpolicy", "web-from-shop", "-n", "shop"],
        None,
    )
    .await;
    wait_until(&client, &prefix, T, "the NetworkPolicy deleted", |s| {
        !s.raw.contains_key(&np)
    })
    .await;
}

/// Issue 14 part 4: a node whose agent stops reporting is marked on its Node object
/// (`stale_since_unix_ms`), and unmarked when it reports again; a node whose agent never
/// reported is not judged; a new leader keeps an existing mark until it judges the node.
/// The reports are written as `ReportStatus` stores them (`agents/<node>`); the publisher
/// only reads etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_agent_stops_reporting_is_marked_until_it_reports_again() {
    init_logs();
    let etcd = Etcd::start();
    let client = connect(&etcd).await;
    let lab = Lab::start().await;
    lab.node("n1", "192.168.0.1", "10.0.1.0/24").await;
    lab.node("n2", "192.168.0.2", "10.0.2.0/24").await;
    let keys = Keys::new(PREFIX);
    let prefix = format!("{PREFIX}clusters/{CLUSTER}/");
    let agent_key = keys.agent("n1");

    // n1's agent reports every 100 ms, saying its interval is 200 ms (stale after 600 ms).
    let reporting = Arc::new(AtomicBool::new(true));
    let reporter = tokio::spawn({
        let (mut kv, reporting, key) = (client.kv_client(), reporting.clone(), agent_key.clone());
        async move {
            loop {
                if reporting.load(Ordering::SeqCst) {
                    let status = pb::AgentStatus {
                        node: "n1".into(),
                        status_interval_ms: 200,
                        ..Default::default()
                    };
                    kv.put(key.as_str(), status.encode_to_vec(), None)
                        .await
                        .expect("writing n1's status");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let _stop_reporter = AbortOnDrop(reporter);

    let mut cfg = publisher_config("p1", Duration::from_secs(60));
    cfg.node_check_interval = Duration::from_millis(50);
    let p1 = Running::start(&client, lab.client().await, cfg.clone());
    let s = wait_until(&client, &prefix, T, "both nodes", |s| {
        s.node("n1").is_some() && s.node("n2").is_some()
    })
    .await;
    assert_eq!(s.node("n1").unwrap().stale_since_unix_ms, 0);
    // Well past 3 intervals while n1 reports, and with n2 never reporting: nothing marked
    // (an absence, so a bounded wait).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (raw, _) = list(&client, &prefix).await;
    let s = State::new(raw);
    assert_eq!(s.node("n1").unwrap().stale_since_unix_ms, 0, "n1 reports");
    assert_eq!(
        s.node("n2").unwrap().stale_since_unix_ms,
        0,
        "n2 never reported: not judged"
    );

    // n1's agent stops reporting: marked within 3 intervals plus a check.
    reporting.store(false, Ordering::SeqCst);
    let stopped_ms = unix_ms();
    let s = wait_until(&client, &prefix, T, "n1 marked not reporting", |s| {
        s.node("n1").is_some_and(|n| n.stale_since_unix_ms != 0)
    })
    .await;
    let n1 = s.node("n1").unwrap();
    assert!(
        (stopped_ms..=unix_ms()).contains(&n1.stale_since_unix_ms),
        "stale since {} (stopped at {stopped_ms})",
        n1.stale_since_unix_ms
    );
    assert_eq!(n1.internal_ips, ["192.168.0.1"], "only marked: {n1:?}");
    assert_eq!(s.node("n2").unwrap().stale_since_unix_ms, 0);
    let marked_at = n1.stale_since_unix_ms;

    // Reporting again: unmarked.
    reporting.store(true, Ordering::SeqCst);
    wait_until(&client, &prefix, T, "n1 reporting again", |s| {
        s.node("n1").is_some_and(|n| n.stale_since_unix_ms == 0)
    })
    .await;

    // Lost again, then a new leader: it keeps the mark (same time) until it judges n1, and
    // clears it when n1 reports.
    reporting.store(false, Ordering::SeqCst);
    let s = wait_until(&client, &prefix, T, "n1 marked again", |s| {
        s.node("n1").is_some_and(|n| n.stale_since_unix_ms != 0)
    })
    .await;
    let marked_again = s.node("n1").unwrap().stale_since_unix_ms;
    assert!(marked_again >= marked_at);
    drop(p1);
    cfg.holder = "p2".into();
    let mut p2 = Running::start(&client, lab.client().await, cfg);
    tokio::time::timeout(T, p2.is_leader.wait_for(true))
        .await
        .expect("p2 became leader");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (raw, _) = list(&client, &prefix).await;
    assert_eq!(
        State::new(raw).node("n1").unwrap().stale_since_unix_ms,
        marked_again,
        "the new leader keeps the mark it found"
    );
    reporting.store(true, Ordering::SeqCst);
    wait_until(&client, &prefix, T, "n1 reporting to the new leader", |s| {
        s.node("n1").is_some_and(|n| n.stale_since_unix_ms == 0)
    })
    .await;
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

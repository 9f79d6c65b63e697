//! The publisher's etcd side against a real etcd: identity allocation and collection, the
//! batched store, and leader election with fencing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use etcd_client::{Client, GetOptions};
use mesh_apiserver::identity::{IdentityAllocator, labels_hash};
use mesh_apiserver::leader::{Elector, LeaderConfig, LeaderSignal};
use mesh_apiserver::store::{self, EtcdStore, Fence};
use mesh_core::{ClusterId, ClusterName, IdentityLabels};
use mesh_proto::keys::Keys;
use mesh_proto::pb;
use mesh_testkit::etcd::Etcd;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const PREFIX: &str = "test/v1/";

async fn connect(etcd: &Etcd) -> Client {
    Client::connect([etcd.endpoint()], None)
        .await
        .expect("connecting to etcd")
}

async fn list(client: &mut Client, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .expect("listing etcd")
        .kvs()
        .iter()
        .map(|kv| (kv.key_str().unwrap().to_string(), kv.value().to_vec()))
        .collect()
}

fn cluster() -> (ClusterName, ClusterId) {
    (
        ClusterName::new("east").unwrap(),
        ClusterId::new(7).unwrap(),
    )
}

fn labels(app: &str) -> IdentityLabels {
    IdentityLabels::for_pod(&cluster().0, "ns", [("app", app)])
}

async fn allocator(client: &Client, fence: Option<Fence>, grace: Duration) -> IdentityAllocator {
    let (name, id) = cluster();
    IdentityAllocator::load(
        client.kv_client(),
        Keys::new(PREFIX),
        name,
        id,
        fence,
        grace,
    )
    .await
    .expect("loading identities")
}

#[tokio::test]
async fn same_labels_same_id_across_restarts() {
    let etcd = Etcd::start();
    let mut client = connect(&etcd).await;
    let mut a = allocator(&client, None, Duration::from_secs(60)).await;
    let web = a.allocate(&labels("web")).await.unwrap();
    let db = a.allocate(&labels("db")).await.unwrap();
    assert_ne!(web, db);
    for id in [web, db] {
        assert_eq!(id.cluster_id(), 7, "{id} outside cluster 7's range");
        assert!((256..=65535).contains(&id.local()), "{id}");
    }
    assert_eq!(a.allocate(&labels("web")).await.unwrap(), web, "cache");

    let keys = Keys::new(PREFIX);
    let index = list(&mut client, &keys.identity_index_prefix()).await;
    assert_eq!(index.len(), 2);
    assert!(index.contains_key(&keys.identity_index(&labels_hash(&labels("web")))));
    let published = list(&mut client, &keys.kind_prefix("east", pb::Kind::Identity)).await;
    let ids: HashSet<String> = published
        .keys()
        .map(|k| k.rsplit('/').next().unwrap().to_string())
        .collect();
    assert_eq!(ids, HashSet::from([web.0.to_string(), db.0.to_string()]));

    // A new allocator (a restarted apiserver) finds the same ids and writes nothing.
    let rev_before = client
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let mut b = allocator(&client, None, Duration::from_secs(60)).await;
    assert_eq!(b.lookup(&labels("web")), Some(web));
    assert_eq!(b.allocate(&labels("db")).await.unwrap(), db);
    let rev_after = client
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    assert_eq!(
        rev_before, rev_after,
        "reloading and re-allocating known labels must not write"
    );
    // New labels get a fresh id.
    let cache = b.allocate(&labels("cache")).await.unwrap();
    assert!(cache != web && cache != db);
}

#[tokio::test]
async fn concurrent_allocators_never_hand_out_one_id_twice() {
    let etcd = Etcd::start();
    let client = connect(&etcd).await;
    let mut a = allocator(&client, None, Duration::from_secs(60)).await;
    let mut b = allocator(&client, None, Duration::from_secs(60)).await;
    // Both see an empty etcd, so both start probing at the same id.
    let (ra, rb) = tokio::join!(
        async {
            let mut out = Vec::new();
            for i in 0..40 {
                let l = labels(&format!("app-{}", i % 30));
                out.push((l.clone(), a.allocate(&l).await.unwrap()));
            }
            out
        },
        async {
            let mut out = Vec::new();
            for i in 0..40 {
                let l = labels(&format!("app-{}", 10 + i % 30));
                out.push((l.clone(), b.allocate(&l).await.unwrap()));
            }
            out
        }
    );
    let mut by_labels: HashMap<IdentityLabels, mesh_core::IdentityId> = HashMap::new();
    for (l, id) in ra.into_iter().chain(rb) {
        let prev = by_labels.insert(l.clone(), id);
        assert!(
            prev.is_none() || prev == Some(id),
            "labels {} got two ids: {prev:?} and {id}",
            l.canonical()
        );
    }
    let distinct: HashSet<_> = by_labels.values().collect();
    assert_eq!(
        distinct.len(),
        by_labels.len(),
        "one id handed out for two label sets: {by_labels:?}"
    );
    assert_eq!(by_labels.len(), 40);
    let mut c = client.clone();
    let keys = Keys::new(PREFIX);
    assert_eq!(list(&mut c, &keys.identity_index_prefix()).await.len(), 40);
    assert_eq!(
        list(&mut c, &keys.kind_prefix("east", pb::Kind::Identity))
            .await
            .len(),
        40
    );
}

#[tokio::test]
async fn unused_identities_are_collected_after_the_grace_period() {
    let etcd = Etcd::start();
    let mut client = connect(&etcd).await;
    let grace = Duration::from_secs(30);
    let mut a = allocator(&client, None, grace).await;
    let web = a.allocate(&labels("web")).await.unwrap();
    let db = a.allocate(&labels("db")).await.unwrap();
    a.acquire(web);
    a.acquire(db);
    let t0 = Instant::now();
    a.release(db, t0);
    assert!(
        a.gc(t0 + grace / 2).await.unwrap().is_empty(),
        "collected before the grace period"
    );
    // Used again within the grace period: kept.
    a.acquire(db);
    assert!(a.gc(t0 + grace * 2).await.unwrap().is_empty());
    a.release(db, t0);
    assert_eq!(a.gc(t0 + grace).await.unwrap(), vec![db]);
    let keys = Keys::new(PREFIX);
    let index = list(&mut client, &keys.identity_index_prefix()).await;
    assert_eq!(
        index.len(),
        1,
        "index entry of the collected identity remains"
    );
    let published = list(&mut client, &keys.kind_prefix("east", pb::Kind::Identity)).await;
    assert_eq!(
        published.keys().cloned().collect::<Vec<_>>(),
        vec![keys.object("east", pb::Kind::Identity, &web.0.to_string())]
    );
    // The labels come back: a (possibly different) id is allocated and the cache is right.
    let db2 = a.allocate(&labels("db")).await.unwrap();
    assert_eq!(a.lookup(&labels("db")), Some(db2));
    assert_ne!(db2, web);
}

#[tokio::test]
async fn loading_repairs_an_index_entry_without_its_identity_key() {
    let etcd = Etcd::start();
    let mut client = connect(&etcd).await;
    let mut a = allocator(&client, None, Duration::from_secs(60)).await;
    let web = a.allocate(&labels("web")).await.unwrap();
    let keys = Keys::new(PREFIX);
    let id_key = keys.object("east", pb::Kind::Identity, &web.0.to_string());
    client.delete(id_key.clone(), None).await.unwrap();
    let b = allocator(&client, None, Duration::from_secs(60)).await;
    assert_eq!(b.lookup(&labels("web")), Some(web));
    assert!(
        list(&mut client, &id_key).await.contains_key(&id_key),
        "identity key not restored"
    );
}

#[tokio::test]
async fn store_writes_only_changes_in_bounded_transactions() {
    let etcd = Etcd::start();
    let mut client = connect(&etcd).await;
    let keys = Keys::new(PREFIX);
    let mut store = EtcdStore::load(client.kv_client(), keys.clone(), "east", None, 128)
        .await
        .unwrap();
    let key = |i: usize| keys.object("east", pb::Kind::Node, &format!("n{i:03}"));
    for i in 0..300 {
        store.set(key(i), format!("v{i}").into_bytes());
    }
    let stats = store.flush(|_, _| {}).await.unwrap();
    assert_eq!((stats.puts, stats.txns), (300, 3), "{stats:?}");
    assert_eq!(
        list(&mut client, &keys.cluster_prefix("east")).await.len(),
        300
    );

    // Same values: nothing to write. One changed value: one put.
    for i in 0..300 {
        store.set(key(i), format!("v{i}").into_bytes());
    }
    assert_eq!(store.pending_len(), 0);
    store.set(key(5), b"changed".to_vec());
    store.remove(&key(6));
    store.remove(&keys.object("east", pb::Kind::Node, "never-written"));
    let stats = store.flush(|_, _| {}).await.unwrap();
    assert_eq!((stats.puts, stats.deletes, stats.txns), (1, 1, 1));

    assert_eq!(store.count(pb::Kind::Node), 299);

    // Large values: transactions stay under etcd's request size limit.
    for i in 0..3 {
        store.set(
            keys.object("east", pb::Kind::Service, &format!("ns/big-{i}")),
            vec![b'x'; 600 * 1024],
        );
    }
    let stats = store.flush(|_, _| {}).await.unwrap();
    assert_eq!((stats.puts, stats.txns), (3, 3), "{stats:?}");
    assert_eq!(store.count(pb::Kind::Service), 3);

    // A second store (a restart) knows what etcd holds.
    let mut again = EtcdStore::load(client.kv_client(), keys.clone(), "east", None, 128)
        .await
        .unwrap();
    assert!(again.contains(&key(5)) && !again.contains(&key(6)));
    assert_eq!(
        (again.count(pb::Kind::Node), again.count(pb::Kind::Service)),
        (299, 3)
    );
    again.set(key(5), b"changed".to_vec());
    assert_eq!(
        again.pending_len(),
        0,
        "an unchanged value is staged after a restart"
    );
}

#[tokio::test]
async fn leader_election_has_one_leader_and_fences_the_old_one() {
    let etcd = Etcd::start();
    let client = connect(&etcd).await;
    let keys = Keys::new(PREFIX);
    let cfg = |holder: &str| LeaderConfig {
        key: keys.leader(),
        holder: holder.into(),
        ttl: Duration::from_secs(2),
    };
    let (sig_a, mut is_a) = LeaderSignal::new();
    let (sig_b, mut is_b) = LeaderSignal::new();
    let a = Elector::new(client.clone(), cfg("a"), sig_a);
    let b = Elector::new(client.clone(), cfg("b"), sig_b);
    let shutdown = CancellationToken::new();

    let la = a.campaign(&shutdown).await.expect("a becomes leader");
    assert!(is_a.get());
    let b_task = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move { b.campaign(&shutdown).await })
    };
    // b must not win while a holds the lease (longer than the TTL: keep-alive works).
    let waited = tokio::time::timeout(Duration::from_secs(3), is_b.wait_for(true)).await;
    assert!(waited.is_err(), "b became leader while a was");
    assert!(
        !la.lost.is_cancelled(),
        "a lost its lease although it kept it alive"
    );

    // A write fenced by a's term succeeds now and fails once b leads.
    let mut store = EtcdStore::load(
        client.kv_client(),
        keys.clone(),
        "east",
        Some(la.fence.clone()),
        128,
    )
    .await
    .unwrap();
    store.set(keys.object("east", pb::Kind::Node, "n1"), b"1".to_vec());
    store.flush(|_, _| {}).await.expect("leader write");

    let old_fence = la.fence.clone();
    la.resign().await;
    is_a.wait_for(false).await;
    let lb = tokio::time::timeout(Duration::from_secs(5), b_task)
        .await
        .expect("b takes over after a resigned")
        .unwrap()
        .expect("b leader");
    assert!(is_b.get());
    assert_ne!(lb.fence, old_fence);
    store.set(keys.object("east", pb::Kind::Node, "n2"), b"2".to_vec());
    match store.flush(|_, _| {}).await {
        Err(store::Error::Fenced { .. }) => {}
        other => panic!("a stale leader's write went through: {other:?}"),
    }

    // Losing the lease (revoked behind b's back) ends b's term at once.
    let mut c = client.clone();
    let leader = c.get(keys.leader(), None).await.unwrap();
    let lease = leader.kvs()[0].lease();
    c.lease_revoke(lease).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), lb.lost.cancelled())
        .await
        .expect("b noticed the loss of its lease");
    is_b.wait_for(false).await;
    shutdown.cancel();
}

//! The fault matrix on a peer importer's stream (issue 16 part 3): cluster B imports A while
//! churn runs in A (pods created and deleted, the global service scaled, its annotations
//! changed, the service deleted); each fault is injected between A and B, then the
//! importer's own recording (`--peer-watch-record-dir`) is checked against A's etcd history
//! by the watch-history checker (a peer's view: A's shared data only), and B's copy of A in
//! B's etcd is compared with A's state key for key. Each test prints the verdict.

mod peer_support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mesh_proto::convert::decode_value;
use mesh_proto::keys::{ClusterKey, Keys};
use mesh_proto::record;
use mesh_proto::tls::{self, ClientEndpoint, ClientTls, TlsIdentity};
use mesh_testkit::certs::Validity;
use mesh_testkit::history::churn::{Churn, ChurnCluster};
use mesh_testkit::history::{self, History, Verdict, View, ViewState, diff};
use peer_support::*;
use tokio::sync::watch;

struct Setup {
    a: Cluster,
    b: Cluster,
    proxy: Proxy,
    importer: TestImporter,
    recordings: tempfile::TempDir,
}

impl Setup {
    /// A and B up, B importing A through a proxy (to partition), synced.
    async fn start() -> Setup {
        init_tracing();
        let mut a = Cluster::new("a", 1, "10.1.0.0/16");
        let mut b = Cluster::new("b", 2, "10.2.0.0/16");
        a.start().await;
        b.start().await;
        a.trust(&b);
        let mut ea = a.etcd_client().await;
        publish_config_and_markers(&mut ea, &a).await;
        let proxy = Proxy::start(a.addr()).await;
        let mut spec = a.spec();
        spec.address = proxy.addr.to_string();
        let (tx, rx) = watch::channel(Some(peers(&[spec])));
        // The importer keeps its peer set alive as long as the sender lives.
        std::mem::forget(tx);
        let recordings = tempfile::tempdir().unwrap();
        let mut options = test_options(None);
        options.record_dir = Some(recordings.path().to_owned());
        let importer = b.importer(rx, options).await;
        importer.wait("a", "synced", |s| s.synced).await;
        Setup {
            a,
            b,
            proxy,
            importer,
            recordings,
        }
    }

    fn churn(&self, seed: u64) -> Churn {
        Churn::start(
            self.a.etcd.endpoint(),
            Keys::default(),
            vec![ChurnCluster {
                name: "a".into(),
                id: 1,
                node: "n1".into(),
                node_ip: [192, 168, 1, 1].into(),
                vip: [10, 96, 1, 20].into(),
                pods: [10, 1, 3],
            }],
            seed,
        )
    }

    fn recording(&self) -> PathBuf {
        self.recordings.path().join("a.rec")
    }

    async fn wait_connected(&self, connected: bool, what: &str) {
        self.importer
            .wait("a", what, |s| s.connected == connected)
            .await;
    }
}

/// B's copy of A (objects under `clusters/a/` of B's etcd, markers and link left out).
async fn imported(b: &Cluster) -> ViewState {
    let keys = Keys::default();
    let mut eb = b.etcd_client().await;
    let mut out = ViewState::new();
    for (key, bytes) in cluster_keys(&mut eb, "a").await {
        if let Some(ClusterKey::Object {
            cluster,
            kind,
            name,
        }) = keys.parse(&key)
            && kind != mesh_proto::pb::Kind::Link
        {
            let value = decode_value(kind, &bytes).expect("B holds valid values");
            out.insert((cluster, kind, name), value);
        }
    }
    out
}

/// Waits until the importer's stream holds A's current state and B's copy of A equals it,
/// then checks the recording and prints the verdict.
async fn converge_and_check(s: &Setup, what: &str, earlier: Option<&History>) -> Verdict {
    let keys = Keys::default();
    let view = View::Peer {
        cluster: "a".into(),
    };
    let deadline = Instant::now() + STEP;
    loop {
        let mut ea = s.a.etcd_client().await;
        let mut h = History::read(&mut ea).await.expect("A's history");
        if let Some(e) = earlier {
            let mut all = e.clone();
            all.extend(h);
            h = all;
        }
        let recs = record::read_file(&s.recording()).unwrap_or_default();
        let want = h.view_at(&keys, &view, h.current()).expect("current");
        let copy = imported(&s.b).await;
        let stream_ok = history::converged(&recs, &h, &keys, &view);
        if stream_ok && copy == want {
            let v = history::check(
                &format!("importer b <- a ({what})"),
                &recs,
                &h,
                &keys,
                &view,
            );
            println!("{v}");
            println!(
                "b's copy of a ({what}): equal to a's shared state at revision {} ({} objects)",
                h.current(),
                want.len()
            );
            return v;
        }
        if Instant::now() >= deadline {
            let v = history::check(
                &format!("importer b <- a ({what})"),
                &recs,
                &h,
                &keys,
                &view,
            );
            panic!(
                "{what}: not converged after {STEP:?}\n{v}\nb's copy of a: {}\nstats: {:#?}",
                diff(&copy, &want),
                s.importer.stats("a")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_apiserver_restart_under_churn() {
    let mut s = Setup::start().await;
    let churn = s.churn(61);
    churn.wait_ops(50, STEP).await;
    s.a.stop().await;
    s.wait_connected(false, "A's apiserver gone").await;
    churn.wait_ops(50, STEP).await;
    s.a.start().await;
    s.wait_connected(true, "reconnected to A").await;
    churn.wait_ops(50, STEP).await;
    let ops = churn.stop().await;
    let v = converge_and_check(&s, "peer apiserver restart", None).await;
    println!("churn: {ops} changes");
    v.assert_ok();
    assert!(v.resumes >= 1, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_etcd_kill_and_restart_under_churn() {
    let mut s = Setup::start().await;
    let churn = s.churn(62);
    churn.wait_ops(50, STEP).await;
    // SIGKILL of the peer's etcd; churn's writes fail while it is down.
    s.a.etcd.kill();
    s.a.etcd.restart();
    churn.wait_ops(100, STEP).await;
    let ops = churn.stop().await;
    let v = converge_and_check(&s, "peer etcd kill -9 and restart", None).await;
    println!("churn: {ops} changes");
    v.assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_partition_and_heal_under_churn() {
    let s = Setup::start().await;
    let churn = s.churn(63);
    churn.wait_ops(50, STEP).await;
    s.proxy.cut();
    s.wait_connected(false, "partitioned").await;
    churn.wait_ops(50, STEP).await;
    s.proxy.heal();
    s.wait_connected(true, "healed").await;
    churn.wait_ops(50, STEP).await;
    let ops = churn.stop().await;
    let v = converge_and_check(&s, "partition and heal", None).await;
    println!("churn: {ops} changes");
    v.assert_ok();
    assert!(v.resumes >= 1, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_compaction_forces_reset_under_churn() {
    let mut s = Setup::start().await;
    let churn = s.churn(64);
    churn.wait_ops(50, STEP).await;
    s.proxy.cut();
    s.wait_connected(false, "partitioned").await;
    // A's apiserver restarts (its in-memory history begins at its load revision) and A's
    // etcd is compacted past the importer's revision while it is away: it comes back to a
    // Reset and a fresh snapshot, and what the snapshot lacks is deleted from B.
    s.a.stop().await;
    churn.wait_ops(50, STEP).await;
    let mut ea = s.a.etcd_client().await;
    let before = History::read(&mut ea).await.expect("A's history");
    ea.compact(before.current(), None)
        .await
        .expect("compaction");
    s.a.start().await;
    s.proxy.heal();
    s.wait_connected(true, "healed").await;
    churn.wait_ops(50, STEP).await;
    let ops = churn.stop().await;
    let v = converge_and_check(&s, "compaction forcing Reset", Some(&before)).await;
    println!("churn: {ops} changes");
    v.assert_ok();
    assert!(v.resets >= 1, "{v}");
}

/// A fresh connection to A's apiserver with B's identity: `Ok` or the error's text.
async fn dial_a(s: &Setup) -> Result<(), String> {
    let ca = tls::parse_certs(s.a.ca.cert_pem.as_bytes(), "ca").unwrap();
    let cert = std::fs::read(&s.b.cert).unwrap();
    let key = std::fs::read(&s.b.key).unwrap();
    let id = TlsIdentity::from_pem(&cert, &key).unwrap();
    let client_tls = ClientTls::new(ca, id, Some(s.a.cluster_name())).unwrap();
    let mut client = tls::connect(&ClientEndpoint::new(s.a.addr().to_string(), client_tls))
        .await
        .map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))?;
    client
        .info(mesh_proto::pb::InfoRequest::default())
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

async fn until_dial(s: &Setup, what: &str, ok: impl Fn(&Result<(), String>) -> bool) -> String {
    let deadline = Instant::now() + STEP;
    loop {
        let r = dial_a(s).await;
        if ok(&r) {
            return format!("{r:?}");
        }
        assert!(Instant::now() < deadline, "{what}: last dial {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn write_leaf(dir: &Path, cert: &mesh_testkit::certs::TestCert) {
    // The key first, then the certificate (the reloader retries a half-written pair).
    let (c, k) = (dir.join("apiserver.crt"), dir.join("apiserver.key"));
    std::fs::write(&k, &cert.key_pem).unwrap();
    std::fs::write(&c, &cert.cert_pem).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_certificate_rotation_under_churn() {
    let s = Setup::start().await;
    let churn = s.churn(65);
    churn.wait_ops(50, STEP).await;
    let dir = s.a.dir.path().to_owned();
    assert_eq!(s.a.cert, dir.join("apiserver.crt"));

    // A's leaf is replaced by an expired one without a restart: a new client is refused
    // with a clear error (the open stream is not affected).
    write_leaf(&dir, &s.a.ca.issue_for("a", "apiserver", Validity::Expired));
    let refused = until_dial(&s, "the expired leaf refused", |r| {
        r.as_ref()
            .is_err_and(|e| e.to_lowercase().contains("expired"))
    })
    .await;
    println!("a fresh client of A with the expired leaf: {refused}");
    // The importer, forced to reconnect, is refused too and says why.
    s.proxy.cut();
    s.proxy.heal();
    let stats = s
        .importer
        .wait("a", "refused: expired", |st| {
            !st.connected && st.last_error.to_lowercase().contains("expired")
        })
        .await;
    println!("importer b <- a: {}", stats.last_error);
    churn.wait_ops(50, STEP).await;

    // A fresh leaf, reloaded without a restart: clients connect again, the importer
    // resumes where it stopped.
    write_leaf(&dir, &s.a.ca.issue("apiserver"));
    until_dial(&s, "the fresh leaf served", |r| r.is_ok()).await;
    s.wait_connected(true, "reconnected with the fresh leaf")
        .await;
    churn.wait_ops(50, STEP).await;
    let ops = churn.stop().await;
    let v = converge_and_check(&s, "certificate rotation", None).await;
    println!("churn: {ops} changes");
    v.assert_ok();
    assert!(v.resumes >= 1, "{v}");
}

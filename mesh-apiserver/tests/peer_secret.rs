//! Peers come from a Kubernetes Secret, applied live (DESIGN.md section 10): `kubectl
//! apply` of the Secret in cluster B's (lab) Kubernetes API starts importing A and trusts
//! A's CA; adding C to the Secret starts C; removing A stops it and withdraws its data,
//! status and CA; deleting the Secret removes every peer. Also: a directory of files.

mod peer_support;

use std::time::Duration;

use mesh_apiserver::peer::{PeerSource, PeerSpec};
use mesh_lab::kube_api::{KubeApi, KubeApiConfig, KubeApiHandle};
use mesh_proto::pb::Kind;
use mesh_proto::peer_entry::render_entry;
use peer_support::*;

struct Lab {
    api: KubeApiHandle,
    _dir: tempfile::TempDir,
    cache: tempfile::TempDir,
}

impl Lab {
    async fn start() -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let api = KubeApi::start(KubeApiConfig::new(dir.path().join("api"), "b"))
            .await
            .expect("lab Kubernetes API");
        Lab {
            api,
            _dir: dir,
            cache,
        }
    }

    async fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(self.api.kubeconfig_path())
            .arg("--cache-dir")
            .arg(self.cache.path())
            .arg("--request-timeout=20s")
            .args(args)
            .env_remove("KUBECONFIG")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("kubectl");
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).await.unwrap();
        }
        drop(input);
        let out = child.wait_with_output().await.unwrap();
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply` of the peer Secret holding `specs` (built by `kubectl create secret
    /// generic --from-file --dry-run`, so keys are in `data` and removed keys go away).
    async fn apply_peers(&self, specs: &[PeerSpec]) {
        let files = tempfile::tempdir().unwrap();
        let mut args: Vec<String> = [
            "create",
            "secret",
            "generic",
            "mesh-peers",
            "-n",
            "kube-system",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for s in specs {
            let path = files.path().join(format!("{}.yaml", s.name));
            std::fs::write(&path, render_entry(s)).unwrap();
            args.push(format!("--from-file={}", path.display()));
        }
        args.extend(["--dry-run=client".into(), "-o".into(), "json".into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let manifest = self.kubectl(&args, None).await;
        self.kubectl(&["apply", "-f", "-"], Some(&manifest)).await;
    }

    async fn client(&self) -> kube::Client {
        let kubeconfig = kube::config::Kubeconfig::read_from(self.api.kubeconfig_path()).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap();
        kube::Client::try_from(config).unwrap()
    }
}

async fn wait_trust(b: &Cluster, peer: &str, want: bool) {
    let deadline = tokio::time::Instant::now() + STEP;
    while trusts(b, peer) != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "trust of {peer} never became {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_from_a_secret_are_applied_live() {
    init_tracing();
    let mut a = Cluster::new("a", 1, "10.1.0.0/16");
    let mut c = Cluster::new("c", 3, "10.3.0.0/16");
    let mut b = Cluster::new("b", 2, "10.2.0.0/16");
    a.start().await;
    c.start().await;
    b.start().await;
    a.trust(&b);
    c.trust(&b);
    for x in [&a, &c] {
        let mut e = x.etcd_client().await;
        publish_config_and_markers(&mut e, x).await;
        put(
            &mut e,
            x.keys().object(&x.name, Kind::Node, "n1"),
            &node(&x.name, "n1", "192.168.0.1"),
        )
        .await;
    }
    let lab = Lab::start().await;
    let source = PeerSource::Secret {
        client: lab.client().await,
        namespace: "kube-system".into(),
        name: "mesh-peers".into(),
    };
    let importer = b.importer_from(source, test_options(None)).await;
    let mut eb = b.etcd_client().await;
    assert!(!trusts(&b, "a"));

    // kubectl apply: A is imported, and B trusts A's CA.
    lab.apply_peers(&[a.spec()]).await;
    importer.wait("a", "synced", |s| s.synced).await;
    wait_keys(&mut eb, "a", "A's node in B", |m| {
        m.contains_key(&a.keys().object("a", Kind::Node, "n1"))
    })
    .await;
    wait_trust(&b, "a", true).await;

    // C is added next to A.
    lab.apply_peers(&[a.spec(), c.spec()]).await;
    importer.wait("c", "synced", |s| s.synced).await;
    wait_keys(&mut eb, "c", "C's node in B", |m| {
        m.contains_key(&c.keys().object("c", Kind::Node, "n1"))
    })
    .await;

    // A is removed: its data, status and CA go; C stays.
    lab.apply_peers(&[c.spec()]).await;
    wait_keys(&mut eb, "a", "A's data withdrawn", |m| m.is_empty()).await;
    wait_trust(&b, "a", false).await;
    let deadline = tokio::time::Instant::now() + STEP;
    while peer_status(&mut eb, "a").await.is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "A's status never removed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(importer.stats("a").is_none());
    assert!(importer.stats("c").unwrap().connected);
    assert!(!cluster_keys(&mut eb, "c").await.is_empty());

    // kubectl delete: no peers at all.
    lab.kubectl(
        &["delete", "secret", "mesh-peers", "-n", "kube-system"],
        None,
    )
    .await;
    wait_keys(&mut eb, "c", "C's data withdrawn", |m| m.is_empty()).await;
    wait_trust(&b, "c", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_from_a_directory() {
    init_tracing();
    let mut a = Cluster::new("a", 1, "10.1.0.0/16");
    let mut b = Cluster::new("b", 2, "10.2.0.0/16");
    a.start().await;
    b.start().await;
    a.trust(&b);
    let mut ea = a.etcd_client().await;
    publish_config_and_markers(&mut ea, &a).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("README"), "not a peer").unwrap();
    let source = PeerSource::Dir {
        path: dir.path().to_owned(),
        interval: Duration::from_millis(100),
    };
    let importer = b.importer_from(source, test_options(None)).await;
    std::fs::write(dir.path().join("a.yaml"), render_entry(&a.spec())).unwrap();
    importer.wait("a", "synced", |s| s.synced).await;
    let mut eb = b.etcd_client().await;
    std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
    wait_keys(&mut eb, "a", "A's data withdrawn", |m| m.is_empty()).await;
}

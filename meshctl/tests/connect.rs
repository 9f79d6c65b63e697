//! `meshctl connect` / `meshctl disconnect` against two lab Kubernetes APIs: the real binary
//! reads each cluster's Service, TLS Secret and ConfigMap and writes the peer Secrets.

use std::collections::BTreeMap;
use std::process::{Command, Output};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use mesh_lab::kube_api::{KubeApi, KubeApiConfig, KubeApiHandle};
use mesh_proto::peer_entry::parse_entry;
use serde_json::json;

const PEERS_NS: &str = "mesh-system";
const PEERS: &str = "mesh-peers";

struct Lab {
    _dir: tempfile::TempDir,
    a: KubeApiHandle,
    b: KubeApiHandle,
    kubeconfig: String,
}

async fn client(h: &KubeApiHandle) -> kube::Client {
    let kc = Kubeconfig::read_from(h.kubeconfig_path()).unwrap();
    let opts = KubeConfigOptions {
        context: Some(h.context().to_owned()),
        ..Default::default()
    };
    let config = kube::Config::from_custom_kubeconfig(kc, &opts)
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

/// Creates what connect reads: namespace, LoadBalancer Service with an ingress IP, the TLS
/// Secret's ca.crt and the `mesh-config` ConfigMap.
async fn setup_cluster(h: &KubeApiHandle, name: &str, id: u32, pod_cidr: &str, lb_ip: &str) {
    let c = client(h).await;
    let pp = PostParams::default();
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": "mesh-system"}})).unwrap();
    Api::<Namespace>::all(c.clone())
        .create(&pp, &ns)
        .await
        .unwrap();
    let svcs: Api<Service> = Api::namespaced(c.clone(), "mesh-system");
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "mesh-apiserver"},
        "spec": {"type": "LoadBalancer", "selector": {"app": "x"},
                 "ports": [{"name": "grpc", "port": 7443, "targetPort": 7443}]}
    }))
    .unwrap();
    svcs.create(&pp, &svc).await.unwrap();
    svcs.patch_status(
        "mesh-apiserver",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": [{"ip": lb_ip}]}}})),
    )
    .await
    .unwrap();
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("mesh-apiserver-tls".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "ca.crt".to_owned(),
            ByteString(h.ca_pem().as_bytes().to_vec()),
        )])),
        ..Default::default()
    };
    Api::<Secret>::namespaced(c.clone(), "mesh-system")
        .create(&pp, &secret)
        .await
        .unwrap();
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "mesh-config"},
        "data": {"MESH_CLUSTER_NAME": name, "MESH_CLUSTER_ID": id.to_string(),
                 "MESH_POD_CIDR": pod_cidr, "MESH_SERVICE_CIDR": "10.96.0.0/16"}
    }))
    .unwrap();
    Api::<ConfigMap>::namespaced(c, "mesh-system")
        .create(&pp, &cm)
        .await
        .unwrap();
}

async fn lab(b_name: &str, b_id: u32, b_cidr: &str) -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = KubeApiConfig::new(dir.path().join("a"), "alpha");
    ca.context = "ctx-a".into();
    let mut cb = KubeApiConfig::new(dir.path().join("b"), "beta");
    cb.context = "ctx-b".into();
    let a = KubeApi::start(ca).await.unwrap();
    let b = KubeApi::start(cb).await.unwrap();
    setup_cluster(&a, "alpha", 1, "10.1.0.0/16", "192.0.2.1").await;
    setup_cluster(&b, b_name, b_id, b_cidr, "192.0.2.2").await;
    let kubeconfig = format!(
        "{}:{}",
        a.kubeconfig_path().display(),
        b.kubeconfig_path().display()
    );
    Lab {
        _dir: dir,
        a,
        b,
        kubeconfig,
    }
}

async fn meshctl(lab: &Lab, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshctl"));
    cmd.args(args)
        .args([
            "--context",
            "ctx-a",
            "--destination-context",
            "ctx-b",
            "--peers-secret",
            &format!("{PEERS_NS}/{PEERS}"),
        ])
        .env("KUBECONFIG", &lab.kubeconfig);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

async fn peers(h: &KubeApiHandle) -> Option<BTreeMap<String, ByteString>> {
    let c = client(h).await;
    Api::<Secret>::namespaced(c, PEERS_NS)
        .get_opt(PEERS)
        .await
        .unwrap()
        .map(|s| s.data.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_writes_both_secrets_and_disconnect_removes_them() {
    let lab = lab("beta", 2, "10.2.0.0/16").await;
    let out = meshctl(&lab, &["connect"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{}", String::from_utf8_lossy(&out.stdout));

    let a = peers(&lab.a).await.expect("A's peer Secret");
    let spec = parse_entry("beta.yaml", &a["beta.yaml"].0)
        .unwrap()
        .unwrap();
    assert_eq!(spec.name.as_str(), "beta");
    assert_eq!(spec.address, "192.0.2.2:7443");
    assert_eq!(spec.ca_pem.trim(), lab.b.ca_pem().trim());
    assert_eq!(a.len(), 1);

    let b = peers(&lab.b).await.expect("B's peer Secret");
    let spec = parse_entry("alpha.yaml", &b["alpha.yaml"].0)
        .unwrap()
        .unwrap();
    assert_eq!(spec.name.as_str(), "alpha");
    assert_eq!(spec.address, "192.0.2.1:7443");
    assert_eq!(spec.ca_pem.trim(), lab.a.ca_pem().trim());
    assert_eq!(b.len(), 1);
    for v in a.values().chain(b.values()) {
        assert!(!String::from_utf8_lossy(&v.0).contains("PRIVATE KEY"));
    }

    // Idempotent.
    let out = meshctl(&lab, &["connect"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = meshctl(&lab, &["disconnect"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(peers(&lab.a).await.unwrap().is_empty());
    assert!(peers(&lab.b).await.unwrap().is_empty());
}

async fn refused(b_name: &str, b_id: u32, b_cidr: &str, expect: &[&str]) {
    let lab = lab(b_name, b_id, b_cidr).await;
    let out = meshctl(&lab, &["connect"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    println!("{err}");
    assert!(!out.status.success(), "connect should fail");
    assert!(err.contains("nothing was written"), "{err}");
    for e in expect {
        assert!(err.contains(e), "{err:?} should contain {e:?}");
    }
    assert!(peers(&lab.a).await.is_none(), "nothing written in A");
    assert!(peers(&lab.b).await.is_none(), "nothing written in B");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_id_is_refused() {
    refused(
        "beta",
        1,
        "10.2.0.0/16",
        &["same cluster id", "\"alpha\"", "\"beta\"", "id 1"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_name_is_refused() {
    refused(
        "alpha",
        2,
        "10.2.0.0/16",
        &["same name", "ctx-a", "ctx-b", "id 1", "id 2"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_pod_cidrs_are_refused() {
    refused(
        "beta",
        2,
        "10.1.128.0/17",
        &[
            "overlaps",
            "10.1.0.0/16",
            "10.1.128.0/17",
            "\"alpha\"",
            "\"beta\"",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_mode_connects_a_third_cluster_to_every_peer() {
    let lab = lab("beta", 2, "10.2.0.0/16").await;
    let out = meshctl(&lab, &["connect"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let mut cc = KubeApiConfig::new(dir.path().join("c"), "gamma");
    cc.context = "ctx-c".into();
    let c = KubeApi::start(cc).await.unwrap();
    setup_cluster(&c, "gamma", 3, "10.3.0.0/16", "192.0.2.3").await;
    let kubeconfig = format!("{}:{}", lab.kubeconfig, c.kubeconfig_path().display());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshctl"));
    cmd.args([
        "connect",
        "--context",
        "ctx-c",
        "--destination-context",
        "ctx-b",
        "--connection-mode",
        "mesh",
        "--peers-secret",
        &format!("{PEERS_NS}/{PEERS}"),
    ])
    .env("KUBECONFIG", &kubeconfig);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let keys = |m: BTreeMap<String, ByteString>| m.into_keys().collect::<Vec<_>>();
    assert_eq!(keys(peers(&c).await.unwrap()), ["alpha.yaml", "beta.yaml"]);
    assert_eq!(
        keys(peers(&lab.a).await.unwrap()),
        ["beta.yaml", "gamma.yaml"]
    );
    assert_eq!(
        keys(peers(&lab.b).await.unwrap()),
        ["alpha.yaml", "gamma.yaml"]
    );
}

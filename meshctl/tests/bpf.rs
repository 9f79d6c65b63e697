//! `meshctl bpf lb list`, `meshctl bpf ipcache list|get` and `meshctl flows` against real
//! pinned maps: a Datapath is opened on a temporary bpffs with a temporary cgroup, a service,
//! backends and ipcache entries are programmed, and the real meshctl binary reads them.
//!
//! Needs root (CAP_BPF, CAP_SYS_ADMIN); fails with a message otherwise.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use mesh_agent::datapath::{
    BackendValue, Datapath, DatapathConfig, IpcacheValue, PROTO_TCP, ServiceEntryKey,
    ServiceEntryValue, unpin_dir,
};

const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified";

struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    fn new() -> Self {
        let path = Path::new(CGROUP_ROOT).join(format!("meshctl-bpf-test-{}", std::process::id()));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("create cgroup {path:?}: {e}"));
        Self { path }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// A temporary directory with a bpffs mounted on it; on drop, unpins the datapath and
/// unmounts it.
struct Bpffs {
    dir: tempfile::TempDir,
}

impl Bpffs {
    fn mounted() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("meshctl-bpffs")
            .tempdir()
            .unwrap();
        let st = Command::new("mount")
            .args(["-t", "bpf", "bpf", dir.path().to_str().unwrap()])
            .status()
            .unwrap();
        assert!(st.success(), "mount bpffs");
        Self { dir }
    }

    fn pin_dir(&self) -> PathBuf {
        self.dir.path().join("mesh").join("node")
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = unpin_dir(&self.pin_dir());
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn meshctl(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "meshctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The cells of the table row whose first cell is `first`... (split on 3+ spaces).
fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .map(|l| {
            l.split("   ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(String::from)
                .collect()
        })
        .collect()
}

#[test]
fn bpf_lb_ipcache_and_flows_read_pinned_maps() {
    mesh_testkit::require_root("the meshctl bpf tests");
    let cgroup = Cgroup::new();
    let bpffs = Bpffs::mounted();
    let pin = bpffs.pin_dir();
    let mut dp = Datapath::open(DatapathConfig::new(&pin, &cgroup.path)).unwrap();

    let vip = Ipv4Addr::new(10, 96, 0, 10);
    let frontend = ServiceEntryKey::master(vip, 80, PROTO_TCP);
    for (slot, id, ip, cluster_id) in [
        (1, 7, Ipv4Addr::new(10, 1, 0, 1), 1),
        (2, 8, Ipv4Addr::new(10, 2, 0, 1), 2),
    ] {
        let backend = BackendValue {
            ip,
            port: 8080,
            proto: PROTO_TCP,
            cluster_id,
            flags: 0,
        };
        dp.upsert_backend(id, backend).unwrap();
        dp.upsert_service_slot(
            frontend.with_slot(slot),
            ServiceEntryValue::backend(id, backend),
        )
        .unwrap();
    }
    dp.upsert_service_slot(frontend, ServiceEntryValue::master(2))
        .unwrap();
    // A frontend with no backend: refused.
    let empty = ServiceEntryKey::master(Ipv4Addr::new(10, 96, 0, 11), 443, PROTO_TCP);
    dp.upsert_service_slot(empty, ServiceEntryValue::master(0))
        .unwrap();
    dp.upsert_ipcache(
        "10.2.0.0/16".parse().unwrap(),
        IpcacheValue {
            identity: 2000,
            tunnel_endpoint: Some(Ipv4Addr::new(192, 168, 0, 2)),
            cluster_id: 2,
            flags: 0,
        },
    )
    .unwrap();
    dp.upsert_ipcache(
        "10.2.0.1/32".parse().unwrap(),
        IpcacheValue {
            identity: 2001,
            tunnel_endpoint: Some(Ipv4Addr::new(192, 168, 0, 2)),
            cluster_id: 2,
            flags: 0,
        },
    )
    .unwrap();
    let dir = pin.to_str().unwrap();

    let lb = meshctl(&["bpf", "lb", "list", "--bpffs-dir", dir]);
    let lb_rows = rows(&lb);
    assert_eq!(
        lb_rows[0],
        ["SERVICE ADDRESS", "BACKEND ADDRESS", "CLUSTER ID"],
        "{lb}"
    );
    for want in [
        ["10.96.0.10:80/TCP", "2 (master)", "-"],
        ["10.96.0.10:80/TCP", "10.1.0.1:8080 (7)", "1"],
        ["10.96.0.10:80/TCP", "10.2.0.1:8080 (8)", "2"],
        ["10.96.0.11:443/TCP", "0 (master): refused, no backend", "-"],
    ] {
        assert!(
            lb_rows.iter().any(|r| r == &want),
            "no row {want:?} in\n{lb}"
        );
    }
    assert_eq!(lb_rows.len(), 5, "{lb}");
    let json: serde_json::Value = serde_json::from_str(&meshctl(&[
        "bpf",
        "lb",
        "list",
        "--bpffs-dir",
        dir,
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(json.as_array().unwrap().len(), 4, "{json}");
    let mut clusters: Vec<u64> = json
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["cluster_id"].as_u64())
        .collect();
    clusters.sort();
    assert_eq!(clusters, [1, 2], "{json}");

    // --node reads <bpffs root>/<node>; the root comes from MESH_BPFFS_ROOT (what
    // `mesh-lab env` exports) or --bpffs-root.
    let root = pin.parent().unwrap().to_str().unwrap();
    let by_env = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["bpf", "lb", "list", "--node", "node"])
        .env("MESH_BPFFS_ROOT", root)
        .output()
        .unwrap();
    assert!(
        by_env.status.success(),
        "{}",
        String::from_utf8_lossy(&by_env.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&by_env.stdout), lb);
    assert_eq!(
        meshctl(&["bpf", "lb", "list", "--bpffs-root", root, "--node", "node"]),
        lb
    );
    // A node that has no pins there: the error names the directory and the nodes that do.
    let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["bpf", "lb", "list", "--bpffs-root", root, "--node", "other"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{root}/other"))
            && err.contains(&format!("nodes under {root}: node")),
        "{err}"
    );

    let ipc = meshctl(&["bpf", "ipcache", "list", "--bpffs-dir", dir]);
    let ipc_rows = rows(&ipc);
    assert_eq!(
        ipc_rows[0],
        [
            "PREFIX",
            "IDENTITY",
            "TUNNEL ENDPOINT",
            "CLUSTER ID",
            "FLAGS"
        ],
        "{ipc}"
    );
    assert!(
        ipc_rows
            .iter()
            .any(|r| r == &["10.2.0.0/16", "2000", "192.168.0.2", "2", "0x0"]),
        "{ipc}"
    );
    assert!(
        ipc_rows
            .iter()
            .any(|r| r.first().map(String::as_str) == Some("10.2.0.1/32")),
        "{ipc}"
    );

    // Longest prefix match.
    let get = meshctl(&["bpf", "ipcache", "get", "10.2.0.1", "--bpffs-dir", dir]);
    assert_eq!(rows(&get)[1][..2], ["10.2.0.1/32", "2001"], "{get}");
    let get = meshctl(&["bpf", "ipcache", "get", "10.2.3.4", "--bpffs-dir", dir]);
    assert_eq!(rows(&get)[1][..2], ["10.2.0.0/16", "2000"], "{get}");
    let miss = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["bpf", "ipcache", "get", "10.9.9.9", "--bpffs-dir", dir])
        .output()
        .unwrap();
    assert!(!miss.status.success());
    assert!(
        String::from_utf8_lossy(&miss.stderr).contains("matches no ipcache entry"),
        "{}",
        String::from_utf8_lossy(&miss.stderr)
    );

    // No traffic went through a classifier here: the table is empty but readable.
    let flows = meshctl(&["flows", "--bpffs-dir", dir]);
    assert_eq!(
        rows(&flows)[0],
        ["SRC IDENTITY", "DST IDENTITY", "PACKETS", "BYTES"],
        "{flows}"
    );
    let flows_json = meshctl(&["flows", "--bpffs-dir", dir, "-o", "json"]);
    assert!(
        serde_json::from_str::<serde_json::Value>(&flows_json)
            .unwrap()
            .is_array()
    );

    // A directory without pinned maps: a clear error.
    let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["bpf", "lb", "list", "--bpffs-dir", "/nonexistent/mesh/node"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/mesh/node"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dp.close();
}

#[test]
fn bpf_policy_list_shows_each_identitys_entries_and_rules() {
    mesh_testkit::require_root("the meshctl bpf tests");
    let cgroup = Cgroup::new();
    let bpffs = Bpffs::mounted();
    let pin = bpffs.pin_dir();
    let mut dp = Datapath::open(DatapathConfig::new(&pin, &cgroup.path)).unwrap();

    // The agent's path from a policy users write to the maps.
    let cluster: mesh_core::ClusterName = "east".parse().unwrap();
    let mut ids = mesh_core::policy::IdentityTable::new();
    for (id, app) in [(300, "web"), (301, "client")] {
        ids.insert(
            mesh_core::IdentityId(id),
            mesh_core::IdentityLabels::for_pod(&cluster, "default", [("app", app)]),
        );
    }
    let policy = mesh_core::policy::parse_policy(
        &serde_json::json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "endpointSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{
                    "fromEndpoints": [{"matchLabels": {"app": "client"}}],
                    "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]
                }]
            }
        }),
        &cluster,
    )
    .unwrap();
    let compiled = mesh_core::policy::compile(&[policy].into_iter().collect(), &ids, &cluster);
    let tables = mesh_core::policy::policy_tables(&compiled);
    let (want, _) = mesh_agent::policy::desired_policy(&tables, &[], &Default::default());
    mesh_agent::policy::PolicyReconciler::default()
        .reconcile(&mut dp, &want)
        .unwrap();

    let dir = pin.to_str().unwrap();
    let out = meshctl(&["bpf", "policy", "list", "--bpffs-dir", dir]);
    let got = rows(&out);
    assert_eq!(
        got,
        [
            vec![
                "IDENTITY",
                "DIRECTION",
                "DEFAULT DENY",
                "REMOTE",
                "PORT",
                "VERDICT",
                "PACKETS",
                "RULE"
            ],
            vec![
                "300",
                "ingress",
                "yes",
                "301",
                "80/TCP",
                "allow",
                "0",
                "CiliumNetworkPolicy east/default/web spec.ingress[0]"
            ],
            vec![
                "300",
                "ingress",
                "yes",
                "any",
                "0-65535/ANY",
                "deny",
                "0",
                "default deny"
            ],
        ],
        "{out}"
    );
    let json: serde_json::Value = serde_json::from_str(&meshctl(&[
        "bpf",
        "policy",
        "list",
        "--bpffs-dir",
        dir,
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(
        json[0]["rule"],
        "CiliumNetworkPolicy east/default/web spec.ingress[0]"
    );
    assert_eq!(json[0]["remote"], 301);
}

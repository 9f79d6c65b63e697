//! Keeps the benchmarks compiling and working: each runs at a tiny size through the real
//! binary (`-o json`, components re-executed from it) and must report the number of
//! samples, entries and events it was asked for. No timing is checked.
//!
//! Root and etcd are needed: without them each test fails and says what is missing
//! (`cargo nextest run --profile unprivileged` leaves these tests out, reported as skipped).

use std::process::Command;

use serde_json::Value;

/// Fails the test, saying what is missing, when the benchmarks cannot run here.
fn require_root_and_etcd() {
    mesh_testkit::require_root("the benchmark smoke tests");
    let etcd = std::env::var("MESH_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
    if let Err(e) = Command::new(&etcd).arg("--version").output() {
        panic!("the benchmark smoke tests need etcd ({etcd}: {e}): run scripts/setup.sh");
    }
}

/// Runs `mesh-bench --self-exec -o json ARGS` and returns its one report.
fn bench(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-bench"))
        .args(["--self-exec", "-o", "json"])
        .args(args)
        .output()
        .expect("running mesh-bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "mesh-bench {args:?} failed:\n{stderr}"
    );
    let reports: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "mesh-bench {args:?} printed no JSON ({e}):\n{}\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let reports = reports.as_array().expect("a list of reports");
    assert_eq!(reports.len(), 1, "{reports:?}");
    reports[0].clone()
}

/// The first entry of `report[list]` ("figures", "distributions") whose name `matches`.
fn entry<'a>(report: &'a Value, list: &str, matches: impl Fn(&str) -> bool) -> &'a Value {
    report[list]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"].as_str().is_some_and(&matches))
        .unwrap_or_else(|| panic!("no such entry of {list} in {report:#}"))
}

fn figure(report: &Value, name: &str) -> f64 {
    entry(report, "figures", |n| n == name)["value"]
        .as_f64()
        .unwrap()
}

/// Every sample of every distribution completed: a sample that times out (5 s, a hundred
/// times the target) means the change never reached the maps, which is a failure.
fn assert_samples(report: &Value, samples: u64) {
    let dists = report["distributions"].as_array().unwrap();
    assert_eq!(dists.len(), 2, "{report:#}");
    for d in dists {
        let done = d["count"].as_u64().unwrap();
        let timeouts = d["timeouts"].as_u64().unwrap();
        assert_eq!(timeouts, 0, "samples timed out: {d:#}");
        assert_eq!(done, samples, "{d:#}");
        assert!(d["p50_ms"].as_f64().unwrap() <= d["max_ms"].as_f64().unwrap());
    }
}

/// The hop breakdown: `hops` hop rows plus the agent's reconcile, each over both changes
/// of every sample, and one per-sample row per change (counts only, no speed).
fn assert_hops(report: &Value, samples: u64, hops: usize) {
    let rows = report["hops"].as_array().expect("a hop table");
    assert_eq!(rows.len(), hops + 1, "{report:#}");
    assert!(rows[hops]["name"].as_str().unwrap().contains("reconcile"));
    for h in rows {
        let seen = h["count"].as_u64().unwrap() + h["timeouts"].as_u64().unwrap();
        assert_eq!(seen, 2 * samples, "{h:#}");
    }
    let table = &report["samples"];
    assert_eq!(table["rows"].as_array().unwrap().len() as u64, 2 * samples);
    // #, change, total, one column per hop, reconcile.
    assert_eq!(table["columns"].as_array().unwrap().len(), hops + 4);
}

#[test]
fn propagation_reports_every_sample() {
    require_root_and_etcd();
    let r = bench(&["propagation", "--samples", "3"]);
    assert_eq!(r["benchmark"], "propagation");
    assert_samples(&r, 3);
    // write -> k8s watch -> etcd a -> a's index -> etcd b -> b's index -> maps.
    assert_hops(&r, 3, 6);
    assert!(
        r["distributions"][0]["target"]
            .as_str()
            .unwrap()
            .contains("p99 <= 50 ms")
    );
}

#[test]
fn failover_reports_every_sample() {
    require_root_and_etcd();
    let r = bench(&["failover", "--samples", "3"]);
    assert_eq!(r["benchmark"], "failover");
    assert_samples(&r, 3);
    // write -> k8s watch -> etcd b -> b's index -> maps.
    assert_hops(&r, 3, 4);
}

#[test]
fn initial_sync_fills_the_maps_at_a_tiny_scale() {
    require_root_and_etcd();
    // 100 endpoints, 10 identities, 10 services, 512 ipcache entries. The benchmark itself
    // fails unless the agent's pinned maps hold exactly the expected entries.
    let r = bench(&["initial-sync", "--scale", "0.001"]);
    assert_eq!(r["params"]["peer_endpoints"], 100);
    assert_eq!(r["params"]["peer_services"], 10);
    assert_eq!(r["params"]["ipcache_entries"], 512);
    assert!(figure(&r, "agent RSS after case 2") > 0.0);
    assert!(figure(&r, "apiserver RSS per cached endpoint (case 2)") > 0.0);
    // Where the time went: every phase of the agent's initial sync, and the rest.
    for case in ["case 1", "case 2"] {
        let phases = r["figures"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| {
                f["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(&format!("{case} phase: ")))
            })
            .count();
        assert_eq!(phases, 8, "7 phases and the rest in {r:#}");
    }
}

#[test]
fn fanout_delivers_every_event_to_every_stream() {
    require_root_and_etcd();
    let r = bench(&["fanout", "--streams", "3", "--events", "50"]);
    for side in ["apiserver (mTLS)", "apiserver (plaintext)", "direct etcd"] {
        assert_eq!(
            figure(&r, &format!("{side}: streams that received every event")),
            3.0,
            "{r:#}"
        );
        assert_eq!(figure(&r, &format!("{side}: events delivered")), 150.0);
    }
}

#[test]
fn socket_lb_times_every_connect_of_every_side() {
    require_root_and_etcd();
    let r = bench(&[
        "socket-lb",
        "--services",
        "10,40",
        "--connects",
        "30",
        "--rounds",
        "2",
    ]);
    for n in [10, 40] {
        assert_eq!(
            figure(&r, &format!("{n} services: connect() calls timed per side")),
            60.0,
            "{r:#}"
        );
        for side in ["socket-lb", "direct", "nft-dnat"] {
            assert!(
                figure(
                    &r,
                    &format!("{n} services: {side} connect rate (median round)")
                ) > 0.0
            );
        }
    }
}

#[test]
fn scale_syncs_every_synthetic_endpoint_and_times_the_churn() {
    require_root_and_etcd();
    // 3 synthetic clusters x 2 nodes x 10 pods, served by the generator and imported by
    // the real importer; the benchmark itself fails unless the index and the agent's
    // ipcache hold every endpoint, before and after the churn.
    let r = bench(&[
        "scale",
        "--clusters",
        "3",
        "--nodes",
        "2",
        "--churn",
        "20",
        "--duration",
        "3",
        "--sample-every",
        "1",
    ]);
    assert_eq!(r["benchmark"], "scale");
    assert_eq!(r["params"]["endpoints"], 60);
    assert_eq!(r["params"]["identities"], 300);
    // 60 endpoints + 6 nodes.
    assert_eq!(figure(&r, "agent ipcache entries after churn"), 66.0);
    assert_eq!(
        figure(
            &r,
            "live synthetic pods missing from the agent's ipcache after churn"
        ),
        0.0
    );
    let dists = r["distributions"].as_array().unwrap();
    assert_eq!(dists.len(), 2, "{r:#}");
    for d in dists {
        assert_eq!(d["timeouts"].as_u64().unwrap(), 0, "{d:#}");
        assert!(d["count"].as_u64().unwrap() > 0, "{d:#}");
    }
}

#[test]
fn fanout_with_one_object_per_transaction_delivers_every_event() {
    require_root_and_etcd();
    let r = bench(&[
        "fanout",
        "--streams",
        "2",
        "--events",
        "30",
        "--txn-ops",
        "1",
    ]);
    assert_eq!(r["params"]["txn_ops"], 1);
    for side in ["apiserver (mTLS)", "apiserver (plaintext)", "direct etcd"] {
        assert_eq!(
            figure(&r, &format!("{side}: events delivered")),
            60.0,
            "{r:#}"
        );
    }
}

#[test]
fn initial_sync_via_the_importer_fills_the_maps_at_a_tiny_scale() {
    require_root_and_etcd();
    // The benchmark fails unless the pinned maps hold exactly the expected entries.
    let r = bench(&["initial-sync", "--scale", "0.001", "--via-importer"]);
    assert_eq!(r["benchmark"], "initial-sync (via importer)");
    assert_eq!(r["params"]["peer_endpoints"], 100);
    assert_eq!(r["params"]["peer_services"], 10);
    assert!(figure(&r, "agent RSS per remote endpoint") > 0.0);
}

#[test]
fn propagation_reports_every_sample_with_background_churn() {
    require_root_and_etcd();
    let r = bench(&[
        "propagation",
        "--samples",
        "3",
        "--background-clusters",
        "3",
        "--background-nodes",
        "2",
        "--background-churn",
        "20",
    ]);
    assert_samples(&r, 3);
    assert_eq!(r["params"]["background_endpoints"], 60);
    assert!(figure(&r, "background: pods replaced during the samples") > 0.0);
}

/// The lab benchmarks run mesh-lab, meshctl, mesh-apiserver and mesh-agent from
/// mesh-bench's directory: built there, from the current sources.
fn ensure_lab_binaries() {
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_mesh-bench"));
    mesh_testkit::bins::ensure_built(
        exe.parent().expect("mesh-bench's directory"),
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap(),
        &["mesh-lab", "meshctl", "mesh-apiserver", "mesh-agent"],
    );
}

#[test]
fn policy_times_every_enforcement_and_connect_and_counts_the_programs() {
    require_root_and_etcd();
    ensure_lab_binaries();
    let r = bench(&[
        "policy",
        "--policies",
        "2",
        "--nodes",
        "2",
        "--rounds",
        "2",
        "--connects",
        "50",
    ]);
    let count = |name: &str| {
        entry(&r, "distributions", |n| n == name)["count"]
            .as_u64()
            .unwrap()
    };
    // Every (policy, node) enforced, no timeout; every connect of both sides timed.
    assert_eq!(count("kubectl apply returned -> enforced on a node"), 4);
    assert_eq!(count("kubectl apply returned -> enforced on every node"), 2);
    assert_eq!(count("connect() to the global service, no policy"), 100);
    assert_eq!(count("connect() to the global service, egress policy"), 100);
    // The kernel counted the lab agents' programs: connect4 ran (the figures are per
    // connect4 run, so a side where it never ran would read "0.0 runs"), and so did the
    // ingress program, whose name the kernel truncates to 15 bytes.
    for side in ["no policy", "egress policy"] {
        assert!(
            figure(
                &r,
                &format!("{side}:   mesh_connect4 (1.0 runs per connect())")
            ) > 0.0,
            "{r:#}"
        );
        let prefix = format!("{side}:   mesh_policy_ingress (");
        let ingress = entry(&r, "figures", |n| n.starts_with(&prefix));
        assert!(ingress["value"].as_f64().unwrap() > 0.0, "{r:#}");
    }
}

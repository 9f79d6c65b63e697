//! The soak (issue 16 part 5) for two minutes through the real binary: 200 synthetic agent
//! streams, an agent and an apiserver under continuous churn; the test checks the verdict
//! (no unbounded growth of the mesh processes, every stream converged to etcd key for key,
//! both processes alive), not any speed.

use std::process::Command;

use serde_json::Value;

#[test]
fn two_minute_soak_passes_its_verdict() {
    mesh_testkit::require_root("the soak test");
    let etcd = std::env::var("MESH_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
    if let Err(e) = Command::new(&etcd).arg("--version").output() {
        panic!("the soak test needs etcd ({etcd}: {e}): run scripts/setup.sh");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-bench"))
        .args(["--self-exec", "-o", "json", "soak", "--minutes", "2"])
        .output()
        .expect("running mesh-bench soak");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let reports: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "mesh-bench soak printed no JSON ({e}):\n{}\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let report = &reports.as_array().expect("a list of reports")[0];
    let figure = |name: &str| -> &Value {
        report["figures"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .unwrap_or_else(|| panic!("no figure {name:?} in {report:#}"))
    };
    // The table: one row per interval (2 minutes / 5 s), RSS and fds of every process.
    let table = report["notes"][0].as_str().expect("the table");
    assert!(table.lines().count() >= 10, "{table}");
    assert!(table.contains("apiserver MiB/fds") && table.contains("agent MiB/fds"));
    assert_eq!(
        figure("streams converged to etcd, key for key")["value"],
        200.0
    );
    for name in [
        "apiserver: RSS, mean of the last third",
        "apiserver: fds, max of the last third",
        "agent: RSS, mean of the last third",
        "agent: fds, max of the last third",
        "processes still running",
    ] {
        assert_eq!(figure(name)["met"], true, "{name}: {report:#}\n{stderr}");
    }
    assert_eq!(figure("verdict")["met"], true, "{report:#}\n{stderr}");
    assert!(out.status.success(), "mesh-bench soak failed:\n{stderr}");
}

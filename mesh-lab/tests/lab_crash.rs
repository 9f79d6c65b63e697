//! `mesh-lab down` after the supervisor was killed with SIGKILL: everything is derived from
//! the naming prefixes and removed. Needs root.

mod lab_support;

use lab_support::{LabGuard, lab_name, leftovers};

#[test]
fn lab_down_after_supervisor_sigkill() {
    let name = lab_name('k');
    let lab = LabGuard::up(&name, &["--clusters", "2", "--nodes", "1"]);
    lab.kubectl_ok("east", &["create", "deployment", "echo", "--image=ignored"]);
    lab.kubectl_ok(
        "east",
        &["rollout", "status", "deploy/echo", "--timeout=60s"],
    );
    assert!(
        !leftovers(&name).is_empty(),
        "the lab exists before the crash"
    );

    let pid = lab.status_json()["supervisor_pid"]
        .as_i64()
        .expect("supervisor pid");
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());

    let out = lab.lab_ok(&["down"]);
    assert!(
        out.contains("netns mlab-"),
        "down reports the namespaces it removed: {out}"
    );
    assert_eq!(
        leftovers(&name),
        Vec::<String>::new(),
        "left behind after a crash"
    );
}

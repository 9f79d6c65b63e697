//! Three clusters: `affinity: remote` spreads over both remotes, fails over between them
//! when one has no ready backend, and back to the local cluster when neither has.

mod e2e_support;
mod lab_support;

use std::time::Duration;

use e2e_support::{Failures, Lab, require_root};

const STEP: Duration = Duration::from_secs(60);

fn scale(lab: &Lab, cluster: &str, replicas: u32) {
    lab.kubectl(
        cluster,
        &[
            "-n",
            "demo",
            "scale",
            "deployment",
            "rebel-base",
            &format!("--replicas={replicas}"),
        ],
    );
}

#[test]
fn three_clusters_remote_affinity_failover() {
    require_root("three_clusters_remote_affinity_failover");
    let lab = Lab::up('t', 3, 1);
    assert_eq!(lab.clusters, ["east", "north", "west"]);
    for c in ["east", "west", "north"] {
        lab.apply_example(c, "rebel-base.yaml");
        lab.kubectl(
            c,
            &[
                "-n",
                "demo",
                "annotate",
                "service",
                "rebel-base",
                "service.cilium.io/global=true",
            ],
        );
    }
    lab.apply_example("east", "x-wing.yaml");
    for c in ["east", "west", "north"] {
        lab.rollout(c, "rebel-base");
    }
    lab.rollout("east", "x-wing");
    lab.converge(
        "east",
        "rebel-base",
        "cluster",
        &["east", "west", "north"],
        STEP,
        Failures::Forbidden,
    );

    lab.kubectl(
        "east",
        &[
            "-n",
            "demo",
            "annotate",
            "service",
            "rebel-base",
            "service.cilium.io/affinity=remote",
        ],
    );
    lab.converge(
        "east",
        "rebel-base",
        "cluster",
        &["west", "north"],
        STEP,
        Failures::Forbidden,
    );

    // One remote without ready backends: the other remote takes all.
    scale(&lab, "west", 0);
    lab.converge(
        "east",
        "rebel-base",
        "cluster",
        &["north"],
        STEP,
        Failures::Forbidden,
    );
    // Both remotes empty: failover to the local cluster.
    scale(&lab, "north", 0);
    lab.converge(
        "east",
        "rebel-base",
        "cluster",
        &["east"],
        STEP,
        Failures::Forbidden,
    );
    // A remote comes back: remote again.
    scale(&lab, "west", 2);
    lab.converge(
        "east",
        "rebel-base",
        "cluster",
        &["west"],
        STEP,
        Failures::Forbidden,
    );
}

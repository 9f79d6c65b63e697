//! Network policy by name and by namespace (issue #12), driven only with kubectl, meshctl and
//! `mesh-lab exec`:
//!
//! - every Service's ClusterIP is translated by the agents' socket LB (the lab's kube-dns
//!   included, a local-only service), so under an egress default deny with the DNS
//!   allowance from Cilium's docs x-wing resolves names through the lab DNS and connects by
//!   name to the allowed global service (west's rebel-base only), while a name it is not
//!   allowed to reach fails at connect;
//! - `meshctl service explain --from` shows the policy-aware backend choice;
//! - a NetworkPolicy with a namespaceSelector and a named port admits a client of a
//!   labelled namespace and refuses one of another namespace;
//! - an invalid policy is reported (a Warning Event naming the field, seen with `kubectl get
//!   events`) while the other policies keep being enforced.

mod e2e_support;
mod lab_support;

use std::time::{Duration, Instant};

use e2e_support::{Failures, Lab, counts, require_root};

const STEP: Duration = Duration::from_secs(60);

fn policy_file(name: &str) -> String {
    format!(
        "{}/../examples/lab-demo/policy/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// Polls `probe` (each call is a round of real requests or reads) until it returns `Ok`, or
/// panics with its last error after `STEP`.
fn eventually<T>(what: &str, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + STEP;
    loop {
        match probe() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => panic!("{what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

/// One request from deploy/x-wing of `ns` in east: whether it got an HTTP reply.
fn request(lab: &Lab, ns: &str, url: &str) -> (bool, String) {
    lab.exec(
        "east",
        ns,
        "x-wing",
        &["curl", "-sS", "--max-time", "2", url],
    )
}

#[test]
fn names_resolve_under_default_deny_and_namespaces_and_invalid_policies_behave() {
    require_root("names_resolve_under_default_deny_and_namespaces_and_invalid_policies_behave");
    let lab = Lab::up('n', 2, 1);
    for c in ["east", "west"] {
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
    for c in ["east", "west"] {
        lab.rollout(c, "rebel-base");
    }
    lab.rollout("east", "x-wing");
    // By name: the lookup goes to kube-dns's ClusterIP, which the socket LB translates too.
    lab.converge(
        "east",
        "rebel-base",
        "cluster",
        &["east", "west"],
        STEP,
        Failures::Forbidden,
    );
    let explain = lab.meshctl("east", &["service", "explain", "kube-system/kube-dns"]);
    assert!(
        explain.contains("not global: local backends only"),
        "{explain}"
    );
    let list = lab.meshctl("east", &["service", "list"]);
    assert!(list.contains("kube-system/kube-dns"), "{list}");
    // Without policy, kube-dns's metrics port answers x-wing (the lab workload serves it).
    let metrics = "http://kube-dns.kube-system:9153/";
    eventually("x-wing -> kube-dns:9153 without policy", || {
        match request(&lab, "demo", metrics) {
            (true, _) => Ok(()),
            (false, out) => Err(out),
        }
    });

    // Egress default deny for namespace demo with the DNS allowance, and Cilium's example:
    // x-wing may reach rebel-base only in west.
    lab.kubectl("east", &["apply", "-f", &policy_file("default-deny.yaml")]);
    lab.kubectl(
        "east",
        &["apply", "-f", &policy_file("x-wing-to-west.yaml")],
    );
    lab.converge(
        "east",
        "rebel-base",
        "cluster",
        &["west"],
        STEP,
        Failures::Tolerated,
    );
    let steady = lab.replies("east", "rebel-base", "cluster", 40);
    assert_eq!(
        counts(&steady).get("west"),
        Some(&40),
        "by name under default deny: {:?}",
        counts(&steady)
    );
    // The name still resolves (DNS allowed), but x-wing may not connect to it: kube-dns's
    // pod on port 9153 is not what the DNS allowance (port 53) allows.
    let (ok, out) = lab.exec(
        "east",
        "demo",
        "x-wing",
        &["getent", "hosts", "kube-dns.kube-system.svc.cluster.local"],
    );
    assert!(ok, "the lookup is allowed: {out}");
    let (ok, out) = lab.exec(
        "east",
        "demo",
        "x-wing",
        &["curl", "-sS", "-v", "--max-time", "2", metrics],
    );
    assert!(
        !ok && out.contains("Operation not permitted"),
        "x-wing -> kube-dns:9153 must be refused at once (EPERM): {out}"
    );

    // explain --from: which rebel-base backends x-wing's egress allows, and why.
    let xwing = lab.pods("east", "x-wing").into_iter().next().unwrap();
    let from = format!("east/demo/{xwing}");
    let e = lab.meshctl(
        "east",
        &["service", "explain", "demo/rebel-base", "--from", &from],
    );
    assert!(
        e.contains("connections go to the allowed backend") && e.contains("west/"),
        "{e}"
    );
    assert!(e.contains("DENY") && e.contains("default deny"), "{e}");
    let e = lab.meshctl(
        "east",
        &[
            "service",
            "explain",
            "kube-system/kube-dns",
            "--from",
            &from,
        ],
    );
    assert!(
        e.contains("spec.egress[1]") || e.contains("spec.egress[0]"),
        "{e}"
    );

    // A NetworkPolicy with a namespaceSelector and a named port (rebel-base's "http" is
    // 8080): clients of namespace rebels may reach east's rebel-base, those of empire not.
    let xwing_yaml = std::fs::read_to_string(format!(
        "{}/../examples/lab-demo/x-wing.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    for (ns, squad) in [("rebels", "rebels"), ("empire", "empire")] {
        lab.apply_yaml(
            "east",
            &format!(
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels:\n    squad: {squad}\n"
            ),
        );
        lab.apply_yaml(
            "east",
            &xwing_yaml.replace("namespace: demo", &format!("namespace: {ns}")),
        );
        lab.kubectl(
            "east",
            &[
                "-n",
                ns,
                "rollout",
                "status",
                "deployment/x-wing",
                "--timeout=90s",
            ],
        );
    }
    lab.apply_yaml(
        "east",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: rebels-only, namespace: demo}
spec:
  podSelector: {matchLabels: {app: rebel-base}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {squad: rebels}}
    ports:
    - {port: http, protocol: TCP}
"#,
    );
    let rebel_ip = lab.kubectl(
        "east",
        &[
            "-n",
            "demo",
            "get",
            "pods",
            "-l",
            "app=rebel-base",
            "-o",
            "jsonpath={.items[0].status.podIP}",
        ],
    );
    let url = format!("http://{rebel_ip}:8080/");
    let namespaces_behave = || match (request(&lab, "rebels", &url), request(&lab, "empire", &url))
    {
        ((true, _), (false, _)) => Ok(()),
        (rebels, empire) => Err(format!("rebels: {rebels:?}; empire: {empire:?}")),
    };
    eventually("rebels allowed, empire refused", namespaces_behave);

    // An invalid policy: reported with the field, and the others keep being enforced.
    lab.apply_yaml(
        "east",
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: broken, namespace: demo}
spec:
  endpointSelector: {}
  ingress:
  - toPorts:
    - ports:
      - port: "http x"
"#,
    );
    let events = eventually("a Warning Event for the invalid policy", || {
        let out = lab.kubectl(
            "east",
            &[
                "-n",
                "demo",
                "get",
                "events",
                "--field-selector",
                "involvedObject.name=broken",
            ],
        );
        if out.contains("InvalidPolicy") {
            Ok(out)
        } else {
            Err(out)
        }
    });
    assert!(
        events.contains("Warning") && events.contains("spec.ingress[0].toPorts[0].ports[0].port"),
        "{events}"
    );
    let steady = lab.replies("east", "rebel-base", "cluster", 20);
    assert_eq!(
        counts(&steady).get("west"),
        Some(&20),
        "{:?}",
        counts(&steady)
    );
    namespaces_behave().expect("the namespaceSelector policy is still enforced");
    let (ok, out) = request(&lab, "demo", metrics);
    assert!(!ok, "the default deny is still enforced: {out}");
}

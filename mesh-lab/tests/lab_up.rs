//! `mesh-lab up` with 2 clusters x 2 nodes, driven like a user would: kubectl through the
//! lab kubeconfig, `mesh-lab status|exec|kill|start|partition|heal`, `meshctl status`, and
//! `mesh-lab down` leaving nothing behind. Needs root (netns, cgroups, eBPF).

mod lab_support;

use std::time::Duration;

use lab_support::{LabGuard, eventually, lab_name, leftovers};

fn exec(lab: &LabGuard, cluster: &str, pod: &str, script: &str) -> (i32, String) {
    let out = lab.lab(&["exec", cluster, pod, "--", "sh", "-c", script]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn lab_up_two_clusters_faults_and_down() {
    let name = lab_name('u');
    let lab = LabGuard::up(&name, &["--clusters", "2", "--nodes", "2"]);

    // kubectl works with every context of the one kubeconfig.
    for c in ["east", "west"] {
        let nodes = lab.kubectl_ok(c, &["get", "nodes", "-o", "name"]);
        assert_eq!(
            nodes.lines().collect::<Vec<_>>(),
            [format!("node/{c}-node1"), format!("node/{c}-node2")],
            "nodes of {c}"
        );
        let lb = lab.kubectl_ok(
            c,
            &[
                "-n",
                "mesh-system",
                "get",
                "svc",
                "mesh-apiserver",
                "-o",
                "jsonpath={.status.loadBalancer.ingress[0].ip}",
            ],
        );
        let status = lab.status_json();
        let apiserver = lab.component(c, "apiserver");
        assert_eq!(
            apiserver["address"].as_str().unwrap(),
            format!("{lb}:7443"),
            "LoadBalancer ingress of {c} is its apiserver's address ({status})"
        );
    }

    // status shows every component running.
    for c in ["east", "west"] {
        for comp in [
            "kube-api",
            "dns",
            "etcd",
            "apiserver",
            &format!("agent/{c}-node1"),
            &format!("agent/{c}-node2"),
        ] {
            let s = lab.component(c, comp);
            assert_eq!(s["state"], "running", "{c} {comp}: {s}");
        }
    }

    // A Deployment's pod runs in its own netns with an IP of its node's pod CIDR, the
    // cluster DNS in resolv.conf, and exec returns the command's exit code.
    lab.kubectl_ok(
        "east",
        &[
            "create",
            "deployment",
            "echo",
            "--image=ignored",
            "--port=80",
            "--replicas=2",
        ],
    );
    lab.kubectl_ok("east", &["expose", "deployment", "echo", "--port=80"]);
    lab.kubectl_ok(
        "east",
        &["rollout", "status", "deploy/echo", "--timeout=60s"],
    );
    let pods = lab.kubectl_ok(
        "east",
        &["get", "pods", "-l", "app=echo", "-o",
          "jsonpath={range .items[*]}{.metadata.name} {.status.podIP} {.spec.nodeName}{\"\\n\"}{end}"],
    );
    let (pod, ip, node) = {
        let first = pods.lines().next().expect("a pod");
        let f: Vec<&str> = first.split_whitespace().collect();
        (f[0].to_owned(), f[1].to_owned(), f[2].to_owned())
    };
    let n: u8 = node.trim_start_matches("east-node").parse().unwrap();
    assert!(
        ip.starts_with(&format!("10.1.{n}.")),
        "pod IP {ip} in {node}'s pod CIDR"
    );
    let (code, out) = exec(
        &lab,
        "east",
        &pod,
        "ip -4 -o addr show eth0; cat /etc/resolv.conf",
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("inet {ip}/32")), "{out}");
    let dns = lab.component("east", "dns")["address"]
        .as_str()
        .unwrap()
        .to_owned();
    let dns_ip = dns.split(':').next().unwrap();
    assert!(out.contains(&format!("nameserver {dns_ip}")), "{out}");
    assert!(out.contains("search default.svc.cluster.local"), "{out}");
    let (code, _) = exec(&lab, "east", "deploy/echo", "exit 7");
    assert_eq!(code, 7, "exec returns the command's exit code");
    // The Service by name, through the cluster DNS and the node's service rules.
    let (code, out) = exec(&lab, "east", &pod, "curl -s -m 5 http://echo");
    assert_eq!(code, 0, "curl http://echo: {out}");
    assert!(out.contains("\"cluster\":\"east\""), "{out}");

    // A pod of west, for cross-cluster traffic.
    lab.kubectl_ok(
        "west",
        &[
            "create",
            "deployment",
            "echo",
            "--image=ignored",
            "--port=80",
        ],
    );
    lab.kubectl_ok(
        "west",
        &["rollout", "status", "deploy/echo", "--timeout=60s"],
    );
    let west_ip = lab.kubectl_ok(
        "west",
        &[
            "get",
            "pods",
            "-l",
            "app=echo",
            "-o",
            "jsonpath={.items[0].status.podIP}",
        ],
    );
    // Routes to west's pods come from the agents.
    let reach = format!("curl -s -m 2 http://{west_ip}/");
    let out = eventually(
        "east pod reaching a west pod",
        Duration::from_secs(30),
        || {
            let (code, out) = exec(&lab, "east", &pod, &reach);
            (code == 0).then_some(out)
        },
    );
    assert!(out.contains("\"cluster\":\"west\""), "{out}");

    // Kill and start an apiserver and an agent: status follows.
    for comp in ["apiserver", "agent/east-node2"] {
        lab.lab_ok(&["kill", "east", comp]);
        let s = lab.component("east", comp);
        assert_eq!(s["state"], "killed", "{comp}: {s}");
        assert!(s["pid"].is_null(), "{comp}: {s}");
        lab.lab_ok(&["start", "east", comp]);
        let s = lab.component("east", comp);
        assert_eq!(s["state"], "running", "{comp}: {s}");
    }
    eventually(
        "east's apiserver serving again",
        Duration::from_secs(60),
        || {
            lab.meshctl_status("east")
                .filter(|s| s["not_ready"].as_array().is_some_and(|v| v.is_empty()))
        },
    );

    // Partition: pod traffic and the peer connection between east and west are cut.
    lab.lab_ok(&["partition", "east", "west"]);
    let st = lab.status_json();
    assert_eq!(
        st["partitions"][0],
        serde_json::json!(["east", "west"]),
        "{st}"
    );
    let (code, out) = exec(&lab, "east", &pod, &reach);
    assert_ne!(code, 0, "partitioned: a west pod must not answer: {out}");
    eventually(
        "east's peer west disconnected",
        Duration::from_secs(90),
        || {
            lab.meshctl_status("east").filter(|s| {
                s["peers"].as_array().is_some_and(|p| {
                    p.iter()
                        .any(|p| p["name"] == "west" && p["connected"] == false)
                })
            })
        },
    );
    lab.lab_ok(&["heal"]);
    eventually(
        "east pod reaching west again",
        Duration::from_secs(30),
        || {
            let (code, out) = exec(&lab, "east", &pod, &reach);
            (code == 0).then_some(out)
        },
    );
    eventually(
        "east's peer west connected again",
        Duration::from_secs(90),
        || {
            lab.meshctl_status("east").filter(|s| {
                s["peers"].as_array().is_some_and(|p| {
                    p.iter()
                        .any(|p| p["name"] == "west" && p["connected"] == true)
                })
            })
        },
    );

    // down removes everything, and is idempotent.
    let out = lab.lab_ok(&["down"]);
    assert!(out.contains("removed"), "{out}");
    assert_eq!(
        leftovers(&name),
        Vec::<String>::new(),
        "left behind by down"
    );
    let out = lab.lab_ok(&["down"]);
    assert!(out.contains("nothing to remove"), "{out}");
}

//! Table tests: one per construct users write, with the YAML as they write it, compiled
//! against a small two-cluster world and checked through `decide`.

use std::collections::BTreeMap;

use super::*;
use crate::identity::RESERVED_WORLD;
use crate::{ClusterId, ClusterName, IdentityId, IdentityLabels, Protocol};

use Direction::{Egress, Ingress};
use Verdict::{Allow, Deny};

const LOCAL: &str = "east";

fn east() -> ClusterName {
    ClusterName::new(LOCAL).unwrap()
}

/// Identities of the test world: `cluster/namespace/name`, plus reserved and CIDR ones.
struct World {
    table: IdentityTable,
    ids: BTreeMap<String, IdentityId>,
}

/// (cluster, cluster id, namespace, name, pod labels, named ports)
type Pod = (
    &'static str,
    u8,
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static [(&'static str, Protocol, u16)],
);

fn world() -> World {
    let pods: &[Pod] = &[
        (
            "east",
            1,
            "default",
            "web",
            &[("app", "web")],
            &[("http", Protocol::Tcp, 8080)],
        ),
        ("east", 1, "default", "client", &[("app", "client")], &[]),
        ("east", 1, "other", "client", &[("app", "client")], &[]),
        (
            "east",
            1,
            "other",
            "db",
            &[("app", "db"), ("tier", "data")],
            &[],
        ),
        (
            "east",
            1,
            "kube-system",
            "dns",
            &[("k8s-app", "kube-dns")],
            &[("dns", Protocol::Udp, 53), ("dns-tcp", Protocol::Tcp, 53)],
        ),
        (
            "west",
            2,
            "default",
            "web",
            &[("app", "web")],
            &[("http", Protocol::Tcp, 8080)],
        ),
        ("west", 2, "default", "client", &[("app", "client")], &[]),
        ("east", 1, "default", "x-wing", &[("name", "x-wing")], &[]),
        (
            "east",
            1,
            "default",
            "rebel-base",
            &[("name", "rebel-base")],
            &[],
        ),
        (
            "west",
            2,
            "default",
            "rebel-base",
            &[("name", "rebel-base")],
            &[],
        ),
    ];
    let mut table = IdentityTable::new();
    let mut ids = BTreeMap::new();
    for (i, (cluster, cid, ns, name, labels, ports)) in pods.iter().enumerate() {
        let cname = ClusterName::new(*cluster).unwrap();
        let mut l = IdentityLabels::for_pod(&cname, ns, labels.iter().copied());
        // Namespace labels, as the apiserver adds them (DESIGN.md section 14).
        let mut ns_labels = vec![("kubernetes.io/metadata.name".to_string(), ns.to_string())];
        if *ns == "other" {
            ns_labels.push(("team".into(), "blue".into()));
        }
        let mut strings: Vec<String> = l.iter().map(String::from).collect();
        for (k, v) in ns_labels {
            strings.push(format!("k8s:{NAMESPACE_LABELS_PREFIX}{k}={v}"));
        }
        l = IdentityLabels::from_strings(strings).unwrap();
        let id = IdentityId::new(ClusterId::new(u32::from(*cid)).unwrap(), 256 + i as u32).unwrap();
        table.insert(id, l);
        table.set_named_ports(
            id,
            ports
                .iter()
                .map(|(n, p, port)| NamedPort {
                    name: n.to_string(),
                    protocol: *p,
                    port: *port,
                })
                .collect(),
        );
        ids.insert(format!("{cluster}/{ns}/{name}"), id);
    }
    ids.insert("host".into(), IdentityId(1));
    ids.insert("world".into(), IdentityId(RESERVED_WORLD));
    ids.insert("remote-node".into(), IdentityId(6));
    World { table, ids }
}

fn parse_yaml(yaml: &str) -> Result<Vec<Policy>, PolicyError> {
    yaml.split("\n---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|doc| {
            let v: serde_json::Value = serde_yaml::from_str(doc).expect("test YAML parses");
            parse_policy(&v, &east())
        })
        .collect()
}

/// Policies compiled in `world`, with CIDR identities allocated as the agent would.
struct Compiled {
    world: World,
    compiled: CompiledPolicy,
    policies: PolicySet,
}

fn compile_yaml(yaml: &str) -> Compiled {
    let policies: PolicySet = parse_yaml(yaml)
        .unwrap_or_else(|e| panic!("policy parses: {e}"))
        .into_iter()
        .collect();
    let mut world = world();
    let mut alloc = CidrIdentities::new();
    let changes = alloc.sync(&policies.cidr_prefixes(&east())).unwrap();
    CidrIdentities::apply_to(&changes, &mut world.table);
    for (p, id) in &changes.added {
        world.ids.insert(format!("cidr:{p}"), *id);
    }
    let compiled = compile(&policies, &world.table, &east());
    assert!(compiled.missing_cidr_identities.is_empty());
    Compiled {
        world,
        compiled,
        policies,
    }
}

impl Compiled {
    fn id(&self, name: &str) -> IdentityId {
        *self
            .world
            .ids
            .get(name)
            .unwrap_or_else(|| panic!("no identity {name} in the test world"))
    }

    /// `port` as `80/TCP`.
    fn decide(&self, local: &str, dir: Direction, remote: &str, port: &str) -> Decision {
        let (port, proto) = port.split_once('/').unwrap();
        let (local, remote) = (self.id(local), self.id(remote));
        let proto: Protocol = proto.parse().unwrap();
        let port: u16 = port.parse().unwrap();
        let d = decide(&self.compiled, local, dir, remote, proto, port);
        // Every table test also checks the compiled form against the reference semantics.
        let flow = Flow {
            local,
            direction: dir,
            remote,
            protocol: proto,
            port,
        };
        let r = reference::evaluate(&self.policies, &self.world.table, &east(), &flow);
        assert_eq!(d, r, "compiled and reference disagree on {flow:?}");
        d
    }

    /// Checks a table of `(local, direction, remote, port, verdict)` rows, reporting every
    /// row that fails.
    fn expect(&self, rows: &[(&str, Direction, &str, &str, Verdict)]) {
        let mut failures = Vec::new();
        for (local, dir, remote, port, want) in rows {
            let got = self.decide(local, *dir, remote, port);
            if got.verdict != *want {
                failures.push(format!(
                    "{local} {dir} {remote} {port}: want {want}, got {} ({:?})",
                    got.verdict, got.reason
                ));
            }
        }
        assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    }

    fn reason(&self, local: &str, dir: Direction, remote: &str, port: &str) -> Reason {
        self.decide(local, dir, remote, port).reason
    }
}

fn rule_path(reason: &Reason) -> String {
    match reason {
        Reason::Rule(r) => format!("{} {}", r.policy.object(), r.path()),
        other => format!("{other:?}"),
    }
}

// === NetworkPolicy ===

#[test]
fn np_pod_selector_peer_is_the_policys_namespace_and_local_cluster() {
    let c = compile_yaml(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-client, namespace: default}
spec:
  podSelector:
    matchLabels: {app: web}
  ingress:
  - from:
    - podSelector:
        matchLabels: {app: client}
    ports:
    - port: 80
"#,
    );
    c.expect(&[
        (
            "east/default/web",
            Ingress,
            "east/default/client",
            "80/TCP",
            Allow,
        ),
        (
            "east/default/web",
            Ingress,
            "east/other/client",
            "80/TCP",
            Deny,
        ),
        (
            "east/default/web",
            Ingress,
            "west/default/client",
            "80/TCP",
            Deny,
        ),
        (
            "east/default/web",
            Ingress,
            "east/default/client",
            "81/TCP",
            Deny,
        ),
        (
            "east/default/web",
            Ingress,
            "east/default/client",
            "80/UDP",
            Deny,
        ),
        ("east/default/web", Ingress, "world", "80/TCP", Deny),
        // Egress is not in the implicit policyTypes; other pods are not selected.
        ("east/default/web", Egress, "world", "443/TCP", Allow),
        ("east/default/client", Ingress, "world", "80/TCP", Allow),
    ]);
    assert_eq!(
        rule_path(&c.reason("east/default/web", Ingress, "east/default/client", "80/TCP")),
        "default/allow-client spec.ingress[0]"
    );
    assert_eq!(
        c.reason("east/default/web", Egress, "world", "443/TCP"),
        Reason::NotEnforced
    );
    assert_eq!(
        c.decide("east/default/web", Ingress, "east/default/client", "80/TCP")
            .to_string(),
        "allow (NetworkPolicy east/default/allow-client spec.ingress[0])"
    );
    assert_eq!(
        c.decide("east/default/web", Ingress, "world", "80/TCP")
            .to_string(),
        "deny (default deny, enforced by NetworkPolicy east/default/allow-client)"
    );
    match c.reason("east/default/web", Ingress, "world", "80/TCP") {
        Reason::DefaultDeny { enforced_by } => {
            assert_eq!(enforced_by.len(), 1);
            assert_eq!(enforced_by[0].object(), "default/allow-client");
        }
        other => panic!("want default deny, got {other:?}"),
    }
}

#[test]
fn np_namespace_selector_matches_namespace_labels() {
    let c = compile_yaml(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-blue, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: blue}}
  - from:
    - namespaceSelector:
        matchLabels: {kubernetes.io/metadata.name: kube-system}
"#,
    );
    c.expect(&[
        (
            "east/default/web",
            Ingress,
            "east/other/client",
            "80/TCP",
            Allow,
        ),
        (
            "east/default/web",
            Ingress,
            "east/other/db",
            "5432/TCP",
            Allow,
        ),
        (
            "east/default/web",
            Ingress,
            "east/kube-system/dns",
            "80/TCP",
            Allow,
        ),
        (
            "east/default/web",
            Ingress,
            "east/default/client",
            "80/TCP",
            Deny,
        ),
        ("east/default/web", Ingress, "host", "80/TCP", Allow), // ingress from the local host always passes
    ]);
}

#[test]
fn np_pod_and_namespace_selector_together_are_anded() {
    let c = compile_yaml(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: clients-anywhere, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {}
      podSelector: {matchLabels: {app: client}}
"#,
    );
    c.expect(&[
        (
            "east/default/web",
            Ingress,
            "east/default/client",
            "80/TCP",
            Allow,
        ),
        (
            "east/default/web",
            Ingress,
            "east/other/client",
            "80/TCP",
            Allow,
        ),
        ("east/default/web", Ingress, "east/other/db", "80/TCP", Deny),
        // Local cluster only, as Cilium translates NetworkPolicy peers.
        (
            "east/default/web",
            Ingress,
            "west/default/client",
            "80/TCP",
            Deny,
        ),
    ]);
}

#[test]
fn np_ip_block_with_except_is_a_cidr_rule() {
    let c = compile_yaml(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress-ten, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  egress:
  - to:
    - ipBlock:
        cidr: 10.0.0.0/8
        except: [10.1.0.0/16]
    ports:
    - {protocol: TCP, port: 443}
"#,
    );
    c.expect(&[
        (
            "east/default/web",
            Egress,
            "cidr:10.0.0.0/8",
            "443/TCP",
            Allow,
        ),
        (
            "east/default/web",
            Egress,
            "cidr:10.1.0.0/16",
            "443/TCP",
            Deny,
        ),
        ("east/default/web", Egress, "world", "443/TCP", Deny),
        (
            "east/default/web",
            Egress,
            "cidr:10.0.0.0/8",
            "80/TCP",
            Deny,
        ),
        // CIDR peers never match endpoints with an identity.
        (
            "east/default/web",
            Egress,
            "east/default/client",
            "443/TCP",
            Deny,
        ),
        // egress present and no policyTypes: Ingress and Egress, ingress denies everything.
        (
            "east/default/web",
            Ingress,
            "east/default/client",
            "80/TCP",
            Deny,
        ),
    ]);
    let prefixes: Vec<String> = c
        .compiled
        .cidr_prefixes
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(prefixes, ["10.0.0.0/8", "10.1.0.0/16"]);
}

#[test]
fn np_named_ports_and_end_port() {
    let c = compile_yaml(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: ports, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - ports:
    - port: http
    - {protocol: UDP, port: 9000, endPort: 9010}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-to-http, namespace: default}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
  - to:
    - podSelector: {}
    - namespaceSelector: {}
    ports:
    - port: http
    - {port: dns, protocol: UDP}
"#,
    );
    c.expect(&[
        // Ingress named port: the selected pod's own port named http.
        ("east/default/web", Ingress, "world", "8080/TCP", Allow),
        ("east/default/web", Ingress, "world", "80/TCP", Deny),
        ("east/default/web", Ingress, "world", "8080/UDP", Deny),
        (
            "east/default/web",
            Ingress,
            "east/default/client",
            "9000/UDP",
            Allow,
        ),
        (
            "east/default/web",
            Ingress,
            "east/default/client",
            "9010/UDP",
            Allow,
        ),
        (
            "east/default/web",
            Ingress,
            "east/default/client",
            "9011/UDP",
            Deny,
        ),
        (
            "east/default/web",
            Ingress,
            "east/default/client",
            "9005/TCP",
            Deny,
        ),
        // Egress named port: the peer's port of that name.
        (
            "east/default/client",
            Egress,
            "east/default/web",
            "8080/TCP",
            Allow,
        ),
        (
            "east/default/client",
            Egress,
            "east/kube-system/dns",
            "53/UDP",
            Allow,
        ),
        (
            "east/default/client",
            Egress,
            "east/kube-system/dns",
            "53/TCP",
            Deny,
        ),
        (
            "east/default/client",
            Egress,
            "east/kube-system/dns",
            "8080/TCP",
            Deny,
        ),
        (
            "east/default/client",
            Egress,
            "west/default/web",
            "8080/TCP",
            Deny,
        ),
    ]);
}

#[test]
fn np_policy_types_defaults_and_empty_rules() {
    let c = compile_yaml(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress-only, namespace: default}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  ingress:
  - {}
  egress:
  - to:
    - podSelector: {matchLabels: {app: web}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all-ingress, namespace: other}
spec:
  podSelector: {}
  ingress: []
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-all-ingress, namespace: kube-system}
spec:
  podSelector: {}
  ingress:
  - {}
"#,
    );
    c.expect(&[
        // Ingress rules of a policy whose policyTypes lack Ingress are ignored.
        ("east/default/client", Ingress, "world", "80/TCP", Allow),
        (
            "east/default/client",
            Egress,
            "east/default/web",
            "80/TCP",
            Allow,
        ),
        ("east/default/client", Egress, "world", "80/TCP", Deny),
        // `ingress: []` with the implicit Ingress type denies all ingress.
        (
            "east/other/client",
            Ingress,
            "east/other/db",
            "80/TCP",
            Deny,
        ),
        ("east/other/client", Egress, "world", "80/TCP", Allow),
        // `ingress: [{}]` allows everything, from every cluster and outside.
        ("east/kube-system/dns", Ingress, "world", "53/UDP", Allow),
        (
            "east/kube-system/dns",
            Ingress,
            "west/default/client",
            "53/UDP",
            Allow,
        ),
    ]);
    assert_eq!(
        c.reason("east/default/client", Ingress, "world", "80/TCP"),
        Reason::NotEnforced
    );
}

// === CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy ===

#[test]
fn cnp_spec_and_specs_both_apply() {
    let c = compile_yaml(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: two-rules, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
specs:
- endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: web}}]
- endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEntities: [world]
"#,
    );
    c.expect(&[
        (
            "east/default/web",
            Ingress,
            "east/default/client",
            "80/TCP",
            Allow,
        ),
        ("east/default/web", Ingress, "world", "80/TCP", Allow),
        ("east/default/web", Ingress, "host", "80/TCP", Allow), // ingress from the local host always passes
        (
            "east/default/client",
            Egress,
            "east/default/web",
            "80/TCP",
            Allow,
        ),
        ("east/default/client", Egress, "world", "80/TCP", Deny),
    ]);
    assert_eq!(
        rule_path(&c.reason("east/default/web", Ingress, "world", "80/TCP")),
        "default/two-rules specs[1].ingress[0]"
    );
}

#[test]
fn cnp_selects_and_peers_in_its_namespace_unless_told() {
    let c = compile_yaml(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: ns-scoped, namespace: default}
spec:
  endpointSelector: {}
  ingress:
  - fromEndpoints:
    - {}
    - matchLabels:
        io.kubernetes.pod.namespace: kube-system
"#,
    );
    c.expect(&[
        (
            "east/default/web",
            Ingress,
            "east/default/client",
            "80/TCP",
            Allow,
        ),
        (
            "east/default/web",
            Ingress,
            "east/other/client",
            "80/TCP",
            Deny,
        ),
        (
            "east/default/web",
            Ingress,
            "east/kube-system/dns",
            "80/TCP",
            Allow,
        ),
        // The endpointSelector {} of a namespaced policy selects only its namespace.
        ("east/other/client", Ingress, "world", "80/TCP", Allow),
        ("east/default/client", Ingress, "world", "80/TCP", Deny),
    ]);
}

#[test]
fn cnp_match_expressions_operators() {
    let c = compile_yaml(
        r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: exprs}
spec:
  endpointSelector:
    matchExpressions:
    - {key: app, operator: In, values: [web]}
  ingress:
  - fromEndpoints:
    - matchExpressions:
      - {key: app, operator: Exists}
      - {key: app, operator: NotIn, values: [web, client]}
    toPorts: [{ports: [{port: "1"}]}]
  - fromEndpoints:
    - matchExpressions:
      - {key: tier, operator: DoesNotExist}
      - {key: io.kubernetes.pod.namespace, operator: In, values: [other]}
    toPorts: [{ports: [{port: "2"}]}]
"#,
    );
    c.expect(&[
        ("east/default/web", Ingress, "east/other/db", "1/TCP", Allow),
        (
            "east/default/web",
            Ingress,
            "east/other/client",
            "1/TCP",
            Deny,
        ),
        // Exists: dns has no app label.
        (
            "east/default/web",
            Ingress,
            "east/kube-system/dns",
            "1/TCP",
            Deny,
        ),
        (
            "east/default/web",
            Ingress,
            "east/other/client",
            "2/TCP",
            Allow,
        ),
        ("east/default/web", Ingress, "east/other/db", "2/TCP", Deny),
        (
            "east/default/web",
            Ingress,
            "east/default/client",
            "2/TCP",
            Deny,
        ),
        // In selects web in every namespace of the local cluster (clusterwide kind).
        ("west/default/web", Ingress, "world", "1/TCP", Allow),
    ]);
}

#[test]
fn cnp_label_keys_with_source_prefixes() {
    let c = compile_yaml(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: prefixes, namespace: default}
spec:
  endpointSelector: {matchLabels: {"k8s:app": web}}
  ingress:
  - fromEndpoints: [{matchLabels: {"any:app": client}}]
    toPorts: [{ports: [{port: "80"}]}]
  - fromEndpoints: [{matchLabels: {"container:app": x-wing}}]
    toPorts: [{ports: [{port: "81"}]}]
"#,
    );
    c.expect(&[
        (
            "east/default/web",
            Ingress,
            "east/default/client",
            "80/TCP",
            Allow,
        ),
        (
            "east/default/web",
            Ingress,
            "east/default/x-wing",
            "81/TCP",
            Deny,
        ),
        (
            "east/default/web",
            Ingress,
            "east/default/client",
            "81/TCP",
            Deny,
        ),
    ]);
    let p = c.policies.iter().next().unwrap();
    assert_eq!(p.problems.len(), 1, "{:?}", p.problems);
    assert_eq!(
        p.problems[0].path,
        "spec.ingress[1].fromEndpoints[0].matchLabels.container:app"
    );
    assert!(
        p.problems[0].message.contains("container"),
        "{}",
        p.problems[0]
    );
}

#[test]
fn cnp_entities() {
    let c = compile_yaml(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: entities, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEntities: [world]
    toPorts: [{ports: [{port: "1"}]}]
  - fromEntities: [cluster]
    toPorts: [{ports: [{port: "2"}]}]
  - fromEntities: [host]
    toPorts: [{ports: [{port: "3"}]}]
  - fromEntities: [remote-node]
    toPorts: [{ports: [{port: "4"}]}]
  - fromEntities: [all]
    toPorts: [{ports: [{port: "5"}]}]
  - fromCIDR: [192.168.0.0/16]
    toPorts: [{ports: [{port: "6"}]}]
"#,
    );
    let web = "east/default/web";
    c.expect(&[
        (web, Ingress, "world", "1/TCP", Allow),
        (web, Ingress, "cidr:192.168.0.0/16", "1/TCP", Allow),
        (web, Ingress, "host", "1/TCP", Allow), // ingress from the local host always passes
        (web, Ingress, "east/default/client", "1/TCP", Deny),
        (web, Ingress, "west/default/client", "1/TCP", Deny),
        (web, Ingress, "east/other/client", "2/TCP", Allow),
        (web, Ingress, "host", "2/TCP", Allow),
        (web, Ingress, "remote-node", "2/TCP", Allow),
        (web, Ingress, "west/default/client", "2/TCP", Deny),
        (web, Ingress, "world", "2/TCP", Deny),
        (web, Ingress, "host", "3/TCP", Allow),
        (web, Ingress, "remote-node", "3/TCP", Deny),
        (web, Ingress, "remote-node", "4/TCP", Allow),
        (web, Ingress, "host", "4/TCP", Allow), // ingress from the local host always passes
        (web, Ingress, "world", "5/TCP", Allow),
        (web, Ingress, "west/default/client", "5/TCP", Allow),
        (web, Ingress, "host", "5/TCP", Allow),
    ]);
}

#[test]
fn cnp_cidr_and_cidr_set_with_except() {
    let c = compile_yaml(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: cidrs, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress:
  - toCIDR: [192.168.1.0/24, 172.16.0.1]
  - toCIDRSet:
    - cidr: 10.0.0.0/8
      except: [10.96.0.0/12]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"#,
    );
    let web = "east/default/web";
    c.expect(&[
        (web, Egress, "cidr:192.168.1.0/24", "80/UDP", Allow),
        (web, Egress, "cidr:172.16.0.1/32", "22/TCP", Allow),
        (web, Egress, "cidr:10.0.0.0/8", "443/TCP", Allow),
        (web, Egress, "cidr:10.0.0.0/8", "80/TCP", Deny),
        (web, Egress, "cidr:10.96.0.0/12", "443/TCP", Deny),
        (web, Egress, "world", "443/TCP", Deny),
    ]);
}

#[test]
fn cnp_port_ranges_and_protocol_any() {
    let c = compile_yaml(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: ports, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - toPorts:
    - ports:
      - {port: "8000", endPort: 8100, protocol: TCP}
      - {port: "53", protocol: ANY}
      - {port: "5000"}
"#,
    );
    let web = "east/default/web";
    c.expect(&[
        (web, Ingress, "world", "8000/TCP", Allow),
        (web, Ingress, "east/default/client", "8100/TCP", Allow),
        (web, Ingress, "east/default/client", "8101/TCP", Deny),
        (web, Ingress, "east/default/client", "8050/UDP", Deny),
        (web, Ingress, "east/default/client", "53/UDP", Allow),
        (web, Ingress, "east/default/client", "53/TCP", Allow),
        (web, Ingress, "east/default/client", "53/SCTP", Allow),
        // Protocol defaults to ANY in Cilium.
        (web, Ingress, "east/default/client", "5000/UDP", Allow),
        (web, Ingress, "east/default/client", "52/UDP", Deny),
    ]);
}

#[test]
fn cnp_deny_beats_allow_in_both_directions() {
    let c = compile_yaml(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: allow-all, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEntities: [all]
  egress:
  - toEntities: [all]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: deny-some, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  egressDeny:
  - toCIDR: [10.0.0.0/8]
"#,
    );
    let web = "east/default/web";
    c.expect(&[
        (web, Ingress, "east/default/client", "80/TCP", Deny),
        (web, Ingress, "east/default/client", "81/TCP", Allow),
        (web, Ingress, "east/default/client", "80/UDP", Allow),
        (web, Ingress, "world", "80/TCP", Allow),
        (web, Egress, "cidr:10.0.0.0/8", "443/TCP", Deny),
        (web, Egress, "world", "443/TCP", Allow),
    ]);
    assert_eq!(
        rule_path(&c.reason(web, Ingress, "east/default/client", "80/TCP")),
        "default/deny-some spec.ingressDeny[0]"
    );
}

#[test]
fn cnp_enable_default_deny_false_keeps_the_direction_open_but_denies_apply() {
    let c = compile_yaml(
        r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: additive}
spec:
  endpointSelector: {matchLabels: {app: web}}
  enableDefaultDeny: {ingress: false, egress: false}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
  egressDeny:
  - toEntities: [world]
"#,
    );
    let web = "east/default/web";
    c.expect(&[
        (web, Ingress, "world", "80/TCP", Allow),
        (web, Ingress, "east/default/client", "80/TCP", Allow),
        (web, Egress, "east/default/client", "80/TCP", Allow),
        (web, Egress, "world", "80/TCP", Deny),
    ]);
    assert_eq!(
        c.reason(web, Ingress, "world", "80/TCP"),
        Reason::NotEnforced
    );
}

#[test]
fn cnp_cluster_label_widens_the_local_default() {
    // Cilium's Cluster Mesh example: x-wing may reach rebel-base only in the other cluster.
    let c = compile_yaml(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: allow-cross-cluster, namespace: default}
spec:
  endpointSelector: {matchLabels: {name: x-wing}}
  egress:
  - toEndpoints:
    - matchLabels:
        name: rebel-base
        io.cilium.k8s.policy.cluster: west
    toPorts: [{ports: [{port: "80"}]}]
  - toEndpoints:
    - matchLabels: {name: rebel-base}
      matchExpressions:
      - {key: io.cilium.k8s.policy.cluster, operator: Exists}
    toPorts: [{ports: [{port: "81"}]}]
  - toEndpoints:
    - matchLabels: {name: rebel-base}
      matchExpressions:
      - {key: io.cilium.k8s.policy.cluster, operator: In, values: [east, west]}
    toPorts: [{ports: [{port: "82"}]}]
  - toEndpoints:
    - matchLabels: {name: rebel-base}
      matchExpressions:
      - {key: io.cilium.k8s.policy.cluster, operator: NotIn, values: [south]}
    toPorts: [{ports: [{port: "83"}]}]
  - toEndpoints:
    - matchLabels: {name: rebel-base}
    toPorts: [{ports: [{port: "84"}]}]
"#,
    );
    let x = "east/default/x-wing";
    c.expect(&[
        (x, Egress, "west/default/rebel-base", "80/TCP", Allow),
        (x, Egress, "east/default/rebel-base", "80/TCP", Deny),
        (x, Egress, "west/default/rebel-base", "81/TCP", Allow),
        (x, Egress, "east/default/rebel-base", "81/TCP", Allow),
        (x, Egress, "west/default/rebel-base", "82/TCP", Allow),
        (x, Egress, "east/default/rebel-base", "82/TCP", Allow),
        // NotIn does not name clusters to select: the local default stays.
        (x, Egress, "west/default/rebel-base", "83/TCP", Deny),
        (x, Egress, "east/default/rebel-base", "83/TCP", Allow),
        (x, Egress, "west/default/rebel-base", "84/TCP", Deny),
        (x, Egress, "east/default/rebel-base", "84/TCP", Allow),
    ]);
}

#[test]
fn ccnp_dns_allowance_from_ciliums_docs_works_unchanged() {
    let c = compile_yaml(
        r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: default-deny-but-dns}
spec:
  endpointSelector:
    matchExpressions:
    - {key: io.kubernetes.pod.namespace, operator: NotIn, values: [kube-system]}
  egress:
  - toEndpoints:
    - matchLabels:
        io.kubernetes.pod.namespace: kube-system
        k8s-app: kube-dns
    toPorts:
    - ports:
      - {port: "53", protocol: ANY}
"#,
    );
    c.expect(&[
        (
            "east/default/client",
            Egress,
            "east/kube-system/dns",
            "53/UDP",
            Allow,
        ),
        (
            "east/other/db",
            Egress,
            "east/kube-system/dns",
            "53/TCP",
            Allow,
        ),
        (
            "east/default/client",
            Egress,
            "east/kube-system/dns",
            "54/UDP",
            Deny,
        ),
        (
            "east/default/client",
            Egress,
            "east/default/web",
            "80/TCP",
            Deny,
        ),
        ("east/default/client", Egress, "world", "53/UDP", Deny),
        // Clusterwide peers are not namespaced; kube-system itself is not selected.
        ("east/kube-system/dns", Egress, "world", "53/UDP", Allow),
    ]);
}

#[test]
fn cnp_empty_rule_denies_all_and_l4_only_rule_allows_any_peer() {
    let c = compile_yaml(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: lockdown, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  ingress:
  - {}
  egress:
  - toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"#,
    );
    let cl = "east/default/client";
    c.expect(&[
        (cl, Ingress, "east/default/web", "80/TCP", Deny),
        (cl, Ingress, "host", "80/TCP", Allow), // ingress from the local host always passes
        (cl, Egress, "world", "443/TCP", Allow),
        (cl, Egress, "west/default/web", "443/TCP", Allow),
        (cl, Egress, "west/default/web", "80/TCP", Deny),
    ]);
}

#[test]
fn unenforceable_rules_are_reported_and_fail_closed() {
    let c = compile_yaml(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l7, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  enableDefaultDeny: {ingress: false, egress: false}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: GET, path: /}]
  egress:
  - toFQDNs: [{matchName: example.com}]
  - toEndpoints: [{matchLabels: {app: client}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: requires, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  ingressDeny:
  - fromRequires: [{matchLabels: {app: web}}]
"#,
    );
    let web = "east/default/web";
    c.expect(&[
        // The L7 rule allows nothing; the direction is enforced despite enableDefaultDeny.
        (web, Ingress, "east/default/client", "80/TCP", Deny),
        (web, Ingress, "world", "80/TCP", Deny),
        // toFQDNs allows nothing; the other egress rule still allows.
        (web, Egress, "world", "443/TCP", Deny),
        (web, Egress, "east/default/client", "443/TCP", Allow),
        // An unenforceable deny denies everything.
        (
            "east/default/client",
            Ingress,
            "east/default/web",
            "80/TCP",
            Deny,
        ),
        ("east/default/client", Ingress, "world", "80/TCP", Deny),
    ]);
    let problems: Vec<String> = c
        .policies
        .iter()
        .flat_map(|p| {
            p.problems
                .iter()
                .map(move |pr| format!("{}: {}", p.reference.object(), pr.path))
        })
        .collect();
    assert_eq!(
        problems,
        [
            "default/l7: spec.ingress[0].toPorts[0].rules",
            "default/l7: spec.egress[0].toFQDNs",
            "default/requires: spec.ingressDeny[0].fromRequires",
        ]
    );
    assert!(matches!(
        c.reason(web, Ingress, "world", "80/TCP"),
        Reason::DefaultDeny { .. }
    ));
}

#[test]
fn ccnp_is_not_namespaced_and_node_selector_is_reported() {
    let c = compile_yaml(
        r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: clients}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: db}}]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: hosts}
spec:
  nodeSelector: {}
  ingress:
  - fromEntities: [cluster]
"#,
    );
    c.expect(&[
        (
            "east/default/client",
            Egress,
            "east/other/db",
            "5432/TCP",
            Allow,
        ),
        (
            "east/other/client",
            Egress,
            "east/other/db",
            "5432/TCP",
            Allow,
        ),
        (
            "east/other/client",
            Egress,
            "east/default/web",
            "80/TCP",
            Deny,
        ),
        ("east/default/web", Ingress, "world", "80/TCP", Allow),
    ]);
    let hosts = c
        .policies
        .iter()
        .find(|p| p.reference.name == "hosts")
        .unwrap();
    assert_eq!(hosts.reference.namespace, None);
    assert_eq!(hosts.problems[0].path, "spec.nodeSelector");
}

#[test]
fn unknown_fields_are_ignored() {
    let c = compile_yaml(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: extra, namespace: default, labels: {a: b}, annotations: {x: y}}
status: {whatever: 1}
spec:
  description: "a description"
  someFutureField: {x: 1}
  endpointSelector: {matchLabels: {app: web}, futureThing: true}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    newPeerKind: [1]
"#,
    );
    assert!(c.policies.iter().all(|p| p.problems.is_empty()));
    c.expect(&[(
        "east/default/web",
        Ingress,
        "east/default/client",
        "80/TCP",
        Allow,
    )]);
}

#[test]
fn policies_of_other_clusters_are_not_compiled() {
    let mut c = compile_yaml("");
    let v: serde_json::Value = serde_yaml::from_str(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: default}
spec: {podSelector: {}}
"#,
    )
    .unwrap();
    let west = ClusterName::new("west").unwrap();
    c.policies.upsert(parse_policy(&v, &west).unwrap());
    c.compiled = compile(&c.policies, &c.world.table, &east());
    assert!(c.compiled.identities.is_empty());
    c.expect(&[("east/default/web", Ingress, "world", "80/TCP", Allow)]);
}

#[test]
fn identities_sharing_policies_share_tables() {
    let c = compile_yaml(
        r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: clients}
spec:
  endpointSelector: {matchLabels: {app: client}}
  ingress:
  - fromEntities: [cluster]
"#,
    );
    let a = &c.compiled.identities[&c.id("east/default/client")];
    let b = &c.compiled.identities[&c.id("east/other/client")];
    assert!(std::sync::Arc::ptr_eq(&a.ingress, &b.ingress));
    assert!(a.ingress.enforced && !a.egress.enforced);
}

// === errors ===

fn parse_err(yaml: &str) -> String {
    match parse_yaml(yaml) {
        Ok(p) => panic!("expected an error, parsed {p:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn errors_name_the_object_the_path_and_the_problem() {
    let cases: &[(&str, &str)] = &[
        (
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: allow-web, namespace: default}
spec:
  endpointSelector: {}
  ingress:
  - toPorts: [{ports: [{port: "http x"}]}]
"#,
            r#"default/allow-web: spec.ingress[0].toPorts[0].ports[0].port: "http x" is not a port number or name"#,
        ),
        (
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: ns}
spec:
  podSelector: {}
  ingress:
  - from:
    - ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}
      podSelector: {}
    - ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}
    - {}
    ports:
    - {port: 90, endPort: 80}
    - {port: http, endPort: 90}
    - {protocol: ICMP}
"#,
            "ns/p: spec.ingress[0].from[0]: ipBlock cannot be combined with podSelector or namespaceSelector; \
             spec.ingress[0].from[1].ipBlock.except[0]: 11.0.0.0/16 is not inside cidr 10.0.0.0/8; \
             spec.ingress[0].from[2]: a peer must set podSelector, namespaceSelector or ipBlock; \
             spec.ingress[0].ports[0].endPort: 80 is below port 90; \
             spec.ingress[0].ports[1].endPort: cannot be used with the named port \"http\": endPort needs a port number; \
             spec.ingress[0].ports[2].protocol: \"ICMP\" is not a protocol: expected TCP, UDP or SCTP",
        ),
        (
            r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: c}
spec:
  endpointSelector:
    matchLabels: {app: true}
    matchExpressions:
    - {key: a, operator: Equals, values: [x]}
    - {key: b, operator: In}
    - {key: c, operator: Exists, values: [x]}
  egress:
  - toEntities: [everyone]
    toCIDR: [300.0.0.0/8]
    toPorts: [{ports: [{port: "70000"}]}]
  ingress: {}
"#,
            "c: spec.endpointSelector.matchLabels.app: expected a string, found a boolean; \
             spec.endpointSelector.matchExpressions[0].operator: \"Equals\" is not an operator: expected In, NotIn, Exists or DoesNotExist; \
             spec.endpointSelector.matchExpressions[1].values: must not be empty for operators In and NotIn; \
             spec.endpointSelector.matchExpressions[2].values: must be empty for operators Exists and DoesNotExist; \
             spec.ingress: expected a list, found an object; \
             spec.egress[0].toEntities[0]: \"everyone\" is not an entity: expected world, cluster, host, remote-node or all; \
             spec.egress[0].toCIDR[0]: \"300.0.0.0/8\" is not a CIDR (expected e.g. 10.0.0.0/8); \
             spec.egress[0].toPorts[0].ports[0].port: 70000 is not a port number (1-65535)",
        ),
        (
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: t, namespace: default}
spec:
  podSelector: {}
  policyTypes: [Inbound]
"#,
            r#"default/t: spec.policyTypes[0]: "Inbound" is not a policy type: expected Ingress or Egress"#,
        ),
        (
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: nospec, namespace: default}
"#,
            "default/nospec: spec: missing: a Cilium policy needs spec or specs",
        ),
        (
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: s, namespace: default}
spec:
  ingress: []
"#,
            "default/s: spec: needs endpointSelector or nodeSelector",
        ),
        (
            r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: cm, namespace: default}
"#,
            r#"default/cm: unsupported policy kind "v1" "ConfigMap": expected networking.k8s.io/v1 NetworkPolicy, cilium.io/v2 CiliumNetworkPolicy or cilium.io/v2 CiliumClusterwideNetworkPolicy"#,
        ),
    ];
    for (yaml, want) in cases {
        assert_eq!(&parse_err(yaml), want, "for:\n{yaml}");
    }
}

#[test]
fn parsed_model_keeps_the_translations_visible() {
    let p = &parse_yaml(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: np, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - podSelector: {matchLabels: {app: client}}
    - namespaceSelector: {matchLabels: {team: blue}}
"#,
    )
    .unwrap()[0];
    let Subject::Endpoints(subject) = &p.specs[0].subject else {
        panic!("endpoint subject")
    };
    assert_eq!(
        subject.to_string(),
        "app=web,io.kubernetes.pod.namespace=shop"
    );
    let Peers::List(peers) = &p.specs[0].ingress.allow[0].peers else {
        panic!("peer list")
    };
    let shown: Vec<String> = peers
        .iter()
        .map(|p| match p {
            Peer::Endpoints(s) => s.to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        shown,
        [
            "app=client,io.kubernetes.pod.namespace=shop,io.cilium.k8s.policy.cluster=east",
            "io.cilium.k8s.namespace.labels.team=blue,io.cilium.k8s.policy.cluster=east",
        ]
    );
    assert_eq!(p.specs[0].egress, DirectionRules::default());
}

#[test]
fn world_matches_unknown_identities_only_through_wildcards() {
    let c = compile_yaml(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: w, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEntities: [world]
    toPorts: [{ports: [{port: "1"}]}]
  - fromEntities: [all]
    toPorts: [{ports: [{port: "2"}]}]
"#,
    );
    let web = c.id("east/default/web");
    let unknown = IdentityId((9 << 16) | 999);
    let d = |port| decide(&c.compiled, web, Ingress, unknown, Protocol::Tcp, port).verdict;
    assert_eq!(d(1), Deny, "world is not an unknown cluster's identity");
    assert_eq!(d(2), Allow);
}

/// Found by the `policy` fuzz target: a clusterwide policy without a name was refused with
/// an error naming no object (`": metadata.name: missing..."`).
#[test]
fn errors_name_the_object_even_without_a_name() {
    let v = serde_json::json!({
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumClusterwideNetworkPolicy",
        "spec": {"endpointSelector": {}},
    });
    let e = parse_policy(&v, &east()).unwrap_err();
    assert!(e.to_string().starts_with("<unnamed>: metadata.name"), "{e}");
    let mut v = v;
    v["kind"] = "CiliumNetworkPolicy".into();
    let e = parse_policy(&v, &east()).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("default/<unnamed>: metadata.name"),
        "{e}"
    );
}

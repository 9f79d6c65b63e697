//! Property tests of the compile step against the reference semantics and the laws of
//! DESIGN.md section 14, on random policies and identities of two clusters.

use proptest::prelude::*;
use proptest::sample::select;

use super::*;
use crate::identity::{LABEL_CLUSTER, LABEL_NAMESPACE, RESERVED_HOST};
use crate::{ClusterId, ClusterName, IdentityId, IdentityLabels, Protocol};

const CLUSTERS: [&str; 2] = ["east", "west"];
const NAMESPACES: [&str; 2] = ["a", "b"];
const APPS: [&str; 3] = ["x", "y", "z"];
const PREFIXES: [&str; 4] = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "192.168.0.0/16"];
const PORTS: [u16; 5] = [79, 80, 81, 443, 8080];
const PROTOCOLS: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];

fn east() -> ClusterName {
    ClusterName::new("east").unwrap()
}

/// One random endpoint identity: cluster, namespace, app label, tier label, named port http.
#[derive(Debug, Clone)]
struct Ident {
    cluster: usize,
    ns: usize,
    app: Option<usize>,
    tier: bool,
    http: Option<(Protocol, u16)>,
}

fn idents() -> impl Strategy<Value = Vec<Ident>> {
    proptest::collection::vec(
        (
            0..2usize,
            0..2usize,
            proptest::option::of(0..3usize),
            any::<bool>(),
            proptest::option::of((select(PROTOCOLS.to_vec()), select(vec![80u16, 8080]))),
        )
            .prop_map(|(cluster, ns, app, tier, http)| Ident {
                cluster,
                ns,
                app,
                tier,
                http,
            }),
        1..8,
    )
}

/// The identity table of `idents`, CIDR identities for every test prefix, and the ids.
struct Universe {
    table: IdentityTable,
    /// Endpoint identities of the local cluster (east), plus one no table knows.
    locals: Vec<IdentityId>,
    /// Every identity a flow can come from or go to, plus one no table knows.
    remotes: Vec<IdentityId>,
}

fn universe(idents: &[Ident]) -> Universe {
    let mut table = IdentityTable::new();
    let mut locals = Vec::new();
    for (i, id) in idents.iter().enumerate() {
        let cluster = ClusterName::new(CLUSTERS[id.cluster]).unwrap();
        let mut labels: Vec<(&str, &str)> = Vec::new();
        if let Some(a) = id.app {
            labels.push(("app", APPS[a]));
        }
        if id.tier {
            labels.push(("tier", "data"));
        }
        let l = IdentityLabels::for_pod(&cluster, NAMESPACES[id.ns], labels);
        let cid = ClusterId::new(id.cluster as u32 + 1).unwrap();
        let num = IdentityId::new(cid, 256 + i as u32).unwrap();
        table.insert(num, l);
        if let Some((protocol, port)) = id.http {
            table.set_named_ports(
                num,
                vec![NamedPort {
                    name: "http".into(),
                    protocol,
                    port,
                }],
            );
        }
        if id.cluster == 0 {
            locals.push(num);
        }
    }
    let mut alloc = CidrIdentities::new();
    let changes = alloc
        .sync(&PREFIXES.iter().map(|p| p.parse().unwrap()).collect())
        .unwrap();
    CidrIdentities::apply_to(&changes, &mut table);
    let unknown = IdentityId((1 << 16) | 60000);
    locals.push(unknown);
    let mut remotes = table.all_ids();
    remotes.push(unknown);
    Universe {
        table,
        locals,
        remotes,
    }
}

fn selector() -> impl Strategy<Value = Selector> {
    let values = |vs: &'static [&'static str]| {
        proptest::sample::subsequence(vs.to_vec(), 1..=vs.len())
            .prop_map(|v| v.into_iter().map(String::from).collect::<Vec<_>>())
    };
    let requirement = prop_oneof![
        values(&APPS).prop_map(|v| Requirement {
            key: "app".into(),
            op: SelectorOp::In(v)
        }),
        values(&APPS).prop_map(|v| Requirement {
            key: "app".into(),
            op: SelectorOp::NotIn(v)
        }),
        select(vec!["app", "tier"]).prop_map(|k| Requirement {
            key: k.into(),
            op: SelectorOp::Exists
        }),
        select(vec!["app", "tier"]).prop_map(|k| Requirement {
            key: k.into(),
            op: SelectorOp::DoesNotExist
        }),
        values(&NAMESPACES).prop_map(|v| Requirement {
            key: LABEL_NAMESPACE.into(),
            op: SelectorOp::In(v)
        }),
        values(&CLUSTERS).prop_map(|v| Requirement {
            key: LABEL_CLUSTER.into(),
            op: SelectorOp::In(v)
        }),
        Just(Requirement {
            key: LABEL_CLUSTER.into(),
            op: SelectorOp::Exists
        }),
    ];
    proptest::collection::vec(requirement, 0..3).prop_map(|requirements| Selector { requirements })
}

fn peer() -> impl Strategy<Value = Peer> {
    prop_oneof![
        selector().prop_map(Peer::Endpoints),
        select(vec![
            Entity::World,
            Entity::Cluster,
            Entity::Host,
            Entity::RemoteNode,
            Entity::All
        ])
        .prop_map(Peer::Entity),
        (
            select(PREFIXES.to_vec()),
            proptest::option::of(select(PREFIXES.to_vec()))
        )
            .prop_map(|(c, e)| Peer::Cidr(CidrPeer {
                cidr: c.parse().unwrap(),
                except: e.into_iter().map(|e| e.parse().unwrap()).collect(),
            })),
    ]
}

fn port_spec() -> impl Strategy<Value = PortSpec> {
    let ports = prop_oneof![
        Just(PortMatch::Range(PortRange::ALL)),
        (select(PORTS.to_vec()), 0u16..3).prop_map(|(p, len)| PortMatch::Range(PortRange {
            start: p,
            end: p + len
        })),
        Just(PortMatch::Named("http".into())),
    ];
    (proptest::option::of(select(PROTOCOLS.to_vec())), ports)
        .prop_map(|(protocol, ports)| PortSpec { protocol, ports })
}

fn rule(enforceable_only: bool) -> impl Strategy<Value = Rule> {
    let peers = prop_oneof![
        1 => Just(Peers::Any),
        4 => proptest::collection::vec(peer(), 0..3).prop_map(Peers::List),
    ];
    (
        peers,
        proptest::collection::vec(port_spec(), 0..3),
        proptest::bool::weighted(if enforceable_only { 0.0 } else { 0.1 }),
    )
        .prop_map(|(peers, ports, bad)| Rule {
            peers,
            ports,
            unenforceable: bad.then(|| "L7 rules".to_string()),
        })
}

fn direction_rules() -> impl Strategy<Value = DirectionRules> {
    (
        any::<bool>(),
        proptest::collection::vec(rule(false), 0..3),
        proptest::collection::vec(rule(false), 0..2),
    )
        .prop_map(|(default_deny, allow, deny)| DirectionRules {
            default_deny: default_deny
                || allow.iter().chain(&deny).any(|r| r.unenforceable.is_some()),
            allow,
            deny,
        })
}

fn spec() -> impl Strategy<Value = (Selector, DirectionRules, DirectionRules)> {
    (selector(), direction_rules(), direction_rules())
}

fn policies() -> impl Strategy<Value = Vec<Policy>> {
    proptest::collection::vec(
        (
            select(vec![
                PolicyKind::NetworkPolicy,
                PolicyKind::CiliumNetworkPolicy,
                PolicyKind::CiliumClusterwideNetworkPolicy,
            ]),
            // Mostly policies of the local cluster; some of the peer, which must not count.
            select(vec!["east", "east", "east", "west"]),
            proptest::collection::vec(spec(), 1..3),
        ),
        0..5,
    )
    .prop_map(|ps| {
        ps.into_iter()
            .enumerate()
            .map(|(i, (kind, cluster, specs))| Policy {
                reference: PolicyRef {
                    kind,
                    cluster: ClusterName::new(cluster).unwrap(),
                    namespace: kind.is_namespaced().then(|| "a".to_string()),
                    name: format!("p{i}"),
                },
                specs: specs
                    .into_iter()
                    .enumerate()
                    .map(|(j, (subject, ingress, egress))| PolicySpec {
                        source: if j == 0 {
                            SpecSource::Spec
                        } else {
                            SpecSource::Specs(j as u32 - 1)
                        },
                        subject: Subject::Endpoints(subject),
                        ingress,
                        egress,
                    })
                    .collect(),
                problems: Vec::new(),
            })
            .collect()
    })
}

/// Every flow of the universe: local x direction x remote x protocol x port.
fn flows(u: &Universe) -> impl Iterator<Item = Flow> + '_ {
    u.locals.iter().flat_map(move |&local| {
        Direction::ALL.into_iter().flat_map(move |direction| {
            u.remotes.iter().flat_map(move |&remote| {
                PROTOCOLS.into_iter().flat_map(move |protocol| {
                    PORTS.into_iter().map(move |port| Flow {
                        local,
                        direction,
                        remote,
                        protocol,
                        port,
                    })
                })
            })
        })
    })
}

fn decide_flow(c: &CompiledPolicy, f: &Flow) -> Decision {
    decide(c, f.local, f.direction, f.remote, f.protocol, f.port)
}

/// Whether `spec` of a local-cluster policy selects the local endpoint of `flow`.
fn selects(table: &IdentityTable, policy: &Policy, subject: &Selector, local: IdentityId) -> bool {
    policy.reference.cluster == east()
        && matches!(table.kind(local), IdentityKind::Endpoint(l)
            if l.get(LABEL_CLUSTER) == Some("east") && subject.matches_with(|k| l.get(k)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// `decide` on the compiled form equals the naive evaluation of the policies.
    #[test]
    fn compiled_decide_equals_reference_semantics(ids in idents(), ps in policies()) {
        let u = universe(&ids);
        let set: PolicySet = ps.into_iter().collect();
        let compiled = compile(&set, &u.table, &east());
        for f in flows(&u) {
            let want = reference::evaluate(&set, &u.table, &east(), &f);
            prop_assert_eq!(decide_flow(&compiled, &f), want, "flow {:?}", f);
        }
    }

    /// The datapath's tables decide as `decide` does: same verdict, and the rule id they
    /// report names the rule `decide` reports.
    #[test]
    fn tables_decide_equals_decide(ids in idents(), ps in policies()) {
        let u = universe(&ids);
        let set: PolicySet = ps.into_iter().collect();
        let compiled = compile(&set, &u.table, &east());
        let tables = policy_tables(&compiled);
        for f in flows(&u) {
            let want = decide_flow(&compiled, &f);
            let (verdict, rule) =
                decide_tables(&tables, f.local, f.direction, f.remote, f.protocol, f.port);
            prop_assert_eq!(verdict, want.verdict, "flow {:?}: {:?}", f, want.reason);
            let want_rule = match &want.reason {
                Reason::Rule(r) => Some(r.clone()),
                _ => None,
            };
            prop_assert_eq!(rule.map(|id| tables.rules[&id].clone()), want_rule, "flow {:?}", f);
        }
    }

    /// A deny rule that matches a flow denies it, whatever allows it too.
    #[test]
    fn deny_beats_allow(
        ids in idents(),
        ps in policies(),
        subject in selector(),
        deny in rule(true),
        direction in select(Direction::ALL.to_vec()),
    ) {
        let u = universe(&ids);
        let mut set: PolicySet = ps.into_iter().collect();
        let mk = |name: &str, dir_rules: DirectionRules| Policy {
            reference: PolicyRef {
                kind: PolicyKind::CiliumClusterwideNetworkPolicy,
                cluster: east(),
                namespace: None,
                name: name.into(),
            },
            specs: vec![{
                let mut s = PolicySpec {
                    source: SpecSource::Spec,
                    subject: Subject::Endpoints(subject.clone()),
                    ingress: DirectionRules::default(),
                    egress: DirectionRules::default(),
                };
                *s.direction_mut(direction) = dir_rules;
                s
            }],
            problems: Vec::new(),
        };
        let allow_all = Rule { peers: Peers::Any, ports: vec![], unenforceable: None };
        set.upsert(mk("zz-deny", DirectionRules { default_deny: false, allow: vec![], deny: vec![deny.clone()] }));
        set.upsert(mk("zz-allow-all", DirectionRules { default_deny: true, allow: vec![allow_all], deny: vec![] }));
        let compiled = compile(&set, &u.table, &east());
        let denier = set.iter().find(|p| p.reference.name == "zz-deny").unwrap();
        for f in flows(&u).filter(|f| f.direction == direction) {
            let from_host = f.direction == Direction::Ingress && f.remote.0 == RESERVED_HOST;
            if selects(&u.table, denier, &subject, f.local)
                && !from_host
                && reference::rule_matches(&deny, Verdict::Deny, &u.table, &east(), &f)
            {
                let d = decide_flow(&compiled, &f);
                prop_assert_eq!(d.verdict, Verdict::Deny, "flow {:?}: {:?}", f, d.reason);
            }
        }
    }

    /// An endpoint no policy selects allows everything, both ways.
    #[test]
    fn unselected_endpoint_allows_all(ids in idents(), ps in policies()) {
        let u = universe(&ids);
        let set: PolicySet = ps.into_iter().collect();
        let compiled = compile(&set, &u.table, &east());
        for f in flows(&u) {
            let selected = set.iter().any(|p| p.specs.iter().any(|s| match &s.subject {
                Subject::Endpoints(sel) => selects(&u.table, p, sel, f.local),
                Subject::Nodes(_) => false,
            }));
            if !selected {
                let d = decide_flow(&compiled, &f);
                let from_host = f.direction == Direction::Ingress && f.remote.0 == RESERVED_HOST;
                let reason = if from_host { Reason::LocalHost } else { Reason::NotEnforced };
                prop_assert_eq!(d, Decision { verdict: Verdict::Allow, reason }, "flow {:?}", f);
            }
        }
    }

    /// Applying the same policies in another order, with their specs listed in another
    /// order, compiles to the same result.
    #[test]
    fn order_of_policies_does_not_matter(ids in idents(), ps in policies(), seed in any::<u64>()) {
        let u = universe(&ids);
        let forward: PolicySet = ps.iter().cloned().collect();
        let mut shuffled = ps.clone();
        shuffled.reverse();
        let mut x = seed | 1;
        for p in &mut shuffled {
            // A small xorshift permutation of the specs (their `source` stays with them).
            for i in (1..p.specs.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                p.specs.swap(i, (x % (i as u64 + 1)) as usize);
            }
        }
        let backward: PolicySet = shuffled.into_iter().collect();
        prop_assert_eq!(
            compile(&forward, &u.table, &east()),
            compile(&backward, &u.table, &east())
        );
    }

    /// Adding an allow rule to a policy never removes a flow that was allowed.
    #[test]
    fn adding_an_allow_never_removes_an_allowed_flow(
        ids in idents(),
        ps in policies(),
        extra in rule(true),
        which in any::<proptest::sample::Index>(),
        direction in select(Direction::ALL.to_vec()),
    ) {
        prop_assume!(!ps.is_empty());
        let u = universe(&ids);
        let before: PolicySet = ps.iter().cloned().collect();
        let mut ps = ps;
        let i = which.index(ps.len());
        ps[i].specs[0].direction_mut(direction).allow.push(extra);
        let after: PolicySet = ps.into_iter().collect();
        let (b, a) = (compile(&before, &u.table, &east()), compile(&after, &u.table, &east()));
        for f in flows(&u) {
            if decide_flow(&b, &f).verdict == Verdict::Allow {
                let d = decide_flow(&a, &f);
                prop_assert_eq!(d.verdict, Verdict::Allow, "flow {:?} lost: {:?}", f, d.reason);
            }
        }
    }

    /// A peer selector written without the cluster label never matches an identity of
    /// another cluster (parsed from the JSON users write).
    #[test]
    fn selector_without_cluster_label_stays_in_the_local_cluster(
        ids in idents(),
        labels in proptest::collection::btree_map(
            select(vec!["app", "k8s:app", "tier", "io.kubernetes.pod.namespace"]),
            select(vec!["x", "y", "data", "a", "b"]),
            0..3,
        ),
        exprs in proptest::collection::vec(
            (select(vec!["app", "any:tier", "k8s:io.kubernetes.pod.namespace"]),
             select(vec!["In", "NotIn", "Exists", "DoesNotExist"]),
             select(vec!["x", "a", "data"])),
            0..3,
        ),
        kind in select(vec!["CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"]),
    ) {
        let exprs: Vec<serde_json::Value> = exprs.into_iter().map(|(k, op, v)| {
            if op == "In" || op == "NotIn" {
                serde_json::json!({"key": k, "operator": op, "values": [v]})
            } else {
                serde_json::json!({"key": k, "operator": op})
            }
        }).collect();
        let sel = serde_json::json!({"matchLabels": labels, "matchExpressions": exprs});
        let obj = serde_json::json!({
            "apiVersion": "cilium.io/v2",
            "kind": kind,
            "metadata": {"name": "p", "namespace": "a"},
            "spec": {
                "endpointSelector": {},
                "ingress": [{"fromEndpoints": [sel]}],
                "egress": [{"toEndpoints": [sel]}],
            },
        });
        let policy = parse_policy(&obj, &east()).unwrap();
        let u = universe(&ids);
        let set: PolicySet = [policy].into_iter().collect();
        let compiled = compile(&set, &u.table, &east());
        for f in flows(&u) {
            if u.table.cluster_of(f.remote) == Some("west") {
                let d = decide_flow(&compiled, &f);
                prop_assert!(
                    !matches!(d.reason, Reason::Rule(_)),
                    "flow {:?} to another cluster allowed by {:?}", f, d.reason
                );
            }
        }
    }
}

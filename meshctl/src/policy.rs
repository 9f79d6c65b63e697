//! `meshctl policy list [--node N]` and `meshctl policy check --from C/NS/POD --to C/NS/POD
//! --port 80/TCP`: the network policies of the apiserver's cluster, what each selector
//! resolves to in every cluster, and the verdict for one flow with the rule that decided.
//!
//! Both run the agent's path, not a copy of it: the watched objects go into the agent's own
//! state (`mesh_proto::state::MeshState`, which parses each policy with mesh-core's
//! `parse_policy`), through its sync gate, into `MeshState::compile_policy` (mesh-core's
//! `compile`) and, for `check`, mesh-core's `decide`. Policies are served only to their own
//! cluster's readers, so a direction enforced in another cluster is evaluated by running the
//! command against that cluster's apiserver.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use clap::{Args, Subcommand};
use mesh_core::policy::{
    CidrIdentities, Decision, Direction, Peer, Peers, Policy, PolicyRef, PortMatch, Reason, Rule,
    RuleRef, Subject, Verdict, decide,
};
use mesh_core::{ClusterName, Endpoint, IdentityId, Protocol};
use mesh_proto::pb;
use mesh_proto::state::{MeshState, PolicyView};
use serde::Serialize;

use crate::conn::ConnArgs;
use crate::inspect::{Watched, read_watch};
use crate::output::Format;
use crate::service::{agent_gate, agent_state};
use mesh_core::parse_duration;

const ENFORCEMENT_NOTE: &str = "Verdicts are what mesh-core's compile/decide give for the \
watched state, the function agents program; kernel enforcement of these tables is the next \
step of the agent (issue #12 part 5).";

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// The cluster's network policies: per policy the identities it selects and, per rule,
    /// the identities each peer resolves to in every cluster.
    #[command(after_help = ENFORCEMENT_NOTE)]
    List(ListArgs),
    /// The verdict for one flow: the client's egress in its cluster and the server's ingress
    /// in its cluster, each with the rule that decided or the default deny and the policies
    /// enforcing it. Exit status 0: allowed in both directions; 1: denied; 2: not denied,
    /// but a direction is enforced in another cluster (run the command against that
    /// cluster's apiserver: policies are never served to peers).
    #[command(after_help = ENFORCEMENT_NOTE)]
    Check(CheckArgs),
}

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Only what this node's agent enforces (policies selecting an endpoint on the node).
    #[arg(long)]
    node: Option<String>,
    /// Give up waiting for the snapshot after this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Args)]
pub struct CheckArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// The client pod, CLUSTER/NAMESPACE/POD.
    #[arg(long)]
    from: String,
    /// The server pod, CLUSTER/NAMESPACE/POD.
    #[arg(long)]
    to: String,
    /// The destination port and protocol, PORT/PROTOCOL (TCP, UDP, SCTP; default TCP).
    #[arg(long)]
    port: String,
    /// Give up waiting for the snapshot after this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

pub async fn run(cmd: PolicyCommand) -> anyhow::Result<i32> {
    match cmd {
        PolicyCommand::List(a) => {
            let local = local_cluster(&a.conn).await?;
            let (watched, _) = read_watch(&a.conn, vec![], a.timeout).await?;
            let report = list(&watched, &local, a.node.as_deref())?;
            print(a.output, &report, render_list)?;
            Ok(0)
        }
        PolicyCommand::Check(a) => {
            let local = local_cluster(&a.conn).await?;
            let (watched, _) = read_watch(&a.conn, vec![], a.timeout).await?;
            let report = check(&watched, &local, &a.from, &a.to, &a.port)?;
            print(a.output, &report, render_check)?;
            Ok(report.exit_code())
        }
    }
}

fn print<T: Serialize>(format: Format, v: &T, table: fn(&T) -> String) -> anyhow::Result<()> {
    match format {
        Format::Table => print!("{}", table(v)),
        Format::Json => println!("{}", serde_json::to_string_pretty(v)?),
        Format::Yaml => print!("{}", serde_yaml::to_string(v)?),
    }
    Ok(())
}

async fn local_cluster(conn: &ConnArgs) -> anyhow::Result<ClusterName> {
    let mut client = conn.connect().await?;
    let name = client
        .info(pb::InfoRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("info from {}: {}", conn.server, s.message()))?
        .into_inner()
        .name;
    ClusterName::new(name.clone())
        .map_err(|e| anyhow::anyhow!("the apiserver names its cluster {name:?}: {e}"))
}

// ===== the agent's view =====

/// What the agent of `local` would compile from `watched`.
pub(crate) struct Loaded {
    pub(crate) state: MeshState,
    pub(crate) view: PolicyView,
    /// Values the agent rejects, with the reason.
    pub(crate) invalid: Vec<String>,
    /// Why the agent programs nothing yet (then everything seen is compiled).
    pub(crate) waiting: Option<String>,
    /// Clusters seen but never synced: their identities are left out.
    pub(crate) left_out: Vec<String>,
}

pub(crate) fn load(watched: &Watched, local: &ClusterName) -> anyhow::Result<Loaded> {
    let (state, invalid) = agent_state(watched, local);
    let gate = agent_gate(local);
    let (clusters, waiting): (Vec<ClusterName>, _) = match state.programmable(&gate) {
        Ok(c) => (c.into_keys().collect(), None),
        Err(w) => (
            state.clusters().keys().cloned().collect(),
            Some(w.to_string()),
        ),
    };
    let left_out = state
        .clusters()
        .keys()
        .filter(|c| !clusters.contains(c))
        .map(ToString::to_string)
        .collect();
    let view = state
        .compile_policy(&clusters, &mut CidrIdentities::new())
        .expect("the state has a local cluster")?;
    Ok(Loaded {
        state,
        view,
        invalid,
        waiting,
        left_out,
    })
}

// ===== list =====

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct ListReport {
    pub cluster: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub policies: Vec<PolicyRow>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    pub clusters_left_out: Vec<String>,
    pub invalid: Vec<String>,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct PolicyRow {
    pub kind: String,
    /// `namespace/name`, or `name` for a clusterwide policy.
    pub policy: String,
    /// Parts mesh cannot enforce (they fail closed).
    pub problems: Vec<String>,
    pub specs: Vec<SpecRow>,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct SpecRow {
    /// `spec` or `specs[i]`.
    pub spec: String,
    /// The subject selector.
    pub selector: String,
    /// Local identities selected (on `--node`, only those of its endpoints).
    pub selects: Vec<u32>,
    pub rules: Vec<RuleRow>,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct RuleRow {
    /// JSON path of the rule, e.g. `spec.ingress[0]`.
    pub rule: String,
    pub direction: Direction,
    pub verdict: Verdict,
    pub peers: Vec<PeerRow>,
    /// `80/TCP`, `8000-8080/ANY`, `http/TCP`; empty: every port.
    pub ports: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unenforceable: Option<String>,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct PeerRow {
    /// The selector, entity or CIDR as the model holds it (after Cilium's translations:
    /// namespace and local-cluster defaults included).
    pub peer: String,
    /// For a selector: the endpoint identities it resolves to, by cluster.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub identities: BTreeMap<String, Vec<u32>>,
}

/// `policy list` over what was watched.
pub fn list(
    watched: &Watched,
    local: &ClusterName,
    node: Option<&str>,
) -> anyhow::Result<ListReport> {
    let loaded = load(watched, local)?;
    let table = &loaded.view.identities;
    let on_node: Option<BTreeSet<IdentityId>> = match node {
        None => None,
        Some(n) => {
            let cluster = loaded.state.cluster(local);
            let known = cluster.is_some_and(|c| c.state.nodes.contains_key(n));
            if !known {
                let nodes: Vec<&String> = cluster
                    .map(|c| c.state.nodes.keys().collect())
                    .unwrap_or_default();
                anyhow::bail!("node {n:?} is not a node of cluster {local} (nodes: {nodes:?})");
            }
            Some(
                local_endpoints(&loaded.state, local)
                    .filter(|e| e.node == n)
                    .map(|e| e.identity)
                    .collect(),
            )
        }
    };
    let mut policies = Vec::new();
    for p in loaded.state.policies().into_iter().flat_map(|s| s.iter()) {
        let row = policy_row(p, table, local, on_node.as_ref());
        if on_node.is_some() && row.specs.iter().all(|s| s.selects.is_empty()) {
            continue;
        }
        policies.push(row);
    }
    Ok(ListReport {
        cluster: local.to_string(),
        node: node.map(str::to_owned),
        policies,
        waiting: loaded.waiting,
        clusters_left_out: loaded.left_out,
        invalid: loaded.invalid,
    })
}

fn local_endpoints<'a>(
    state: &'a MeshState,
    local: &ClusterName,
) -> impl Iterator<Item = &'a Endpoint> {
    state
        .cluster(local)
        .into_iter()
        .flat_map(|c| c.state.endpoints.values())
}

fn policy_row(
    p: &Policy,
    table: &mesh_core::policy::IdentityTable,
    local: &ClusterName,
    on_node: Option<&BTreeSet<IdentityId>>,
) -> PolicyRow {
    let specs = p
        .specs
        .iter()
        .map(|spec| {
            let (selector, selects) = match &spec.subject {
                Subject::Endpoints(sel) => (
                    sel.to_string(),
                    table
                        .matching(sel)
                        .into_iter()
                        // Subjects select local endpoints only.
                        .filter(|id| table.cluster_of(*id) == Some(local.as_str()))
                        .filter(|id| on_node.is_none_or(|n| n.contains(id)))
                        .map(|id| id.0)
                        .collect(),
                ),
                Subject::Nodes(sel) => (format!("nodes: {sel} (not enforced)"), Vec::new()),
            };
            let mut rules = Vec::new();
            for direction in Direction::ALL {
                let d = spec.direction(direction);
                for (verdict, list) in [(Verdict::Allow, &d.allow), (Verdict::Deny, &d.deny)] {
                    for (i, rule) in list.iter().enumerate() {
                        let r = RuleRef {
                            policy: p.reference.clone(),
                            spec: spec.source,
                            direction,
                            section: verdict,
                            index: i as u32,
                        };
                        rules.push(rule_row(&r, rule, table));
                    }
                }
            }
            SpecRow {
                spec: spec.source.to_string(),
                selector,
                selects,
                rules,
            }
        })
        .collect();
    PolicyRow {
        kind: p.reference.kind.to_string(),
        policy: p.reference.object(),
        problems: p.problems.iter().map(ToString::to_string).collect(),
        specs,
    }
}

fn rule_row(r: &RuleRef, rule: &Rule, table: &mesh_core::policy::IdentityTable) -> RuleRow {
    let peers = match &rule.peers {
        Peers::Any => vec![PeerRow {
            peer: "any".into(),
            identities: BTreeMap::new(),
        }],
        Peers::List(list) => list
            .iter()
            .map(|peer| match peer {
                Peer::Endpoints(sel) => {
                    let mut identities: BTreeMap<String, Vec<u32>> = BTreeMap::new();
                    for id in table.matching(sel) {
                        let cluster = table.cluster_of(id).unwrap_or("?").to_owned();
                        identities.entry(cluster).or_default().push(id.0);
                    }
                    PeerRow {
                        peer: sel.to_string(),
                        identities,
                    }
                }
                Peer::Entity(e) => PeerRow {
                    peer: format!("entity:{}", e.as_str()),
                    identities: BTreeMap::new(),
                },
                Peer::Cidr(c) => PeerRow {
                    peer: if c.except.is_empty() {
                        format!("cidr:{}", c.cidr)
                    } else {
                        let except: Vec<String> =
                            c.except.iter().map(ToString::to_string).collect();
                        format!("cidr:{} except {}", c.cidr, except.join(","))
                    },
                    identities: BTreeMap::new(),
                },
            })
            .collect(),
    };
    let ports = rule
        .ports
        .iter()
        .map(|p| {
            let proto = p.protocol.map_or("ANY".to_string(), |p| p.to_string());
            match &p.ports {
                PortMatch::Range(r) if r.start == r.end => format!("{}/{proto}", r.start),
                PortMatch::Range(r) => format!("{}-{}/{proto}", r.start, r.end),
                PortMatch::Named(n) => format!("{n}/{proto}"),
            }
        })
        .collect();
    RuleRow {
        rule: r.path(),
        direction: r.direction,
        verdict: r.section,
        peers,
        ports,
        unenforceable: rule.unenforceable.clone(),
    }
}

fn render_list(r: &ListReport) -> String {
    let mut out = String::new();
    if let Some(w) = &r.waiting {
        out.push_str(&format!("Agents program nothing yet: {w}\n"));
    }
    match &r.node {
        Some(n) => out.push_str(&format!(
            "Policies enforced on node {n} of cluster {}:\n",
            r.cluster
        )),
        None => out.push_str(&format!("Policies of cluster {}:\n", r.cluster)),
    }
    if r.policies.is_empty() {
        out.push_str("  (none)\n");
    }
    let ids = |v: &[u32]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
        }
    };
    for p in &r.policies {
        out.push_str(&format!("{} {}\n", p.kind, p.policy));
        for problem in &p.problems {
            out.push_str(&format!("  not fully enforced: {problem}\n"));
        }
        for s in &p.specs {
            out.push_str(&format!(
                "  {} selects {} -> identities {}\n",
                s.spec,
                s.selector,
                ids(&s.selects)
            ));
            for rule in &s.rules {
                let ports = if rule.ports.is_empty() {
                    "all ports".to_string()
                } else {
                    rule.ports.join(",")
                };
                out.push_str(&format!(
                    "    {} {} {} [{ports}]{}\n",
                    rule.rule,
                    rule.verdict,
                    match rule.direction {
                        Direction::Ingress => "from",
                        Direction::Egress => "to",
                    },
                    rule.unenforceable
                        .as_ref()
                        .map(|u| format!(" (unenforceable, fails closed: {u})"))
                        .unwrap_or_default()
                ));
                for peer in &rule.peers {
                    let resolved = if peer.identities.is_empty() {
                        String::new()
                    } else {
                        let per: Vec<String> = peer
                            .identities
                            .iter()
                            .map(|(c, v)| format!("{c}: {}", ids(v)))
                            .collect();
                        format!(" -> {}", per.join("; "))
                    };
                    out.push_str(&format!("      {}{resolved}\n", peer.peer));
                }
            }
        }
    }
    if !r.clusters_left_out.is_empty() {
        out.push_str(&format!(
            "Clusters left out (never synced): {}\n",
            r.clusters_left_out.join(", ")
        ));
    }
    for i in &r.invalid {
        out.push_str(&format!("Rejected by the agent: {i}\n"));
    }
    out
}

// ===== check =====

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct CheckReport {
    pub from: PodRef,
    pub to: PodRef,
    pub port: u16,
    pub protocol: Protocol,
    /// The client's egress, evaluated in the client's cluster.
    pub egress: DirectionCheck,
    /// The server's ingress, evaluated in the server's cluster.
    pub ingress: DirectionCheck,
    /// `allowed`, `denied`, or `unknown` (nothing denies, but a direction is enforced in a
    /// cluster whose policies this apiserver does not serve).
    pub verdict: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    pub invalid: Vec<String>,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub cluster: String,
    pub namespace: String,
    pub pod: String,
    pub ip: String,
    pub identity: u32,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct DirectionCheck {
    /// The cluster whose policies decide this direction.
    pub cluster: String,
    /// `None`: not evaluated (another cluster's policies).
    pub decision: Option<Decision>,
    /// The decision in words, or why it was not evaluated.
    pub explanation: String,
}

impl CheckReport {
    pub fn exit_code(&self) -> i32 {
        match self.verdict.as_str() {
            "allowed" => 0,
            "denied" => 1,
            _ => 2,
        }
    }
}

/// `policy check` over what was watched.
pub fn check(
    watched: &Watched,
    local: &ClusterName,
    from: &str,
    to: &str,
    port: &str,
) -> anyhow::Result<CheckReport> {
    let (port, protocol) = parse_port(port)?;
    let loaded = load(watched, local)?;
    let client = find_pod(&loaded.state, "--from", from)?;
    let server = find_pod(&loaded.state, "--to", to)?;
    let evaluate = |direction: Direction, here: &Endpoint, there: &Endpoint, cluster: &str| {
        if cluster != local.as_str() {
            return DirectionCheck {
                cluster: cluster.to_owned(),
                decision: None,
                explanation: format!(
                    "not evaluated: decided by cluster {cluster}'s policies, which only its own apiserver serves (run this check against it)"
                ),
            };
        }
        let d = decide(
            &loaded.view.compiled,
            here.identity,
            direction,
            there.identity,
            protocol,
            port,
        );
        let explanation = decision_text(&d);
        DirectionCheck {
            cluster: cluster.to_owned(),
            decision: Some(d),
            explanation,
        }
    };
    let egress = evaluate(Direction::Egress, &client.1, &server.1, &client.0);
    let ingress = evaluate(Direction::Ingress, &server.1, &client.1, &server.0);
    let verdicts = [&egress, &ingress].map(|d| d.decision.as_ref().map(|d| d.verdict));
    let verdict = if verdicts.contains(&Some(Verdict::Deny)) {
        "denied"
    } else if verdicts.contains(&None) {
        "unknown"
    } else {
        "allowed"
    };
    let pod_ref = |(cluster, e): &(String, Endpoint)| PodRef {
        cluster: cluster.clone(),
        namespace: e.namespace.clone(),
        pod: e.pod.clone(),
        ip: e.ip.to_string(),
        identity: e.identity.0,
    };
    Ok(CheckReport {
        from: pod_ref(&client),
        to: pod_ref(&server),
        port,
        protocol,
        egress,
        ingress,
        verdict: verdict.into(),
        waiting: loaded.waiting,
        invalid: loaded.invalid,
    })
}

/// A decision in words: the verdict and the rule (its JSON path), or the default deny and
/// the policies enforcing it.
pub(crate) fn decision_text(d: &Decision) -> String {
    match &d.reason {
        Reason::Rule(r) => format!("{} by {r}", d.verdict),
        Reason::DefaultDeny { enforced_by } => {
            let by: Vec<String> = enforced_by.iter().map(PolicyRef::to_string).collect();
            format!(
                "{} by default deny, enforced by {}",
                d.verdict,
                by.join(", ")
            )
        }
        Reason::NotEnforced => format!(
            "{}: no policy selects the endpoint in this direction",
            d.verdict
        ),
        Reason::LocalHost => format!(
            "{}: ingress from the local host is always allowed",
            d.verdict
        ),
    }
}

/// `80/TCP`, `53/udp`, `80` (TCP).
fn parse_port(s: &str) -> anyhow::Result<(u16, Protocol)> {
    let (port, proto) = s.split_once('/').unwrap_or((s, "TCP"));
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| anyhow::anyhow!("--port {s:?}: {port:?} is not a port in 1..=65535"))?;
    let protocol = proto.to_ascii_uppercase().parse().map_err(|_| {
        anyhow::anyhow!("--port {s:?}: unknown protocol {proto:?} (TCP, UDP, SCTP)")
    })?;
    Ok((port, protocol))
}

/// The endpoint of `CLUSTER/NAMESPACE/POD` (its first address) and its cluster.
pub(crate) fn find_pod(
    state: &MeshState,
    flag: &str,
    s: &str,
) -> anyhow::Result<(String, Endpoint)> {
    let mut parts = s.splitn(3, '/');
    let (Some(cluster), Some(ns), Some(pod)) = (parts.next(), parts.next(), parts.next()) else {
        anyhow::bail!("{flag} {s:?}: expected CLUSTER/NAMESPACE/POD");
    };
    let name = ClusterName::new(cluster)
        .map_err(|e| anyhow::anyhow!("{flag} {s:?}: invalid cluster name {cluster:?}: {e}"))?;
    let Some(c) = state.cluster(&name) else {
        let known: Vec<String> = state.clusters().keys().map(ToString::to_string).collect();
        anyhow::bail!("{flag} {s:?}: cluster {cluster} is not in the mesh (clusters: {known:?})");
    };
    c.state
        .endpoints
        .values()
        .find(|e| e.namespace == ns && e.pod == pod)
        .map(|e| (cluster.to_owned(), e.clone()))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{flag} {s:?}: no endpoint of pod {ns}/{pod} in cluster {cluster} (not running, no IP yet, or host network)"
            )
        })
}

fn render_check(r: &CheckReport) -> String {
    let mut out = String::new();
    if let Some(w) = &r.waiting {
        out.push_str(&format!("Agents program nothing yet: {w}\n"));
    }
    let pod = |p: &PodRef| {
        format!(
            "{}/{}/{} ({}, identity {})",
            p.cluster, p.namespace, p.pod, p.ip, p.identity
        )
    };
    out.push_str(&format!("From:    {}\n", pod(&r.from)));
    out.push_str(&format!("To:      {}\n", pod(&r.to)));
    out.push_str(&format!("Port:    {}/{}\n", r.port, r.protocol));
    out.push_str(&format!(
        "Egress:  {} (in cluster {})\n",
        r.egress.explanation, r.egress.cluster
    ));
    out.push_str(&format!(
        "Ingress: {} (in cluster {})\n",
        r.ingress.explanation, r.ingress.cluster
    ));
    out.push_str(&format!("Verdict: {}\n", r.verdict.to_uppercase()));
    for i in &r.invalid {
        out.push_str(&format!("Rejected by the agent: {i}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::IdentityLabels;
    use mesh_core::model::Identity;
    use mesh_proto::convert::PolicyObject;
    use mesh_proto::keys::policy_name;
    use mesh_proto::state::LOCAL_KINDS;
    use serde_json::json;

    fn east() -> ClusterName {
        ClusterName::new("east").unwrap()
    }

    /// A watch of east's apiserver as an operator sees it: east (id 1) and west (id 2), each
    /// with pods on nodes, and east's policies.
    struct Stream(Watched);

    impl Stream {
        fn new() -> Self {
            let mut w = Watched::default();
            for c in ["east", "west"] {
                for kind in LOCAL_KINDS {
                    w.synced.insert((c.into(), kind as i32));
                }
            }
            Stream(w)
        }

        fn put(&mut self, cluster: &str, kind: pb::Kind, name: String, v: pb::event::Value) {
            self.0
                .objects
                .insert((cluster.into(), kind as i32, name), v);
        }

        /// A pod: its identity (labels as the apiserver builds them) and its endpoint.
        fn pod(
            &mut self,
            cluster: &str,
            local_id: u32,
            pod: &str,
            app: &str,
            ip: &str,
            node: &str,
        ) {
            let cid = if cluster == "east" { 1 } else { 2 };
            let id = IdentityId((cid << 16) | local_id);
            let name = ClusterName::new(cluster).unwrap();
            let labels = IdentityLabels::for_pod_in_namespace(&name, "default", [], [("app", app)]);
            let identity = Identity { id, labels };
            self.put(
                cluster,
                pb::Kind::Identity,
                id.0.to_string(),
                pb::event::Value::Identity((&identity).into()),
            );
            let ep = Endpoint {
                ip: ip.parse().unwrap(),
                identity: id,
                host_ip: None,
                node: node.into(),
                namespace: "default".into(),
                pod: pod.into(),
                named_ports: Vec::new(),
            };
            self.put(
                cluster,
                pb::Kind::Endpoint,
                ip.into(),
                pb::event::Value::Endpoint((&ep).into()),
            );
            let n = mesh_core::Node {
                cluster: name,
                name: node.into(),
                internal_ips: vec![],
                pod_cidrs: vec![],
                stale_since: None,
            };
            self.put(
                cluster,
                pb::Kind::Node,
                node.into(),
                pb::event::Value::Node((&n).into()),
            );
        }

        /// A CiliumNetworkPolicy of east, as the publisher publishes it.
        fn cnp(&mut self, name: &str, spec: serde_json::Value) {
            let object = json!({
                "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                "metadata": {"namespace": "default", "name": name},
                "spec": spec,
            });
            let value = match PolicyObject::parse(object.to_string(), &east()) {
                Ok(p) => pb::Policy::from(&p),
                // An object the agents reject: sent as the fields say.
                Err(_) => pb::Policy {
                    cluster: "east".into(),
                    kind: pb::PolicyKind::CiliumNetworkPolicy as i32,
                    namespace: "default".into(),
                    name: name.into(),
                    object: object.to_string(),
                },
            };
            self.put(
                "east",
                pb::Kind::Policy,
                policy_name(
                    mesh_core::policy::PolicyKind::CiliumNetworkPolicy,
                    Some("default"),
                    name,
                ),
                pb::event::Value::Policy(value),
            );
        }
    }

    /// Cilium's cluster mesh policy example: x-wing (east) may reach rebel-base only in west.
    fn mesh() -> Stream {
        let mut s = Stream::new();
        s.pod("east", 300, "x-wing", "x-wing", "10.1.0.10", "e1");
        s.pod("east", 301, "tie-fighter", "tie-fighter", "10.1.0.11", "e1");
        s.pod(
            "east",
            302,
            "rebel-base-east",
            "rebel-base",
            "10.1.1.20",
            "e2",
        );
        s.pod(
            "west",
            300,
            "rebel-base-west",
            "rebel-base",
            "10.2.0.20",
            "w1",
        );
        s.cnp(
            "x-wing-to-west",
            json!({
                "endpointSelector": {"matchLabels": {"app": "x-wing"}},
                "egress": [{
                    "toEndpoints": [{"matchLabels": {
                        "app": "rebel-base", "io.cilium.k8s.policy.cluster": "west"}}],
                    "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]
                }]
            }),
        );
        s
    }

    fn run_check(s: &Stream, from: &str, to: &str) -> CheckReport {
        check(&s.0, &east(), from, to, "80/TCP").unwrap()
    }

    #[test]
    fn a_cluster_label_allows_the_remote_backend_only() {
        let s = mesh();
        let r = run_check(&s, "east/default/x-wing", "west/default/rebel-base-west");
        let egress = r.egress.decision.as_ref().expect("egress is east's");
        assert_eq!(egress.verdict, Verdict::Allow);
        let Reason::Rule(rule) = &egress.reason else {
            panic!("{egress:?}")
        };
        assert_eq!(rule.policy.object(), "default/x-wing-to-west");
        assert_eq!(rule.path(), "spec.egress[0]");
        // West's ingress is west's to decide: never served to east's readers.
        assert_eq!(r.ingress.decision, None);
        assert!(
            r.ingress.explanation.contains("cluster west"),
            "{}",
            r.ingress.explanation
        );
        assert_eq!((r.verdict.as_str(), r.exit_code()), ("unknown", 2));

        // The same service's local backend: default deny, naming the policy.
        let r = run_check(&s, "east/default/x-wing", "east/default/rebel-base-east");
        let egress = r.egress.decision.as_ref().unwrap();
        assert_eq!(egress.verdict, Verdict::Deny);
        let Reason::DefaultDeny { enforced_by } = &egress.reason else {
            panic!("{egress:?}")
        };
        assert_eq!(enforced_by[0].object(), "default/x-wing-to-west");
        assert_eq!(
            r.ingress.decision.as_ref().unwrap().reason,
            Reason::NotEnforced
        );
        assert_eq!((r.verdict.as_str(), r.exit_code()), ("denied", 1));
        let text = render_check(&r);
        assert!(
            text.contains(
                "deny by default deny, enforced by CiliumNetworkPolicy east/default/x-wing-to-west"
            ),
            "{text}"
        );
        assert!(text.contains("Verdict: DENIED"), "{text}");

        // Another port than the rule's: denied too.
        let r = check(
            &s.0,
            &east(),
            "east/default/x-wing",
            "west/default/rebel-base-west",
            "81/TCP",
        )
        .unwrap();
        assert_eq!(r.egress.decision.unwrap().verdict, Verdict::Deny);
    }

    #[test]
    fn deny_beats_allow_and_unselected_pods_allow_everything() {
        let mut s = mesh();
        let r = run_check(
            &s,
            "east/default/tie-fighter",
            "east/default/rebel-base-east",
        );
        assert_eq!((r.verdict.as_str(), r.exit_code()), ("allowed", 0));
        s.cnp(
            "rebel-base-ingress",
            json!({
                "endpointSelector": {"matchLabels": {"app": "rebel-base"}},
                "ingress": [{"fromEndpoints": [{}]}],
                "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"app": "tie-fighter"}}]}]
            }),
        );
        let r = run_check(
            &s,
            "east/default/tie-fighter",
            "east/default/rebel-base-east",
        );
        let ingress = r.ingress.decision.as_ref().unwrap();
        assert_eq!(ingress.verdict, Verdict::Deny);
        let Reason::Rule(rule) = &ingress.reason else {
            panic!("{ingress:?}")
        };
        assert_eq!(
            (rule.policy.object().as_str(), rule.path().as_str()),
            ("default/rebel-base-ingress", "spec.ingressDeny[0]")
        );
        assert_eq!(r.exit_code(), 1);
        // x-wing is not denied on ingress (the allow rule), only by its own egress policy.
        let r = run_check(&s, "east/default/x-wing", "east/default/rebel-base-east");
        assert_eq!(r.ingress.decision.unwrap().verdict, Verdict::Allow);
    }

    #[test]
    fn an_invalid_policy_is_reported_and_the_others_keep_working() {
        let mut s = mesh();
        s.cnp(
            "broken",
            json!({"endpointSelector": {},
                   "ingress": [{"toPorts": [{"ports": [{"port": "http x"}]}]}]}),
        );
        let r = run_check(&s, "east/default/x-wing", "east/default/rebel-base-east");
        assert_eq!(r.egress.decision.unwrap().verdict, Verdict::Deny);
        assert_eq!(
            r.ingress.decision.unwrap().reason,
            Reason::NotEnforced,
            "the broken policy (selecting everything) is not applied"
        );
        assert_eq!(r.invalid.len(), 1, "{:?}", r.invalid);
        assert!(
            r.invalid[0].contains("spec.ingress[0].toPorts[0].ports[0].port"),
            "{:?}",
            r.invalid
        );
        let l = list(&s.0, &east(), None).unwrap();
        assert_eq!(l.policies.len(), 1);
        assert_eq!(l.invalid, r.invalid);
    }

    #[test]
    fn bad_flags_name_the_problem() {
        let s = mesh();
        let err = |from: &str, to: &str, port: &str| {
            check(&s.0, &east(), from, to, port)
                .unwrap_err()
                .to_string()
        };
        let e = err(
            "east/default/nobody",
            "west/default/rebel-base-west",
            "80/TCP",
        );
        assert!(
            e.contains("--from") && e.contains("default/nobody") && e.contains("east"),
            "{e}"
        );
        let e = err("east/default/x-wing", "north/default/x", "80/TCP");
        assert!(e.contains("--to") && e.contains("north"), "{e}");
        let e = err(
            "east/default/x-wing",
            "west/default/rebel-base-west",
            "80/ICMP",
        );
        assert!(e.contains("ICMP"), "{e}");
        let e = err("east/default/x-wing", "west/default/rebel-base-west", "0");
        assert!(e.contains("1..=65535"), "{e}");
        let e = err("east/x-wing", "west/default/rebel-base-west", "80");
        assert!(e.contains("CLUSTER/NAMESPACE/POD"), "{e}");
        let e = list(&s.0, &east(), Some("w1")).unwrap_err().to_string();
        assert!(e.contains("w1") && e.contains("e1"), "{e}");
    }

    #[test]
    fn list_resolves_each_selector_in_every_cluster() {
        let mut s = mesh();
        s.cnp(
            "rebel-base-ingress",
            json!({
                "endpointSelector": {"matchLabels": {"app": "rebel-base"}},
                "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "x-wing"}}]}]
            }),
        );
        let l = list(&s.0, &east(), None).unwrap();
        assert_eq!(l.waiting, None);
        let names: Vec<&str> = l.policies.iter().map(|p| p.policy.as_str()).collect();
        assert_eq!(
            names,
            ["default/rebel-base-ingress", "default/x-wing-to-west"]
        );
        let xwing = &l.policies[1].specs[0];
        assert_eq!(xwing.selects, [(1 << 16) | 300], "x-wing in east only");
        let rule = &xwing.rules[0];
        assert_eq!(
            (rule.rule.as_str(), rule.verdict),
            ("spec.egress[0]", Verdict::Allow)
        );
        assert_eq!(rule.ports, ["80/TCP"]);
        assert_eq!(
            rule.peers[0].identities,
            BTreeMap::from([("west".to_string(), vec![(2 << 16) | 300])]),
            "the cluster label widens the selector to west, and only west"
        );
        // Without a cluster label: the local cluster only (and the policy's namespace).
        let ingress = &l.policies[0].specs[0];
        assert_eq!(ingress.selects, [(1 << 16) | 302]);
        assert_eq!(
            ingress.rules[0].peers[0].identities,
            BTreeMap::from([("east".to_string(), vec![(1 << 16) | 300])])
        );
        let text = render_list(&l);
        assert!(text.contains("spec.egress[0] allow to [80/TCP]"), "{text}");
        assert!(
            text.contains(&format!("-> west: {}", (2 << 16) | 300)),
            "{text}"
        );

        // On node e2 only rebel-base-east's policy applies.
        let l = list(&s.0, &east(), Some("e2")).unwrap();
        let names: Vec<&str> = l.policies.iter().map(|p| p.policy.as_str()).collect();
        assert_eq!(names, ["default/rebel-base-ingress"]);
        let json = serde_json::to_value(&l).unwrap();
        assert_eq!(json["node"], "e2");
        assert_eq!(
            json["policies"][0]["specs"][0]["selects"][0],
            (1 << 16) | 302
        );
    }

    #[test]
    fn without_the_policy_marker_the_agent_waits_and_says_so() {
        let mut s = mesh();
        s.0.synced
            .remove(&("east".to_string(), pb::Kind::Policy as i32));
        let l = list(&s.0, &east(), None).unwrap();
        assert!(
            l.waiting.as_deref().unwrap_or_default().contains("east"),
            "{:?}",
            l.waiting
        );
    }

    // ===== service explain --from =====

    /// [`mesh`] with rebel-base global in both clusters (ClusterIP 10.101.0.20 in east, port
    /// 80 -> 80), the clusters' configs (so the agent programs their ipcache), and kube-dns,
    /// a local-only service of east.
    fn mesh_with_services() -> Stream {
        let mut s = mesh();
        for (c, id) in [("east", 1u32), ("west", 2)] {
            s.put(
                c,
                pb::Kind::Config,
                String::new(),
                pb::event::Value::Config(pb::ClusterConfig {
                    name: c.into(),
                    id,
                    pod_cidrs: vec![format!("10.{id}.0.0/16")],
                    ..Default::default()
                }),
            );
        }
        s.pod("east", 303, "coredns", "kube-dns", "10.1.0.53", "e1");
        let svc =
            |cluster: &str, name: &str, global: bool, vip: &str, port: u16, backends: &[&str]| {
                let svc = mesh_core::GlobalService {
                    cluster: ClusterName::new(cluster).unwrap(),
                    namespace: "default".into(),
                    name: name.into(),
                    global,
                    shared: true,
                    affinity: mesh_core::Affinity::None,
                    internal_traffic_policy: mesh_core::TrafficPolicy::Cluster,
                    ports: vec![mesh_core::ServicePort {
                        name: "p".into(),
                        protocol: Protocol::Tcp,
                        port,
                    }],
                    frontends: vec![vip.parse().unwrap()],
                    backends: backends
                        .iter()
                        .map(|ip| mesh_core::Backend {
                            ip: ip.parse().unwrap(),
                            ports: vec![mesh_core::ServicePort {
                                name: "p".into(),
                                protocol: Protocol::Tcp,
                                port,
                            }],
                            node: "n".into(),
                            zone: String::new(),
                            conditions: mesh_core::BackendConditions {
                                ready: true,
                                serving: true,
                                terminating: false,
                            },
                        })
                        .collect(),
                };
                (svc.key(), pb::event::Value::Service((&svc).into()))
            };
        for (cluster, name, global, vip, port, backends) in [
            (
                "east",
                "rebel-base",
                true,
                "10.101.0.20",
                80,
                &["10.1.1.20"][..],
            ),
            (
                "west",
                "rebel-base",
                true,
                "10.102.0.20",
                80,
                &["10.2.0.20"][..],
            ),
            (
                "east",
                "kube-dns",
                false,
                "10.101.0.10",
                53,
                &["10.1.0.53"][..],
            ),
        ] {
            let (key, value) = svc(cluster, name, global, vip, port, backends);
            s.put(cluster, pb::Kind::Service, key, value);
        }
        s
    }

    fn gate() -> mesh_core::select::GateInput<'static> {
        static EAST: std::sync::OnceLock<ClusterName> = std::sync::OnceLock::new();
        agent_gate(EAST.get_or_init(east))
    }

    #[test]
    fn explain_from_shows_which_backends_the_clients_egress_allows() {
        let s = mesh_with_services();
        let e = crate::service::explain_from(
            &s.0,
            "",
            "default/rebel-base",
            &gate(),
            "east/default/x-wing",
            &crate::service::Quarantines::NotRead("not asked".into()),
        )
        .unwrap();
        assert_eq!(e.node, "e1", "the client's node by default");
        let f = &e.programmed[0];
        let eg = f.egress.as_ref().unwrap();
        let verdicts: Vec<(String, Verdict)> = eg
            .backends
            .iter()
            .map(|b| (b.cluster.clone(), b.decision.verdict))
            .collect();
        assert_eq!(
            verdicts,
            [
                ("east".into(), Verdict::Deny),
                ("west".into(), Verdict::Allow)
            ]
        );
        assert_eq!(eg.result, "allowed");
        assert!(
            eg.backends[1]
                .explanation
                .contains("CiliumNetworkPolicy east/default/x-wing-to-west spec.egress[0]"),
            "{:?}",
            eg.backends[1]
        );
        let text = crate::service::render_explain(&e);
        assert!(text.contains("default deny"), "{text}");
        assert!(
            text.contains("connections go to the allowed backend west/10.2.0.20:80 (1 denied"),
            "{text}"
        );
        // A client no policy selects: any backend.
        let e = crate::service::explain_from(
            &s.0,
            "",
            "default/rebel-base",
            &gate(),
            "east/default/tie-fighter",
            &crate::service::Quarantines::NotRead("not asked".into()),
        )
        .unwrap();
        assert_eq!(e.programmed[0].egress.as_ref().unwrap().result, "any");
        // x-wing to the local-only kube-dns (no DNS allowance in this policy): refused.
        let e = crate::service::explain_from(
            &s.0,
            "",
            "default/kube-dns",
            &gate(),
            "east/default/x-wing",
            &crate::service::Quarantines::NotRead("not asked".into()),
        )
        .unwrap();
        assert!(!e.global);
        let eg = e.programmed[0].egress.as_ref().unwrap();
        assert_eq!(eg.result, "refused");
        assert_eq!(
            eg.backends[0].identity,
            (1 << 16) | 303,
            "the backend pod's identity"
        );
        // A client of another cluster: its policies are not served here.
        let err = crate::service::explain_from(
            &s.0,
            "",
            "default/rebel-base",
            &gate(),
            "west/default/rebel-base-west",
            &crate::service::Quarantines::NotRead("not asked".into()),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("cluster west's apiserver"), "{err}");
    }

    /// `service explain --from` and the agent agree: for every frontend the agent programs
    /// (`desired::compute`), each backend's identity from the agent's ipcache and the
    /// verdict of the agent's policy tables (`decide_tables`, what the datapath looks up)
    /// are what explain reports, for several clients and policies.
    #[test]
    fn explain_from_agrees_with_the_agents_maps() {
        use mesh_agent::desired;
        use mesh_core::policy::{decide_tables, policy_tables};
        let mut s = mesh_with_services();
        let policies = [
            json!({}),
            json!({"endpointSelector": {"matchLabels": {"app": "tie-fighter"}},
                   "egressDeny": [{"toEndpoints": [{"matchLabels": {
                       "io.cilium.k8s.policy.cluster": "west"}}]}]}),
            json!({"endpointSelector": {},
                   "egress": [{"toEndpoints": [{"matchLabels": {
                       "io.kubernetes.pod.namespace": "default", "app": "kube-dns"}}],
                       "toPorts": [{"ports": [{"port": "53", "protocol": "ANY"}]}]}]}),
            json!({"endpointSelector": {"matchLabels": {"app": "tie-fighter"}},
                   "egress": [{"toCIDR": ["10.2.0.0/16"]}]}),
        ];
        for (i, spec) in policies.into_iter().enumerate() {
            if i > 0 {
                s.cnp(&format!("extra-{i}"), spec);
            }
            let (state, invalid) = crate::service::agent_state(&s.0, &east());
            assert!(invalid.is_empty(), "{invalid:?}");
            let clusters = state.programmable(&gate()).unwrap();
            let view = state
                .compile_policy(clusters.keys(), &mut CidrIdentities::new())
                .unwrap()
                .unwrap();
            let tables = policy_tables(&view.compiled);
            for client in ["x-wing", "tie-fighter", "rebel-base-east"] {
                let from = format!("east/default/{client}");
                let (_, ep) = find_pod(&state, "--from", &from).unwrap();
                let (agent, _) = desired::compute(&clusters, &east(), &ep.node);
                // The agent's ipcache: its builder, endpoints and nodes, the CIDRs under them.
                let mut builder = mesh_agent::ipcache::IpcacheBuilder::new();
                builder.update(&clusters, |_| None, &east(), &ep.node);
                builder.set_cidrs(
                    view.identities
                        .cidrs()
                        .map(|(id, net)| (net, id.0))
                        .collect(),
                );
                let ipcache = |ip: std::net::IpAddr| {
                    builder
                        .ipcache()
                        .iter()
                        .filter(|(net, _)| net.contains(&ip))
                        .max_by_key(|(net, _)| net.prefix_len())
                        .map_or(mesh_core::identity::RESERVED_WORLD, |(_, v)| v.identity)
                };
                for svc in ["default/rebel-base", "default/kube-dns"] {
                    let e = crate::service::explain_from(
                        &s.0,
                        "",
                        svc,
                        &gate(),
                        &from,
                        &crate::service::Quarantines::NotRead("not asked".into()),
                    )
                    .unwrap();
                    for f in &e.programmed {
                        let key = agent
                            .services
                            .iter()
                            .find(|(k, _)| {
                                mesh_core::select::Frontend {
                                    vip: k.vip,
                                    port: k.port,
                                    protocol: k.proto,
                                }
                                .to_string()
                                    == f.frontend
                            })
                            .unwrap_or_else(|| panic!("{} not programmed", f.frontend));
                        let want: Vec<(std::net::IpAddr, u16, u32, Verdict)> = key
                            .1
                            .iter()
                            .map(|b| {
                                let id = ipcache(b.ip);
                                let (v, _) = decide_tables(
                                    &tables,
                                    ep.identity,
                                    Direction::Egress,
                                    IdentityId(id),
                                    b.proto,
                                    b.port,
                                );
                                (b.ip, b.port, id, v)
                            })
                            .collect();
                        let got: Vec<(std::net::IpAddr, u16, u32, Verdict)> = f
                            .egress
                            .as_ref()
                            .unwrap()
                            .backends
                            .iter()
                            .map(|b| (b.ip, b.port, b.identity, b.decision.verdict))
                            .collect();
                        assert_eq!(got, want, "policy {i}, {client} -> {svc} {}", f.frontend);
                    }
                }
            }
        }
    }
}

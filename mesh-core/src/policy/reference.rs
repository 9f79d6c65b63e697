//! The reference semantics: a direct, naive evaluation of the policies for one flow.
//!
//! This is the definition `compile` + `decide` must agree with (a property test checks it on
//! random inputs). It is slow (every policy, every rule, every flow) and obviously follows
//! DESIGN.md section 14; use `compile` and `decide` everywhere else.

use crate::identity::{LABEL_CLUSTER, RESERVED_HOST};
use crate::{ClusterName, IdentityId, Protocol};

use super::compile::{Decision, Reason};
use super::identities::{IdentityKind, IdentityTable};
use super::model::*;

/// One flow, seen from the local endpoint's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    /// The endpoint whose policy applies (destination on ingress, source on egress).
    pub local: IdentityId,
    pub direction: Direction,
    /// The other end (source on ingress, destination on egress).
    pub remote: IdentityId,
    pub protocol: Protocol,
    /// Destination port.
    pub port: u16,
}

/// Evaluates the policies of `local_cluster` for one flow, straight from the model.
pub fn evaluate(
    policies: &PolicySet,
    identities: &IdentityTable,
    local_cluster: &ClusterName,
    flow: &Flow,
) -> Decision {
    // Kubelet probes come from the node: ingress from the local host always passes.
    if flow.direction == Direction::Ingress && flow.remote.0 == RESERVED_HOST {
        return Decision {
            verdict: Verdict::Allow,
            reason: Reason::LocalHost,
        };
    }
    let IdentityKind::Endpoint(local_labels) = identities.kind(flow.local) else {
        return not_enforced();
    };
    if local_labels.get(LABEL_CLUSTER) != Some(local_cluster.as_str()) {
        return not_enforced();
    }
    let mut enforced_by: Vec<PolicyRef> = Vec::new();
    let mut deny: Option<RuleRef> = None;
    let mut allow: Option<RuleRef> = None;
    for policy in policies
        .iter()
        .filter(|p| &p.reference.cluster == local_cluster)
    {
        for spec in &policy.specs {
            let Subject::Endpoints(subject) = &spec.subject else {
                continue;
            };
            if !subject.matches_with(|k| local_labels.get(k)) {
                continue;
            }
            let rules = spec.direction(flow.direction);
            if rules.default_deny {
                enforced_by.push(policy.reference.clone());
            }
            for (section, list) in [(Verdict::Allow, &rules.allow), (Verdict::Deny, &rules.deny)] {
                for (i, rule) in list.iter().enumerate() {
                    if !rule_matches(rule, section, identities, local_cluster, flow) {
                        continue;
                    }
                    let r = RuleRef {
                        policy: policy.reference.clone(),
                        spec: spec.source,
                        direction: flow.direction,
                        section,
                        index: i as u32,
                    };
                    let best = match section {
                        Verdict::Allow => &mut allow,
                        Verdict::Deny => &mut deny,
                    };
                    if best.as_ref().is_none_or(|b| r < *b) {
                        *best = Some(r);
                    }
                }
            }
        }
    }
    enforced_by.sort();
    enforced_by.dedup();
    if let Some(r) = deny {
        return Decision {
            verdict: Verdict::Deny,
            reason: Reason::Rule(r),
        };
    }
    if enforced_by.is_empty() {
        return not_enforced();
    }
    match allow {
        Some(r) => Decision {
            verdict: Verdict::Allow,
            reason: Reason::Rule(r),
        },
        None => Decision {
            verdict: Verdict::Deny,
            reason: Reason::DefaultDeny { enforced_by },
        },
    }
}

fn not_enforced() -> Decision {
    Decision {
        verdict: Verdict::Allow,
        reason: Reason::NotEnforced,
    }
}

pub(crate) fn rule_matches(
    rule: &Rule,
    section: Verdict,
    identities: &IdentityTable,
    local_cluster: &ClusterName,
    flow: &Flow,
) -> bool {
    if rule.unenforceable.is_some() {
        // Fail closed: allows nothing, denies everything.
        return section == Verdict::Deny;
    }
    let peer_ok = match &rule.peers {
        Peers::Any => true,
        Peers::List(peers) => peers
            .iter()
            .any(|p| peer_matches(p, identities, local_cluster, flow.remote)),
    };
    if !peer_ok {
        return false;
    }
    if rule.ports.is_empty() {
        return true;
    }
    // Named ports belong to the destination: the local endpoint on ingress, the peer on
    // egress.
    let owner = match flow.direction {
        Direction::Ingress => flow.local,
        Direction::Egress => flow.remote,
    };
    rule.ports.iter().any(|p| {
        let proto_ok = p.protocol.is_none_or(|x| x == flow.protocol);
        match &p.ports {
            PortMatch::Range(r) => proto_ok && r.contains(flow.port),
            PortMatch::Named(name) => identities.named_ports(owner).iter().any(|np| {
                &np.name == name
                    && np.port == flow.port
                    && np.protocol == flow.protocol
                    && p.protocol.is_none_or(|x| x == np.protocol)
            }),
        }
    })
}

fn peer_matches(
    peer: &Peer,
    identities: &IdentityTable,
    local_cluster: &ClusterName,
    remote: IdentityId,
) -> bool {
    let kind = identities.kind(remote);
    match peer {
        Peer::Endpoints(sel) => match kind {
            IdentityKind::Endpoint(labels) => sel.matches_with(|k| labels.get(k)),
            _ => false,
        },
        Peer::Entity(Entity::All) => true,
        Peer::Entity(Entity::World) => {
            matches!(kind, IdentityKind::World | IdentityKind::Cidr(_))
        }
        Peer::Entity(Entity::Host) => kind == IdentityKind::Host,
        Peer::Entity(Entity::RemoteNode) => kind == IdentityKind::RemoteNode,
        Peer::Entity(Entity::Cluster) => match kind {
            IdentityKind::Host | IdentityKind::RemoteNode => true,
            IdentityKind::Endpoint(labels) => {
                labels.get(LABEL_CLUSTER) == Some(local_cluster.as_str())
            }
            _ => false,
        },
        Peer::Cidr(c) => match kind {
            IdentityKind::Cidr(prefix) => c.covers(&prefix),
            _ => false,
        },
    }
}

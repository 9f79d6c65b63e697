//! Policy-aware backend choice (DESIGN.md section 14): which backends of one frontend a
//! client's egress policy lets it reach, and so where its connections go.
//!
//! The datapath (`bpf/sock_lb.bpf.c`, `select_backend`) does this per connect: when the
//! client's egress is in force it probes the frontend's slots from a random one until a
//! backend the policy allows, and refuses the connect (`EPERM`) when none is. This is that
//! decision as a pure function of the compiled policy, for `meshctl service explain --from`:
//! each backend's [`Decision`] comes from [`decide`] (which the agent's tables reproduce,
//! `decide_tables`, property-tested), and the [`Outcome`] says which of them are used.

use serde::Serialize;

use super::compile::{CompiledPolicy, Decision, Reason, decide};
use super::model::{Direction, Verdict};
use crate::{IdentityId, Protocol};

/// Where a client's connections to one frontend go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Outcome {
    /// The client's egress is not enforced and no deny rule applies: any backend, as
    /// without policy.
    AnyBackend,
    /// The client's connections go only to these backends (indices into the input, in
    /// order); the others are denied and skipped.
    Allowed { backends: Vec<usize> },
    /// Every backend is denied (or there is none): the connect is refused at once.
    Refused,
}

/// The egress decision for each backend of a frontend and the resulting [`Outcome`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendChoice {
    /// One per input backend, in order.
    pub decisions: Vec<Decision>,
    pub outcome: Outcome,
}

/// Decides `client`'s egress to each backend `(identity, target port)` of a frontend of
/// `protocol` (the identity is the backend address's, as the ipcache gives it: world when
/// unknown). Backends may be in any cluster.
pub fn choose_backends(
    compiled: &CompiledPolicy,
    client: IdentityId,
    protocol: Protocol,
    backends: &[(IdentityId, u16)],
) -> BackendChoice {
    let decisions: Vec<Decision> = backends
        .iter()
        .map(|&(remote, port)| decide(compiled, client, Direction::Egress, remote, protocol, port))
        .collect();
    let outcome = if decisions.is_empty() {
        Outcome::Refused
    } else if decisions
        .iter()
        .all(|d| d.verdict == Verdict::Allow && d.reason == Reason::NotEnforced)
    {
        Outcome::AnyBackend
    } else {
        let allowed: Vec<usize> = decisions
            .iter()
            .enumerate()
            .filter(|(_, d)| d.verdict == Verdict::Allow)
            .map(|(i, _)| i)
            .collect();
        if allowed.is_empty() {
            Outcome::Refused
        } else {
            Outcome::Allowed { backends: allowed }
        }
    };
    BackendChoice { decisions, outcome }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{IdentityTable, PolicySet, compile, parse_policy};
    use crate::{ClusterName, IdentityLabels};

    fn cluster(s: &str) -> ClusterName {
        ClusterName::new(s).unwrap()
    }

    /// x-wing (east) may reach rebel-base only in west: Cilium's cluster-mesh example.
    fn setup(spec: serde_json::Value) -> (CompiledPolicy, [IdentityId; 3]) {
        let east = cluster("east");
        let mut ids = IdentityTable::new();
        let mk = |c: &str, local: u32, app: &str| {
            let cid = if c == "east" { 1 } else { 2 };
            let id = IdentityId((cid << 16) | local);
            let labels =
                IdentityLabels::for_pod_in_namespace(&cluster(c), "demo", [], [("app", app)]);
            (id, labels)
        };
        let xwing = mk("east", 300, "x-wing");
        let east_rb = mk("east", 301, "rebel-base");
        let west_rb = mk("west", 300, "rebel-base");
        for (id, labels) in [&xwing, &east_rb, &west_rb] {
            ids.insert(*id, labels.clone());
        }
        let object = serde_json::json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"namespace": "demo", "name": "p"},
            "spec": spec,
        });
        let mut set = PolicySet::new();
        set.upsert(parse_policy(&object, &east).unwrap());
        (compile(&set, &ids, &east), [xwing.0, east_rb.0, west_rb.0])
    }

    #[test]
    fn connections_go_to_allowed_backends_only_and_fail_when_none_is() {
        let (compiled, [xwing, east_rb, west_rb]) = setup(serde_json::json!({
            "endpointSelector": {"matchLabels": {"app": "x-wing"}},
            "egress": [{"toEndpoints": [{"matchLabels":
                {"app": "rebel-base", "io.cilium.k8s.policy.cluster": "west"}}],
                "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}]
        }));
        let both = [(east_rb, 8080), (west_rb, 8080)];
        let c = choose_backends(&compiled, xwing, Protocol::Tcp, &both);
        assert_eq!(c.outcome, Outcome::Allowed { backends: vec![1] });
        assert_eq!(c.decisions[0].verdict, Verdict::Deny);
        assert!(matches!(c.decisions[0].reason, Reason::DefaultDeny { .. }));
        assert!(matches!(c.decisions[1].reason, Reason::Rule(_)));
        // Only the local backend left: refused.
        let c = choose_backends(&compiled, xwing, Protocol::Tcp, &both[..1]);
        assert_eq!(c.outcome, Outcome::Refused);
        // Another port of the same backends: refused too.
        let c = choose_backends(&compiled, xwing, Protocol::Tcp, &[(west_rb, 81)]);
        assert_eq!(c.outcome, Outcome::Refused);
        // A client no policy selects: any backend.
        let c = choose_backends(&compiled, east_rb, Protocol::Tcp, &both);
        assert_eq!(c.outcome, Outcome::AnyBackend);
        // No backend at all: refused.
        let c = choose_backends(&compiled, east_rb, Protocol::Tcp, &[]);
        assert_eq!(c.outcome, Outcome::Refused);
    }

    #[test]
    fn a_deny_without_default_deny_still_skips_the_denied_backend() {
        let (compiled, [xwing, east_rb, west_rb]) = setup(serde_json::json!({
            "endpointSelector": {"matchLabels": {"app": "x-wing"}},
            "enableDefaultDeny": {"egress": false},
            "egressDeny": [{"toEndpoints": [{"matchLabels": {"app": "rebel-base"}}]}]
        }));
        let c = choose_backends(
            &compiled,
            xwing,
            Protocol::Tcp,
            &[(east_rb, 8080), (west_rb, 8080)],
        );
        // The deny selects only east's (no cluster label: local cluster only).
        assert_eq!(c.outcome, Outcome::Allowed { backends: vec![1] });
    }
}

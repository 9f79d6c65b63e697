//! Network policy in the datapath (DESIGN.md section 14): from the compiled policy to the
//! policy maps.
//!
//! Each reconcile, the agent compiles the local cluster's policies against the identities of
//! the synced clusters (`MeshState::compile_policy`, the function `meshctl policy check`
//! calls), turns the result into the datapath's tables (`mesh_core::policy::policy_tables`,
//! which `meshctl bpf policy list` reads back), adds which network namespace is which local
//! endpoint ([`NetnsScanner`](crate::datapath::NetnsScanner)), and writes the difference
//! (`mesh_maps::policy::plan_policy`: new entries before the endpoints that use them, stale
//! ones after, so no update opens a window). Like the service maps, the policy maps are
//! pinned: an agent restart keeps enforcing the last state, and the first reconcile after it
//! reads them back and writes only the difference.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::IpNet;
use mesh_core::ClusterName;
use mesh_core::policy::{CidrIdentities, PolicyTables, Verdict};
use mesh_maps::layout;
use mesh_maps::policy::{PolicyDump, PolicyEntryKey, PolicyEntryValue, PolicyNetns};
use mesh_proto::state::MeshState;

use crate::datapath::{self, Datapath, NetnsInfo};

/// The local endpoints of this node: IPv4 address -> identity (ipcache entries of this
/// node's pods, as the agent programs them: the local cluster's entries, which win every
/// prefix they hold).
pub fn local_endpoints<'a>(
    ipcache: impl IntoIterator<Item = (&'a IpNet, &'a crate::desired::IpcacheInfo)>,
) -> BTreeMap<Ipv4Addr, u32> {
    ipcache
        .into_iter()
        .filter(|(_, info)| info.local_node && info.identity != mesh_core::identity::RESERVED_HOST)
        .filter_map(|(net, info)| match net {
            IpNet::V4(n) if n.prefix_len() == 32 => Some((n.addr(), info.identity)),
            _ => None,
        })
        .collect()
}

/// The policy maps' desired content: `tables`, and each scanned namespace whose address is a
/// local endpoint's, mapped to that endpoint's identity. Returns the endpoints no namespace
/// was found for.
pub fn desired_policy(
    tables: &PolicyTables,
    namespaces: &[NetnsInfo],
    endpoints: &BTreeMap<Ipv4Addr, u32>,
) -> (PolicyDump, Vec<Ipv4Addr>) {
    let mut out = PolicyDump::default();
    for (id, ep) in &tables.endpoints {
        let mut flags = 0;
        if ep.ingress_enforced {
            flags |= layout::POLICY_F_INGRESS_ENFORCED;
        }
        if ep.egress_enforced {
            flags |= layout::POLICY_F_EGRESS_ENFORCED;
        }
        out.endpoints.insert(
            id.0,
            layout::PolicyEndpoint {
                ingress_table: ep.ingress_table,
                egress_table: ep.egress_table,
                flags,
            },
        );
    }
    for (k, v) in &tables.entries {
        out.entries.insert(
            PolicyEntryKey {
                table: k.table,
                remote: k.remote,
                proto: k.proto,
                port: k.port,
                prefix_len: k.prefix_len,
            },
            PolicyEntryValue {
                rule: v.rule,
                rank: v.rank,
                verdict: match v.verdict {
                    Verdict::Allow => layout::VERDICT_ALLOW,
                    Verdict::Deny => layout::VERDICT_DENY,
                },
            },
        );
    }
    for (id, rule) in &tables.rules {
        out.rules.insert(*id, rule.to_string());
    }
    let mut found = std::collections::BTreeSet::new();
    for ns in namespaces {
        // A pod namespace has one address; the first that is a local endpoint names it.
        if let Some((ip, identity)) = ns
            .addrs
            .iter()
            .find_map(|ip| endpoints.get(ip).map(|id| (*ip, *id)))
        {
            found.insert(ip);
            out.netns.insert(ns.cookie, PolicyNetns { identity, ip });
        }
    }
    let missing = endpoints
        .keys()
        .filter(|ip| !found.contains(*ip))
        .copied()
        .collect();
    (out, missing)
}

/// The outcome of a policy compilation, as the agent programs it.
#[derive(Debug, Clone)]
pub enum Compiled {
    /// The datapath's tables, and the CIDR identities of the prefixes the policies name
    /// (prefix -> identity), which join the ipcache.
    Tables {
        tables: Arc<PolicyTables>,
        cidrs: BTreeMap<IpNet, u32>,
    },
    /// The CIDR identities ran out.
    Failed(String),
    /// No local cluster (a reader of services only).
    NoLocalCluster,
}

/// What a compilation depends on: the local cluster's policies and, of every programmed
/// cluster, its identities and its endpoints that declare named ports (the clusters'
/// generations of those parts).
#[derive(Debug, Clone, PartialEq, Eq)]
struct PolicyInputs {
    policies: Option<u64>,
    clusters: Vec<(ClusterName, u64, u64)>,
}

/// The last compilation and its inputs: the agent compiles again only when they changed
/// (under the scale profile's churn, pods replaced under the same identities change none).
#[derive(Debug, Default)]
pub struct PolicyCache {
    last: Option<(PolicyInputs, Compiled)>,
}

// === impl PolicyCache ===

impl PolicyCache {
    /// `MeshState::compile_policy` against the identities of `clusters`, or the last result
    /// if its inputs did not change. A failure is not kept: it is tried again.
    pub fn compile<S>(
        &mut self,
        state: &MeshState,
        clusters: &BTreeMap<ClusterName, S>,
        cidr: &mut CidrIdentities,
    ) -> Compiled {
        let generations = |name: &ClusterName| state.cluster(name).map(|c| c.generations);
        let inputs = PolicyInputs {
            policies: state
                .local_cluster()
                .and_then(generations)
                .map(|g| g.policies),
            clusters: clusters
                .keys()
                .map(|name| {
                    let g = generations(name).unwrap_or_default();
                    (name.clone(), g.identities, g.named_ports)
                })
                .collect(),
        };
        if let Some((last, compiled)) = &self.last
            && *last == inputs
        {
            return compiled.clone();
        }
        let compiled = match state.compile_policy(clusters.keys(), cidr) {
            Some(Ok(view)) => Compiled::Tables {
                tables: Arc::new(mesh_core::policy::policy_tables(&view.compiled)),
                cidrs: view
                    .identities
                    .cidrs()
                    .map(|(id, net)| (net, id.0))
                    .collect(),
            },
            Some(Err(e)) => Compiled::Failed(e.to_string()),
            None => Compiled::NoLocalCluster,
        };
        self.last = match compiled {
            Compiled::Failed(_) => None,
            _ => Some((inputs, compiled.clone())),
        };
        compiled
    }
}

/// Keeps the policy maps equal to a desired content, with a mirror like the service
/// reconciler's: read from the kernel on the first reconcile and after a failure.
#[derive(Debug, Default)]
pub struct PolicyReconciler {
    mirror: Option<PolicyDump>,
}

// === impl PolicyReconciler ===

impl PolicyReconciler {
    pub fn invalidate(&mut self) {
        self.mirror = None;
    }

    /// The maps as last read or written.
    pub fn mirror(&self) -> Option<&PolicyDump> {
        self.mirror.as_ref()
    }

    /// Writes the difference; returns the operations applied, by kind.
    pub fn reconcile(
        &mut self,
        dp: &mut Datapath,
        desired: &PolicyDump,
    ) -> Result<BTreeMap<&'static str, u64>, datapath::Error> {
        let mut current = match self.mirror.take() {
            Some(m) => m,
            None => dp.policy_dump()?,
        };
        let ops = mesh_maps::policy::plan_policy(&current, desired);
        let mut counts = BTreeMap::new();
        for op in &ops {
            // On failure the mirror stays `None`: the next attempt re-reads the maps.
            dp.apply_policy(op)?;
            mesh_maps::policy::apply_to_dump(&mut current, op);
            *counts.entry(op.kind()).or_default() += 1;
        }
        self.mirror = Some(current);
        Ok(counts)
    }
}

/// Kinds of `mesh_maps::policy::PolicyOp`, for the metric's label values.
pub const POLICY_OP_KINDS: [&str; 8] = [
    "policy_rule_upsert",
    "policy_entry_upsert",
    "policy_endpoint_upsert",
    "policy_netns_upsert",
    "policy_netns_delete",
    "policy_endpoint_delete",
    "policy_entry_delete",
    "policy_rule_delete",
];

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

use ipnet::IpNet;
use mesh_core::policy::{PolicyTables, Verdict};
use mesh_maps::layout;
use mesh_maps::policy::{PolicyDump, PolicyEntryKey, PolicyEntryValue, PolicyNetns};

use crate::datapath::{self, Datapath, NetnsInfo};
use crate::desired::DesiredState;

/// The local endpoints of this node: IPv4 address -> identity (ipcache entries of this
/// node's pods, as the agent programs them).
pub fn local_endpoints(desired: &DesiredState) -> BTreeMap<Ipv4Addr, u32> {
    desired
        .ipcache
        .iter()
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

/// The CIDR identities the compiled policy needs in the ipcache, added to `desired` where no
/// entry of the same prefix exists (an endpoint or node entry keeps its own identity).
pub fn add_cidr_identities(
    desired: &mut DesiredState,
    cidrs: impl IntoIterator<Item = (IpNet, u32)>,
) {
    for (net, identity) in cidrs {
        desired
            .ipcache
            .entry(net)
            .or_insert(crate::desired::IpcacheInfo {
                identity,
                host_ip: None,
                cluster_id: 0,
                local_node: false,
                remote_cluster: false,
            });
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

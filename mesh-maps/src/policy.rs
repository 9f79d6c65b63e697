//! The network-policy maps of a node (bpf/mesh.h, "network policy"): typed handles, the
//! whole-map dump the agent's reconciler diffs against and `meshctl bpf policy list` prints,
//! the per-rule counters, and single-entry writes.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use aya::maps::{HashMap, LpmTrie, MapData, MapError, PerCpuHashMap, lpm_trie::Key};

use crate::pinned::{Error, Result, map_err, open_raw, typed};
use crate::sys::Access;
use crate::{
    FlowCounters, MAP_POLICY, MAP_POLICY_COUNTERS, MAP_POLICY_ENDPOINTS, MAP_POLICY_NETNS,
    MAP_POLICY_RULES, ip_from_raw, ip_to_raw, layout,
};

/// Key of one `mesh_policy` entry, in host order: table, remote identity (0 = any), protocol
/// number (0 = any), and a port prefix of which the first `prefix_len` bits matter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyEntryKey {
    pub table: u32,
    pub remote: u32,
    pub proto: u8,
    /// Host order.
    pub port: u16,
    /// 0..=16.
    pub prefix_len: u8,
}

/// Value of one `mesh_policy` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyEntryValue {
    pub rule: u32,
    pub rank: u32,
    /// [`layout::VERDICT_ALLOW`] or [`layout::VERDICT_DENY`].
    pub verdict: u8,
}

/// A local endpoint's network namespace (the key is its netns cookie).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyNetns {
    pub identity: u32,
    pub ip: Ipv4Addr,
}

/// The content of the policy maps (without the counters and the reply cache, which only
/// the programs write).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyDump {
    pub endpoints: BTreeMap<u32, layout::PolicyEndpoint>,
    pub entries: BTreeMap<PolicyEntryKey, PolicyEntryValue>,
    pub netns: BTreeMap<u64, PolicyNetns>,
    pub rules: BTreeMap<u32, String>,
}

/// One write to the policy maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyOp {
    RuleUpsert(u32, String),
    EntryUpsert(PolicyEntryKey, PolicyEntryValue),
    EndpointUpsert(u32, layout::PolicyEndpoint),
    NetnsUpsert(u64, PolicyNetns),
    NetnsDelete(u64),
    EndpointDelete(u32),
    EntryDelete(PolicyEntryKey),
    RuleDelete(u32),
}

impl PolicyOp {
    /// Label of the op's kind (metrics, logs).
    pub fn kind(&self) -> &'static str {
        match self {
            PolicyOp::RuleUpsert(..) => "policy_rule_upsert",
            PolicyOp::EntryUpsert(..) => "policy_entry_upsert",
            PolicyOp::EndpointUpsert(..) => "policy_endpoint_upsert",
            PolicyOp::NetnsUpsert(..) => "policy_netns_upsert",
            PolicyOp::NetnsDelete(..) => "policy_netns_delete",
            PolicyOp::EndpointDelete(..) => "policy_endpoint_delete",
            PolicyOp::EntryDelete(..) => "policy_entry_delete",
            PolicyOp::RuleDelete(..) => "policy_rule_delete",
        }
    }
}

/// A policy verdict counter's key, in host types.
pub type PolicyCounterKey = layout::PolicyCounterKey;

/// The operations that bring `current` to `desired`, in an order that never opens a
/// window: names and entries are written before the endpoints that point at their tables,
/// endpoints before the namespaces that name them; removals go the other way round.
pub fn plan_policy(current: &PolicyDump, desired: &PolicyDump) -> Vec<PolicyOp> {
    let mut ops = Vec::new();
    for (id, name) in &desired.rules {
        if current.rules.get(id) != Some(name) {
            ops.push(PolicyOp::RuleUpsert(*id, name.clone()));
        }
    }
    for (k, v) in &desired.entries {
        if current.entries.get(k) != Some(v) {
            ops.push(PolicyOp::EntryUpsert(*k, *v));
        }
    }
    for (id, v) in &desired.endpoints {
        if current.endpoints.get(id) != Some(v) {
            ops.push(PolicyOp::EndpointUpsert(*id, *v));
        }
    }
    for (c, v) in &desired.netns {
        if current.netns.get(c) != Some(v) {
            ops.push(PolicyOp::NetnsUpsert(*c, *v));
        }
    }
    for c in current.netns.keys() {
        if !desired.netns.contains_key(c) {
            ops.push(PolicyOp::NetnsDelete(*c));
        }
    }
    for id in current.endpoints.keys() {
        if !desired.endpoints.contains_key(id) {
            ops.push(PolicyOp::EndpointDelete(*id));
        }
    }
    for k in current.entries.keys() {
        if !desired.entries.contains_key(k) {
            ops.push(PolicyOp::EntryDelete(*k));
        }
    }
    for id in current.rules.keys() {
        if !desired.rules.contains_key(id) {
            ops.push(PolicyOp::RuleDelete(*id));
        }
    }
    ops
}

/// Applies `op` to `dump` (the reconciler's mirror).
pub fn apply_to_dump(dump: &mut PolicyDump, op: &PolicyOp) {
    match op {
        PolicyOp::RuleUpsert(id, name) => {
            dump.rules.insert(*id, name.clone());
        }
        PolicyOp::EntryUpsert(k, v) => {
            dump.entries.insert(*k, *v);
        }
        PolicyOp::EndpointUpsert(id, v) => {
            dump.endpoints.insert(*id, *v);
        }
        PolicyOp::NetnsUpsert(c, v) => {
            dump.netns.insert(*c, *v);
        }
        PolicyOp::NetnsDelete(c) => {
            dump.netns.remove(c);
        }
        PolicyOp::EndpointDelete(id) => {
            dump.endpoints.remove(id);
        }
        PolicyOp::EntryDelete(k) => {
            dump.entries.remove(k);
        }
        PolicyOp::RuleDelete(id) => {
            dump.rules.remove(id);
        }
    }
}

/// Handles on the policy maps a program reads and the agent writes.
pub struct PolicyMaps {
    pub endpoints: HashMap<MapData, u32, layout::PolicyEndpoint>,
    pub entries: LpmTrie<MapData, layout::PolicyKeyData, layout::PolicyValue>,
    pub netns: HashMap<MapData, u64, layout::PolicyNetnsValue>,
    pub rules: HashMap<MapData, u32, layout::PolicyRuleName>,
    pub counters: PerCpuHashMap<MapData, layout::PolicyCounterKey, layout::PolicyCounterValue>,
}

impl std::fmt::Debug for PolicyMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyMaps").finish_non_exhaustive()
    }
}

fn lpm_key(k: &PolicyEntryKey) -> Key<layout::PolicyKeyData> {
    Key::new(
        layout::POLICY_PREFIX_FIXED + u32::from(k.prefix_len),
        layout::PolicyKeyData {
            table: k.table,
            remote: k.remote,
            proto: k.proto,
            pad: 0,
            port: k.port.to_be(),
        },
    )
}

// === impl PolicyMaps ===

impl PolicyMaps {
    /// Opens the policy maps pinned under `maps_dir` (`<pin_dir>/maps`).
    pub fn open_pinned(maps_dir: &Path, access: Access) -> Result<Self> {
        Ok(Self {
            endpoints: typed(&open_raw(maps_dir, MAP_POLICY_ENDPOINTS, access)?)?,
            entries: typed(&open_raw(maps_dir, MAP_POLICY, access)?)?,
            netns: typed(&open_raw(maps_dir, MAP_POLICY_NETNS, access)?)?,
            rules: typed(&open_raw(maps_dir, MAP_POLICY_RULES, access)?)?,
            counters: typed(&open_raw(maps_dir, MAP_POLICY_COUNTERS, access)?)?,
        })
    }

    /// Every entry of the endpoint, policy, netns and rule maps.
    pub fn dump(&self) -> Result<PolicyDump> {
        let mut out = PolicyDump::default();
        for e in self.endpoints.iter() {
            let (k, v) = e.map_err(map_err(MAP_POLICY_ENDPOINTS))?;
            out.endpoints.insert(k, v);
        }
        for e in self.entries.iter() {
            let (k, v) = e.map_err(map_err(MAP_POLICY))?;
            let prefix_len = k
                .prefix_len()
                .checked_sub(layout::POLICY_PREFIX_FIXED)
                .filter(|l| *l <= 16)
                .ok_or_else(|| Error::InvalidEntry {
                    map: MAP_POLICY,
                    detail: format!("prefix length {}", k.prefix_len()),
                })?;
            let d = k.data();
            out.entries.insert(
                PolicyEntryKey {
                    table: d.table,
                    remote: d.remote,
                    proto: d.proto,
                    port: u16::from_be(d.port),
                    prefix_len: prefix_len as u8,
                },
                PolicyEntryValue {
                    rule: v.rule,
                    rank: v.rank,
                    verdict: v.verdict,
                },
            );
        }
        for e in self.netns.iter() {
            let (k, v) = e.map_err(map_err(MAP_POLICY_NETNS))?;
            out.netns.insert(
                k,
                PolicyNetns {
                    identity: v.identity,
                    ip: ip_from_raw(v.ip4),
                },
            );
        }
        for e in self.rules.iter() {
            let (k, v) = e.map_err(map_err(MAP_POLICY_RULES))?;
            out.rules.insert(k, v.as_str());
        }
        Ok(out)
    }

    /// The verdict counters, summed over CPUs.
    pub fn counters(&self) -> Result<BTreeMap<PolicyCounterKey, FlowCounters>> {
        let mut out = BTreeMap::new();
        for e in self.counters.iter() {
            let (k, per_cpu) = e.map_err(map_err(MAP_POLICY_COUNTERS))?;
            let sum = per_cpu
                .iter()
                .fold(FlowCounters::default(), |acc, v| FlowCounters {
                    packets: acc.packets + v.packets,
                    bytes: acc.bytes + v.bytes,
                });
            out.insert(k, sum);
        }
        Ok(out)
    }

    /// Applies one write.
    pub fn apply(&mut self, op: &PolicyOp) -> Result<()> {
        let absent_ok = |r: Result<(), MapError>| match r {
            Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            other => other,
        };
        match op {
            PolicyOp::RuleUpsert(id, name) => self
                .rules
                .insert(id, layout::PolicyRuleName::new(name), 0)
                .map_err(map_err(MAP_POLICY_RULES)),
            PolicyOp::EntryUpsert(k, v) => self
                .entries
                .insert(
                    &lpm_key(k),
                    layout::PolicyValue {
                        rule: v.rule,
                        rank: v.rank,
                        verdict: v.verdict,
                        pad: [0; 3],
                    },
                    0,
                )
                .map_err(map_err(MAP_POLICY)),
            PolicyOp::EndpointUpsert(id, v) => self
                .endpoints
                .insert(id, v, 0)
                .map_err(map_err(MAP_POLICY_ENDPOINTS)),
            PolicyOp::NetnsUpsert(c, v) => self
                .netns
                .insert(
                    c,
                    layout::PolicyNetnsValue {
                        identity: v.identity,
                        ip4: ip_to_raw(v.ip),
                    },
                    0,
                )
                .map_err(map_err(MAP_POLICY_NETNS)),
            PolicyOp::NetnsDelete(c) => {
                absent_ok(self.netns.remove(c)).map_err(map_err(MAP_POLICY_NETNS))
            }
            PolicyOp::EndpointDelete(id) => {
                absent_ok(self.endpoints.remove(id)).map_err(map_err(MAP_POLICY_ENDPOINTS))
            }
            PolicyOp::EntryDelete(k) => {
                absent_ok(self.entries.remove(&lpm_key(k))).map_err(map_err(MAP_POLICY))
            }
            PolicyOp::RuleDelete(id) => {
                absent_ok(self.rules.remove(id)).map_err(map_err(MAP_POLICY_RULES))
            }
        }
    }
}

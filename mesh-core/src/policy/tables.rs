//! The compiled policy in the datapath's shape (bpf/mesh.h, "network policy"): what the agent
//! programs and `meshctl bpf policy list` names. Pure, so the agent's maps and meshctl's view
//! of them come from one function.
//!
//! - Each distinct entry list is one **table**, shared by every identity and direction whose
//!   entries are equal (identities the same policies select share their tables). Its id is a
//!   hash of its content, so a recompile that leaves a table unchanged keeps its id and the
//!   agent's diff leaves its entries alone. Id 0 means "no entries".
//! - Each `PolicyEntry` range becomes one LPM entry per port prefix
//!   (`PortRange::prefixes`); remote identity 0 and protocol 0 stand for "any".
//! - Each rule gets a **rule id**, a hash of its name (stable across recompiles, so counters
//!   keyed by it keep meaning), and carries its **rank** (position among the sorted rules), so
//!   the datapath reports the smallest matching rule as `decide` does.
//!
//! Hash collisions are resolved by probing to the next free id in a deterministic order
//! (tables and rules sorted by content), so equal inputs give equal outputs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde::Serialize;

use super::compile::{CompiledPolicy, DirectionPolicy, PolicyEntry};
use super::model::{Direction, RuleRef, Verdict};
use crate::{IdentityId, Protocol};

/// IP protocol number of `p` as the datapath keys it.
pub fn protocol_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

/// One local identity's tables and enforcement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct EndpointTables {
    /// 0: no entries.
    pub ingress_table: u32,
    pub egress_table: u32,
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
}

impl EndpointTables {
    pub fn table(&self, d: Direction) -> u32 {
        match d {
            Direction::Ingress => self.ingress_table,
            Direction::Egress => self.egress_table,
        }
    }

    pub fn enforced(&self, d: Direction) -> bool {
        match d {
            Direction::Ingress => self.ingress_enforced,
            Direction::Egress => self.egress_enforced,
        }
    }
}

/// Key of one LPM entry: table, remote identity (0 = any), protocol number (0 = any), and a
/// port prefix (`port`, host order, of which the first `prefix_len` bits matter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct TableKey {
    pub table: u32,
    pub remote: u32,
    pub proto: u8,
    pub port: u16,
    pub prefix_len: u8,
}

/// Value of one LPM entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct TableValue {
    pub verdict: Verdict,
    pub rule: u32,
    pub rank: u32,
}

/// The whole datapath form of a compiled policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PolicyTables {
    pub endpoints: BTreeMap<IdentityId, EndpointTables>,
    pub entries: BTreeMap<TableKey, TableValue>,
    /// Rule id -> the rule, for every rule some entry names.
    pub rules: BTreeMap<u32, RuleRef>,
}

/// FNV-1a, 32 bits: small, stable across builds and platforms (std's hasher is neither
/// guaranteed stable nor meant for ids).
fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Gives each item an id from its hash, never 0, probing upwards on collision. `items` must be
/// sorted and distinct, so the assignment is deterministic.
fn assign_ids<T: Clone + Eq + std::hash::Hash>(
    items: impl IntoIterator<Item = (T, u32)>,
) -> HashMap<T, u32> {
    let mut taken = BTreeSet::new();
    let mut out = HashMap::new();
    for (item, hash) in items {
        let mut id = hash.max(1);
        while !taken.insert(id) {
            id = id.wrapping_add(1).max(1);
        }
        out.insert(item, id);
    }
    out
}

/// The stable id of a rule: a hash of its display name.
fn rule_hash(rule: &RuleRef) -> u32 {
    fnv1a(rule.to_string().as_bytes())
}

/// One entry of a table's content: remote, protocol number, port range, verdict, rule id.
type ContentEntry = (Option<u32>, Option<u8>, u16, u16, Verdict, u32);

/// The content hash of a table (its entries with stable rule ids).
fn table_hash(entries: &[ContentEntry]) -> u32 {
    let mut bytes = Vec::with_capacity(entries.len() * 16);
    for &(remote, proto, start, end, verdict, rule) in entries {
        bytes.extend_from_slice(&remote.unwrap_or(0).to_le_bytes());
        bytes.push(proto.unwrap_or(0));
        bytes.extend_from_slice(&start.to_le_bytes());
        bytes.extend_from_slice(&end.to_le_bytes());
        bytes.push(matches!(verdict, Verdict::Deny) as u8);
        bytes.extend_from_slice(&rule.to_le_bytes());
    }
    fnv1a(&bytes)
}

/// The datapath tables of `compiled`.
pub fn policy_tables(compiled: &CompiledPolicy) -> PolicyTables {
    // Rule ids, in sorted rule order (compiled.rules is sorted and distinct).
    let rule_ids = assign_ids(compiled.rules.iter().map(|r| (r.clone(), rule_hash(r))));
    let id_of_rank = |rank: u32| rule_ids[&compiled.rules[rank as usize]];

    // Distinct direction tables (shared Arcs first, then by content).
    let mut contents: BTreeSet<Vec<ContentEntry>> = BTreeSet::new();
    let mut seen: HashMap<*const DirectionPolicy, Vec<ContentEntry>> = HashMap::new();
    let mut content_of = |d: &Arc<DirectionPolicy>| -> Vec<ContentEntry> {
        seen.entry(Arc::as_ptr(d))
            .or_insert_with(|| {
                d.entries
                    .iter()
                    .map(|e: &PolicyEntry| {
                        (
                            e.remote.map(|r| r.0),
                            e.protocol.map(protocol_number),
                            e.ports.start,
                            e.ports.end,
                            e.verdict,
                            id_of_rank(e.rule),
                        )
                    })
                    .collect()
            })
            .clone()
    };
    let mut per_identity = Vec::with_capacity(compiled.identities.len());
    for (id, p) in &compiled.identities {
        let ingress = content_of(&p.ingress);
        let egress = content_of(&p.egress);
        for c in [&ingress, &egress] {
            if !c.is_empty() {
                contents.insert(c.clone());
            }
        }
        per_identity.push((*id, ingress, egress, p.ingress.enforced, p.egress.enforced));
    }
    let table_ids = assign_ids(contents.into_iter().map(|c| {
        let h = table_hash(&c);
        (c, h)
    }));

    let mut out = PolicyTables::default();
    // Ranks: the entry's rule index in compiled.rules, recovered from the stable id.
    let rank_of: HashMap<u32, u32> = compiled
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| (rule_ids[r], i as u32))
        .collect();
    for (content, &table) in &table_ids {
        for &(remote, proto, start, end, verdict, rule) in content {
            let range = super::model::PortRange { start, end };
            for (port, prefix_len) in range.prefixes() {
                out.entries.insert(
                    TableKey {
                        table,
                        remote: remote.unwrap_or(0),
                        proto: proto.unwrap_or(0),
                        port,
                        prefix_len,
                    },
                    TableValue {
                        verdict,
                        rule,
                        rank: rank_of[&rule],
                    },
                );
            }
            out.rules
                .entry(rule)
                .or_insert_with(|| compiled.rules[rank_of[&rule] as usize].clone());
        }
    }
    let table_of = |c: &Vec<_>| if c.is_empty() { 0 } else { table_ids[c] };
    for (id, ingress, egress, ingress_enforced, egress_enforced) in per_identity {
        out.endpoints.insert(
            id,
            EndpointTables {
                ingress_table: table_of(&ingress),
                egress_table: table_of(&egress),
                ingress_enforced,
                egress_enforced,
            },
        );
    }
    out
}

/// What the datapath decides from `tables` (the lookup of bpf/policy.h, in Rust): the verdict
/// and the rule id that decided (None: not enforced, local host, or default deny). Equal to
/// [`super::decide`] on the compiled policy the tables came from (a property test says so);
/// the kernel tests compare the programs with it.
pub fn decide_tables(
    tables: &PolicyTables,
    local: IdentityId,
    direction: Direction,
    remote: IdentityId,
    protocol: Protocol,
    port: u16,
) -> (Verdict, Option<u32>) {
    if direction == Direction::Ingress && remote.0 == crate::identity::RESERVED_HOST {
        return (Verdict::Allow, None);
    }
    let Some(ep) = tables.endpoints.get(&local) else {
        return (Verdict::Allow, None);
    };
    let table = ep.table(direction);
    let proto = protocol_number(protocol);
    let mut deny: Option<TableValue> = None;
    let mut allow: Option<TableValue> = None;
    if table != 0 {
        for (r, p) in [(remote.0, proto), (remote.0, 0), (0, proto), (0, 0)] {
            // Longest port prefix containing `port`.
            let found = (0..=16u8).rev().find_map(|len| {
                let mask = if len == 0 { 0 } else { u16::MAX << (16 - len) };
                tables
                    .entries
                    .get(&TableKey {
                        table,
                        remote: r,
                        proto: p,
                        port: port & mask,
                        prefix_len: len,
                    })
                    .copied()
            });
            if let Some(v) = found {
                let best = match v.verdict {
                    Verdict::Deny => &mut deny,
                    Verdict::Allow => &mut allow,
                };
                if best.is_none_or(|b| v.rank < b.rank) {
                    *best = Some(v);
                }
            }
        }
    }
    if let Some(d) = deny {
        return (Verdict::Deny, Some(d.rule));
    }
    if !ep.enforced(direction) {
        return (Verdict::Allow, None);
    }
    match allow {
        Some(a) => (Verdict::Allow, Some(a.rule)),
        None => (Verdict::Deny, None),
    }
}

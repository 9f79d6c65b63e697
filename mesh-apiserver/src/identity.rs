//! The identity allocator (DESIGN.md sections 4 and 6).
//!
//! Two keys per identity, always written and deleted together in one transaction:
//!
//! - `<prefix>identity-index/<sha256 of the canonical labels>` -> `pb::Identity` (id, labels):
//!   the allocation, so the same labels get the same id, across restarts and replicas;
//! - `<prefix>clusters/<c>/identities/<id>` -> `pb::Identity`: the published identity, and the
//!   reservation of the id.
//!
//! Allocation is a transaction that requires both keys to be absent (create revision 0) and
//! the leader fence to hold: two replicas can never hand out one id twice, and a stale
//! leader cannot allocate at all. When the transaction fails the allocator reads what won:
//! the same labels allocated by someone else are adopted; a taken id is skipped.
//!
//! Identities are reference counted by the endpoints that use them. An identity unused for
//! the grace period (`PublisherConfig::identity_gc_grace`, default 5 minutes: long enough to
//! ride out a rolling restart, short enough that churned label sets do not pile up) is
//! deleted. After a restart every loaded identity starts unused; the endpoints of the initial
//! sync take their references before the first collection may run.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, KvClient, Txn, TxnOp, TxnOpResponse};
use mesh_core::identity::{LOCAL_MAX, LOCAL_MIN};
use mesh_core::{ClusterId, ClusterName, IdentityId, IdentityLabels};
use mesh_proto::keys::Keys;
use mesh_proto::pb;
use prost::Message;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::store::Fence;

/// Default time an identity stays allocated after its last endpoint is gone.
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(300);

/// Attempts at allocating one label set before giving up (each failed attempt learns one
/// taken id, so this bounds only pathological contention).
const MAX_ATTEMPTS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("etcd {op} of {key:?} failed: {source}")]
    Etcd {
        op: &'static str,
        key: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error(
        "lost leadership: leader key {key:?} is no longer the one created at revision {revision}"
    )]
    Fenced { key: String, revision: i64 },
    #[error(
        "no free identity left in cluster {cluster} (ids {min}..={max} of cluster id {cluster_id} are all allocated)"
    )]
    Exhausted {
        cluster: ClusterName,
        cluster_id: ClusterId,
        min: u32,
        max: u32,
    },
    #[error(
        "identity index {key:?} holds labels [{existing}], not [{wanted}]: a hash collision or a corrupt index"
    )]
    IndexConflict {
        key: String,
        existing: String,
        wanted: String,
    },
    #[error(
        "allocating identity for labels [{labels}]: gave up after {attempts} contended attempts"
    )]
    Contended { labels: String, attempts: usize },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The index key's hash of a label set: hex SHA-256 of its canonical form.
pub fn labels_hash(labels: &IdentityLabels) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, labels.canonical().as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn encode_identity(id: IdentityId, labels: &IdentityLabels) -> Vec<u8> {
    pb::Identity::from(&mesh_core::model::Identity {
        id,
        labels: labels.clone(),
    })
    .encode_to_vec()
}

fn decode_identity(bytes: &[u8]) -> Option<(IdentityId, IdentityLabels)> {
    let msg = pb::Identity::decode(bytes).ok()?;
    let ident = mesh_core::model::Identity::try_from(msg).ok()?;
    Some((ident.id, ident.labels))
}

#[derive(Debug, Clone)]
struct Entry {
    /// `None` for an identity key whose value cannot be decoded (collected as unused).
    labels: Option<IdentityLabels>,
    /// The index key and the value it holds, when this identity owns one.
    index: Option<(String, Vec<u8>)>,
    refs: usize,
    unused_since: Option<Instant>,
}

/// Allocates, caches and collects the identities of one cluster.
pub struct IdentityAllocator {
    kv: KvClient,
    keys: Keys,
    cluster: ClusterName,
    cluster_id: ClusterId,
    fence: Option<Fence>,
    grace: Duration,
    by_labels: HashMap<IdentityLabels, IdentityId>,
    by_id: BTreeMap<IdentityId, Entry>,
    next_local: u32,
}

// === impl IdentityAllocator ===

impl IdentityAllocator {
    /// Loads the cluster's identities and the allocation index, repairing what a crash
    /// between two writes could not have left but a manual edit could (an index entry
    /// without its identity key is rewritten; an identity key without an index entry is
    /// adopted when its labels are free, else collected).
    pub async fn load(
        kv: KvClient,
        keys: Keys,
        cluster: ClusterName,
        cluster_id: ClusterId,
        fence: Option<Fence>,
        grace: Duration,
    ) -> Result<Self> {
        let mut me = Self {
            kv,
            keys,
            cluster,
            cluster_id,
            fence,
            grace,
            by_labels: HashMap::new(),
            by_id: BTreeMap::new(),
            next_local: LOCAL_MIN,
        };
        let now = Instant::now();
        let index_prefix = me.keys.identity_index_prefix();
        let ids_prefix = me.keys.kind_prefix(me.cluster.as_str(), pb::Kind::Identity);
        let index = me.list(&index_prefix).await?;
        let published = me.list(&ids_prefix).await?;

        let mut repairs: Vec<TxnOp> = Vec::new();
        let mut published_ids: BTreeMap<IdentityId, Option<IdentityLabels>> = BTreeMap::new();
        for (key, value) in &published {
            let id = key[ids_prefix.len()..].parse::<u32>().ok().map(IdentityId);
            let decoded = decode_identity(value);
            match (id, decoded) {
                (Some(id), Some((vid, labels))) if vid == id => {
                    published_ids.insert(id, Some(labels));
                }
                (Some(id), _) => {
                    warn!(%key, "identity value cannot be decoded or names another id; it will be collected");
                    published_ids.insert(id, None);
                }
                (None, _) => {
                    error!(%key, "deleting an identity key that is not a number");
                    repairs.push(TxnOp::delete(key.clone(), None));
                }
            }
        }
        for (key, value) in index {
            let Some((id, labels)) = decode_identity(&value) else {
                error!(%key, "deleting an identity index entry that cannot be decoded");
                repairs.push(TxnOp::delete(key, None));
                continue;
            };
            let expected_key = me.keys.identity_index(&labels_hash(&labels));
            let in_range = id.check_range(&me.cluster, me.cluster_id).is_ok() && !id.is_reserved();
            if key != expected_key || !in_range || me.by_id.contains_key(&id) {
                error!(%key, %id, "deleting an identity index entry that is misplaced, out of range or duplicated");
                repairs.push(TxnOp::delete(key, None));
                continue;
            }
            match published_ids.remove(&id) {
                Some(Some(l)) if l == labels => {}
                _ => {
                    warn!(%id, "rewriting identity key missing or disagreeing with its index entry");
                    repairs.push(TxnOp::put(
                        me.identity_key(id),
                        encode_identity(id, &labels),
                        None,
                    ));
                }
            }
            me.by_labels.insert(labels.clone(), id);
            me.by_id.insert(
                id,
                Entry {
                    labels: Some(labels),
                    index: Some((key, value)),
                    refs: 0,
                    unused_since: Some(now),
                },
            );
        }
        // Identity keys no index entry claims.
        for (id, labels) in published_ids {
            let adoptable = labels.as_ref().filter(|l| {
                !me.by_labels.contains_key(*l)
                    && id.check_range(&me.cluster, me.cluster_id).is_ok()
                    && !id.is_reserved()
            });
            let index = match adoptable {
                Some(l) => {
                    let key = me.keys.identity_index(&labels_hash(l));
                    let value = encode_identity(id, l);
                    info!(%id, "restoring the index entry of an identity");
                    repairs.push(TxnOp::put(key.clone(), value.clone(), None));
                    me.by_labels.insert(l.clone(), id);
                    Some((key, value))
                }
                None => None,
            };
            me.by_id.insert(
                id,
                Entry {
                    labels,
                    index,
                    refs: 0,
                    unused_since: Some(now),
                },
            );
        }
        for chunk in repairs.chunks(crate::store::ETCD_DEFAULT_MAX_TXN_OPS) {
            me.fenced_txn(Vec::new(), chunk.to_vec(), "repair").await?;
        }
        debug!(identities = me.by_id.len(), "loaded identities");
        Ok(me)
    }

    async fn list(&mut self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let resp = self
            .kv
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|source| Error::Etcd {
                op: "list",
                key: prefix.to_string(),
                source,
            })?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| Some((kv.key_str().ok()?.to_string(), kv.value().to_vec())))
            .collect())
    }

    async fn fenced_txn(
        &mut self,
        mut when: Vec<Compare>,
        then: Vec<TxnOp>,
        op: &'static str,
    ) -> Result<bool> {
        if let Some(f) = &self.fence {
            when.push(f.compare());
        }
        let resp = self
            .kv
            .txn(Txn::new().when(when).and_then(then))
            .await
            .map_err(|source| Error::Etcd {
                op,
                key: self.keys.identity_index_prefix(),
                source,
            })?;
        if !resp.succeeded() && op == "repair" {
            return Err(self.fenced());
        }
        Ok(resp.succeeded())
    }

    fn fenced(&self) -> Error {
        match &self.fence {
            Some(f) => Error::Fenced {
                key: f.key.clone(),
                revision: f.create_revision,
            },
            None => Error::Fenced {
                key: String::new(),
                revision: 0,
            },
        }
    }

    fn identity_key(&self, id: IdentityId) -> String {
        self.keys
            .object(self.cluster.as_str(), pb::Kind::Identity, &id.0.to_string())
    }

    /// The cached identity of `labels`.
    pub fn lookup(&self, labels: &IdentityLabels) -> Option<IdentityId> {
        self.by_labels.get(labels).copied()
    }

    pub fn labels(&self, id: IdentityId) -> Option<&IdentityLabels> {
        self.by_id.get(&id)?.labels.as_ref()
    }

    /// Number of identities this cluster holds.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Every identity and its reference count.
    pub fn refs(&self) -> impl Iterator<Item = (IdentityId, usize)> + '_ {
        self.by_id.iter().map(|(id, e)| (*id, e.refs))
    }

    fn next_free(&mut self) -> Option<IdentityId> {
        let span = LOCAL_MAX - LOCAL_MIN + 1;
        for i in 0..span {
            let local = LOCAL_MIN + (self.next_local - LOCAL_MIN + i) % span;
            let id = IdentityId::new(self.cluster_id, local).ok()?;
            if !self.by_id.contains_key(&id) {
                self.next_local = if local == LOCAL_MAX {
                    LOCAL_MIN
                } else {
                    local + 1
                };
                return Some(id);
            }
        }
        None
    }

    /// The identity of `labels`, allocated in etcd when it has none yet.
    pub async fn allocate(&mut self, labels: &IdentityLabels) -> Result<IdentityId> {
        if let Some(id) = self.lookup(labels) {
            return Ok(id);
        }
        let index_key = self.keys.identity_index(&labels_hash(labels));
        for _ in 0..MAX_ATTEMPTS {
            let Some(id) = self.next_free() else {
                return Err(Error::Exhausted {
                    cluster: self.cluster.clone(),
                    cluster_id: self.cluster_id,
                    min: LOCAL_MIN,
                    max: LOCAL_MAX,
                });
            };
            let id_key = self.identity_key(id);
            let value = encode_identity(id, labels);
            let mut when = vec![
                Compare::create_revision(index_key.clone(), CompareOp::Equal, 0),
                Compare::create_revision(id_key.clone(), CompareOp::Equal, 0),
            ];
            let mut otherwise = vec![
                TxnOp::get(index_key.clone(), None),
                TxnOp::get(id_key.clone(), None),
            ];
            if let Some(f) = &self.fence {
                when.push(f.compare());
                otherwise.push(TxnOp::get(f.key.clone(), None));
            }
            let txn = Txn::new().when(when).and_then(vec![
                TxnOp::put(index_key.clone(), value.clone(), None),
                TxnOp::put(id_key.clone(), value.clone(), None),
            ]);
            let resp = self
                .kv
                .txn(txn.or_else(otherwise))
                .await
                .map_err(|source| Error::Etcd {
                    op: "allocate",
                    key: index_key.clone(),
                    source,
                })?;
            if resp.succeeded() {
                info!(%id, labels = %labels.canonical(), "allocated identity");
                self.insert(id, labels.clone(), Some((index_key, value)));
                return Ok(id);
            }
            let gets: Vec<Option<(Vec<u8>, i64)>> = resp
                .op_responses()
                .into_iter()
                .map(|r| match r {
                    TxnOpResponse::Get(g) => g
                        .kvs()
                        .first()
                        .map(|kv| (kv.value().to_vec(), kv.create_revision())),
                    _ => None,
                })
                .collect();
            if let Some(f) = &self.fence
                && gets.get(2).cloned().flatten().map(|(_, rev)| rev) != Some(f.create_revision)
            {
                return Err(self.fenced());
            }
            if let Some(Some((existing, _))) = gets.first() {
                // Someone allocated these labels: adopt their id if the entry is really ours.
                match decode_identity(existing) {
                    Some((eid, elabels)) if &elabels == labels => {
                        debug!(id = %eid, "adopting an identity allocated concurrently");
                        self.insert(eid, elabels, Some((index_key, existing.clone())));
                        return Ok(eid);
                    }
                    other => {
                        return Err(Error::IndexConflict {
                            key: index_key,
                            existing: other
                                .map(|(_, l)| l.canonical())
                                .unwrap_or_else(|| "<undecodable>".into()),
                            wanted: labels.canonical(),
                        });
                    }
                }
            }
            if let Some(Some((existing, _))) = gets.get(1) {
                // The id is taken (by an allocation we have not seen): remember and skip it.
                let l = decode_identity(existing).map(|(_, l)| l);
                debug!(%id, "identity id taken concurrently; trying the next");
                self.by_id.insert(
                    id,
                    Entry {
                        labels: l,
                        index: None,
                        refs: 0,
                        unused_since: None,
                    },
                );
            }
        }
        Err(Error::Contended {
            labels: labels.canonical(),
            attempts: MAX_ATTEMPTS,
        })
    }

    fn insert(&mut self, id: IdentityId, labels: IdentityLabels, index: Option<(String, Vec<u8>)>) {
        self.by_labels.insert(labels.clone(), id);
        self.by_id.insert(
            id,
            Entry {
                labels: Some(labels),
                index,
                refs: 0,
                unused_since: Some(Instant::now()),
            },
        );
    }

    /// One more endpoint uses `id`.
    pub fn acquire(&mut self, id: IdentityId) {
        if let Some(e) = self.by_id.get_mut(&id) {
            e.refs += 1;
            e.unused_since = None;
        }
    }

    /// One endpoint less uses `id`; at zero the grace period starts.
    pub fn release(&mut self, id: IdentityId, now: Instant) {
        if let Some(e) = self.by_id.get_mut(&id) {
            e.refs = e.refs.saturating_sub(1);
            if e.refs == 0 {
                e.unused_since = Some(now);
            }
        }
    }

    /// The earliest time an unused identity becomes collectable.
    pub fn next_gc_at(&self) -> Option<Instant> {
        self.by_id
            .values()
            .filter(|e| e.refs == 0)
            .filter_map(|e| e.unused_since)
            .min()
            .map(|t| t + self.grace)
    }

    /// Deletes the identities unused for the grace period (index and identity key in one
    /// transaction each, guarded by the index value so an entry rewritten meanwhile stays).
    /// Returns the collected ids.
    pub async fn gc(&mut self, now: Instant) -> Result<Vec<IdentityId>> {
        let due: Vec<IdentityId> = self
            .by_id
            .iter()
            .filter(|(_, e)| e.refs == 0 && e.unused_since.is_some_and(|t| t + self.grace <= now))
            .map(|(id, _)| *id)
            .collect();
        let mut collected = Vec::new();
        for id in due {
            let entry = self.by_id[&id].clone();
            let id_key = self.identity_key(id);
            let mut when = Vec::new();
            let mut ops = vec![TxnOp::delete(id_key.clone(), None)];
            if let Some((key, value)) = &entry.index {
                when.push(Compare::value(key.clone(), CompareOp::Equal, value.clone()));
                ops.push(TxnOp::delete(key.clone(), None));
            }
            let has_guard = !when.is_empty();
            if !self.fenced_txn(when, ops, "collect").await? {
                // Either the fence or the index guard failed: tell them apart.
                if let Some(f) = self.fence.clone() {
                    let resp =
                        self.kv
                            .get(f.key.clone(), None)
                            .await
                            .map_err(|source| Error::Etcd {
                                op: "get",
                                key: f.key.clone(),
                                source,
                            })?;
                    if resp.kvs().first().map(|kv| kv.create_revision()) != Some(f.create_revision)
                    {
                        return Err(self.fenced());
                    }
                }
                if has_guard {
                    warn!(%id, "identity index entry changed under the collector; forgetting the cached entry");
                    self.forget(id);
                }
                continue;
            }
            info!(%id, labels = %entry.labels.as_ref().map(|l| l.canonical()).unwrap_or_default(), "collected unused identity");
            self.forget(id);
            collected.push(id);
        }
        Ok(collected)
    }

    fn forget(&mut self, id: IdentityId) {
        if let Some(e) = self.by_id.remove(&id)
            && let Some(l) = e.labels
            && self.by_labels.get(&l) == Some(&id)
        {
            self.by_labels.remove(&l);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_and_label_sensitive() {
        let c = ClusterName::new("east").unwrap();
        let a = IdentityLabels::for_pod(&c, "ns", [("app", "a")]);
        let b = IdentityLabels::for_pod(&c, "ns", [("app", "b")]);
        assert_eq!(labels_hash(&a), labels_hash(&a.clone()));
        assert_ne!(labels_hash(&a), labels_hash(&b));
        assert_eq!(labels_hash(&a).len(), 64);
        // Pinned: the index key must not change between releases.
        let empty = IdentityLabels::default();
        assert_eq!(
            labels_hash(&empty),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn identity_value_roundtrip() {
        let c = ClusterName::new("east").unwrap();
        let l = IdentityLabels::for_pod(&c, "ns", [("app", "a")]);
        let bytes = encode_identity(IdentityId(0x10100), &l);
        assert_eq!(decode_identity(&bytes), Some((IdentityId(0x10100), l)));
        assert_eq!(decode_identity(b"\xff\xff"), None);
    }
}

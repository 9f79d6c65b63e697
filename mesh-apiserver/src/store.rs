//! The etcd side of the publisher: what this cluster has in etcd, the changes staged since,
//! and batched, fenced transactions that write only what differs.
//!
//! The store starts from a list of the cluster's keys in etcd (the "mark" of mark and sweep)
//! and remembers every value it wrote since. Staging a value equal to what etcd holds is a
//! no-op, so a restarted publisher rewrites nothing that did not change and deletes only
//! what the caller sweeps explicitly after its initial sync.
//!
//! Every transaction carries the leader fence (the create revision of the leader key): a
//! replica that lost its leadership cannot write, even if it has not noticed yet.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, KvClient};
use mesh_core::Backoff;
use mesh_proto::keys::{ClusterKey, Keys};
use mesh_proto::pb;

use crate::etcd_write::{Sink, WriteError, write_batched};
use tracing::{debug, warn};

pub use crate::etcd_write::{
    DEFAULT_TXN_OPS, ETCD_DEFAULT_MAX_TXN_OPS, MAX_TXN_BYTES, MAX_TXN_OPS, TxnOps,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("etcd {op} under {prefix:?} failed: {source}")]
    Etcd {
        op: &'static str,
        prefix: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error(
        "lost leadership: leader key {key:?} is no longer the one created at revision {revision}"
    )]
    Fenced { key: String, revision: i64 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Proof of leadership attached to every write: the leader key and its create revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub key: String,
    pub create_revision: i64,
}

impl Fence {
    pub fn compare(&self) -> Compare {
        Compare::create_revision(self.key.clone(), CompareOp::Equal, self.create_revision)
    }
}

/// What one flush did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlushStats {
    pub puts: usize,
    pub deletes: usize,
    pub txns: usize,
}

/// Callback told about every committed change: `(kind, key, created|updated|deleted)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyChange {
    Created,
    Updated,
    Deleted,
}

/// The cluster's published keys (except identities, which the allocator owns).
pub struct EtcdStore {
    kv: KvClient,
    keys: Keys,
    cluster_prefix: String,
    fence: Option<Fence>,
    max_ops: TxnOps,
    /// What etcd holds, as far as this store knows: listed at start, then every value it
    /// committed.
    written: BTreeMap<String, Vec<u8>>,
    /// Staged changes: `None` deletes.
    pending: BTreeMap<String, Option<Vec<u8>>>,
    /// Objects per kind in `written`.
    counts: HashMap<pb::Kind, usize>,
}

// === impl EtcdStore ===

impl EtcdStore {
    /// Lists the cluster's keys (the mark). Identity keys are left to the allocator.
    pub async fn load(
        kv: KvClient,
        keys: Keys,
        cluster: &str,
        fence: Option<Fence>,
        max_ops: impl Into<TxnOps>,
    ) -> Result<Self> {
        let cluster_prefix = keys.cluster_prefix(cluster);
        let mut store = Self {
            kv,
            keys,
            cluster_prefix,
            fence,
            max_ops: max_ops.into(),
            written: BTreeMap::new(),
            pending: BTreeMap::new(),
            counts: HashMap::new(),
        };
        store.written = store.list_prefix(&store.cluster_prefix.clone()).await?;
        let identities = store.keys.kind_prefix(cluster, pb::Kind::Identity);
        store.written.retain(|k, _| !k.starts_with(&identities));
        let kinds: Vec<pb::Kind> = store
            .written
            .keys()
            .filter_map(|k| store.object_kind(k))
            .collect();
        for kind in kinds {
            *store.counts.entry(kind).or_default() += 1;
        }
        debug!(prefix = %store.cluster_prefix, keys = store.written.len(), "listed published keys");
        Ok(store)
    }

    async fn list_prefix(&mut self, prefix: &str) -> Result<BTreeMap<String, Vec<u8>>> {
        let resp = self
            .kv
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|source| Error::Etcd {
                op: "list",
                prefix: prefix.to_string(),
                source,
            })?;
        let mut out = BTreeMap::new();
        for kv in resp.kvs() {
            match std::str::from_utf8(kv.key()) {
                Ok(k) => {
                    out.insert(k.to_string(), kv.value().to_vec());
                }
                Err(_) => warn!(prefix, key = ?kv.key(), "ignoring a key that is not UTF-8"),
            }
        }
        Ok(out)
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Stages `key = value`; a no-op when etcd already holds exactly that.
    pub fn set(&mut self, key: String, value: Vec<u8>) {
        if self.written.get(&key) == Some(&value) {
            self.pending.remove(&key);
        } else {
            self.pending.insert(key, Some(value));
        }
    }

    /// Stages the deletion of `key`; a no-op when etcd does not hold it.
    pub fn remove(&mut self, key: &str) {
        if self.written.contains_key(key) {
            self.pending.insert(key.to_string(), None);
        } else {
            self.pending.remove(key);
        }
    }

    /// Whether etcd holds `key` (as far as the store knows, staged changes excluded).
    pub fn contains(&self, key: &str) -> bool {
        self.written.contains_key(key)
    }

    /// The value etcd holds at `key` (as far as the store knows, staged changes excluded).
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.written.get(key).map(Vec::as_slice)
    }

    /// Keys etcd holds under `prefix`.
    pub fn keys_under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a String> + 'a {
        self.written
            .range(prefix.to_string()..)
            .map(|(k, _)| k)
            .take_while(move |k| k.starts_with(prefix))
    }

    /// Number of objects of `kind` etcd holds for this cluster.
    pub fn count(&self, kind: pb::Kind) -> usize {
        self.counts.get(&kind).copied().unwrap_or(0)
    }

    fn object_kind(&self, key: &str) -> Option<pb::Kind> {
        match self.keys.parse(key) {
            Some(ClusterKey::Object { kind, .. }) => Some(kind),
            _ => None,
        }
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Writes the staged changes with [`write_batched`] (transactions of at most `max_ops`
    /// operations and [`MAX_TXN_BYTES`], in key order, fenced). On error, what was not
    /// committed stays staged and the call can be retried.
    pub async fn flush(
        &mut self,
        mut on_change: impl FnMut(&str, KeyChange),
    ) -> Result<FlushStats> {
        let mut stats = FlushStats::default();
        let Self {
            kv,
            keys,
            cluster_prefix,
            fence,
            max_ops,
            written,
            pending,
            counts,
        } = self;
        let object_kind = |key: &str| match keys.parse(key) {
            Some(ClusterKey::Object { kind, .. }) => Some(kind),
            _ => None,
        };
        // One in flight, as before the importer pipelined its writes: the publisher's flushes
        // commit in key order (its synced markers after its objects).
        let sink = Sink::Etcd {
            kv,
            fence: fence.as_ref(),
        };
        let committed = write_batched(sink, pending, max_ops, 1, None, |batch| {
            for (k, v) in batch {
                match v {
                    Some(v) => {
                        stats.puts += 1;
                        let change = if written.insert(k.clone(), v).is_some() {
                            KeyChange::Updated
                        } else {
                            if let Some(kind) = object_kind(&k) {
                                *counts.entry(kind).or_default() += 1;
                            }
                            KeyChange::Created
                        };
                        on_change(&k, change);
                    }
                    None => {
                        stats.deletes += 1;
                        if written.remove(&k).is_some()
                            && let Some(kind) = object_kind(&k)
                            && let Some(c) = counts.get_mut(&kind)
                        {
                            *c = c.saturating_sub(1);
                        }
                        on_change(&k, KeyChange::Deleted);
                    }
                }
            }
        })
        .await;
        match committed {
            Ok(txns) => {
                stats.txns = txns;
                Ok(stats)
            }
            Err(WriteError::Etcd(source)) => Err(Error::Etcd {
                op: "txn",
                prefix: cluster_prefix.clone(),
                source,
            }),
            Err(WriteError::Fenced { key, revision }) => Err(Error::Fenced { key, revision }),
        }
    }

    /// Flushes, retrying transient etcd errors with capped exponential backoff until it
    /// succeeds, the fence fails, or `token` is cancelled (then the changes stay staged).
    pub async fn flush_retrying(
        &mut self,
        token: &tokio_util::sync::CancellationToken,
        mut on_change: impl FnMut(&str, KeyChange),
    ) -> Result<FlushStats> {
        let mut retries =
            Backoff::equal_jitter(Duration::from_millis(50), Duration::from_secs(5)).retries();
        let mut total = FlushStats::default();
        loop {
            match self.flush(&mut on_change).await {
                Ok(s) => {
                    total.puts += s.puts;
                    total.deletes += s.deletes;
                    total.txns += s.txns;
                    return Ok(total);
                }
                Err(e @ Error::Fenced { .. }) => return Err(e),
                Err(error) => {
                    let delay = retries.next_delay(rand::random());
                    warn!(%error, retry_in = ?delay, pending = self.pending.len(), "etcd write failed");
                    tokio::select! {
                        _ = token.cancelled() => return Ok(total),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

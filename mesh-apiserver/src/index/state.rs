//! The index proper: [`State`] (objects, synced markers, history, subscribers) and the types it hands out.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mesh_proto::keys::{ClusterKey, Keys};
use mesh_proto::pb::{self, Kind};
use prost::Message;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::*;
use crate::metrics::{ClusterKindLabels, Metrics};

/// Why a value or key under `clusters/` was skipped.
#[derive(Debug, thiserror::Error)]
pub enum SkipReason {
    #[error("key is not UTF-8: {key:?}")]
    KeyNotUtf8 { key: String },
    #[error("key {key:?} has an unknown shape")]
    UnknownKey { key: String },
    #[error("value of {key:?} is not a valid {kind}: {source}")]
    Value {
        key: String,
        kind: &'static str,
        #[source]
        source: prost::DecodeError,
    },
}

impl SkipReason {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            SkipReason::KeyNotUtf8 { .. } => "key_not_utf8",
            SkipReason::UnknownKey { .. } => "unknown_key",
            SkipReason::Value { .. } => "value",
        }
    }
}

/// Configuration of the index.
#[derive(Debug, Clone)]
pub struct IndexConfig {
    pub keys: Keys,
    /// Events kept for resuming streams.
    pub history_events: usize,
    /// Batches buffered per subscriber before it is cut off as slow.
    pub subscriber_buffer: usize,
    /// Keys per page when listing etcd.
    pub list_page_size: i64,
    /// How often the feeder asks etcd for a progress notification when idle; the revision
    /// it returns feeds the streams' heartbeats. A watch silent for 3 intervals after such
    /// a request is considered broken and re-established.
    pub progress_interval: Duration,
    /// Backoff bounds for re-establishing the etcd watch.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl IndexConfig {
    pub fn new(keys: Keys) -> Self {
        Self {
            keys,
            history_events: 100_000,
            subscriber_buffer: 1024,
            list_page_size: 5_000,
            progress_interval: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// One object's identity in the index. Ordered by cluster, then kind in the order of
/// `pb::Kind` (config, nodes, identities, endpoints, services: the order a consumer
/// applies a snapshot in), then name. The cluster name is shared by every key and
/// object of that cluster.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IndexKey {
    pub cluster: Arc<str>,
    pub kind: i32,
    pub name: String,
}

/// One object (or its delete) as the index stores it and fans it out: what streams
/// filter on, and the `pb::Event` encoded once. Streams copy these bytes into their
/// messages; nothing is decoded, cloned or re-encoded per stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Obj {
    pub cluster: Arc<str>,
    pub kind: i32,
    /// etcd mod revision of this change.
    pub revision: i64,
    /// A service's `(global, shared)` flags (`None`: not a service), for the gRPC edge: a
    /// peer sees a non-global or non-shared service as absent
    /// (`mesh_core::select::service_presented`).
    pub service_flags: Option<(bool, bool)>,
    /// A delete: the event has no value.
    pub deleted: bool,
    /// The encoded `pb::Event` (kind, cluster, name, revision, value).
    pub wire: Box<[u8]>,
}

impl Obj {
    /// Encodes the event of `key` at `revision` (`None`: a delete).
    pub fn new(key: &IndexKey, revision: i64, value: Option<pb::event::Value>) -> Self {
        let service_flags = match &value {
            Some(pb::event::Value::Service(s)) => Some((!s.local_only, s.shared)),
            _ => None,
        };
        let deleted = value.is_none();
        let ev = pb::Event {
            kind: key.kind,
            cluster: key.cluster.to_string(),
            name: key.name.clone(),
            revision,
            value,
        };
        Obj {
            cluster: key.cluster.clone(),
            kind: key.kind,
            revision,
            service_flags,
            deleted,
            wire: ev.encode_to_vec().into_boxed_slice(),
        }
    }

    /// The event, decoded from the stored bytes (status, tests and the rare paths that
    /// need a field; never the fan-out).
    pub fn event(&self) -> pb::Event {
        // The bytes were encoded by `Obj::new` from a valid event: decoding cannot fail
        // short of memory corruption, and an empty event is the only sane fallback.
        pb::Event::decode(&*self.wire).unwrap_or_default()
    }

    /// The object's name within (cluster, kind).
    pub fn name(&self) -> String {
        self.event().name
    }
}

/// One change as fanned out to subscribers.
#[derive(Debug, Clone)]
pub enum IndexChange {
    /// An upsert, or a delete, encoded once.
    Object(Arc<Obj>),
    /// The synced marker of `(cluster, kind)` appeared.
    Synced { cluster: String, kind: Kind },
}

/// The changes of one etcd watch response (or of a re-list diff), at `revision`.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// The highest revision the index has applied once this batch is applied.
    pub revision: i64,
    pub changes: Vec<IndexChange>,
}

/// A raw etcd event (from a watch response or a list).
#[derive(Debug, Clone)]
pub struct RawEvent {
    pub key: Vec<u8>,
    /// `None` for a delete.
    pub value: Option<Vec<u8>>,
    pub mod_revision: i64,
}

/// Why a subscriber gets a fresh snapshot instead of resuming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResetReason {
    /// The requested revision is older than the oldest one the history can resume from.
    TooOld { requested: i64, oldest: i64 },
    /// The requested revision is newer than the index (etcd was restored or replaced).
    Ahead { requested: i64, current: i64 },
    /// The requested revision is older than the history and etcd could not be read at it
    /// (compacted, or etcd failed), so the difference cannot be computed.
    Unreadable {
        requested: i64,
        oldest: i64,
        error: String,
    },
}

impl ResetReason {
    pub fn label(&self) -> &'static str {
        match self {
            ResetReason::TooOld { .. } => "too_old",
            ResetReason::Ahead { .. } => "ahead",
            ResetReason::Unreadable { .. } => "compacted",
        }
    }
}

impl fmt::Display for ResetReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResetReason::TooOld { requested, oldest } => write!(
                f,
                "resume revision {requested} is older than the server's history (oldest resumable revision {oldest})"
            ),
            ResetReason::Ahead { requested, current } => write!(
                f,
                "resume revision {requested} is ahead of the server's revision {current} (etcd was replaced or restored)"
            ),
            ResetReason::Unreadable {
                requested,
                oldest,
                error,
            } => write!(
                f,
                "resume revision {requested} is older than the server's history (oldest resumable revision {oldest}) and etcd cannot be read at it: {error}"
            ),
        }
    }
}

/// A consistent copy of the index at `revision`.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub revision: i64,
    /// Objects in `IndexKey` order.
    pub objects: Vec<Arc<Obj>>,
    /// `(cluster, kind)` whose synced marker exists at `revision`.
    pub synced: Vec<(String, Kind)>,
}

/// How a subscription starts.
#[derive(Debug)]
pub enum Start {
    /// A full snapshot; `reset` is set when the subscriber asked to resume and could not.
    Snapshot {
        snapshot: Snapshot,
        reset: Option<ResetReason>,
    },
    /// The batches after the requested revision, then the synced markers that exist now.
    Resume {
        from: i64,
        missed: Vec<Arc<Batch>>,
        synced: Vec<(String, Kind)>,
        revision: i64,
    },
}

/// Which objects a subscriber wants in its snapshot.
pub type Filter<'a> = &'a (dyn Fn(&str, Kind) -> bool + Sync);

/// What a subscription's next update is.
#[derive(Debug)]
pub enum Update {
    Batch(Arc<Batch>),
    /// The subscriber fell behind (its buffer was full) and was cut from live delivery;
    /// it must subscribe again with its last revision.
    Lagged,
    /// The index shut down.
    Closed,
}

/// A live subscription.
#[derive(Debug)]
pub struct Subscription {
    pub start: Start,
    rx: mpsc::Receiver<Arc<Batch>>,
    lagged: Arc<AtomicBool>,
}

impl Subscription {
    /// The next batch; `Lagged` once the index cut this subscriber off.
    pub async fn next(&mut self) -> Update {
        match self.rx.recv().await {
            Some(b) => Update::Batch(b),
            None if self.lagged.load(Ordering::Acquire) => Update::Lagged,
            None => Update::Closed,
        }
    }

    /// The next batch if one is already queued (to coalesce a backlog).
    pub fn try_next(&mut self) -> Option<Arc<Batch>> {
        self.rx.try_recv().ok()
    }
}

#[derive(Debug)]
struct Subscriber {
    tx: mpsc::Sender<Arc<Batch>>,
    lagged: Arc<AtomicBool>,
}

/// The synchronous index. One writer (the feeder), many readers (`subscribe`, `status`).
#[derive(Debug)]
pub struct State {
    keys: Keys,
    metrics: Metrics,
    history_limit: usize,
    subscriber_buffer: usize,
    pub(super) loaded: bool,
    pub(super) revision: i64,
    objects: BTreeMap<IndexKey, Arc<Obj>>,
    /// Every cluster name seen, shared by the keys and objects of that cluster.
    cluster_names: BTreeSet<Arc<str>>,
    synced: BTreeMap<(String, i32), i64>,
    counts: HashMap<(Arc<str>, i32), u64>,
    history: VecDeque<Arc<Batch>>,
    history_len: usize,
    /// The oldest revision a subscriber can resume from: every change after it is in
    /// `history`.
    pub(super) history_start: i64,
    subscribers: Vec<Subscriber>,
}

/// Counts of one cluster, for `Status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterCounts {
    /// `(kind, count, synced)` for every kind.
    pub kinds: Vec<(Kind, u64, bool)>,
    /// The id from the cluster's config, if known.
    pub id: Option<u32>,
}

fn kind_name(kind: Kind) -> &'static str {
    mesh_proto::keys::kind_segment(kind).unwrap_or("unspecified")
}

fn kind_of(k: i32) -> Kind {
    Kind::try_from(k).unwrap_or(Kind::Unspecified)
}

enum Decoded {
    Object {
        cluster: String,
        kind: Kind,
        name: String,
        value: Option<pb::event::Value>,
    },
    Synced(String, Kind),
}

/// A full list of the clusters prefix, decoded page by page (the raw pages are dropped
/// as soon as they are decoded), before [`State::reset_listed`] swaps it in.
#[derive(Debug, Default)]
pub struct Listing {
    objects: BTreeMap<IndexKey, Arc<Obj>>,
    synced: BTreeMap<(String, i32), i64>,
}

fn decode_value(kind: Kind, key: &str, v: &[u8]) -> Result<pb::event::Value, SkipReason> {
    use pb::event::Value;
    let err = |kind_name: &'static str| {
        move |source| SkipReason::Value {
            key: key.to_owned(),
            kind: kind_name,
            source,
        }
    };
    Ok(match kind {
        Kind::Config => Value::Config(pb::ClusterConfig::decode(v).map_err(err("ClusterConfig"))?),
        Kind::Node => Value::Node(pb::Node::decode(v).map_err(err("Node"))?),
        Kind::Identity => Value::Identity(pb::Identity::decode(v).map_err(err("Identity"))?),
        Kind::Endpoint => Value::Endpoint(pb::Endpoint::decode(v).map_err(err("Endpoint"))?),
        Kind::Service => {
            Value::Service(pb::GlobalService::decode(v).map_err(err("GlobalService"))?)
        }
        Kind::Policy => Value::Policy(pb::Policy::decode(v).map_err(err("Policy"))?),
        Kind::Link => Value::Link(pb::PeerLink::decode(v).map_err(err("PeerLink"))?),
        Kind::Unspecified => {
            return Err(SkipReason::UnknownKey {
                key: key.to_owned(),
            });
        }
    })
}

// === impl State ===

impl State {
    pub fn new(cfg: &IndexConfig, metrics: Metrics) -> Self {
        Self {
            keys: cfg.keys.clone(),
            metrics,
            history_limit: cfg.history_events,
            subscriber_buffer: cfg.subscriber_buffer.max(1),
            loaded: false,
            revision: 0,
            objects: BTreeMap::new(),
            cluster_names: BTreeSet::new(),
            synced: BTreeMap::new(),
            counts: HashMap::new(),
            history: VecDeque::new(),
            history_len: 0,
            history_start: 0,
            subscribers: Vec::new(),
        }
    }

    pub fn revision(&self) -> i64 {
        self.revision
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded
    }

    pub fn history_start(&self) -> i64 {
        self.history_start
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    pub fn subscribers(&self) -> usize {
        self.subscribers.len()
    }

    /// The current object at `(cluster, kind, name)`.
    pub fn get(&self, cluster: &str, kind: Kind, name: &str) -> Option<Arc<Obj>> {
        self.objects
            .get(&IndexKey {
                cluster: cluster.into(),
                kind: kind as i32,
                name: name.into(),
            })
            .cloned()
    }

    /// Decodes one raw event. Errors name the key; the caller logs and skips.
    fn decode(&self, raw: &RawEvent) -> Result<Decoded, SkipReason> {
        let key = std::str::from_utf8(&raw.key).map_err(|_| SkipReason::KeyNotUtf8 {
            key: String::from_utf8_lossy(&raw.key).into_owned(),
        })?;
        match self.keys.parse(key) {
            None => Err(SkipReason::UnknownKey { key: key.into() }),
            Some(ClusterKey::Synced { cluster, kind }) => Ok(Decoded::Synced(cluster, kind)),
            Some(ClusterKey::Object {
                cluster,
                kind,
                name,
            }) => {
                let value = match &raw.value {
                    None => None,
                    Some(v) => Some(decode_value(kind, key, v)?),
                };
                Ok(Decoded::Object {
                    cluster,
                    kind,
                    name,
                    value,
                })
            }
        }
    }

    /// The key of `(cluster, kind, name)`, the cluster name shared with every other key
    /// of that cluster.
    fn key(&mut self, cluster: String, kind: Kind, name: String) -> IndexKey {
        let cluster = match self.cluster_names.get(cluster.as_str()) {
            Some(c) => c.clone(),
            None => {
                let c: Arc<str> = cluster.into();
                self.cluster_names.insert(c.clone());
                c
            }
        };
        IndexKey {
            cluster,
            kind: kind as i32,
            name,
        }
    }

    fn skip(&self, err: &SkipReason) {
        warn!(error = %err, "skipping an undecodable entry under clusters/");
        Metrics::inc_reason(&self.metrics.decode_errors, err.reason());
    }

    fn count(&mut self, key: &IndexKey, delta: i64) {
        let c = self
            .counts
            .entry((key.cluster.clone(), key.kind))
            .or_default();
        *c = c.saturating_add_signed(delta);
        let v = *c;
        self.metrics
            .index_objects
            .get_or_create(&ClusterKindLabels {
                cluster: key.cluster.to_string(),
                kind: kind_name(kind_of(key.kind)).into(),
            })
            .set(v as i64);
    }

    fn event(key: &IndexKey, revision: i64, value: Option<pb::event::Value>) -> Arc<Obj> {
        Arc::new(Obj::new(key, revision, value))
    }

    /// Puts or deletes one object; returns the change when something changed.
    fn set(
        &mut self,
        key: IndexKey,
        revision: i64,
        value: Option<pb::event::Value>,
    ) -> Option<IndexChange> {
        let span = tracing::trace_span!("apply", cluster = %key.cluster, kind = kind_name(kind_of(key.kind)), name = %key.name, revision);
        let _e = span.enter();
        match value {
            Some(value) => {
                let ev = Self::event(&key, revision, Some(value));
                if self.objects.insert(key.clone(), ev.clone()).is_none() {
                    self.count(&key, 1);
                }
                Some(IndexChange::Object(ev))
            }
            None => {
                self.objects.remove(&key)?;
                self.count(&key, -1);
                Some(IndexChange::Object(Self::event(&key, revision, None)))
            }
        }
    }

    /// Applies the events of one etcd watch response as one batch.
    pub fn apply(&mut self, events: Vec<RawEvent>) {
        let revision = events
            .iter()
            .map(|e| e.mod_revision)
            .max()
            .unwrap_or(self.revision)
            .max(self.revision);
        let mut changes = Vec::with_capacity(events.len());
        for raw in events {
            match self.decode(&raw) {
                Ok(Decoded::Object {
                    cluster,
                    kind,
                    name,
                    value,
                }) => {
                    let key = self.key(cluster, kind, name);
                    if let Some(c) = self.set(key, raw.mod_revision, value) {
                        changes.push(c);
                    }
                }
                Ok(Decoded::Synced(cluster, kind)) => {
                    let k = (cluster, kind as i32);
                    if raw.value.is_some() {
                        if !self.synced.contains_key(&k) {
                            self.synced.insert(k.clone(), raw.mod_revision);
                            changes.push(IndexChange::Synced { cluster: k.0, kind });
                        }
                    } else {
                        self.synced.remove(&k);
                    }
                }
                Err(err) => {
                    self.skip(&err);
                    // A key that held a valid value and now holds garbage: the old value
                    // is no longer what etcd says, so it is withdrawn rather than kept.
                    if let SkipReason::Value { key, .. } = &err
                        && let Some(ClusterKey::Object {
                            cluster,
                            kind,
                            name,
                        }) = self.keys.parse(key)
                    {
                        let k = self.key(cluster, kind, name);
                        if let Some(c) = self.set(k, raw.mod_revision, None) {
                            changes.push(c);
                        }
                    }
                }
            }
        }
        self.publish(revision, changes);
    }

    /// A progress notification: every change up to `revision` has been applied.
    pub fn advance(&mut self, revision: i64) {
        if revision > self.revision {
            self.publish(revision, Vec::new());
        }
    }

    /// Replaces the whole state with a list taken at `revision`. The first call loads the
    /// index; later calls (after a compaction) diff the list against the index and publish
    /// the difference, deletes included, as one batch at `revision`.
    pub fn reset(&mut self, revision: i64, kvs: Vec<RawEvent>) {
        let mut listing = Listing::default();
        self.list_page(&mut listing, kvs);
        self.reset_listed(revision, listing);
    }

    /// Decodes one page of a list into `listing` (see [`State::reset_listed`]).
    pub fn list_page(&mut self, listing: &mut Listing, kvs: Vec<RawEvent>) {
        for raw in kvs {
            match self.decode(&raw) {
                Ok(Decoded::Object {
                    cluster,
                    kind,
                    name,
                    value: Some(value),
                }) => {
                    let key = self.key(cluster, kind, name);
                    let obj = Self::event(&key, raw.mod_revision, Some(value));
                    listing.objects.insert(key, obj);
                }
                Ok(Decoded::Object { value: None, .. }) => {}
                Ok(Decoded::Synced(cluster, kind)) => {
                    listing
                        .synced
                        .insert((cluster, kind as i32), raw.mod_revision);
                }
                Err(err) => self.skip(&err),
            }
        }
    }

    /// [`State::reset`] with a list decoded by [`State::list_page`].
    pub fn reset_listed(&mut self, revision: i64, listing: Listing) {
        self.metrics.etcd_relists.inc();
        let Listing { objects, synced } = listing;

        if !self.loaded || revision < self.revision {
            if self.loaded {
                // etcd went back in time (restored or replaced): nothing in the history
                // is valid any more. Every subscriber is cut off; they come back with a
                // revision ahead of ours and get a reset.
                warn!(
                    revision,
                    index_revision = self.revision,
                    "etcd revision went backwards; resetting every stream"
                );
                for s in self.subscribers.drain(..) {
                    s.lagged.store(true, Ordering::Release);
                }
                self.history.clear();
                self.history_len = 0;
            }
            for key in self.objects.keys().cloned().collect::<Vec<_>>() {
                self.count(&key, -1);
            }
            self.objects = objects;
            for key in self.objects.keys().cloned().collect::<Vec<_>>() {
                self.count(&key, 1);
            }
            self.synced = synced;
            self.revision = revision;
            self.history_start = revision;
            self.loaded = true;
            self.metrics.index_revision.set(revision);
            info!(revision, objects = self.objects.len(), "index loaded");
            return;
        }

        let mut changes = Vec::new();
        let vanished: Vec<IndexKey> = self
            .objects
            .keys()
            .filter(|k| !objects.contains_key(*k))
            .cloned()
            .collect();
        for key in vanished {
            if let Some(c) = self.set(key, revision, None) {
                changes.push(c);
            }
        }
        for (key, ev) in objects {
            let same = self
                .objects
                .get(&key)
                .is_some_and(|old| old.revision == ev.revision);
            if !same {
                if self.objects.insert(key.clone(), ev.clone()).is_none() {
                    self.count(&key, 1);
                }
                changes.push(IndexChange::Object(ev));
            }
        }
        for (k, rev) in &synced {
            if !self.synced.contains_key(k) {
                changes.push(IndexChange::Synced {
                    cluster: k.0.clone(),
                    kind: kind_of(k.1),
                });
            }
            let _ = rev;
        }
        self.synced = synced;
        info!(
            revision,
            changes = changes.len(),
            "index re-listed after compaction"
        );
        self.publish(revision, changes);
    }

    /// Records a batch in the history and fans it out. Never blocks: a subscriber whose
    /// buffer is full is cut off and told it lagged.
    fn publish(&mut self, revision: i64, changes: Vec<IndexChange>) {
        self.revision = revision;
        self.metrics.index_revision.set(revision);
        let batch = Arc::new(Batch { revision, changes });
        if !batch.changes.is_empty() {
            self.history_len += batch.changes.len();
            self.history.push_back(batch.clone());
            while self.history_len > self.history_limit {
                let Some(old) = self.history.pop_front() else {
                    break;
                };
                self.history_len -= old.changes.len();
                self.history_start = old.revision;
            }
            self.metrics.history_events.set(self.history_len as i64);
        }
        let metrics = &self.metrics;
        self.subscribers
            .retain(|s| match s.tx.try_send(batch.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    s.lagged.store(true, Ordering::Release);
                    metrics.slow_client_drops.inc();
                    debug!(revision, "subscriber fell behind; cut from live delivery");
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
    }

    fn synced_for(&self, filter: Filter<'_>) -> Vec<(String, Kind)> {
        self.synced
            .keys()
            .map(|(c, k)| (c.clone(), kind_of(*k)))
            .filter(|(c, k)| filter(c, *k))
            .collect()
    }

    /// A snapshot of the objects `filter` accepts.
    pub fn snapshot(&self, filter: Filter<'_>) -> Snapshot {
        Snapshot {
            revision: self.revision,
            objects: self
                .objects
                .iter()
                .filter(|(k, _)| filter(&k.cluster, kind_of(k.kind)))
                .map(|(_, v)| v.clone())
                .collect(),
            synced: self.synced_for(filter),
        }
    }

    /// Starts a subscription: from `resume_revision` when the history still holds
    /// everything after it, else from a snapshot (with a reset reason when a resume was
    /// asked for). Registration and snapshot happen under the same borrow, so no change is
    /// lost or duplicated between them.
    pub fn subscribe(&mut self, resume_revision: i64, filter: Filter<'_>) -> Subscription {
        let (tx, rx) = mpsc::channel(self.subscriber_buffer);
        let lagged = Arc::new(AtomicBool::new(false));
        let start = if resume_revision <= 0 {
            Start::Snapshot {
                snapshot: self.snapshot(filter),
                reset: None,
            }
        } else if resume_revision > self.revision {
            Start::Snapshot {
                snapshot: self.snapshot(filter),
                reset: Some(ResetReason::Ahead {
                    requested: resume_revision,
                    current: self.revision,
                }),
            }
        } else if resume_revision < self.history_start {
            Start::Snapshot {
                snapshot: self.snapshot(filter),
                reset: Some(ResetReason::TooOld {
                    requested: resume_revision,
                    oldest: self.history_start,
                }),
            }
        } else {
            // History is in revision order: skip what the subscriber has.
            let first = self
                .history
                .partition_point(|b| b.revision <= resume_revision);
            Start::Resume {
                from: resume_revision,
                missed: self.history.range(first..).cloned().collect(),
                synced: self.synced_for(filter),
                revision: self.revision,
            }
        };
        self.subscribers.push(Subscriber {
            tx,
            lagged: lagged.clone(),
        });
        Subscription { start, rx, lagged }
    }

    /// Whether a subscriber resuming at `resume_revision` needs the difference computed
    /// from etcd: it is older than the history but not ahead of the index.
    pub fn needs_diff(&self, resume_revision: i64) -> bool {
        resume_revision > 0
            && resume_revision < self.history_start
            && resume_revision <= self.revision
    }

    /// Starts a subscription for a subscriber at `from`, older than the history, given
    /// the keys (and their mod revisions) etcd held at `from` (`keys_at_from`, a historical
    /// keys-only read). The subscriber gets one ordinary batch at the current revision:
    /// a delete for every key it had that no longer exists, an upsert for every object
    /// written after `from`; then live batches. Registration and diff happen under the
    /// same borrow, like [`State::subscribe`]. Falls back to `subscribe` when the history
    /// covers `from` after all or `from` is ahead.
    pub fn subscribe_diff(
        &mut self,
        from: i64,
        keys_at_from: &[(Vec<u8>, i64)],
        filter: Filter<'_>,
    ) -> Subscription {
        if !self.needs_diff(from) {
            return self.subscribe(from, filter);
        }
        let (tx, rx) = mpsc::channel(self.subscriber_buffer);
        let lagged = Arc::new(AtomicBool::new(false));
        let mut changes = Vec::new();
        let mut before = BTreeSet::new();
        for (key, _) in keys_at_from {
            let Ok(key) = std::str::from_utf8(key) else {
                continue;
            };
            if let Some(ClusterKey::Object {
                cluster,
                kind,
                name,
            }) = self.keys.parse(key)
                && filter(&cluster, kind)
            {
                let k = IndexKey {
                    cluster: cluster.into(),
                    kind: kind as i32,
                    name,
                };
                if !self.objects.contains_key(&k) {
                    changes.push(IndexChange::Object(Self::event(&k, self.revision, None)));
                }
                before.insert(k);
            }
        }
        for (k, ev) in &self.objects {
            if filter(&k.cluster, kind_of(k.kind)) && ev.revision > from {
                changes.push(IndexChange::Object(ev.clone()));
            }
        }
        // In revision order, as every other batch (the watch-history checker's "ordered"):
        // upserts by their mod revision, then the deletes, which carry the index revision
        // (when a vanished key was deleted is not known from a keys-only read).
        changes.sort_by_key(|c| match c {
            IndexChange::Object(o) => o.revision,
            IndexChange::Synced { .. } => i64::MAX,
        });
        info!(
            from,
            revision = self.revision,
            keys_at_from = before.len(),
            changes = changes.len(),
            "resuming from etcd's history: sending the difference"
        );
        let batch = Arc::new(Batch {
            revision: self.revision,
            changes,
        });
        let start = Start::Resume {
            from,
            missed: vec![batch],
            synced: self.synced_for(filter),
            revision: self.revision,
        };
        self.subscribers.push(Subscriber {
            tx,
            lagged: lagged.clone(),
        });
        Subscription { start, rx, lagged }
    }

    /// Whether the index holds exactly the objects (same mod revisions) and synced markers
    /// of `keys` (a keys-only listing of the clusters prefix). Keys of an unknown shape are
    /// ignored; a key whose value the index could not decode makes it a mismatch.
    pub fn matches_keys(&self, keys: &[(Vec<u8>, i64)]) -> bool {
        let mut objects = 0usize;
        let mut synced = BTreeSet::new();
        for (key, mod_revision) in keys {
            let Ok(key) = std::str::from_utf8(key) else {
                continue;
            };
            match self.keys.parse(key) {
                None => {}
                Some(ClusterKey::Synced { cluster, kind }) => {
                    synced.insert((cluster, kind as i32));
                }
                Some(ClusterKey::Object {
                    cluster,
                    kind,
                    name,
                }) => {
                    let k = IndexKey {
                        cluster: cluster.into(),
                        kind: kind as i32,
                        name,
                    };
                    match self.objects.get(&k) {
                        Some(ev) if ev.revision == *mod_revision => objects += 1,
                        _ => return false,
                    }
                }
            }
        }
        objects == self.objects.len() && synced.iter().eq(self.synced.keys())
    }

    /// Per-cluster counts and synced flags, for `Status`.
    pub fn counts(&self) -> BTreeMap<String, ClusterCounts> {
        let mut clusters: BTreeSet<&str> = self.counts.keys().map(|(c, _)| &**c).collect();
        clusters.extend(self.synced.keys().map(|(c, _)| c.as_str()));
        clusters
            .into_iter()
            .map(|c| {
                let kinds = mesh_proto::keys::PUBLISHED_KINDS
                    .iter()
                    .map(|k| {
                        let key = (c.to_owned(), *k as i32);
                        let count = self
                            .counts
                            .get(&(Arc::from(c), *k as i32))
                            .copied()
                            .unwrap_or(0);
                        (*k, count, self.synced.contains_key(&key))
                    })
                    .collect();
                let id = self
                    .get(c, Kind::Config, "")
                    .and_then(|obj| match obj.event().value {
                        Some(pb::event::Value::Config(cfg)) => Some(cfg.id),
                        _ => None,
                    });
                (c.to_owned(), ClusterCounts { kinds, id })
            })
            .collect()
    }

    /// Drops every subscriber (shutdown).
    pub(super) fn close(&mut self) {
        self.subscribers.clear();
    }
}

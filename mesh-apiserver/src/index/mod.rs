//! The serving index (DESIGN.md section 7): ONE etcd watch on `<prefix>clusters/` feeds an
//! in-memory copy of every object, the synced markers and a bounded history of recent
//! changes. Watch streams are served from it, never with an etcd watch per client.
//!
//! The index proper ([`State`]) is synchronous with one writer (the feeder task):
//! [`State::reset`] for a full list at a revision, [`State::apply`] for one etcd watch
//! response, [`State::advance`] for a progress notification. Subscribers take a snapshot
//! or the missed part of the history under the same lock as their registration, so no
//! change falls between the two, and then receive `Arc<Batch>`es through a bounded channel.
//! A subscriber whose channel is full is cut off (never waited for) and told so; it resumes
//! from its last revision, from the history if it is still there.
//!
//! A subscriber older than the history (the server restarted, or the history was trimmed)
//! is resumed with the difference between etcd at its revision (a keys-only historical
//! read, [`read_keys_at`]) and the index now ([`State::subscribe_diff`]); only when etcd
//! compacted that revision does it get a reset and a snapshot.

mod feeder;
mod state;
#[cfg(test)]
mod tests;

use feeder::*;
pub use state::*;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use etcd_client::GetOptions;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span};

use crate::metrics::Metrics;

/// Errors of the index and its feeder.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("listing {prefix:?} from etcd: {source}")]
    List {
        prefix: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("watching {prefix:?} from revision {from}: {source}")]
    Watch {
        prefix: String,
        from: i64,
        #[source]
        source: etcd_client::Error,
    },
    #[error("the etcd watch was canceled by the server: {reason}")]
    WatchCanceled { reason: String },
    #[error("the etcd watch stream ended")]
    WatchClosed,
    #[error("the etcd watch sent nothing for {0:?} after a progress request")]
    WatchStalled(Duration),
    #[error("the index is shut down")]
    Shutdown,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A cheap handle on the shared index.
#[derive(Debug, Clone)]
pub struct Index {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    loaded: watch::Sender<bool>,
    revision: watch::Sender<i64>,
    etcd_ok: AtomicBool,
}

// === impl Index ===

impl Index {
    /// An index not fed by etcd (tests feed it through `with_state`).
    pub fn new(cfg: &IndexConfig, metrics: Metrics) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::new(cfg, metrics)),
                loaded: watch::channel(false).0,
                revision: watch::channel(0).0,
                etcd_ok: AtomicBool::new(false),
            }),
        }
    }

    /// Creates the index and spawns the task that feeds it from one etcd watch until
    /// `shutdown`.
    pub fn start(
        etcd: etcd_client::Client,
        cfg: IndexConfig,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let index = Self::new(&cfg, metrics.clone());
        let feeder = Feeder {
            index: index.clone(),
            etcd,
            prefix: cfg.keys.clusters_prefix(),
            cfg,
            metrics,
            shutdown,
        };
        let task = tokio::spawn(feeder.run().instrument(info_span!("index_feeder")));
        (index, task)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The lock is never held across an await or a panic-prone call; a poisoned lock
        // would mean a bug in the index itself, which is unrecoverable.
        self.inner.state.lock().expect("index lock poisoned")
    }

    /// Runs `f` with the state (tests, status, the memory check).
    pub fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut st = self.lock();
        let was_loaded = st.loaded;
        let r = f(&mut st);
        let rev = st.revision;
        let loaded = st.loaded;
        drop(st);
        self.inner.revision.send_if_modified(|r| {
            let changed = *r != rev;
            *r = rev;
            changed
        });
        if loaded && !was_loaded {
            self.inner.loaded.send_replace(true);
        }
        r
    }

    /// Waits until the index has applied `revision`.
    pub async fn wait_revision(&self, revision: i64) -> Result<()> {
        let mut rx = self.inner.revision.subscribe();
        rx.wait_for(|r| *r >= revision)
            .await
            .map_err(|_| Error::Shutdown)?;
        Ok(())
    }

    /// Waits until the first list has been loaded.
    pub async fn wait_loaded(&self) -> Result<()> {
        let mut rx = self.inner.loaded.subscribe();
        rx.wait_for(|l| *l).await.map_err(|_| Error::Shutdown)?;
        Ok(())
    }

    pub fn is_loaded(&self) -> bool {
        *self.inner.loaded.borrow()
    }

    /// Whether the feeder's etcd watch is currently established.
    pub fn etcd_connected(&self) -> bool {
        self.inner.etcd_ok.load(Ordering::Acquire)
    }

    pub fn revision(&self) -> i64 {
        self.lock().revision
    }

    /// Subscribes once the index is loaded. See [`State::subscribe`].
    pub async fn subscribe(
        &self,
        resume_revision: i64,
        filter: Filter<'_>,
    ) -> Result<Subscription> {
        self.wait_loaded().await?;
        Ok(self.lock().subscribe(resume_revision, filter))
    }

    pub fn counts(&self) -> BTreeMap<String, ClusterCounts> {
        self.lock().counts()
    }

    /// Subscribes like [`Index::subscribe`], except that a subscriber older than the
    /// history is resumed with the difference between etcd at its revision (a keys-only
    /// historical read of `prefixes`) and the index now, instead of a reset and a
    /// snapshot. Only when etcd cannot be read at that revision (compacted) does it get
    /// `Reset` ([`ResetReason::Unreadable`]).
    pub async fn subscribe_resuming(
        &self,
        etcd: &etcd_client::Client,
        prefixes: &[String],
        page_size: i64,
        resume_revision: i64,
        filter: Filter<'_>,
    ) -> Result<Subscription> {
        self.wait_loaded().await?;
        {
            let mut st = self.lock();
            if !st.needs_diff(resume_revision) {
                return Ok(st.subscribe(resume_revision, filter));
            }
        }
        let mut keys = Vec::new();
        let mut failure = None;
        for prefix in prefixes {
            match read_keys_at(etcd, prefix, resume_revision, page_size).await {
                Ok(mut k) => keys.append(&mut k),
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            }
        }
        let mut st = self.lock();
        Ok(match failure {
            None => st.subscribe_diff(resume_revision, &keys, filter),
            Some(error) => {
                let mut sub = st.subscribe(resume_revision, filter);
                if let Start::Snapshot {
                    reset: reset @ Some(ResetReason::TooOld { .. }),
                    ..
                } = &mut sub.start
                {
                    let oldest = st.history_start;
                    *reset = Some(ResetReason::Unreadable {
                        requested: resume_revision,
                        oldest,
                        error: error.to_string(),
                    });
                }
                sub
            }
        })
    }
}

/// The keys (with their mod revisions) under `prefix` at `revision`, read keys-only in
/// pages. Fails when etcd compacted past `revision`.
pub async fn read_keys_at(
    etcd: &etcd_client::Client,
    prefix: &str,
    revision: i64,
    page_size: i64,
) -> Result<Vec<(Vec<u8>, i64)>, etcd_client::Error> {
    let end = prefix_end(prefix.as_bytes());
    let mut kv = etcd.kv_client();
    let mut start = prefix.as_bytes().to_vec();
    let mut out = Vec::new();
    loop {
        let opts = GetOptions::new()
            .with_range(end.clone())
            .with_limit(page_size.max(1))
            .with_keys_only()
            .with_revision(revision);
        let resp = kv.get(start.clone(), Some(opts)).await?;
        let more = resp.more();
        out.extend(
            resp.kvs()
                .iter()
                .map(|kv| (kv.key().to_vec(), kv.mod_revision())),
        );
        match (more, out.last()) {
            (true, Some((last, _))) => {
                let mut next = last.clone();
                next.push(0);
                start = next;
            }
            _ => break,
        }
    }
    Ok(out)
}

//! The feeder: the one etcd watch that keeps the [`State`] current.

use std::sync::atomic::Ordering;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions};
use mesh_core::backoff::{Backoff, Retries};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::*;
use crate::metrics::Metrics;

/// Feeds the index from etcd: list at R, watch from R+1, re-establish with backoff,
/// re-list on compaction.
pub(super) struct Feeder {
    pub(super) index: Index,
    pub(super) etcd: etcd_client::Client,
    pub(super) prefix: String,
    pub(super) cfg: IndexConfig,
    pub(super) metrics: Metrics,
    pub(super) shutdown: CancellationToken,
}

enum WatchEnd {
    Compacted(i64),
    Shutdown,
}

/// The first key after every key with `prefix`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

// === impl Feeder ===

impl Feeder {
    pub(super) async fn run(mut self) {
        // Equal jitter: the feeder retries its own etcd, keeping a floor between attempts.
        let mut backoff =
            Backoff::equal_jitter(self.cfg.backoff_min, self.cfg.backoff_max).retries();
        let mut need_list = true;
        loop {
            if self.shutdown.is_cancelled() {
                break;
            }
            if need_list {
                match self.list().await {
                    Ok((rev, listing)) => {
                        self.index.with_state(|st| st.reset_listed(rev, listing));
                        need_list = false;
                    }
                    Err(error) => {
                        self.inner_etcd_ok(false);
                        warn!(%error, "listing etcd failed; retrying");
                        if self.sleep(backoff.next_delay(rand::random())).await {
                            break;
                        }
                        continue;
                    }
                }
            }
            let from = self.index.revision() + 1;
            match self.watch(from, &mut backoff).await {
                Ok(WatchEnd::Shutdown) => break,
                Ok(WatchEnd::Compacted(rev)) => {
                    Metrics::inc_reason(&self.metrics.etcd_watch_restarts, "compacted");
                    warn!(
                        from,
                        compact_revision = rev,
                        "etcd compacted past the index revision; re-listing"
                    );
                    need_list = true;
                }
                Err(error) => {
                    self.inner_etcd_ok(false);
                    let reason = match error {
                        Error::WatchClosed => "closed",
                        Error::WatchCanceled { .. } => "canceled",
                        Error::WatchStalled(_) => "stalled",
                        _ => "error",
                    };
                    Metrics::inc_reason(&self.metrics.etcd_watch_restarts, reason);
                    warn!(%error, from, "etcd watch broke; re-establishing");
                    if self.sleep(backoff.next_delay(rand::random())).await {
                        break;
                    }
                }
            }
        }
        self.index.with_state(|st| st.close());
        info!("index feeder stopped");
    }

    fn inner_etcd_ok(&self, ok: bool) {
        self.index.inner.etcd_ok.store(ok, Ordering::Release);
    }

    /// Sleeps unless shut down first; returns true on shutdown.
    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.shutdown.cancelled() => true,
            _ = tokio::time::sleep(d) => false,
        }
    }

    /// Lists the clusters prefix at one revision, in pages, each decoded as it arrives.
    async fn list(&mut self) -> Result<(i64, Listing)> {
        let end = prefix_end(self.prefix.as_bytes());
        let mut kv = self.etcd.kv_client();
        let mut start = self.prefix.as_bytes().to_vec();
        let mut revision = 0;
        let mut listing = Listing::default();
        let mut keys = 0usize;
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(self.cfg.list_page_size);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let mut resp =
                kv.get(start.clone(), Some(opts))
                    .await
                    .map_err(|source| Error::List {
                        prefix: self.prefix.clone(),
                        source,
                    })?;
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            let more = resp.more();
            let kvs = resp.take_kvs();
            let last = kvs.last().map(|k| k.key().to_vec());
            keys += kvs.len();
            let page = kvs
                .into_iter()
                .map(|kv| {
                    let mod_revision = kv.mod_revision();
                    let (key, value) = kv.into_key_value();
                    RawEvent {
                        key,
                        value: Some(value),
                        mod_revision,
                    }
                })
                .collect();
            self.index.lock().list_page(&mut listing, page);
            match (more, last) {
                (true, Some(mut last)) => {
                    last.push(0);
                    start = last;
                }
                _ => break,
            }
        }
        self.inner_etcd_ok(true);
        debug!(revision, keys, "listed etcd");
        Ok((revision, listing))
    }

    /// Watches from `from` until the watch breaks (Err), etcd compacted past `from`, or
    /// shutdown.
    async fn watch(&mut self, from: i64, backoff: &mut Retries) -> Result<WatchEnd> {
        let werr = |source| Error::Watch {
            prefix: self.prefix.clone(),
            from,
            source,
        };
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from)
            .with_progress_notify();
        let mut stream = self
            .etcd
            .watch_client()
            .watch(self.prefix.clone(), Some(opts))
            .await
            .map_err(werr)?;
        let mut tick = tokio::time::interval(self.cfg.progress_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        // Progress requests sent since the last response; 3 unanswered = stalled.
        let mut unanswered = 0u32;
        // etcd 3.4 answers a progress request with its current revision even while this
        // watch is still replaying older events (etcd-io/etcd#15220). A watch created at
        // etcd revision T that starts at or before T is replaying until an event at T or
        // later arrives, or until a keys-only read at T shows the index already holds
        // exactly etcd's state at T; until then progress answers are not applied, so the
        // index revision never runs ahead of what it holds.
        let mut replay_until: Option<i64> = None;
        // After such a check passed, replayed events at or before this revision are
        // already reflected in the index and are skipped.
        let mut skip_through = 0i64;
        loop {
            let msg = tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(WatchEnd::Shutdown),
                _ = tick.tick() => {
                    if unanswered >= 3 {
                        return Err(Error::WatchStalled(self.cfg.progress_interval * 3));
                    }
                    unanswered += 1;
                    stream.request_progress().await.map_err(werr)?;
                    continue;
                }
                msg = stream.message() => msg.map_err(werr)?,
            };
            unanswered = 0;
            let Some(resp) = msg else {
                return Err(Error::WatchClosed);
            };
            if resp.compact_revision() > 0 {
                return Ok(WatchEnd::Compacted(resp.compact_revision()));
            }
            if resp.canceled() {
                return Err(Error::WatchCanceled {
                    reason: resp.cancel_reason().to_owned(),
                });
            }
            if resp.created() {
                self.inner_etcd_ok(true);
                backoff.reset();
                let created_at = resp.header().map(|h| h.revision()).unwrap_or(0);
                if created_at >= from {
                    replay_until = Some(created_at);
                }
                debug!(from, created_at, "etcd watch established");
                if resp.events().is_empty() {
                    continue;
                }
            }
            if resp.events().is_empty() {
                let Some(rev) = resp.header().map(|h| h.revision()) else {
                    continue;
                };
                match replay_until {
                    // A progress notification on a watch past its replay: every event up
                    // to the header revision has been delivered.
                    None => self.index.with_state(|st| st.advance(rev)),
                    Some(target) => {
                        if self.holds_state_at(target).await {
                            debug!(target, "the index holds etcd's state; replay is over");
                            self.index.with_state(|st| st.advance(target));
                            skip_through = target;
                            replay_until = None;
                        } else {
                            debug!(
                                target,
                                progress = rev,
                                "progress answer during replay not applied"
                            );
                        }
                    }
                }
                continue;
            }
            if let Some(target) = replay_until
                && resp
                    .events()
                    .iter()
                    .filter_map(|e| e.kv())
                    .any(|kv| kv.mod_revision() >= target)
            {
                replay_until = None;
            }
            let events: Vec<RawEvent> = resp
                .events()
                .iter()
                .filter(|e| e.kv().is_some_and(|kv| kv.mod_revision() > skip_through))
                .filter_map(|e| {
                    let kv = e.kv()?;
                    Some(RawEvent {
                        key: kv.key().to_vec(),
                        value: match e.event_type() {
                            EventType::Put => Some(kv.value().to_vec()),
                            EventType::Delete => None,
                        },
                        mod_revision: kv.mod_revision(),
                    })
                })
                .collect();
            if !events.is_empty() {
                self.index.with_state(|st| st.apply(events));
            }
        }
    }

    /// Whether the index holds exactly etcd's state of the clusters prefix at `revision`
    /// (keys and mod revisions, read keys-only). A failed read counts as no.
    async fn holds_state_at(&self, revision: i64) -> bool {
        match read_keys_at(&self.etcd, &self.prefix, revision, self.cfg.list_page_size).await {
            Ok(keys) => self.index.with_state(|st| st.matches_keys(&keys)),
            Err(error) => {
                debug!(%error, revision, "cannot check the index against etcd");
                false
            }
        }
    }
}

//! Leader election among the apiserver replicas of one cluster, at `<prefix>leader`.
//!
//! A replica becomes leader by creating the leader key, attached to a lease, in a
//! transaction that requires the key to be absent. It keeps the lease alive every TTL/3. It
//! stops being leader (and must stop publishing at once) when the lease cannot be renewed
//! for 2/3 of its TTL, when etcd says the lease is gone, or when the leader key is deleted or
//! recreated. Every write of the leader carries the key's create revision as a fence
//! ([`crate::store::Fence`]), so even a leader that has not noticed its loss yet cannot
//! write. Followers watch the key and campaign again as soon as it is deleted.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, WatchOptions};
use mesh_core::Backoff;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::store::Fence;

/// Default lease TTL of the leader key.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("leader election at {key:?}: etcd {op} failed: {source}")]
    Etcd {
        key: String,
        op: &'static str,
        #[source]
        source: etcd_client::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone)]
pub struct LeaderConfig {
    /// The leader key, `<prefix>leader`.
    pub key: String,
    /// Who this replica is (stored as the key's value, shown to operators).
    pub holder: String,
    pub ttl: Duration,
}

/// Whether this replica is the leader now; changes are observable (for `/readyz`, Status).
#[derive(Debug, Clone)]
pub struct IsLeader(watch::Receiver<bool>);

impl IsLeader {
    pub fn get(&self) -> bool {
        *self.0.borrow()
    }

    pub fn receiver(&self) -> watch::Receiver<bool> {
        self.0.clone()
    }

    /// Waits until leadership equals `want`.
    pub async fn wait_for(&mut self, want: bool) {
        let _ = self.0.wait_for(|v| *v == want).await;
    }
}

/// The sending side of [`IsLeader`].
#[derive(Debug, Clone)]
pub struct LeaderSignal(std::sync::Arc<watch::Sender<bool>>);

impl LeaderSignal {
    pub fn new() -> (Self, IsLeader) {
        let (tx, rx) = watch::channel(false);
        (Self(std::sync::Arc::new(tx)), IsLeader(rx))
    }

    pub fn subscribe(&self) -> IsLeader {
        IsLeader(self.0.subscribe())
    }

    fn set(&self, v: bool) {
        self.0.send_replace(v);
    }
}

/// Campaigns for leadership.
pub struct Elector {
    client: etcd_client::Client,
    cfg: LeaderConfig,
    signal: LeaderSignal,
}

/// A won election. Dropping it (or [`Leadership::resign`]) ends the term locally; `lost` is
/// cancelled when the term ends for any reason.
pub struct Leadership {
    pub fence: Fence,
    /// Cancelled as soon as leadership is lost (or resigned).
    pub lost: CancellationToken,
    lease_id: i64,
    client: etcd_client::Client,
    keeper: Option<JoinHandle<()>>,
    signal: LeaderSignal,
}

// === impl Elector ===

impl Elector {
    pub fn new(client: etcd_client::Client, cfg: LeaderConfig, signal: LeaderSignal) -> Self {
        Self {
            client,
            cfg,
            signal,
        }
    }

    fn err(&self, op: &'static str) -> impl Fn(etcd_client::Error) -> Error + '_ {
        move |source| Error::Etcd {
            key: self.cfg.key.clone(),
            op,
            source,
        }
    }

    /// Waits until this replica is leader (`Some`) or `shutdown` is cancelled (`None`).
    /// Transient etcd errors are retried with backoff.
    pub async fn campaign(&self, shutdown: &CancellationToken) -> Option<Leadership> {
        let mut retries =
            Backoff::equal_jitter(Duration::from_millis(100), Duration::from_secs(5)).retries();
        loop {
            if shutdown.is_cancelled() {
                return None;
            }
            match self.try_once(shutdown).await {
                Ok(Some(l)) => return Some(l),
                Ok(None) => retries.reset(),
                Err(error) => {
                    let delay = retries.next_delay(rand::random());
                    warn!(%error, retry_in = ?delay, "leader election failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// One attempt: win, or wait until the current leader key is deleted (`Ok(None)`).
    async fn try_once(&self, shutdown: &CancellationToken) -> Result<Option<Leadership>> {
        let mut client = self.client.clone();
        let ttl = self.cfg.ttl.as_secs().max(1) as i64;
        let lease = client
            .lease_grant(ttl, None)
            .await
            .map_err(self.err("lease grant"))?;
        let lease_id = lease.id();
        let key = self.cfg.key.clone();
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(
                key.clone(),
                self.cfg.holder.clone(),
                Some(PutOptions::new().with_lease(lease_id)),
            )])
            .or_else(vec![TxnOp::get(key.clone(), None)]);
        let resp = match client.txn(txn).await {
            Ok(r) => r,
            Err(e) => {
                let _ = client.lease_revoke(lease_id).await;
                return Err(self.err("campaign")(e));
            }
        };
        let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
        if resp.succeeded() {
            let fence = Fence {
                key: key.clone(),
                create_revision: revision,
            };
            info!(key = %key, holder = %self.cfg.holder, revision, "became leader");
            self.signal.set(true);
            let lost = CancellationToken::new();
            let keeper = tokio::spawn(
                keep(
                    client.clone(),
                    fence.clone(),
                    lease_id,
                    self.cfg.ttl,
                    lost.clone(),
                    self.signal.clone(),
                )
                .instrument(info_span!("leader", key = %key)),
            );
            return Ok(Some(Leadership {
                fence,
                lost,
                lease_id,
                client,
                keeper: Some(keeper),
                signal: self.signal.clone(),
            }));
        }
        let _ = client.lease_revoke(lease_id).await;
        let holder = resp.op_responses().into_iter().find_map(|r| match r {
            etcd_client::TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            _ => None,
        });
        debug!(key = %key, holder = ?holder, "another replica leads; watching the leader key");
        let mut stream = client
            .watch(
                key.clone(),
                Some(WatchOptions::new().with_start_revision(revision + 1)),
            )
            .await
            .map_err(self.err("watch"))?;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                msg = stream.message() => {
                    let Some(msg) = msg.map_err(self.err("watch"))? else { return Ok(None) };
                    if msg.canceled() {
                        return Ok(None);
                    }
                    if msg.events().iter().any(|e| e.event_type() == EventType::Delete) {
                        debug!(key = %key, "leader key deleted; campaigning");
                        return Ok(None);
                    }
                }
            }
        }
    }
}

/// Keeps the lease alive and watches the leader key until the term ends.
async fn keep(
    mut client: etcd_client::Client,
    fence: Fence,
    lease_id: i64,
    ttl: Duration,
    lost: CancellationToken,
    signal: LeaderSignal,
) {
    let interval = (ttl / 3).max(Duration::from_millis(100));
    let max_silence = ttl * 2 / 3;
    let mut last_ok = Instant::now();
    let mut keepalive: Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)> = None;
    let mut watch = tokio::time::timeout(
        interval,
        client.watch(
            fence.key.clone(),
            Some(WatchOptions::new().with_start_revision(fence.create_revision + 1)),
        ),
    )
    .await
    .ok()
    .and_then(Result::ok);
    let mut tick = tokio::time::interval(interval);
    let reason: &str = loop {
        tokio::select! {
            _ = lost.cancelled() => break "term ended",
            _ = tokio::time::sleep_until(last_ok + max_silence) => break "lease not renewed in time",
            _ = tick.tick() => {
                // Bounded: a hung etcd must not keep the loss timer from firing.
                if keepalive.is_none() {
                    match tokio::time::timeout(interval, client.lease_keep_alive(lease_id)).await {
                        Ok(Ok(pair)) => keepalive = Some(pair),
                        Ok(Err(error)) => { warn!(%error, "opening the lease keep-alive failed"); continue; }
                        Err(_) => { warn!("opening the lease keep-alive timed out"); continue; }
                    }
                }
                if let Some((keeper, _)) = keepalive.as_mut() {
                    match tokio::time::timeout(interval, keeper.keep_alive()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => {
                            warn!(%error, "lease keep-alive failed");
                            keepalive = None;
                        }
                        Err(_) => {
                            warn!("lease keep-alive timed out");
                            keepalive = None;
                        }
                    }
                }
            }
            msg = async { keepalive.as_mut().expect("guarded").1.message().await }, if keepalive.is_some() => {
                match msg {
                    Ok(Some(r)) if r.ttl() > 0 => last_ok = Instant::now(),
                    Ok(Some(_)) => break "lease expired",
                    Ok(None) | Err(_) => { keepalive = None; }
                }
            }
            msg = async { watch.as_mut().expect("guarded").message().await }, if watch.is_some() => {
                match msg {
                    Ok(Some(m)) => {
                        let gone = m.events().iter().any(|e| {
                            e.event_type() == EventType::Delete
                                || e.kv().is_some_and(|kv| kv.create_revision() != fence.create_revision)
                        });
                        if gone { break "leader key deleted or replaced"; }
                    }
                    // Without a watch, the fence on every write and the lease still protect.
                    Ok(None) | Err(_) => watch = None,
                }
            }
        }
    };
    signal.set(false);
    if !lost.is_cancelled() {
        warn!(reason, "lost leadership");
        lost.cancel();
    } else {
        debug!(reason, "leadership ended");
    }
    let _ = client
        .lease_revoke(lease_id)
        .await
        .map(|_| ())
        .or_else(|e| {
            debug!(error = %e, "revoking the lease failed (it will expire)");
            Ok::<(), ()>(())
        });
}

// === impl Leadership ===

impl Leadership {
    /// Ends the term: stops renewing and revokes the lease, so another replica takes over at
    /// once.
    pub async fn resign(mut self) {
        self.lost.cancel();
        if let Some(keeper) = self.keeper.take() {
            let _ = keeper.await;
        }
        let _ = self.client.lease_revoke(self.lease_id).await;
        self.signal.set(false);
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        // The keeper revokes the lease when told the term ended.
        self.lost.cancel();
        self.signal.set(false);
    }
}

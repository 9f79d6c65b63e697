//! The one batched etcd writer, used by the publisher's store ([`crate::store`]) and the peer
//! importer ([`crate::peer`]): staged puts and deletes are written in key order, in
//! transactions bounded by operation count and payload bytes, each guarded by the leader
//! fence when one is given, one at a time or several in flight; and the [`GroupWriter`],
//! through which the importer's peers share transactions (group commit).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use etcd_client::{KvClient, Txn, TxnOp};
use futures::StreamExt;
use futures::future::Either;
use futures::stream::FuturesUnordered;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::{info, warn};

use crate::store::Fence;

/// etcd's default `--max-txn-ops`: what any etcd accepts unless configured lower.
pub const ETCD_DEFAULT_MAX_TXN_OPS: usize = 128;

/// Operations per transaction the apiserver asks for (`--etcd-max-txn-ops`); every etcd
/// mesh starts (the deployment's sidecar, the lab, the tests and benchmarks) is started
/// with `--max-txn-ops` at least this. Measured with `mesh-bench initial-sync
/// --via-importer` (121k keys from a peer): 129 transactions instead of 955, etcd's CPU
/// 1.0 s instead of 1.9-2.2 s, because etcd 3.4 copies its uncommitted write buffer (up to
/// 10,000 entries) for every transaction it applies, whatever the transaction's size.
pub const DEFAULT_TXN_OPS: usize = 1024;

/// The largest `--etcd-max-txn-ops` accepted: [`MAX_TXN_BYTES`] bounds a transaction's
/// payload anyway.
pub const MAX_TXN_OPS: usize = 16384;

/// Payload bound of one transaction: etcd refuses requests over `--max-request-bytes`
/// (1.5 MiB by default); stay well below it. A single larger value still goes alone.
pub const MAX_TXN_BYTES: usize = 1024 * 1024;

/// How many operations one transaction may hold: what the apiserver asks for
/// (`--etcd-max-txn-ops`), lowered to what etcd accepts (its `--max-txn-ops`). Shared by
/// every writer of one etcd (publisher, importer): [`TxnOps::probe`] finds the limit at
/// start, and a transaction etcd refuses for its size probes again (etcd restarted with a
/// lower limit), so the writer's retry fits.
#[derive(Clone, Debug)]
pub struct TxnOps(Arc<AtomicUsize>);

impl TxnOps {
    /// `ops` clamped to `1..=MAX_TXN_OPS`.
    pub fn new(ops: usize) -> Self {
        Self(Arc::new(AtomicUsize::new(ops.clamp(1, MAX_TXN_OPS))))
    }

    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    /// Finds the largest of the current limit, its half, its quarter... that etcd accepts,
    /// with read-only transactions of that many reads of `probe_key` (nothing is written),
    /// and keeps it. Other errors are returned and leave the limit as it was.
    pub async fn probe(&self, kv: &KvClient, probe_key: &str) -> Result<usize, etcd_client::Error> {
        let asked = self.get();
        let mut ops = asked;
        loop {
            let reads = vec![TxnOp::get(probe_key, None); ops];
            match kv.clone().txn(Txn::new().and_then(reads)).await {
                Ok(_) => break,
                Err(e) if refused_for_size(&e) && ops > 1 => ops /= 2,
                Err(e) => return Err(e),
            }
        }
        self.0.fetch_min(ops, Ordering::Relaxed);
        if ops < asked {
            warn!(
                asked,
                accepted = ops,
                "etcd refuses transactions of {asked} operations (its --max-txn-ops is lower): \
                 writing at most {ops} per transaction, which makes imports of large peers \
                 slower; start etcd with --max-txn-ops={asked} (or set --etcd-max-txn-ops)"
            );
        } else {
            info!(ops, "etcd accepts the transactions' size");
        }
        Ok(ops)
    }

    /// After etcd refused a transaction for its size: probe again (from the current limit),
    /// so that the caller's retry fits. A failed probe keeps the limit; the retry will tell.
    async fn refused(&self, kv: &KvClient, probe_key: &str) {
        let _ = self.probe(kv, probe_key).await;
    }
}

impl Default for TxnOps {
    fn default() -> Self {
        Self::new(DEFAULT_TXN_OPS)
    }
}

impl From<usize> for TxnOps {
    fn from(ops: usize) -> Self {
        Self::new(ops)
    }
}

/// etcd's answer to a transaction over its `--max-txn-ops`.
fn refused_for_size(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if s.code() == tonic::Code::InvalidArgument
            && s.message().contains("too many operations in txn request"))
}

/// Staged changes by key: `Some` puts, `None` deletes.
pub type Staged = BTreeMap<String, Option<Vec<u8>>>;

/// One committed transaction's changes, in key order.
pub type Committed = Vec<(String, Option<Vec<u8>>)>;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("etcd txn: {0}")]
    Etcd(#[source] etcd_client::Error),
    #[error(
        "lost leadership: leader key {key:?} is no longer the one created at revision {revision}"
    )]
    Fenced { key: String, revision: i64 },
}

/// Where [`write_batched`] sends its batches.
#[derive(Clone, Copy)]
pub enum Sink<'a> {
    /// One transaction per batch on the client's connection, conditional on `fence`.
    Etcd {
        kv: &'a KvClient,
        fence: Option<&'a Fence>,
    },
    /// Through a [`GroupWriter`]: a batch may share its transaction with other writers'
    /// batches (never with a fence).
    Group(&'a GroupWriter),
}

/// Writes `pending` in batches of at most `ops` operations (its value when each batch is
/// cut) and [`MAX_TXN_BYTES`], each one transaction (or part of one,
/// with [`Sink::Group`]) conditional on the sink's fence, keeping up to `in_flight` of them
/// (at least 1) in flight. Transactions are
/// sent in key order; with one in flight each waits for the previous commit, with more they
/// may commit in any order, so a caller whose readers need one key committed after others
/// (a synced marker after the objects it vouches for) writes it in a later call. Every key
/// appears once in `pending`, so the order never decides a key's final value.
///
/// `extra`: permits shared between writers (the peer importers) for every transaction in
/// flight beyond each writer's first: one writer alone keeps `in_flight` transactions
/// going, many writing at once (250 peers after a restart) share the permits, so the
/// transactions in flight stay bounded by writers + permits.
///
/// A batch's entries are moved out of `pending` when it is cut (not copied: a large import
/// holds each value once, staged or in flight); after its commit they are handed to
/// `on_commit` (in commit order). On error no new transaction is sent, those in flight are
/// awaited (what they commit is handed over as usual), and the batches that failed go back
/// into `pending`, so what was not committed stays there and the call can be retried
/// (unless the [`GroupWriter`]'s task ended with the runtime, which drops what it held).
/// Returns the transactions committed; when it returns, none is in flight.
pub async fn write_batched(
    sink: Sink<'_>,
    pending: &mut Staged,
    ops: &TxnOps,
    in_flight: usize,
    extra: Option<&Arc<Semaphore>>,
    mut on_commit: impl FnMut(Committed),
) -> Result<usize, WriteError> {
    let in_flight = in_flight.max(1);
    let mut txns = 0;
    let mut error = None;
    let mut running = FuturesUnordered::new();
    loop {
        while error.is_none() && running.len() < in_flight && !pending.is_empty() {
            // Beyond the first, a transaction needs one of the shared permits.
            let permit = match (running.is_empty(), extra) {
                (false, Some(extra)) => match extra.clone().try_acquire_owned() {
                    Ok(p) => Some(p),
                    Err(_) => break,
                },
                _ => None,
            };
            let batch = take_batch(pending, ops.get());
            let txn = match sink {
                Sink::Etcd { kv, fence } => Either::Left(send(kv.clone(), batch, fence, ops)),
                Sink::Group(group) => Either::Right(group.write(batch)),
            };
            running.push(async move {
                let out = txn.await;
                drop(permit);
                out
            });
        }
        let Some((batch, result)) = running.next().await else {
            break;
        };
        match result {
            Ok(()) => {
                txns += 1;
                on_commit(batch);
            }
            Err(e) => {
                // Not committed: staged again (no key of it was staged meanwhile: the
                // caller cannot touch `pending` until this returns).
                pending.extend(batch);
                error.get_or_insert(e);
            }
        }
    }
    match error {
        Some(e) => Err(e),
        None => Ok(txns),
    }
}

/// One transaction of `batch`, conditional on `fence`; hands the batch back with the
/// outcome. When etcd refuses it for its size, `ops` is probed again for the retry.
async fn send(
    mut kv: KvClient,
    batch: Committed,
    fence: Option<&Fence>,
    ops: &TxnOps,
) -> (Committed, Result<(), WriteError>) {
    let txn_ops: Vec<TxnOp> = batch.iter().map(|(k, v)| txn_op(k, v)).collect();
    let mut txn = Txn::new();
    if let Some(f) = fence {
        txn = txn.when(vec![f.compare()]);
    }
    let result = match kv.txn(txn.and_then(txn_ops)).await {
        Err(e) => {
            if refused_for_size(&e) {
                ops.refused(&kv, &batch[0].0).await;
            }
            Err(WriteError::Etcd(e))
        }
        // Only the fence's comparison can fail.
        Ok(resp) if !resp.succeeded() => Err(WriteError::Fenced {
            key: fence.map(|f| f.key.clone()).unwrap_or_default(),
            revision: fence.map_or(0, |f| f.create_revision),
        }),
        Ok(_) => Ok(()),
    };
    (batch, result)
}

/// Group commit for many writers of one etcd (the importer's peers): each writer's batch is
/// a request; the requests queued while a transaction is in flight go out together in the
/// next one, as long as they fit [`TxnOps`] operations and [`MAX_TXN_BYTES`] and share no
/// key. A lone request goes out at once; a partial group waits for the transaction in
/// flight, full groups go out up to `in_flight` at a time. 250 peers each writing a change
/// and a status every second were 575 transactions per second on etcd under the scale
/// profile's churn; grouped they are 243-292. A batch is never split (each writer's
/// batch commits atomically, as it would alone). When a shared transaction fails, its
/// requests are sent again one by one, so each writer gets its own batch's outcome.
/// Requests whose writer stopped waiting are not sent.
#[derive(Clone)]
pub struct GroupWriter {
    tx: mpsc::UnboundedSender<Request>,
}

struct Request {
    batch: Committed,
    bytes: usize,
    done: oneshot::Sender<(Committed, Result<(), WriteError>)>,
}

impl GroupWriter {
    /// Starts the writer's task; it ends when every clone of the writer is dropped and the
    /// requests sent before are done. `txns` counts the transactions sent.
    pub fn spawn(kv: KvClient, ops: impl Into<TxnOps>, in_flight: usize, txns: Counter) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run_group(kv, rx, ops.into(), in_flight.max(1), txns));
        Self { tx }
    }

    /// Writes `batch` (at most the writer's [`TxnOps`] operations for it to share a
    /// transaction; a larger one goes alone) and hands it back with the outcome.
    pub async fn write(&self, batch: Committed) -> (Committed, Result<(), WriteError>) {
        let bytes = batch_bytes(&batch);
        let (done, result) = oneshot::channel();
        let lost = |batch| {
            let status = tonic::Status::unavailable("the etcd group writer has stopped");
            (
                batch,
                Err(WriteError::Etcd(etcd_client::Error::GRpcStatus(status))),
            )
        };
        if let Err(mpsc::error::SendError(r)) = self.tx.send(Request { batch, bytes, done }) {
            return lost(r.batch);
        }
        match result.await {
            Ok(out) => out,
            // The task ended with the runtime (the process is stopping): the batch is gone.
            Err(_) => lost(Vec::new()),
        }
    }
}

fn batch_bytes(batch: &Committed) -> usize {
    batch.iter().map(|(k, v)| entry_bytes(k, v)).sum()
}

/// What one staged change weighs against [`MAX_TXN_BYTES`]: its key and value.
fn entry_bytes(key: &str, value: &Option<Vec<u8>>) -> usize {
    key.len() + value.as_ref().map_or(0, Vec::len)
}

async fn run_group(
    kv: KvClient,
    mut rx: mpsc::UnboundedReceiver<Request>,
    ops: TxnOps,
    in_flight: usize,
    txns: Counter,
) {
    let mut queue: VecDeque<Request> = VecDeque::new();
    let mut running = FuturesUnordered::new();
    let mut open = true;
    loop {
        while running.len() < in_flight {
            queue.retain(|r| !r.done.is_closed());
            let (n, full) = group_len(&queue, ops.get());
            // A partial group waits for the transaction in flight: what arrives meanwhile
            // joins it.
            if n == 0 || (!running.is_empty() && !full) {
                break;
            }
            let group: Vec<Request> = queue.drain(..n).collect();
            txns.inc();
            running.push(send_group(kv.clone(), group, ops.clone()));
        }
        if !open && queue.is_empty() && running.is_empty() {
            return;
        }
        tokio::select! {
            Some(()) = running.next(), if !running.is_empty() => {}
            r = rx.recv(), if open => match r {
                Some(r) => {
                    queue.push_back(r);
                    while let Ok(r) = rx.try_recv() {
                        queue.push_back(r);
                    }
                }
                None => open = false,
            },
        }
    }
}

/// How many requests at the head of `queue` share the next transaction (at least one when
/// the queue is not empty), and whether that transaction is full (the next request would
/// not fit, or the operations reached `max_ops`).
fn group_len(queue: &VecDeque<Request>, max_ops: usize) -> (usize, bool) {
    let (mut ops, mut bytes, mut n) = (0, 0, 0);
    let mut keys: HashSet<&str> = HashSet::new();
    for r in queue {
        let fits = ops + r.batch.len() <= max_ops
            && bytes + r.bytes <= MAX_TXN_BYTES
            && r.batch.iter().all(|(k, _)| !keys.contains(k.as_str()));
        if n > 0 && !fits {
            return (n, true);
        }
        keys.extend(r.batch.iter().map(|(k, _)| k.as_str()));
        ops += r.batch.len();
        bytes += r.bytes;
        n += 1;
    }
    (n, ops >= max_ops)
}

/// One transaction of every request's batch; on failure each request is sent alone.
async fn send_group(kv: KvClient, group: Vec<Request>, ops: TxnOps) {
    if group.len() == 1 {
        let r = group.into_iter().next().expect("one request");
        let _ = r.done.send(send(kv, r.batch, None, &ops).await);
        return;
    }
    let txn_ops: Vec<TxnOp> = group
        .iter()
        .flat_map(|r| r.batch.iter())
        .map(|(k, v)| txn_op(k, v))
        .collect();
    match kv.clone().txn(Txn::new().and_then(txn_ops)).await {
        Ok(_) => {
            for r in group {
                let _ = r.done.send((r.batch, Ok(())));
            }
        }
        Err(e) => {
            if refused_for_size(&e) {
                ops.refused(&kv, &group[0].batch[0].0).await;
            }
            let alone = group.into_iter().map(|r| {
                let (kv, ops) = (kv.clone(), ops.clone());
                async move {
                    let _ = r.done.send(send(kv, r.batch, None, &ops).await);
                }
            });
            futures::future::join_all(alone).await;
        }
    }
}

fn txn_op(k: &str, v: &Option<Vec<u8>>) -> TxnOp {
    match v {
        Some(v) => TxnOp::put(k, v.clone(), None),
        None => TxnOp::delete(k, None),
    }
}

/// Moves the first entries of `pending` that fit one transaction out of it: at most
/// `max_ops`, and at most [`MAX_TXN_BYTES`] of keys and values unless the first alone is
/// larger.
fn take_batch(pending: &mut Staged, max_ops: usize) -> Committed {
    let mut bytes = 0;
    let mut batch = Vec::new();
    while batch.len() < max_ops {
        let Some(first) = pending.first_entry() else {
            break;
        };
        let size = entry_bytes(first.key(), first.get());
        if !batch.is_empty() && bytes + size > MAX_TXN_BYTES {
            break;
        }
        bytes += size;
        batch.push(first.remove_entry());
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staged(entries: &[(&str, usize)]) -> Staged {
        entries
            .iter()
            .map(|(k, n)| (k.to_string(), Some(vec![0; *n])))
            .collect()
    }

    #[test]
    fn batches_are_bounded_by_ops_and_bytes() {
        let mut many: Staged = (0..300).map(|i| (format!("k{i:03}"), None)).collect();
        let b = take_batch(&mut many, 128);
        assert_eq!(b.len(), 128);
        assert_eq!(b[0].0, "k000");
        assert_eq!(many.len(), 172, "the batch's entries left the staged ones");
        assert_eq!(many.first_key_value().unwrap().0, "k128");

        let mut big = staged(&[("a", MAX_TXN_BYTES / 2), ("b", MAX_TXN_BYTES / 2), ("c", 1)]);
        let b = take_batch(&mut big, 128);
        assert_eq!(b.len(), 1, "two halves plus keys exceed the byte bound");
        assert_eq!(big.len(), 2);

        // A value larger than the bound still goes, alone.
        let mut huge = staged(&[("a", MAX_TXN_BYTES * 2), ("b", 1)]);
        assert_eq!(take_batch(&mut huge, 128).len(), 1);
    }
}

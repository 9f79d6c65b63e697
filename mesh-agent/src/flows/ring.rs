//! The agent's bounded ring of flows and its followers.
//!
//! Flows are numbered as they arrive; the ring keeps the newest `capacity` of them, and each
//! is also broadcast to the followers (`GetFlows` with `follow`). A follower subscribes
//! before it reads the ring, then skips broadcast flows it has already sent (by number), so
//! nothing falls between the snapshot and the stream. A follower that cannot keep up loses
//! the oldest broadcasts and is told how many (`LostEvent`, `OBSERVER_EVENTS_QUEUE`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mesh_proto::hubble::flow::{Flow, LostEvent};
use tokio::sync::broadcast;

/// What followers receive.
#[derive(Debug, Clone)]
pub enum RingItem {
    /// A flow and its number.
    Flow(u64, Arc<Flow>),
    /// Records lost before they became flows (e.g. the BPF ring buffer was full).
    Lost(LostEvent),
}

/// The ring. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct FlowRing {
    capacity: usize,
    flows: Mutex<VecDeque<(u64, Arc<Flow>)>>,
    seen: AtomicU64,
    tx: broadcast::Sender<RingItem>,
}

impl FlowRing {
    /// A ring of `capacity` flows (at least 1) whose followers may lag by `follow_buffer`.
    pub fn new(capacity: usize, follow_buffer: usize) -> Self {
        let (tx, _) = broadcast::channel(follow_buffer.max(1));
        Self {
            capacity: capacity.max(1),
            flows: Mutex::new(VecDeque::with_capacity(capacity.max(1))),
            seen: AtomicU64::new(0),
            tx,
        }
    }

    /// Adds a flow, evicting the oldest when full.
    pub fn push(&self, flow: Flow) {
        let flow = Arc::new(flow);
        let n = {
            let mut flows = self.flows.lock().unwrap_or_else(|e| e.into_inner());
            let n = self.seen.fetch_add(1, Ordering::Relaxed) + 1;
            if flows.len() == self.capacity {
                flows.pop_front();
            }
            flows.push_back((n, flow.clone()));
            n
        };
        // No follower is not an error.
        let _ = self.tx.send(RingItem::Flow(n, flow));
    }

    /// Tells followers about records lost before they became flows.
    pub fn lost(&self, event: LostEvent) {
        let _ = self.tx.send(RingItem::Lost(event));
    }

    /// Subscribes to what arrives from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<RingItem> {
        self.tx.subscribe()
    }

    /// The flows held now, oldest first, with their numbers.
    pub fn snapshot(&self) -> Vec<(u64, Arc<Flow>)> {
        self.flows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Flows held now.
    pub fn len(&self) -> usize {
        self.flows.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether the ring holds no flow.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Flows ever pushed.
    pub fn seen(&self) -> u64 {
        self.seen.load(Ordering::Relaxed)
    }
}

/// Which flows of a snapshot a request selects: those `keep` accepts, then the last `number`
/// (or the first, with `first`); `number == 0` keeps all.
pub fn select<T>(snapshot: &[T], number: u64, first: bool, keep: impl Fn(&T) -> bool) -> Vec<&T> {
    let kept: Vec<&T> = snapshot.iter().filter(|f| keep(f)).collect();
    let n = usize::try_from(number).unwrap_or(usize::MAX);
    if number == 0 || kept.len() <= n {
        kept
    } else if first {
        kept[..n].to_vec()
    } else {
        kept[kept.len() - n..].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(uuid: &str) -> Flow {
        Flow {
            uuid: uuid.into(),
            ..Default::default()
        }
    }

    #[test]
    fn keeps_the_newest_capacity_flows_numbered() {
        let ring = FlowRing::new(3, 8);
        for i in 0..5 {
            ring.push(flow(&i.to_string()));
        }
        let snap = ring.snapshot();
        let got: Vec<(u64, &str)> = snap.iter().map(|(n, f)| (*n, f.uuid.as_str())).collect();
        assert_eq!(got, vec![(3, "2"), (4, "3"), (5, "4")]);
        assert_eq!((ring.len(), ring.capacity(), ring.seen()), (3, 3, 5));
    }

    #[test]
    fn followers_get_what_arrives_after_subscribing_and_hear_of_lag() {
        let ring = FlowRing::new(10, 2);
        ring.push(flow("before"));
        let mut rx = ring.subscribe();
        for i in 0..3 {
            ring.push(flow(&i.to_string()));
        }
        // Capacity 2: the oldest broadcast was overwritten.
        assert!(matches!(
            rx.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(1))
        ));
        match rx.try_recv().unwrap() {
            RingItem::Flow(n, f) => assert_eq!((n, f.uuid.as_str()), (3, "1")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn select_takes_last_or_first_n_of_the_kept() {
        let v: Vec<u32> = (1..=10).collect();
        let even = |x: &u32| x.is_multiple_of(2);
        assert_eq!(select(&v, 2, false, even), vec![&8, &10]);
        assert_eq!(select(&v, 2, true, even), vec![&2, &4]);
        assert_eq!(select(&v, 0, false, even).len(), 5);
        assert_eq!(select(&v, 50, false, even).len(), 5);
    }
}

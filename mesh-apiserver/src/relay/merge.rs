//! Pure parts of the relay: ordering flows of many nodes by time ([`SortWindow`] for
//! follow mode, [`last_n`] for a bounded request) and joining the two ends of one
//! connection ([`join_ends`], [`join`]). No IO, no clocks: callers pass `now`.

use std::time::{Duration, Instant};

use mesh_proto::hubble::flow::{Flow, Policy, TrafficDirection, Verdict, layer4};
use mesh_proto::hubble::observer::GetFlowsResponse;
use mesh_proto::hubble::observer::get_flows_response::ResponseTypes;

/// Label added to a joined flow's `node_labels`: the node that saw the client's side.
pub const EGRESS_NODE_LABEL: &str = "mesh.io/egress-node";
/// Label added to a joined flow's `node_labels`: the node that saw the server's side.
pub const INGRESS_NODE_LABEL: &str = "mesh.io/ingress-node";

/// How far apart (by flow time) the egress and ingress records of one connection may be.
pub const DEFAULT_JOIN_WINDOW: Duration = Duration::from_secs(2);

/// A response's time in nanoseconds since the epoch: the flow's own time, else the
/// response's (node status and lost events carry only the latter).
pub fn time_ns(r: &GetFlowsResponse) -> i128 {
    let ts = match &r.response_types {
        Some(ResponseTypes::Flow(f)) => f.time.as_ref().or(r.time.as_ref()),
        _ => r.time.as_ref(),
    };
    ts.map_or(0, |t| {
        i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos)
    })
}

fn flow_of(r: &GetFlowsResponse) -> Option<&Flow> {
    match &r.response_types {
        Some(ResponseTypes::Flow(f)) => Some(f),
        _ => None,
    }
}

/// Sorts `items` by time (stable: equal times keep their order) and keeps the last `n`
/// flows (the first `n` with `first`); `n == 0` keeps every flow. Other responses (node
/// status, lost events) are kept, in time order, whatever `n` is: they are not flows.
pub fn last_n(mut items: Vec<GetFlowsResponse>, n: u64, first: bool) -> Vec<GetFlowsResponse> {
    items.sort_by_key(time_ns);
    let flows = items.iter().filter(|r| flow_of(r).is_some()).count();
    let n = usize::try_from(n).unwrap_or(usize::MAX);
    if n == 0 || flows <= n {
        return items;
    }
    // Keep flows whose rank (in time order) is inside the window.
    let (lo, hi) = if first { (0, n) } else { (flows - n, flows) };
    let mut rank = 0;
    items
        .into_iter()
        .filter(|r| {
            if flow_of(r).is_none() {
                return true;
            }
            let keep = rank >= lo && rank < hi;
            rank += 1;
            keep
        })
        .collect()
}

/// How many flows to ask each source for when the answer is `n` in total (`0`: all). A
/// joined flow spends two records, one of each end's node, so the newest `n` answers can
/// use up to `2n` records of one source; asking each for only `n` would leave the oldest
/// of them unjoined, or cut flows that belong in the answer (an unjoined ingress record
/// would stand in for a joined flow older than it).
pub fn per_source_number(n: u64) -> u64 {
    n.saturating_mul(2)
}

/// A bounded answer (`--last N`, `--first N`): the sources' answers (each cut to
/// [`per_source_number`]) ordered, their ends joined, and cut to `n` in total.
pub fn bounded_answer(
    items: Vec<GetFlowsResponse>,
    n: u64,
    first: bool,
    join_window: Duration,
) -> Vec<GetFlowsResponse> {
    last_n(join_ends(last_n(items, 0, false), join_window), n, first)
}

/// What must be equal for two records to be the two ends of one connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct JoinKey {
    tcp: bool,
    source_ip: String,
    destination_ip: String,
    destination_port: u32,
}

/// The L4 protocol (true = TCP, false = UDP) and ports of a TCP or UDP flow.
fn l4(f: &Flow) -> Option<(bool, u32, u32)> {
    match f.l4.as_ref()?.protocol.as_ref()? {
        layer4::Protocol::Tcp(t) => Some((true, t.source_port, t.destination_port)),
        layer4::Protocol::Udp(u) => Some((false, u.source_port, u.destination_port)),
        _ => None,
    }
}

fn join_key(f: &Flow) -> Option<JoinKey> {
    if f.is_reply == Some(true) {
        return None;
    }
    let ip = f.ip.as_ref()?;
    let (tcp, _, destination_port) = l4(f)?;
    Some(JoinKey {
        tcp,
        source_ip: ip.source.clone(),
        destination_ip: ip.destination.clone(),
        destination_port,
    })
}

fn direction(f: &Flow) -> TrafficDirection {
    TrafficDirection::try_from(f.traffic_direction).unwrap_or(TrafficDirection::Unknown)
}

fn flow_ns(f: &Flow) -> i128 {
    f.time.as_ref().map_or(0, |t| {
        i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos)
    })
}

/// Whether `egress` (the client node's record, made at connect or sendmsg) and `ingress`
/// (the server node's record, made at the first packet) are the two ends of one
/// connection: same protocol, source IP, destination IP and port, source ports equal
/// unless the egress one is 0 (not bound yet at connect), an ingress no older than the
/// egress minus nothing and no later than `window` after it, and neither already joined.
pub fn ends_match(egress: &Flow, ingress: &Flow, window: Duration) -> bool {
    if direction(egress) != TrafficDirection::Egress
        || direction(ingress) != TrafficDirection::Ingress
        || is_joined(egress)
        || is_joined(ingress)
    {
        return false;
    }
    let (Some(ke), Some(ki)) = (join_key(egress), join_key(ingress)) else {
        return false;
    };
    if ke != ki {
        return false;
    }
    let (Some((_, sp_e, _)), Some((_, sp_i, _))) = (l4(egress), l4(ingress)) else {
        return false;
    };
    if sp_e != 0 && sp_e != sp_i {
        return false;
    }
    // Clocks of two nodes differ a little: allow the ingress record to look slightly older.
    let d = flow_ns(ingress) - flow_ns(egress);
    let w = window.as_nanos() as i128;
    d >= -w && d <= w
}

/// Whether a flow is already the join of two records.
pub fn is_joined(f: &Flow) -> bool {
    f.node_labels
        .iter()
        .any(|l| l.starts_with(INGRESS_NODE_LABEL))
}

fn policies(ps: &[Policy]) -> String {
    ps.iter()
        .map(|p| {
            if p.namespace.is_empty() {
                format!("{} {}", p.kind, p.name)
            } else {
                format!("{} {}/{}", p.kind, p.namespace, p.name)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One flow with both ends of a connection (see ARCHITECTURE.md, "Flows: relay"): the
/// egress record as the base (its time, uuid, source, service, node and egress policies),
/// the destination endpoint and L4 of the ingress record (the server knows its pod and the
/// real source port), the ingress record's policies in `ingress_*_by`, and the verdict of
/// the side that dropped it (the ingress side's when only it dropped). Both nodes are kept:
/// `node_name` is the client's node, and `node_labels` name both as
/// `mesh.io/egress-node=<cluster/node>` and `mesh.io/ingress-node=<cluster/node>`.
pub fn join(egress: &Flow, ingress: &Flow) -> Flow {
    let mut f = egress.clone();
    if ingress.destination.is_some() {
        f.destination = ingress.destination.clone();
    }
    if f.source.is_none() {
        f.source = ingress.source.clone();
    }
    if ingress.l4.is_some() {
        f.l4 = ingress.l4;
    }
    if f.destination_service.is_none() {
        f.destination_service = ingress.destination_service.clone();
    }
    f.ingress_allowed_by = ingress.ingress_allowed_by.clone();
    f.ingress_denied_by = ingress.ingress_denied_by.clone();
    let dropped = |x: &Flow| x.verdict == Verdict::Dropped as i32;
    let mut summary = format!("ingress at {}", ingress.node_name);
    if dropped(ingress) && !dropped(egress) {
        f.verdict = ingress.verdict;
        f.drop_reason = ingress.drop_reason;
        f.drop_reason_desc = ingress.drop_reason_desc;
        f.event_type = ingress.event_type;
        summary.push_str(" DROPPED");
        if !ingress.ingress_denied_by.is_empty() {
            summary.push_str(&format!(" by {}", policies(&ingress.ingress_denied_by)));
        }
    } else if !ingress.ingress_allowed_by.is_empty() {
        summary.push_str(&format!(
            " allowed by {}",
            policies(&ingress.ingress_allowed_by)
        ));
    }
    f.node_labels
        .push(format!("{EGRESS_NODE_LABEL}={}", egress.node_name));
    f.node_labels
        .push(format!("{INGRESS_NODE_LABEL}={}", ingress.node_name));
    f.summary = if egress.summary.is_empty() {
        summary
    } else {
        format!("{}; {summary}", egress.summary)
    };
    f
}

fn joined_response(egress: &GetFlowsResponse, ingress_flow: &Flow) -> GetFlowsResponse {
    let e = flow_of(egress).expect("an egress flow");
    let f = join(e, ingress_flow);
    GetFlowsResponse {
        node_name: f.node_name.clone(),
        time: f.time.or(egress.time),
        response_types: Some(ResponseTypes::Flow(f)),
    }
}

/// Among `candidates` (indices into `items`), the other end of `f` nearest in time:
/// several connections from one client to one backend within the window all match on the
/// address key (the egress source port is 0), and the nearest is the right one (the ingress
/// follows its egress by a network hop, successive connections are further apart).
fn nearest<'a>(
    f: &Flow,
    candidates: impl Iterator<Item = (usize, &'a Flow)>,
    window: Duration,
) -> Option<usize> {
    let t = flow_ns(f);
    candidates
        .filter(|(_, g)| ends_match(f, g, window) || ends_match(g, f, window))
        .min_by_key(|(_, g)| (flow_ns(g) - t).abs())
        .map(|(j, _)| j)
}

/// Joins, in a batch of responses, each egress record (in time order) with the nearest in
/// time not yet joined ingress record of the same connection ([`ends_match`]); the pair
/// becomes one response at the egress record's place. Everything else is returned
/// unchanged, in order.
pub fn join_ends(items: Vec<GetFlowsResponse>, window: Duration) -> Vec<GetFlowsResponse> {
    let mut order: Vec<usize> = (0..items.len())
        .filter(|&i| flow_of(&items[i]).is_some_and(|f| direction(f) == TrafficDirection::Egress))
        .collect();
    order.sort_by_key(|&i| time_ns(&items[i]));
    let mut partner: Vec<Option<usize>> = vec![None; items.len()];
    let mut taken = vec![false; items.len()];
    for i in order {
        let f = flow_of(&items[i]).expect("a flow");
        let candidates = items.iter().enumerate().filter_map(|(j, r)| {
            let g = flow_of(r)?;
            (!taken[j] && direction(g) == TrafficDirection::Ingress).then_some((j, g))
        });
        if let Some(j) = nearest(f, candidates, window) {
            taken[j] = true;
            partner[i] = Some(j);
        }
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        if taken[i] {
            continue;
        }
        match partner[i] {
            Some(j) => {
                let g = flow_of(&items[j]).expect("a flow");
                out.push(joined_response(item, g));
            }
            None => out.push(item.clone()),
        }
    }
    out
}

/// Follow mode's bounded sort window (Hubble relay's approach): responses of many nodes
/// are held, ordered by time, and released oldest first once they have been held for
/// `hold`, or at once when more than `max_len` are held. A released flow is joined with
/// its other end when that is held too.
#[derive(Debug)]
pub struct SortWindow {
    held: Vec<(Instant, GetFlowsResponse)>,
    max_len: usize,
    hold: Duration,
    join_window: Duration,
}

impl SortWindow {
    pub fn new(max_len: usize, hold: Duration, join_window: Duration) -> Self {
        Self {
            held: Vec::new(),
            max_len: max_len.max(1),
            hold,
            join_window,
        }
    }

    /// Holds `item`, received at `now`.
    pub fn push(&mut self, item: GetFlowsResponse, now: Instant) {
        // Insert after every item of the same or an earlier time: stable by arrival.
        let t = time_ns(&item);
        let at = self.held.partition_point(|(_, r)| time_ns(r) <= t);
        self.held.insert(at, (now, item));
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// When the oldest held item becomes due, if any is held.
    pub fn next_due(&self) -> Option<Instant> {
        self.held.first().map(|(at, _)| *at + self.hold)
    }

    /// Releases, oldest first, what is due at `now` (or beyond `max_len`).
    pub fn pop_ready(&mut self, now: Instant) -> Vec<GetFlowsResponse> {
        let mut out = Vec::new();
        while let Some((at, _)) = self.held.first() {
            if self.held.len() <= self.max_len && *at + self.hold > now {
                break;
            }
            out.push(self.release_first());
        }
        out
    }

    /// Releases everything, oldest first (the end of a stream).
    pub fn drain(&mut self) -> Vec<GetFlowsResponse> {
        let mut out = Vec::new();
        while !self.held.is_empty() {
            out.push(self.release_first());
        }
        out
    }

    fn release_first(&mut self) -> GetFlowsResponse {
        let (_, item) = self.held.remove(0);
        let Some(f) = flow_of(&item) else {
            return item;
        };
        let partner = nearest(
            f,
            self.held
                .iter()
                .enumerate()
                .filter_map(|(j, (_, r))| flow_of(r).map(|g| (j, g))),
            self.join_window,
        );
        match partner {
            None => item,
            Some(j) => {
                let (_, other) = self.held.remove(j);
                let g = flow_of(&other).expect("a flow");
                if direction(f) == TrafficDirection::Egress {
                    joined_response(&item, g)
                } else {
                    joined_response(&other, f)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;

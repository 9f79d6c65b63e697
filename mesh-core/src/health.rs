//! Passive backend health on one node (DESIGN.md section 13b): which backends the node
//! stops sending new connections to, and for how long.
//!
//! The datapath counts, per backend address, connects that failed (refused, unreachable,
//! given up, or a SYN retransmission) and connects that succeeded. [`HealthTracker`] turns
//! the growth of those counters into quarantines: a backend whose connects fail is
//! quarantined for `base << level` (capped at `max`); each new quarantine of the same
//! backend doubles the period; a success clears it and resets the level. When the period
//! is over, a TCP backend stays quarantined until the agent's own probe connect succeeds
//! ([`HealthTracker::start_probes`], [`HealthTracker::probe_result`]): a failed probe
//! starts the next, doubled period, so no client connect is spent on a dead backend. Without
//! probes ([`HealthConfig::probe`] off, and always for UDP, which has no handshake to
//! probe) a quarantine ends with its period and the next client connect is the probe.
//! [`apply_quarantine`]
//! removes quarantined backends from a frontend's selection, **never the last usable
//! ones**: when every backend of the frontend is quarantined, all are kept.
//!
//! Times are nanoseconds of one monotonic clock (the datapath's CLOCK_BOOTTIME).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use crate::Protocol;
use crate::select::SelectedBackend;

/// A backend as the datapath dials it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

/// The datapath's counters of one backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HealthSample {
    pub failures: u64,
    pub successes: u64,
    pub last_failure_ns: u64,
    pub last_success_ns: u64,
}

/// A quarantine in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quarantine {
    pub until_ns: u64,
    /// Failed connects since the last success.
    pub failures: u64,
    /// How many quarantines in a row, this one included.
    pub level: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    /// The first quarantine's period.
    pub base: Duration,
    /// The longest period.
    pub max: Duration,
    /// TCP quarantines end only when a probe connect succeeds (see the module docs).
    pub probe: bool,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(2),
            max: Duration::from_secs(60),
            probe: true,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Tracked {
    seen: HealthSample,
    failures: u64,
    level: u32,
    until_ns: Option<u64>,
    /// A probe of it is under way (started by [`HealthTracker::start_probes`]).
    probing: bool,
}

/// The quarantine state of a node's backends.
#[derive(Debug, Clone, Default)]
pub struct HealthTracker {
    config: HealthConfig,
    /// When the tracker started: counts of earlier connects are not judged.
    start_ns: u64,
    backends: BTreeMap<BackendAddr, Tracked>,
}

impl HealthTracker {
    /// A tracker started at `start_ns` (connects before it, e.g. under a previous agent,
    /// are not judged again).
    pub fn new(config: HealthConfig, start_ns: u64) -> Self {
        Self {
            config,
            start_ns,
            backends: BTreeMap::new(),
        }
    }

    /// Whether `addr`'s quarantines end only with a successful probe.
    fn probed(config: &HealthConfig, addr: &BackendAddr) -> bool {
        config.probe && addr.protocol == Protocol::Tcp
    }

    /// Whether a quarantine is in force at `now_ns`: within its period, or after it while
    /// the backend awaits a successful probe.
    fn in_force(config: &HealthConfig, addr: &BackendAddr, t: &Tracked, now_ns: u64) -> bool {
        t.until_ns
            .is_some_and(|u| u > now_ns || Self::probed(config, addr))
    }

    fn period(config: &HealthConfig, level: u32) -> u64 {
        let base = config.base.as_nanos() as u64;
        let max = config.max.as_nanos() as u64;
        base.saturating_mul(1u64 << level.min(30)).min(max)
    }

    /// Feeds the current counters of `addr`. Of the counts in the first sample of a
    /// backend, only the last failure and success, when they happened after the tracker
    /// started, are judged (at least one of each). Returns whether the backend's quarantine
    /// began or ended.
    pub fn observe(&mut self, addr: BackendAddr, sample: HealthSample, now_ns: u64) -> bool {
        let config = self.config;
        let start = self.start_ns;
        let t = self.backends.entry(addr).or_insert_with(|| Tracked {
            seen: HealthSample {
                failures: sample.failures
                    - u64::from(sample.last_failure_ns > start && sample.failures > 0),
                successes: sample.successes
                    - u64::from(sample.last_success_ns > start && sample.successes > 0),
                ..sample
            },
            ..Default::default()
        });
        let new_failures = sample.failures.saturating_sub(t.seen.failures);
        let new_successes = sample.successes.saturating_sub(t.seen.successes);
        t.seen = sample;
        let was = Self::in_force(&config, &addr, t, now_ns);
        if new_successes > 0 && sample.last_success_ns >= sample.last_failure_ns {
            // The latest word is a success: healthy again.
            t.failures = 0;
            t.level = 0;
            t.until_ns = None;
            t.probing = false;
            return was;
        }
        if new_failures == 0 {
            return false;
        }
        t.failures += new_failures;
        if was {
            // Connections already on their way when it was quarantined: no new period.
            return false;
        }
        t.until_ns = Some(now_ns.saturating_add(Self::period(&config, t.level)));
        t.level = t.level.saturating_add(1);
        true
    }

    /// The quarantined TCP backends whose period is over and that no probe is testing yet:
    /// the caller probes each (a connect of its own, with a timeout) and reports the result
    /// to [`HealthTracker::probe_result`]. Empty when probes are off.
    pub fn start_probes(&mut self, now_ns: u64) -> Vec<BackendAddr> {
        let config = self.config;
        self.backends
            .iter_mut()
            .filter(|(a, t)| {
                Self::probed(&config, a) && !t.probing && t.until_ns.is_some_and(|u| u <= now_ns)
            })
            .map(|(a, t)| {
                t.probing = true;
                *a
            })
            .collect()
    }

    /// The result of a probe [`HealthTracker::start_probes`] asked for: a success ends the
    /// quarantine (returns `true`), a failure starts the next, doubled period. A result for a
    /// backend forgotten or healed meanwhile is ignored.
    pub fn probe_result(&mut self, addr: BackendAddr, ok: bool, now_ns: u64) -> bool {
        let config = self.config;
        let Some(t) = self.backends.get_mut(&addr) else {
            return false;
        };
        if !std::mem::take(&mut t.probing) || t.until_ns.is_none() {
            return false;
        }
        if ok {
            t.failures = 0;
            t.level = 0;
            t.until_ns = None;
            return true;
        }
        t.failures += 1;
        t.until_ns = Some(now_ns.saturating_add(Self::period(&config, t.level)));
        t.level = t.level.saturating_add(1);
        false
    }

    /// Forgets backends not in `keep` (they left every service).
    pub fn retain(&mut self, keep: impl Fn(&BackendAddr) -> bool) {
        self.backends.retain(|a, _| keep(a));
    }

    /// The quarantines in force at `now_ns`.
    pub fn quarantined(&self, now_ns: u64) -> BTreeMap<BackendAddr, Quarantine> {
        self.backends
            .iter()
            .filter_map(|(a, t)| {
                if !Self::in_force(&self.config, a, t, now_ns) {
                    return None;
                }
                let until = t.until_ns?;
                Some((
                    *a,
                    Quarantine {
                        until_ns: until,
                        failures: t.failures,
                        level: t.level,
                    },
                ))
            })
            .collect()
    }

    /// The earliest end of a quarantine period after `now_ns`: when the selection changes
    /// next, or a probe is due.
    pub fn next_expiry(&self, now_ns: u64) -> Option<u64> {
        self.backends
            .values()
            .filter_map(|t| t.until_ns.filter(|u| *u > now_ns))
            .min()
    }
}

/// A frontend's backends without the quarantined ones, unless that leaves none: then all
/// are kept (a quarantined backend is better than refusing every connection). `addr` gives
/// each item's address. Returns the backends to program and the ones left out. The agent
/// applies it to the maps it programs and `meshctl service explain --node` to what it shows.
///
/// Only the keys of `quarantined` matter: the agent passes its [`Quarantine`]s, meshctl what
/// it read from the node's pinned quarantine map.
pub fn apply_quarantine<T: Clone, Q>(
    backends: &[T],
    addr: impl Fn(&T) -> BackendAddr,
    quarantined: &BTreeMap<BackendAddr, Q>,
) -> (Vec<T>, Vec<T>) {
    let (out, kept): (Vec<T>, Vec<T>) = backends
        .iter()
        .cloned()
        .partition(|b| quarantined.contains_key(&addr(b)));
    if kept.is_empty() {
        (backends.to_vec(), Vec::new())
    } else {
        (kept, out)
    }
}

/// The address of a selected backend for a frontend of `protocol`.
pub fn selected_addr(protocol: Protocol) -> impl Fn(&SelectedBackend) -> BackendAddr {
    move |b| BackendAddr {
        ip: b.ip,
        port: b.port,
        protocol,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn addr(last: u8) -> BackendAddr {
        BackendAddr {
            ip: IpAddr::from([10, 0, 0, last]),
            port: 80,
            protocol: Protocol::Tcp,
        }
    }

    fn sample(
        failures: u64,
        successes: u64,
        last_failure_ns: u64,
        last_success_ns: u64,
    ) -> HealthSample {
        HealthSample {
            failures,
            successes,
            last_failure_ns,
            last_success_ns,
        }
    }

    fn unprobed() -> HealthConfig {
        HealthConfig {
            probe: false,
            ..HealthConfig::default()
        }
    }

    #[test]
    fn failures_quarantine_with_doubling_periods_and_a_success_clears() {
        let mut t = HealthTracker::new(unprobed(), 5);
        let a = addr(1);
        assert!(
            !t.observe(a, sample(5, 10, 1, 2), 5),
            "counts from before the start are not judged"
        );
        assert!(t.quarantined(0).is_empty());
        // A failure: quarantined for 2 s.
        assert!(t.observe(a, sample(6, 10, 10 * S, 2), 10 * S));
        let q = t.quarantined(10 * S)[&a];
        assert_eq!((q.until_ns, q.failures, q.level), (12 * S, 1, 1));
        // More failures of connections already under way: no new period.
        assert!(!t.observe(a, sample(8, 10, 11 * S, 2), 11 * S));
        assert_eq!(t.quarantined(11 * S)[&a].failures, 3);
        // Over: the next connect is the probe; it fails: 4 s this time.
        assert!(t.quarantined(12 * S).is_empty());
        assert!(t.observe(a, sample(9, 10, 13 * S, 2), 13 * S));
        assert_eq!(t.quarantined(13 * S)[&a].until_ns, 17 * S);
        assert_eq!(t.next_expiry(13 * S), Some(17 * S));
        // A success after it: cleared, level reset.
        assert!(!t.observe(a, sample(9, 11, 13 * S, 18 * S), 18 * S));
        assert!(t.quarantined(18 * S).is_empty());
        assert!(t.observe(a, sample(10, 11, 19 * S, 18 * S), 19 * S));
        assert_eq!(
            t.quarantined(19 * S)[&a].until_ns,
            21 * S,
            "back to the base period"
        );
    }

    #[test]
    fn periods_are_capped() {
        let mut t = HealthTracker::new(
            HealthConfig {
                base: Duration::from_secs(2),
                max: Duration::from_secs(10),
                probe: false,
            },
            0,
        );
        let a = addr(1);
        t.observe(a, sample(0, 0, 0, 0), 0);
        let mut now = 0;
        let mut periods = Vec::new();
        for f in 1..=5 {
            now += 100 * S;
            assert!(t.observe(a, sample(f, 0, now, 0), now));
            periods.push((t.quarantined(now)[&a].until_ns - now) / S);
        }
        assert_eq!(periods, vec![2, 4, 8, 10, 10]);
    }

    #[test]
    fn a_tcp_quarantine_ends_only_with_a_successful_probe() {
        let mut t = HealthTracker::new(HealthConfig::default(), 0);
        let a = addr(1);
        t.observe(a, sample(0, 0, 0, 0), 0);
        assert!(t.observe(a, sample(1, 0, S, 0), S));
        assert!(
            t.start_probes(2 * S).is_empty(),
            "within the period: no probe"
        );
        // The period is over: still quarantined, one probe due, asked for once.
        assert!(t.quarantined(3 * S + 1).contains_key(&a));
        assert_eq!(t.start_probes(3 * S + 1), vec![a]);
        assert!(t.start_probes(3 * S + 2).is_empty(), "already probing");
        assert!(
            t.quarantined(4 * S).contains_key(&a),
            "in force while probing"
        );
        // The probe fails: the next period, doubled, with no client connect spent.
        assert!(!t.probe_result(a, false, 4 * S));
        let q = t.quarantined(4 * S)[&a];
        assert_eq!((q.until_ns, q.failures, q.level), (8 * S, 2, 2));
        assert_eq!(t.next_expiry(4 * S), Some(8 * S));
        assert!(t.start_probes(7 * S).is_empty());
        // The next probe succeeds: healthy, level reset.
        assert_eq!(t.start_probes(8 * S), vec![a]);
        assert!(t.probe_result(a, true, 8 * S));
        assert!(t.quarantined(8 * S).is_empty());
        assert!(t.observe(a, sample(2, 0, 9 * S, 0), 9 * S));
        assert_eq!(
            t.quarantined(9 * S)[&a].until_ns,
            11 * S,
            "base period again"
        );
        // A result for a backend forgotten meanwhile is ignored.
        assert_eq!(t.start_probes(11 * S), vec![a]);
        t.retain(|_| false);
        assert!(!t.probe_result(a, true, 12 * S));
        assert!(t.quarantined(12 * S).is_empty());
    }

    #[test]
    fn udp_quarantines_end_with_their_period_even_with_probes_on() {
        let mut t = HealthTracker::new(HealthConfig::default(), 0);
        let u = BackendAddr {
            protocol: Protocol::Udp,
            ..addr(1)
        };
        t.observe(u, sample(0, 0, 0, 0), 0);
        assert!(t.observe(u, sample(1, 0, S, 0), S));
        assert!(t.quarantined(2 * S).contains_key(&u));
        assert!(t.quarantined(3 * S + 1).is_empty());
        assert!(
            t.start_probes(3 * S + 1).is_empty(),
            "no handshake to probe"
        );
    }

    #[test]
    fn a_success_during_quarantine_ends_it() {
        let mut t = HealthTracker::new(HealthConfig::default(), 0);
        let a = addr(1);
        t.observe(a, sample(0, 0, 0, 0), 0);
        assert!(t.observe(a, sample(1, 0, S, 0), S));
        assert!(t.observe(a, sample(1, 1, S, 2 * S), 2 * S), "ended");
        assert!(t.quarantined(2 * S).is_empty());
    }

    fn sel(last: u8) -> SelectedBackend {
        SelectedBackend {
            cluster: "east".parse().unwrap(),
            ip: IpAddr::from([10, 0, 0, last]),
            port: 80,
            node: "n".into(),
            local: true,
        }
    }

    #[test]
    fn a_failure_in_the_first_sample_after_the_start_counts() {
        let mut t = HealthTracker::new(HealthConfig::default(), 10 * S);
        let a = addr(1);
        // Successes and then failures, all before the first look: the latest is a failure.
        assert!(t.observe(a, sample(3, 4, 12 * S, 11 * S), 13 * S));
        assert_eq!(t.quarantined(13 * S)[&a].until_ns, 15 * S);
        // A backend only ever successful is healthy.
        assert!(!t.observe(addr(2), sample(0, 4, 0, 12 * S), 13 * S));
        assert!(!t.quarantined(13 * S).contains_key(&addr(2)));
    }

    #[test]
    fn quarantine_never_removes_the_last_usable_backends() {
        let backends = [sel(1), sel(2)];
        let q1 = BTreeMap::from([(
            addr(1),
            Quarantine {
                until_ns: 1,
                failures: 1,
                level: 1,
            },
        )]);
        let tcp = selected_addr(Protocol::Tcp);
        let (kept, out) = apply_quarantine(&backends, &tcp, &q1);
        assert_eq!(kept, vec![backends[1].clone()]);
        assert_eq!(out, vec![backends[0].clone()]);
        let mut q2 = q1.clone();
        q2.insert(addr(2), q1[&addr(1)]);
        let (kept, out) = apply_quarantine(&backends, &tcp, &q2);
        assert_eq!(kept.len(), 2, "all quarantined: all kept");
        assert!(out.is_empty());
        // Another protocol's quarantine does not apply.
        let (kept, _) = apply_quarantine(&backends, selected_addr(Protocol::Udp), &q1);
        assert_eq!(kept.len(), 2);
    }
}

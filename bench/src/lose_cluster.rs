//! `lose-cluster`: DESIGN.md section 13b's goal measured in a lab (`mesh-lab up`: east and
//! west, two nodes each, rebel-base global with affinity none in both, x-wing in west). From
//! x-wing, `mesh-bench request-loop` sends HTTP requests to rebel-base's ClusterIP one after
//! the other for `--seconds`, each with a `--timeout-ms` deadline, and prints every request's
//! start, end and answering cluster. Two losses, `--runs` times each:
//!
//! - **partition**: `mesh-lab partition east west` (control plane and pods) while the
//!   requests run; then `mesh-lab heal` and wait until west reaches both clusters again.
//!   Printed: the time from the partition to the start of the last failed request, and the
//!   requests failed per loss (stale demotion: the goal is no failed request after 5 s).
//! - **backend death**: east's etcd is killed, then one of east's rebel-base pods deleted:
//!   east cannot withdraw it, so only west's nodes' passive health protects the clients.
//!   Printed: the time from the deletion until the pod is in the quarantine map of a west
//!   node (read-only, from the pinned map), the time to the last failed request, and the
//!   requests failed per death. Then east's etcd is started and the lab converges again.
//!
//! Nothing is asserted about speed; the lab is removed at the end, also on Ctrl-C.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use crate::lab::LabGuard;
use crate::report::{Distribution, Figure, LatencyTarget, Machine, Report, Target};

const REBEL_BASE: &str = include_str!("../../examples/lab-demo/rebel-base.yaml");
const X_WING: &str = include_str!("../../examples/lab-demo/x-wing.yaml");
/// DESIGN.md section 13b: from this long after a loss, no failed request.
const GOAL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, clap::Args)]
pub struct Opts {
    /// Losses of each kind (partition, backend death).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// How long x-wing sends requests per loss (the loss comes after its first reply).
    #[arg(long, default_value_t = 12)]
    pub seconds: u64,
    /// Each request's deadline (connect and reply).
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            runs: 5,
            seconds: 12,
            timeout_ms: 1000,
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One request of `request-loop`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub start_ms: u64,
    pub end_ms: u64,
    /// The answering cluster; `None`: the request failed.
    pub cluster: Option<String>,
}

impl Request {
    /// Parses a line `request-loop` prints: `START END CLUSTER` (`-` for a failure).
    pub fn parse(line: &str) -> Result<Self> {
        let mut f = line.split_whitespace();
        let (Some(s), Some(e), Some(c), None) = (f.next(), f.next(), f.next(), f.next()) else {
            bail!("request-loop printed {line:?}, want \"START END CLUSTER\"");
        };
        Ok(Request {
            start_ms: s.parse().with_context(|| format!("START in {line:?}"))?,
            end_ms: e.parse().with_context(|| format!("END in {line:?}"))?,
            cluster: (c != "-").then(|| c.to_owned()),
        })
    }
}

/// `mesh-bench request-loop ADDR SECONDS TIMEOUT_MS` (run inside a pod): HTTP GETs to ADDR
/// one after the other for SECONDS, each on a fresh connection with a TIMEOUT_MS deadline;
/// prints `START_MS END_MS CLUSTER` per request (`-` when it failed), flushing each line.
pub fn request_loop(addr: &str, seconds: u64, timeout_ms: u64) -> Result<()> {
    let addr: std::net::SocketAddr = addr.parse().context("ADDR is IP:PORT")?;
    let timeout = Duration::from_millis(timeout_ms.max(1));
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut out = std::io::stdout().lock();
    while Instant::now() < end {
        let start = unix_ms();
        let cluster = get_cluster(addr, timeout).unwrap_or_else(|| "-".to_owned());
        writeln!(out, "{start} {} {cluster}", unix_ms())?;
        out.flush()?;
    }
    Ok(())
}

/// One GET; the reply's `cluster` field, `None` on any failure.
fn get_cluster(addr: std::net::SocketAddr, timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    let left = deadline.checked_duration_since(Instant::now())?;
    s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
        .ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: rebel-base\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).ok()?;
    let text = String::from_utf8_lossy(&body);
    if !text.starts_with("HTTP/1.1 200") && !text.starts_with("HTTP/1.0 200") {
        return None;
    }
    cluster_field(&text)
}

/// The value of `"cluster":"..."` in a reply.
pub fn cluster_field(reply: &str) -> Option<String> {
    let rest = &reply[reply.find("\"cluster\"")? + "\"cluster\"".len()..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_owned())
}

/// What one loss cost x-wing's requests.
#[derive(Debug, Clone, PartialEq)]
pub struct LossOutcome {
    pub requests: usize,
    pub failed: usize,
    /// From the loss to the start of the last failed request (`None`: none failed).
    pub last_failure_after: Option<Duration>,
    /// Requests started `GOAL` or later after the loss that failed.
    pub failed_after_goal: usize,
}

/// Judges the requests of one loss at `lost_ms`.
pub fn judge(requests: &[Request], lost_ms: u64) -> LossOutcome {
    let failed: Vec<&Request> = requests.iter().filter(|r| r.cluster.is_none()).collect();
    LossOutcome {
        requests: requests.len(),
        failed: failed.len(),
        last_failure_after: failed
            .iter()
            .map(|r| Duration::from_millis(r.start_ms.saturating_sub(lost_ms)))
            .max(),
        failed_after_goal: failed
            .iter()
            .filter(|r| r.start_ms >= lost_ms + GOAL.as_millis() as u64)
            .count(),
    }
}

/// x-wing's request loop, its stdout read on a thread (so the pipe never fills).
struct Requests {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    reader: std::thread::JoinHandle<()>,
}

impl Requests {
    fn start(lab: &LabGuard, bench: &Path, addr: &str, opts: &Opts) -> Result<Self> {
        let mut child = lab
            .lab_command(&[
                "exec",
                "west",
                "-n",
                "demo",
                "deploy/x-wing",
                "--",
                bench.to_str().context("mesh-bench path")?,
                "request-loop",
                addr,
                &opts.seconds.to_string(),
                &opts.timeout_ms.to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("running mesh-lab exec")?;
        let stdout = child.stdout.take().context("piped stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Requests {
            child,
            lines,
            reader,
        })
    }

    /// Waits for the first request that succeeded (the loss comes after it).
    fn first_success(&mut self) -> Result<Vec<Request>> {
        let mut seen = Vec::new();
        while let Ok(line) = self.lines.recv() {
            let r = Request::parse(&line)?;
            let ok = r.cluster.is_some();
            seen.push(r);
            if ok {
                return Ok(seen);
            }
        }
        bail!("x-wing's request loop ended without a successful request")
    }

    /// Waits for the loop's end; every request, `before` first.
    fn finish(self, mut before: Vec<Request>) -> Result<Vec<Request>> {
        for line in self.lines.iter() {
            before.push(Request::parse(&line)?);
        }
        let mut child = self.child;
        let status = child.wait()?;
        let _ = self.reader.join();
        if !status.success() {
            bail!("x-wing's request loop failed ({status})");
        }
        Ok(before)
    }
}

/// Rounds of requests (one second each) until both clusters answer and none fails (the lab converged).
fn wait_both(lab: &LabGuard, bench: &Path, addr: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let opts = Opts {
        runs: 1,
        seconds: 1,
        timeout_ms: 1000,
    };
    loop {
        let mut r = Requests::start(lab, bench, addr, &opts)?;
        let first = r.first_success().unwrap_or_default();
        let all = r.finish(first)?;
        let east = all.iter().any(|r| r.cluster.as_deref() == Some("east"));
        let west = all.iter().any(|r| r.cluster.as_deref() == Some("west"));
        if east && west && all.iter().all(|r| r.cluster.is_some()) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("west did not reach both clusters without failures within {timeout:?}");
        }
    }
}

pub async fn run(opts: &Opts, bin_dir: &Path, machine: &Machine) -> Result<Report> {
    let opts = opts.clone();
    let bin_dir = bin_dir.to_owned();
    let machine = machine.clone();
    tokio::task::spawn_blocking(move || run_blocking(&opts, &bin_dir, machine))
        .await
        .context("the lose-cluster benchmark's thread")?
}

fn pod_ips(lab: &LabGuard, cluster: &str) -> Result<Vec<(String, String)>> {
    let out = lab.kubectl(
        cluster,
        &[
            "-n",
            "demo",
            "get",
            "pods",
            "-l",
            "app=rebel-base",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.status.podIP} \
             {.metadata.deletionTimestamp}{\"\\n\"}{end}",
        ],
        None,
    )?;
    // A pod deleted by an earlier run may still be listed while it terminates: only pods
    // without a deletion timestamp.
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            match (f.next(), f.next(), f.next()) {
                (Some(n), Some(ip), None) => Some((n.to_owned(), ip.to_owned())),
                _ => None,
            }
        })
        .collect())
}

fn run_blocking(opts: &Opts, bin_dir: &Path, machine: Machine) -> Result<Report> {
    let bench = std::env::current_exe().context("mesh-bench's own path")?;
    let lab = LabGuard::up_from(bin_dir, "lc", 2, 2)?;
    for c in ["east", "west"] {
        lab.kubectl(c, &["apply", "-f", "-"], Some(REBEL_BASE))?;
        lab.kubectl(c, &["apply", "-f", "-"], Some(X_WING))?;
        lab.kubectl(
            c,
            &[
                "-n",
                "demo",
                "annotate",
                "service",
                "rebel-base",
                "service.cilium.io/global=true",
            ],
            None,
        )?;
    }
    for c in ["east", "west"] {
        for d in ["rebel-base", "x-wing"] {
            lab.kubectl(
                c,
                &[
                    "-n",
                    "demo",
                    "rollout",
                    "status",
                    &format!("deployment/{d}"),
                    "--timeout=120s",
                ],
                None,
            )?;
        }
    }
    let vip = lab.kubectl(
        "west",
        &[
            "-n",
            "demo",
            "get",
            "service",
            "rebel-base",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ],
        None,
    )?;
    let addr = format!("{}:80", vip.trim());
    let converge = Duration::from_secs(120);
    wait_both(&lab, &bench, &addr, converge)?;
    let west_nodes = lab.node_pin_dirs("west")?;

    let mut partitions = Vec::new();
    for run in 1..=opts.runs {
        eprintln!("lose-cluster: partition {run}/{}", opts.runs);
        let mut r = Requests::start(&lab, &bench, &addr, opts)?;
        let before = r.first_success()?;
        let lost = unix_ms();
        lab.lab(&["partition", "east", "west"])?;
        let all = r.finish(before)?;
        partitions.push(judge(&all, lost));
        lab.lab(&["heal"])?;
        wait_both(&lab, &bench, &addr, converge)?;
    }

    let mut deaths = Vec::new();
    let mut quarantine_times = Vec::new();
    let mut quarantine_timeouts = 0;
    for run in 1..=opts.runs {
        eprintln!("lose-cluster: backend death {run}/{}", opts.runs);
        let (pod, ip) = pod_ips(&lab, "east")?
            .into_iter()
            .next()
            .context("east has no rebel-base pod")?;
        let ip: std::net::Ipv4Addr = ip.parse().with_context(|| format!("{pod}'s IP {ip}"))?;
        // The pod must be a backend on every west node before it dies (east may have
        // published it only just).
        let deadline = Instant::now() + converge;
        loop {
            let mut everywhere = true;
            for (_, pin) in &west_nodes {
                let dump = mesh_maps::open_pinned_readonly(pin)?.dump()?;
                everywhere &= dump.backends.values().any(|b| b.ip == ip);
            }
            if everywhere {
                break;
            }
            if Instant::now() > deadline {
                bail!("{pod} ({ip}) never became a backend on every west node");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut r = Requests::start(&lab, &bench, &addr, opts)?;
        let before = r.first_success()?;
        lab.lab(&["kill", "east", "etcd"])?;
        let t0 = Instant::now();
        let deleted = unix_ms();
        lab.kubectl(
            "east",
            &["-n", "demo", "delete", "pod", &pod, "--wait=false"],
            None,
        )?;
        // Until the pod is quarantined on some west node (read-only pinned maps).
        let mut quarantined = None;
        while quarantined.is_none() && t0.elapsed() < Duration::from_secs(opts.seconds) {
            for (_, pin) in &west_nodes {
                let maps = mesh_maps::open_pinned_readonly(pin)?;
                if maps.quarantines()?.iter().any(|q| q.ip == ip) {
                    quarantined = Some(t0.elapsed());
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        match quarantined {
            Some(d) => quarantine_times.push(d),
            None => quarantine_timeouts += 1,
        }
        let all = r.finish(before)?;
        deaths.push(judge(&all, deleted));
        lab.lab(&["start", "east", "etcd"])?;
        lab.kubectl(
            "east",
            &[
                "-n",
                "demo",
                "rollout",
                "status",
                "deployment/rebel-base",
                "--timeout=120s",
            ],
            None,
        )?;
        wait_both(&lab, &bench, &addr, converge)?;
    }

    let mut report = Report::new(
        "lose-cluster",
        machine,
        "a lab (mesh-lab up: east and west, 2 nodes each, real apiservers, agents and eBPF); \
         rebel-base global (affinity none) in both; x-wing in west sends HTTP requests to its \
         ClusterIP one after the other (each on a new connection, with a deadline) while east \
         is partitioned from west, or while one of east's pods is deleted with east's etcd \
         down (east cannot withdraw it: only passive health helps); every request counted",
    );
    report.param("runs", opts.runs);
    report.param("seconds_per_loss", opts.seconds);
    report.param("request_timeout_ms", opts.timeout_ms);
    let goal = Some(LatencyTarget {
        p50_ms: None,
        p99_ms: Some(GOAL.as_millis() as f64),
    });
    for (what, outcomes) in [("partition", &partitions), ("pod deleted", &deaths)] {
        let last: Vec<Duration> = outcomes
            .iter()
            .map(|o| o.last_failure_after.unwrap_or_default())
            .collect();
        report.distributions.push(Distribution::new(
            &format!("{what} -> start of the last failed request"),
            &last,
            0,
            goal,
        ));
        let failed: Vec<usize> = outcomes.iter().map(|o| o.failed).collect();
        let mean = failed.iter().sum::<usize>() as f64 / failed.len().max(1) as f64;
        report.figures.push(Figure::new(
            &format!("requests failed per loss ({what}; mean)"),
            mean,
            "requests",
        ));
        let after: usize = outcomes.iter().map(|o| o.failed_after_goal).sum();
        report.figures.push(
            Figure::new(
                &format!("requests failed from 5 s after the loss ({what}; all runs)"),
                after as f64,
                "requests",
            )
            .with_target(Target::AtMost(0.0)),
        );
        report.notes.push(format!(
            "{what}: failed per run {:?} of {:?} requests",
            failed,
            outcomes.iter().map(|o| o.requests).collect::<Vec<_>>()
        ));
    }
    report.distributions.push(Distribution::new(
        "pod deleted -> quarantined on a west node",
        &quarantine_times,
        quarantine_timeouts,
        None,
    ));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_and_bad_lines_are_named() {
        assert_eq!(
            Request::parse("10 12 east").unwrap(),
            Request {
                start_ms: 10,
                end_ms: 12,
                cluster: Some("east".into())
            }
        );
        assert_eq!(Request::parse("10 1010 -").unwrap().cluster, None);
        let e = Request::parse("10 east").unwrap_err().to_string();
        assert!(e.contains("\"10 east\""), "{e}");
        assert!(Request::parse("x 1 east").is_err());
    }

    #[test]
    fn the_cluster_field_is_read_from_a_reply() {
        let reply = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n\
                     {\"pod\":\"rebel-base-1\",\"cluster\": \"west\"}";
        assert_eq!(cluster_field(reply).as_deref(), Some("west"));
        assert_eq!(cluster_field("{\"pod\":\"x\"}"), None);
        assert_eq!(cluster_field("{\"cluster\":"), None);
    }

    #[test]
    fn a_loss_is_judged_by_its_failures_and_the_goal() {
        let r = |s: u64, c: Option<&str>| Request {
            start_ms: s,
            end_ms: s + 1,
            cluster: c.map(str::to_owned),
        };
        let reqs = [
            r(900, Some("east")),
            r(1_200, None),
            r(3_000, None),
            r(5_999, Some("west")),
            r(6_000, None),
            r(7_000, Some("west")),
        ];
        let o = judge(&reqs, 1_000);
        assert_eq!(o.requests, 6);
        assert_eq!(o.failed, 3);
        assert_eq!(o.last_failure_after, Some(Duration::from_millis(5_000)));
        assert_eq!(o.failed_after_goal, 1, "the one started 5 s after counts");
        let clean = judge(&reqs[..1], 1_000);
        assert_eq!(clean.last_failure_after, None);
        assert_eq!(clean.failed_after_goal, 0);
    }
}

//! What flow events cost (DESIGN.md section 15): connect() to a service with flow events off
//! and on, the agent's CPU to read, decorate and keep the flows, and what was lost.
//!
//! `cargo run -p mesh-agent --release --example flow_events [connects-per-phase] [rounds]`
//! (as root: it mounts a bpffs in a temporary directory and moves itself into a temporary
//! cgroup, both removed at the end). The process connects to a service frontend that socket
//! LB translates to a listener on 127.0.0.1, alternating phases with events off and on; in
//! the "on" phases the agent's real reader (`mesh_agent::flows::run_reader`: ring buffer,
//! decoration, flow ring, metrics) runs on its own thread, whose CPU time is measured.
//! Prints figures beside the target; asserts nothing.
#![allow(unsafe_code)]

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_agent::datapath::{
    BackendValue, Datapath, DatapathConfig, PROTO_TCP, ServiceEntryKey, ServiceEntryValue,
};
use mesh_agent::flows::{FlowContext, FlowMetrics, FlowRing, FlowSettings, run_reader};
use tokio_util::sync::CancellationToken;

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out pointer; CLOCK_THREAD_CPUTIME_ID exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| {
            a.parse()
                .expect("usage: flow_events [connects-per-phase] [rounds]")
        })
        .collect();
    let n = args.first().copied().unwrap_or(20_000);
    let rounds = args.get(1).copied().unwrap_or(3);
    let cgroup_root = std::fs::read_to_string("/proc/mounts")?
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
        .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .ok_or_else(|| anyhow::anyhow!("no cgroup2 mount in /proc/mounts"))?;
    let cgroup = std::path::PathBuf::from(&cgroup_root)
        .join(format!("mesh-flow-bench-{}", std::process::id()));
    std::fs::create_dir(&cgroup)?;
    let bpffs = tempfile::Builder::new()
        .prefix("mesh-flow-bench")
        .tempdir()?;
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())?;
    let result = run(n, rounds, &cgroup, bpffs.path());
    // Leave the cgroup before removing it.
    let _ = std::fs::write(
        std::path::Path::new(&cgroup_root).join("cgroup.procs"),
        std::process::id().to_string(),
    );
    let _ = mesh_agent::datapath::unpin_dir(&bpffs.path().join("node"));
    let _ = std::process::Command::new("umount")
        .arg(bpffs.path())
        .status();
    let _ = std::fs::remove_dir(&cgroup);
    result
}

struct Phase {
    rate: f64,
    p50_us: f64,
    p99_us: f64,
}

/// Closes with a reset (SO_LINGER 0): no TIME_WAIT, so a long run never waits for a free
/// ephemeral port and measures connect(), not the port search.
fn abort(s: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a pointer to a linger of the size passed.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    drop(s);
}

fn connects(target: SocketAddr, n: u64) -> Phase {
    let mut lat = Vec::with_capacity(n as usize);
    let t0 = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let s = TcpStream::connect(target).expect("connect to the service");
        lat.push(t.elapsed());
        abort(s);
    }
    let total = t0.elapsed();
    lat.sort();
    let pct =
        |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e6;
    Phase {
        rate: n as f64 / total.as_secs_f64(),
        p50_us: pct(0.5),
        p99_us: pct(0.99),
    }
}

fn run(
    n: u64,
    rounds: u64,
    cgroup: &std::path::Path,
    bpffs: &std::path::Path,
) -> anyhow::Result<()> {
    let mut dp = Datapath::open(DatapathConfig::new(bpffs.join("node"), cgroup))?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let backend = listener.local_addr()?;
    // A deep accept queue: a full one drops SYNs, and each drop costs a 1 s retransmit,
    // which a busy machine's accept thread would otherwise put into the figures.
    {
        use std::os::fd::AsRawFd;
        // SAFETY: listen() again on a listening socket only resizes its queue.
        unsafe { libc::listen(listener.as_raw_fd(), 65535) };
    }
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    let vip = Ipv4Addr::new(10, 200, 0, 1);
    let frontend = ServiceEntryKey::master(vip, 80, PROTO_TCP);
    let entry = BackendValue {
        ip: Ipv4Addr::LOCALHOST,
        port: backend.port(),
        proto: PROTO_TCP,
        cluster_id: 1,
        flags: 0,
    };
    dp.upsert_backend(1, entry)?;
    dp.upsert_service_slot(frontend.with_slot(1), ServiceEntryValue::backend(1, entry))?;
    dp.upsert_service_slot(frontend, ServiceEntryValue::master(1))?;
    let target = SocketAddr::from((vip, 80));
    let mut events = dp.take_events().expect("event maps");
    events.control.configure(0, 0)?;
    // Warm up: the first connects pay for page faults and the listener's backlog.
    connects(target, n.min(2000));

    // The reader on its own thread, as in the agent; started with events on.
    let ring = Arc::new(FlowRing::new(4095, 4096));
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = FlowMetrics::register(&mut registry);
    let ctx = Arc::new(std::sync::RwLock::new(Arc::new(FlowContext::new(
        "bench".parse()?,
        "node".into(),
    ))));
    let shutdown = CancellationToken::new();
    let (cpu_tx, cpu_rx) = std::sync::mpsc::channel::<Duration>();
    let (ask_tx, mut ask_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let reader = {
        let (ring, shutdown) = (ring.clone(), shutdown.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                tokio::spawn(async move {
                    while ask_rx.recv().await.is_some() {
                        let _ = cpu_tx.send(thread_cpu());
                    }
                });
                let _ = run_reader(
                    events,
                    FlowSettings {
                        rate: 1_000_000,
                        burst: 100_000,
                        stats_interval: Duration::from_millis(200),
                    },
                    ctx,
                    ring,
                    metrics,
                    shutdown,
                )
                .await;
            });
        })
    };
    let reader_cpu = || -> Duration {
        ask_tx.send(()).expect("reader runs");
        cpu_rx.recv().expect("reader answers")
    };
    // The reader configured the rate on start: switch through a second handle to the same
    // pinned config map for the "off" phases.
    let config_path = bpffs.join("node/maps").join(mesh_maps::MAP_EVENT_CONFIG);
    let set_rate = |rate: u32| -> anyhow::Result<()> {
        let map = aya::maps::MapData::from_pin(&config_path)?;
        let mut arr: aya::maps::Array<_, mesh_maps::layout::EventConfig> =
            aya::maps::Array::try_from(aya::maps::Map::Array(map))?;
        arr.set(
            0,
            mesh_maps::layout::EventConfig {
                rate,
                burst: 100_000,
            },
            0,
        )?;
        Ok(())
    };
    std::thread::sleep(Duration::from_millis(100));

    let stats_path = bpffs.join("node/maps").join(mesh_maps::MAP_EVENT_STATS);
    let counters = || -> anyhow::Result<(u64, u64, u64)> {
        let map = aya::maps::MapData::from_pin(&stats_path)?;
        let arr: aya::maps::PerCpuArray<_, mesh_maps::layout::EventStats> =
            aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(map))?;
        let v = arr.get(&0, 0)?;
        Ok(v.iter().fold((0, 0, 0), |a, s| {
            (
                a.0 + s.emitted,
                a.1 + s.lost_ring_full,
                a.2 + s.rate_limited,
            )
        }))
    };

    let (mut off, mut on) = (Vec::new(), Vec::new());
    let (mut cpu, mut flows, mut lost, mut on_time) = (Duration::ZERO, 0u64, 0u64, Duration::ZERO);
    print!("rounds:");
    for _ in 0..rounds {
        set_rate(0)?;
        off.push(connects(target, n));
        set_rate(1_000_000)?;
        let (c0, seen0, k0) = (reader_cpu(), ring.seen(), counters()?);
        let t = Instant::now();
        on.push(connects(target, n));
        on_time += t.elapsed();
        // Let the reader drain what the phase wrote.
        let deadline = Instant::now() + Duration::from_secs(5);
        while ring.seen() - seen0 < counters()?.0 - k0.0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let k1 = counters()?;
        cpu += reader_cpu() - c0;
        flows += ring.seen() - seen0;
        lost += (k1.1 - k0.1) + (k1.2 - k0.2);
        print!(" .");
        std::io::stdout().flush()?;
    }
    println!();
    shutdown.cancel();
    let _ = reader.join();

    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let rate = |p: &[Phase]| med(&mut p.iter().map(|x| x.rate).collect());
    let p50 = |p: &[Phase]| med(&mut p.iter().map(|x| x.p50_us).collect());
    let p99 = |p: &[Phase]| med(&mut p.iter().map(|x| x.p99_us).collect());
    let (r_off, r_on) = (rate(&off), rate(&on));
    println!(
        "flow events benchmark: connect()+close to a socket-LB service, {n} per phase, {rounds} rounds (medians)"
    );
    println!(
        "  events off: {:>9.0} connects/s   p50 {:>6.1} us   p99 {:>6.1} us",
        r_off,
        p50(&off),
        p99(&off)
    );
    println!(
        "  events on:  {:>9.0} connects/s   p50 {:>6.1} us   p99 {:>6.1} us",
        r_on,
        p50(&on),
        p99(&on)
    );
    println!(
        "  overhead: {:+.1}% connect rate   (target: within 5%)",
        (r_on / r_off - 1.0) * 100.0
    );
    let flows_per_s = flows as f64 / on_time.as_secs_f64();
    let cpu_per_flow = cpu.as_secs_f64() / flows.max(1) as f64;
    println!(
        "  agent reader: {flows} flows at {flows_per_s:.0} flows/s, {:.2} us CPU per flow = {:.1}% of a core per 10k flows/s",
        cpu_per_flow * 1e6,
        cpu_per_flow * 10_000.0 * 100.0
    );
    println!("  records lost at that rate: {lost} (ring full or over the per-CPU rate)");
    Ok(())
}

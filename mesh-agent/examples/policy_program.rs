//! Compiles and programs network policy at DESIGN.md section 14's scale (10k identities x 500
//! rules) into a real datapath: the agent's path from the compile to the pinned maps.
//!
//! `cargo run -p mesh-agent --release --example policy_program [identities] [rules] [--broad]`
//! (as root: it mounts a bpffs in a temporary directory and attaches to a temporary cgroup,
//! both removed at the end). Prints times beside the target; asserts nothing.

#[path = "../../mesh-core/examples/support/policy_gen.rs"]
mod policy_gen;

use std::time::{Duration, Instant};

use mesh_agent::datapath::{Datapath, DatapathConfig};
use mesh_agent::policy::{PolicyReconciler, desired_policy};
use mesh_core::policy::{compile, policy_tables};

fn main() -> anyhow::Result<()> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let broad = raw.iter().any(|a| a == "--broad");
    let nums: Vec<usize> = raw
        .iter()
        .filter(|a| *a != "--broad")
        .map(|a| {
            a.parse()
                .expect("usage: policy_program [identities] [rules] [--broad]")
        })
        .collect();
    let w = policy_gen::workload(
        nums.first().copied().unwrap_or(10_000),
        nums.get(1).copied().unwrap_or(500),
        broad,
    );

    let cgroup_root = std::fs::read_to_string("/proc/mounts")?
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
        .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .ok_or_else(|| anyhow::anyhow!("no cgroup2 mount in /proc/mounts"))?;
    let cgroup = std::path::PathBuf::from(cgroup_root)
        .join(format!("mesh-policy-bench-{}", std::process::id()));
    std::fs::create_dir(&cgroup)?;
    let bpffs = tempfile::Builder::new()
        .prefix("mesh-policy-bench")
        .tempdir()?;
    let result = run(&w, &cgroup, bpffs.path());
    let _ = mesh_agent::datapath::unpin_dir(&bpffs.path().join("node"));
    let _ = std::process::Command::new("umount")
        .arg(bpffs.path())
        .status();
    let _ = std::fs::remove_dir(&cgroup);
    result
}

fn run(
    w: &policy_gen::Workload,
    cgroup: &std::path::Path,
    bpffs: &std::path::Path,
) -> anyhow::Result<()> {
    let mut dp = Datapath::open(DatapathConfig::new(bpffs.join("node"), cgroup))?;
    let t = Instant::now();
    let compiled = compile(&w.policies, &w.table, &w.local);
    let compile_time = t.elapsed();
    let t = Instant::now();
    let tables = policy_tables(&compiled);
    let tables_time = t.elapsed();
    let (want, _) = desired_policy(&tables, &[], &Default::default());
    let mut reconciler = PolicyReconciler::default();
    let t = Instant::now();
    let ops = reconciler.reconcile(&mut dp, &want)?;
    let program_time = t.elapsed();
    let writes: u64 = ops.values().sum();

    // One more policy (a rule for one app): what an apply costs once the rest is programmed.
    let mut policies = w.policies.clone();
    policies.upsert(mesh_core::policy::parse_policy(
        &serde_json::json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "one-more", "namespace": "ns-0"},
            "spec": {"endpointSelector": {"matchLabels": {"app": "app-1"}},
                     "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "app-2"}}],
                                  "toPorts": [{"ports": [{"port": "7000", "protocol": "TCP"}]}]}]}
        }),
        &w.local,
    )?);
    let t = Instant::now();
    let compiled2 = compile(&policies, &w.table, &w.local);
    let (want2, _) = desired_policy(&policy_tables(&compiled2), &[], &Default::default());
    let ops2 = reconciler.reconcile(&mut dp, &want2)?;
    let incremental = t.elapsed();

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("policy compile + program benchmark (real eBPF maps, this build's profile)");
    println!(
        "  identities: {} in {} clusters (kube-dns {}), policies: {}, rules: {}",
        w.table.all_ids().len(),
        w.clusters,
        w.dns,
        w.policies.len(),
        w.rule_count
    );
    println!("  parse all policies:      {:>8.1} ms", ms(w.parse));
    println!("  compile:                 {:>8.1} ms", ms(compile_time));
    println!("  datapath tables:         {:>8.1} ms", ms(tables_time));
    println!(
        "  program (first, empty maps): {:>8.1} ms   ({writes} map writes: {} entries, {} endpoints, {} rule names)",
        ms(program_time),
        want.entries.len(),
        want.endpoints.len(),
        want.rules.len()
    );
    let total = compile_time + tables_time + program_time;
    println!(
        "  total compiled and programmed: {:>8.1} ms   (target: <= 1000 ms)",
        ms(total)
    );
    println!(
        "  one policy more, recompiled and programmed: {:>8.1} ms   ({} map writes)",
        ms(incremental),
        ops2.values().sum::<u64>()
    );
    Ok(())
}

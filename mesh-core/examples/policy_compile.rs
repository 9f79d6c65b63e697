//! Measures `policy::compile` at DESIGN.md section 14's scale: 10k identities x 500 rules.
//!
//! `cargo run -p mesh-core --release --example policy_compile [identities] [rules] [--broad]`
//!
//! Identities: 4 clusters x namespaces x apps (a quarter local). Rules, written as users
//! write them and parsed with `parse_policy`: a clusterwide default deny with the DNS
//! allowance selecting every pod, then CiliumNetworkPolicies allowing an app from a
//! neighbour app (same namespace, any namespace, or any cluster), NetworkPolicies with
//! namespaceSelectors, deny rules and CIDR rules. `--broad` adds an allow from the `cluster`
//! entity to every endpoint (every table then lists every local identity). Prints times;
//! asserts nothing.

#[path = "support/policy_gen.rs"]
mod policy_gen;

use std::time::{Duration, Instant};

use mesh_core::Protocol;
use mesh_core::policy::{Direction, compile, decide, policy_tables};

fn main() {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let broad = raw.iter().any(|a| a == "--broad");
    let args: Vec<usize> = raw
        .iter()
        .filter(|a| *a != "--broad")
        .map(|a| {
            a.parse()
                .expect("usage: policy_compile [identities] [rules] [--broad]")
        })
        .collect();
    let identities = args.first().copied().unwrap_or(10_000);
    let rules = args.get(1).copied().unwrap_or(500);
    let policy_gen::Workload {
        local,
        clusters,
        table,
        policies,
        rule_count,
        dns,
        parse,
    } = policy_gen::workload(identities, rules, broad);
    // Warm up once, then take the median of a few runs.
    let compiled = compile(&policies, &table, &local);
    let mut times: Vec<Duration> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let c = compile(&policies, &table, &local);
            let e = t.elapsed();
            assert_eq!(c.identities.len(), compiled.identities.len());
            e
        })
        .collect();
    times.sort();

    let mut tables = std::collections::HashMap::new();
    for p in compiled.identities.values() {
        for t in [&p.ingress, &p.egress] {
            tables.insert(std::sync::Arc::as_ptr(t), t.entries.len());
        }
    }
    let distinct_entries: usize = tables.values().sum();
    let prefixes: usize = compiled
        .identities
        .values()
        .flat_map(|p| [&p.ingress, &p.egress])
        .flat_map(|d| d.entries.iter())
        .map(|e| e.ports.prefixes().len())
        .sum();
    let some_local = *compiled.identities.keys().next().unwrap();
    let d = decide(
        &compiled,
        some_local,
        Direction::Egress,
        dns,
        Protocol::Udp,
        53,
    );

    println!("policy compile benchmark (mesh-core, this build's profile)");
    println!(
        "  identities: {} in {clusters} clusters ({} local), policies: {}, rules: {rule_count}, CIDR prefixes: {}",
        table.all_ids().len(),
        compiled.identities.len(),
        policies.len(),
        compiled.cidr_prefixes.len()
    );
    println!("  parse all policies:      {:>8.1} ms", ms(parse));
    println!(
        "  compile (median of 5):   {:>8.1} ms   (min {:.1}, max {:.1}; target: 10k x 500 compiled and programmed <= 1000 ms)",
        ms(times[2]),
        ms(times[0]),
        ms(times[4])
    );
    println!(
        "  output: {} local identities, {} distinct tables holding {} entries; per identity (what the map holds): {} entries, {} port prefixes",
        compiled.identities.len(),
        tables.len(),
        distinct_entries,
        compiled.entry_count(),
        prefixes
    );
    let t = Instant::now();
    let datapath = policy_tables(&compiled);
    let tables_time = t.elapsed();
    println!(
        "  datapath tables:         {:>8.1} ms   ({} tables' LPM entries, {} endpoints, {} rules)",
        ms(tables_time),
        datapath.entries.len(),
        datapath.endpoints.len(),
        datapath.rules.len()
    );
    println!("  sample decide: {some_local} egress -> kube-dns 53/UDP: {d}");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

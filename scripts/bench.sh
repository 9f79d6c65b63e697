#!/usr/bin/env bash
# Runs the benchmarks of DESIGN.md section 12 on this machine with release builds of
# mesh-bench, mesh-apiserver and mesh-agent: every benchmark, or the one named.
#
#   bash scripts/bench.sh                         # all, default sizes
#   bash scripts/bench.sh propagation --samples 500
#   bash scripts/bench.sh initial-sync --scale 2 -o json
#   bash scripts/bench.sh fanout --streams 400 --events 5000
#   bash scripts/bench.sh policy --policies 50 --nodes 3   # in a lab (mesh-lab up)
#   bash scripts/bench.sh policy-compile                   # 10k identities x 500 rules
#   bash scripts/bench.sh flows 20000 5                    # connect() with flow events on/off
#   bash scripts/bench.sh lose-cluster --runs 5            # partition / pods dying unseen, in a lab
#   bash scripts/bench.sh socket-lb --services 1000,10000  # connect(): socket LB vs direct vs nft DNAT
#   bash scripts/bench.sh scale                            # Cilium's profile: 250 clusters x 100 nodes, 325 changes/s
#   bash scripts/bench.sh scale --clusters 20 --nodes 10 --churn 50 --duration 20
#   bash scripts/bench.sh fanout --txn-ops 1               # one object per etcd transaction
#   bash scripts/bench.sh initial-sync --via-importer      # the peer served over gRPC, imported by the importer
#   bash scripts/bench.sh propagation --background-clusters 250 --background-nodes 100 --background-churn 325
#
# Benchmarks print distributions and figures beside their targets; they never fail on a
# speed. Everything a benchmark starts (etcd, apiservers, agents, cgroups, bpffs pins,
# temporary directories) is removed when it ends, also on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

benches="propagation failover initial-sync fanout scale policy policy-compile flows lose-cluster socket-lb"
usage() {
    echo "usage: bash scripts/bench.sh [all|${benches// /|}] [FLAGS...]" >&2
    echo "       flags of one benchmark: bash scripts/bench.sh BENCH --help" >&2
}

name="${1:-all}"
case "$name" in
    -h|--help) usage; exit 0 ;;
    -*) name=all ;;
    all|propagation|failover|initial-sync|fanout|scale|policy|policy-compile|flows|lose-cluster|socket-lb) shift || true ;;
    *) echo "unknown benchmark \"$name\"" >&2; usage; exit 2 ;;
esac

if [ "$(id -u)" != 0 ]; then
    echo "scripts/bench.sh must run as root: the agent loads eBPF programs, mounts a bpffs and creates cgroups (try: sudo bash scripts/bench.sh)" >&2
    exit 1
fi
etcd_bin="${MESH_ETCD_BIN:-etcd}"
if ! command -v "$etcd_bin" >/dev/null 2>&1; then
    echo "etcd is not installed (no \"$etcd_bin\" in PATH): run bash scripts/setup.sh, which installs Debian's etcd-server, or set MESH_ETCD_BIN" >&2
    exit 1
fi

# 10k identities x 500 rules: compiled (mesh-core), then compiled and programmed into real
# maps (the agent's path; target <= 1 s). Both print their times beside the target.
policy_compile() {
    echo "policy-compile: building and running the examples in release..." >&2
    cargo run --release -q -p mesh-core --example policy_compile -- "$@"
    cargo run --release -q -p mesh-agent --example policy_program -- "$@"
}
if [ "$name" = policy-compile ]; then
    policy_compile "$@"
    exit 0
fi

# connect() to a socket-LB service with flow events off and on, the agent reader's CPU per
# flow and the records lost (target: within 5%). Args: [connects-per-phase] [rounds].
flows() {
    echo "flows: building and running the example in release..." >&2
    cargo run --release -q -p mesh-agent --example flow_events -- "$@"
}
if [ "$name" = flows ]; then
    flows "$@"
    exit 0
fi

# connect() from a pod netns to a service VIP translated by socket LB vs directly to the
# backend vs nftables DNAT, 1k and 10k services (targets: within 5% of direct, faster than
# DNAT). Only mesh-bench is needed: it loads the agent's programs through its library.
if [ "$name" = socket-lb ]; then
    echo "socket-lb: building mesh-bench in release..." >&2
    cargo build --release -q -p mesh-bench >&2
    exec "${CARGO_TARGET_DIR:-target}/release/mesh-bench" socket-lb "$@"
fi

echo "building release binaries (mesh-bench, mesh-apiserver, mesh-agent, and for the policy lab mesh-lab, meshctl)..." >&2
cargo build --release -p mesh-bench -p mesh-apiserver -p mesh-agent -p mesh-lab -p meshctl >&2
bin_dir="${CARGO_TARGET_DIR:-target}/release"

if [ "$name" = all ]; then
    "$bin_dir/mesh-bench" --bin-dir "$bin_dir" all "$@"
    "$bin_dir/mesh-bench" --bin-dir "$bin_dir" scale "$@"
    "$bin_dir/mesh-bench" --bin-dir "$bin_dir" policy "$@"
    "$bin_dir/mesh-bench" --bin-dir "$bin_dir" lose-cluster "$@"
    "$bin_dir/mesh-bench" socket-lb "$@"
    policy_compile
    flows
    exit 0
fi
exec "$bin_dir/mesh-bench" --bin-dir "$bin_dir" "$name" "$@"

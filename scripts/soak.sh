#!/usr/bin/env bash
# Soak (issue 16 part 5): one cluster (real etcd, the lab Kubernetes API, mesh-apiserver,
# mesh-agent) and 200 synthetic agent streams under continuous churn for N minutes, with
# release builds. Prints one row per interval (RSS and fds of every process) and a verdict:
# no unbounded growth of the apiserver and the agent, every stream converged to etcd's
# state key for key. Exits 1 when the verdict is FAIL.
#
#   bash scripts/soak.sh --minutes 30
#   bash scripts/soak.sh --minutes 5 --streams 400 --rate 500 --interval-s 10
#   bash scripts/soak.sh --minutes 2 -o json
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
    -h|--help)
        exec_help=1 ;;
esac

if [ "$(id -u)" != 0 ]; then
    echo "scripts/soak.sh must run as root: the agent loads eBPF programs, mounts a bpffs and creates cgroups (try: sudo bash scripts/soak.sh)" >&2
    exit 1
fi
etcd_bin="${MESH_ETCD_BIN:-etcd}"
if ! command -v "$etcd_bin" >/dev/null 2>&1; then
    echo "etcd is not installed (no \"$etcd_bin\" in PATH): run bash scripts/setup.sh, or set MESH_ETCD_BIN" >&2
    exit 1
fi

echo "building release binaries (mesh-bench, mesh-apiserver, mesh-agent)..." >&2
cargo build --release -p mesh-bench -p mesh-apiserver -p mesh-agent >&2
bin_dir="${CARGO_TARGET_DIR:-target}/release"
if [ -n "${exec_help:-}" ]; then
    exec "$bin_dir/mesh-bench" soak --help
fi
exec "$bin_dir/mesh-bench" --bin-dir "$bin_dir" soak "$@"

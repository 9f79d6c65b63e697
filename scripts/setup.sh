#!/usr/bin/env bash
# Installs every system package mesh needs on a fresh Debian machine, as root.
# Safe to run twice: apt-get skips what is installed, and the checks at the end only read.
set -euo pipefail

packages=(
  etcd-server etcd-client        # real etcd for the apiserver, the lab and the tests
  clang llvm libbpf-dev bpftool  # eBPF programs in C (bpf/), built by mesh-agent's build.rs
  protobuf-compiler libprotobuf-dev  # protoc and its well-known .proto files (etcd-client needs descriptor.proto)
  iproute2 iputils-ping curl     # network namespaces, veth, routes; probes
  nftables                       # mesh-lab: kube-proxy rules and node NAT inside node netns
  jq shellcheck                  # demo scripts and their lint
  ca-certificates git pkg-config
)

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (it installs Debian packages with apt-get)" >&2
  exit 1
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "setup.sh: system packages already installed"
fi

# The build needs a Rust toolchain; it cannot be downloaded by this script.
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup.sh: cargo not found: install a stable Rust toolchain (rustup) first" >&2
  exit 1
fi

# eBPF and the lab need cgroup v2 and bpffs; report, do not change the host's mounts here.
if ! grep -q cgroup2 /proc/mounts; then
  echo "setup.sh: warning: no cgroup v2 mount found; mesh-agent needs one (--cgroup-path)" >&2
fi

for tool in etcd etcdctl clang protoc ip kubectl; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "setup.sh: warning: $tool not on PATH" >&2
  fi
done
echo "setup.sh: ok"

#!/usr/bin/env bash
# Installs every system package mesh needs on a fresh Debian machine, as root.
# Safe to run twice: apt-get skips what is installed, and the checks at the end only read.
# Usage: scripts/setup.sh [--build-packages | --fuzz]
#   --fuzz: only the fuzzing toolchain (nightly Rust and cargo-fuzz, see below).
set -euo pipefail

packages=(
  etcd-server etcd-client        # real etcd for the apiserver, the lab and the tests
  clang llvm libbpf-dev bpftool  # eBPF programs in C (bpf/), built by mesh-agent's build.rs
  protobuf-compiler libprotobuf-dev  # protoc and its well-known .proto files (etcd-client needs descriptor.proto)
  iproute2 iputils-ping curl     # network namespaces, veth, routes; probes
  nftables                       # mesh-lab: kube-proxy rules and node NAT inside node netns
  jq shellcheck                  # demo scripts and their lint
  g++                            # the fuzz targets: libfuzzer-sys builds libFuzzer (C++)
  python3-grpcio python3-protobuf protobuf-compiler-grpc  # independent Observer client test (Python, generated from proto/)
  ca-certificates git pkg-config
)
# The subset `cargo build` of the workspace needs besides Rust. images/Dockerfile's toolchain
# stage installs exactly these (deploy-check compares the two lists, and checks that each is
# in packages above).
build_packages=(clang llvm libbpf-dev protobuf-compiler libprotobuf-dev pkg-config)
# `setup.sh --build-packages` prints them (for image builds and deploy-check), installs nothing.
if [ "${1:-}" = --build-packages ]; then
  echo "${build_packages[*]}"
  exit 0
fi

# The fuzz targets (fuzz/, scripts/fuzz.sh) need a nightly toolchain (sanitizers,
# -Zsanitizer) and cargo-fuzz. Both come from Rust's own channels: rustup's dist server and
# crates.io (`cargo install`), the same places stable Rust and every crate come from.
fuzz_toolchain() {
  if ! cargo +nightly --version >/dev/null 2>&1; then
    if ! command -v rustup >/dev/null 2>&1; then
      echo "setup.sh: the fuzz targets need a nightly Rust toolchain and rustup is not installed:" >&2
      echo "  install rustup (https://rustup.rs), then: rustup toolchain install nightly --profile minimal" >&2
      return 1
    fi
    echo "setup.sh: installing the nightly toolchain (rustup toolchain install nightly)"
    rustup toolchain install nightly --profile minimal >/dev/null || {
      echo "setup.sh: 'rustup toolchain install nightly --profile minimal' failed (offline?)" >&2
      return 1
    }
  fi
  if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "setup.sh: installing cargo-fuzz (cargo install cargo-fuzz --locked)"
    cargo install cargo-fuzz --locked >/dev/null 2>&1 || {
      echo "setup.sh: 'cargo install cargo-fuzz --locked' failed: cannot reach crates.io?" >&2
      return 1
    }
  fi
  echo "setup.sh: fuzzing toolchain: $(cargo +nightly --version), $(cargo +nightly fuzz --version)"
}
if [ "${1:-}" = --fuzz ]; then
  fuzz_toolchain
  exit
fi

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

fuzz_toolchain || exit 1

# eBPF and the lab need cgroup v2 and bpffs; report, do not change the host's mounts here.
if ! grep -q cgroup2 /proc/mounts; then
  echo "setup.sh: warning: no cgroup v2 mount found; mesh-agent needs one (--cgroup-path)" >&2
fi

missing_tools=()
for tool in etcd etcdctl clang protoc ip nft; do
  command -v "$tool" >/dev/null 2>&1 || missing_tools+=("$tool")
done
if [ ${#missing_tools[@]} -gt 0 ]; then
  echo "setup.sh: ${missing_tools[*]} still not on PATH after installing the packages above" >&2
  exit 1
fi

# kubectl: the demo and the tests use it as a real client of the lab's Kubernetes API.
# Debian has no usable kubectl (bookworm's kubernetes-client is 1.20), so it is not installed
# here; say exactly what to do instead.
kubectl_help() {
  cat >&2 <<'HELP'
setup.sh: kubectl 1.28 or newer is needed (the demo and the tests drive the lab with it).
Debian ships no usable version. Install it from the Kubernetes project's apt repository:
  apt-get install -y gpg
  mkdir -p /etc/apt/keyrings
  curl -fsSL https://pkgs.k8s.io/core:/stable:/v1.32/deb/Release.key \
    | gpg --dearmor -o /etc/apt/keyrings/kubernetes-apt-keyring.gpg
  echo 'deb [signed-by=/etc/apt/keyrings/kubernetes-apt-keyring.gpg] https://pkgs.k8s.io/core:/stable:/v1.32/deb/ /' \
    > /etc/apt/sources.list.d/kubernetes.list
  apt-get update && apt-get install -y kubectl
or put any kubectl >= 1.28 binary on PATH, then run this script again.
HELP
}
if ! command -v kubectl >/dev/null 2>&1; then
  kubectl_help
  exit 1
fi
minor=$(kubectl version --client -o json 2>/dev/null | sed -n 's/.*"minor": *"\([0-9]*\).*/\1/p' | head -1)
if [ -z "$minor" ] || [ "$minor" -lt 28 ]; then
  echo "setup.sh: kubectl on PATH is too old or unreadable (client minor version '${minor:-?}')" >&2
  kubectl_help
  exit 1
fi
echo "setup.sh: ok"

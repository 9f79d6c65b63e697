#!/usr/bin/env bash
# Shared by up.sh, demo.sh and down.sh: settings, prerequisite checks, kubectl helpers.
# Sourced, not run.
# Variables are used by the scripts that source this file.
# shellcheck disable=SC2034

MK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$MK_DIR/.." && pwd)

# The two clusters: kind cluster name = mesh cluster name; kube context kind-<name>.
CLUSTERS=(cluster1 cluster2)
# Certificates and keys made here (CA keys never leave this directory).
STATE=${MESH_KIND_STATE:-$MK_DIR/.state}
# The node image and the kind release it was built for (kind's release notes list the images
# of each release; a node image is only supported with the kind it was built for).
KIND_NODE_IMAGE_PINNED=kindest/node:v1.33.1
KIND_VERSION_PINNED=v0.29.0
KIND_NODE_IMAGE=${KIND_NODE_IMAGE:-$KIND_NODE_IMAGE_PINNED}
CLOUD_PROVIDER_KIND_IMAGE=${CLOUD_PROVIDER_KIND_IMAGE:-registry.k8s.io/cloud-provider-kind/cloud-controller-manager:v0.10.0}
CLOUD_PROVIDER_KIND_NAME=mesh-cloud-provider-kind
# The image repositories deploy/kustomization.yaml refers to (scripts/build-images.sh builds
# them). up.sh tags them by content (image_tag), never with the base's `dev`.
IMAGE_REPOS=(localhost/mesh-apiserver localhost/mesh-agent)
# images/Dockerfile's target that holds only meshctl, copied out when none is installed.
MESHCTL_IMAGE_REPO=localhost/mesh-meshctl
NAMESPACE=mesh-system

bold=$(printf '\033[1m'); dim=$(printf '\033[2m'); off=$(printf '\033[0m')
[ -t 1 ] || { bold=""; dim=""; off=""; }
say() { printf '\n%s==> %s%s\n' "$bold" "$*" "$off"; }
run() { printf '%s$ %s%s\n' "$dim" "$*" "$off"; "$@"; }
die() { echo "$(basename "$0"): $*" >&2; exit 1; }

# require TOOL... : exits naming every missing tool and where to get it.
require() {
  local missing=() t
  for t in "$@"; do
    command -v "$t" >/dev/null 2>&1 || missing+=("$t")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "$(basename "$0"): missing prerequisites: ${missing[*]}" >&2
  for t in "${missing[@]}"; do
    case $t in
      docker) echo "  docker:  https://docs.docker.com/engine/install/" >&2 ;;
      kind) echo "  kind:    https://kind.sigs.k8s.io/docs/user/quick-start/#installation" >&2 ;;
      kubectl) echo "  kubectl: https://kubernetes.io/docs/tasks/tools/" >&2 ;;
      meshctl) echo "  meshctl: cargo build --bin meshctl (then add target/debug to PATH), or set MESHCTL" >&2 ;;
      *) echo "  $t: install it with your package manager" >&2 ;;
    esac
  done
  exit 1
}

require_docker_engine() {
  docker info >/dev/null 2>&1 ||
    die "docker is installed but no container engine answers ('docker info' failed): start it or check permissions"
}

# Puts meshctl on PATH: $MESHCTL, then PATH, then the copy up.sh made under the state
# directory if it was built from this source (meshctl.tag = image_tag; a copy from older
# sources is rebuilt, as the images are), then (when MESHCTL_FROM=cargo) this repository's
# cargo build, else the `meshctl` target of images/Dockerfile, copied out of the image (needs
# only Docker).
find_meshctl() {
  local problem tag
  if [ -n "${MESHCTL:-}" ]; then
    [ -x "$MESHCTL" ] || die "MESHCTL=$MESHCTL is not an executable"
    PATH="$(cd "$(dirname "$MESHCTL")" && pwd):$PATH"
  elif ! command -v meshctl >/dev/null 2>&1; then
    # Without a tag (no git), a copy that exists is used as it is.
    tag=$(image_tag "$ROOT" 2>/dev/null) || tag=""
    if [ -x "$STATE/bin/meshctl" ] &&
      { [ -z "$tag" ] || [ "$(cat "$STATE/bin/meshctl.tag" 2>/dev/null)" = "$tag" ]; }; then
      PATH="$STATE/bin:$PATH"
    elif [ "${MESHCTL_FROM:-docker}" = cargo ]; then
      require cargo
      problem=$(protoc_problem "${PROTOC:-protoc}") || die "$problem"
      say "Building meshctl with cargo (MESHCTL_FROM=cargo)"
      run cargo build --quiet --manifest-path "$ROOT/Cargo.toml" --bin meshctl
      PATH="$ROOT/target/debug:$PATH"
    elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
      meshctl_from_image "$STATE/bin"
      PATH="$STATE/bin:$PATH"
    fi
  fi
  export PATH
  require meshctl
}

# meshctl's build (mesh-proto's build.rs) runs protoc on proto/, which imports the
# well-known google/protobuf/*.proto: Debian's protobuf-compiler brings protoc, and only
# libprotobuf-dev brings those files. The Docker build has both (the toolchain stage).
protoc_problem() { # protoc_problem PROTOC
  local include
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "MESHCTL_FROM=cargo: $1 not found: meshctl's build runs protoc (mesh-proto's build.rs). Install protobuf-compiler and libprotobuf-dev (scripts/setup.sh), or unset MESHCTL_FROM to build meshctl in Docker"
    return 1
  fi
  # protoc finds the well-known protos next to itself (<prefix>/include) or under /usr/include.
  include=$(dirname "$(dirname "$(command -v "$1")")")/include
  if [ ! -f "$include/google/protobuf/timestamp.proto" ] && [ ! -f /usr/include/google/protobuf/timestamp.proto ]; then
    echo "MESHCTL_FROM=cargo: protoc has no well-known protos (google/protobuf/timestamp.proto under $include or /usr/include): install libprotobuf-dev (scripts/setup.sh), or unset MESHCTL_FROM to build meshctl in Docker"
    return 1
  fi
}

# Builds images/Dockerfile's `meshctl` target and copies the binary out of it with docker
# create + docker cp (nothing runs: the image has no shell). The binary is static (musl,
# for the engine's architecture), so it runs on any Linux host of that architecture.
meshctl_from_image() { # meshctl_from_image DIR
  local dir=$1 image cid
  image="$MESHCTL_IMAGE_REPO:$(image_tag "$ROOT")" || exit 1
  say "Building meshctl in Docker (images/Dockerfile, target meshctl)"
  DOCKER_BUILDKIT=1 run docker build --file "$ROOT/images/Dockerfile" --target meshctl \
    --tag "$image" "$ROOT"
  mkdir -p "$dir"
  cid=$(docker create "$image") || die "docker create $image failed"
  run docker cp "$cid:/meshctl" "$dir/meshctl"
  docker rm "$cid" >/dev/null
  chmod 0755 "$dir/meshctl"
  "$dir/meshctl" --version >/dev/null 2>&1 ||
    die "$dir/meshctl (built for the Docker engine's architecture) does not run on this host; install meshctl another way (MESHCTL_FROM=cargo, or MESHCTL=PATH)"
  echo "${image##*:}" >"$dir/meshctl.tag"
}

# === image tags by content ===

# The tag of images built from the tree at DIR: the commit (git rev-parse --short HEAD),
# plus a hash of the uncommitted changes (tracked diffs and untracked files) when the tree
# is dirty, so a rebuilt image gets a new tag and the pods roll. MESH_IMAGE_TAG overrides
# it; `dev` (the base manifests' tag, never rebuilt-aware) is refused.
image_tag() { # image_tag DIR
  local dir=$1 head dirty
  if [ -n "${MESH_IMAGE_TAG:-}" ]; then
    [ "$MESH_IMAGE_TAG" != dev ] ||
      die "MESH_IMAGE_TAG=dev: up.sh tags images by content so a rebuild rolls the pods; unset it or pick another tag"
    echo "$MESH_IMAGE_TAG"
    return
  fi
  if ! command -v git >/dev/null 2>&1 || ! head=$(git -C "$dir" rev-parse --short HEAD 2>/dev/null); then
    die "$dir is not a git checkout (or git is missing): set MESH_IMAGE_TAG to a tag that names this source"
  fi
  dirty=$(git -C "$dir" status --porcelain --untracked-files=all)
  if [ -z "$dirty" ]; then
    echo "$head"
    return
  fi
  # The content of the changes, not only their names: editing a dirty file again changes it.
  dirty=$(
    cd "$dir" &&
      { git diff HEAD --binary; git ls-files --others --exclude-standard -z | xargs -0 -r sha256sum; } |
      sha256sum | cut -c1-12
  )
  echo "$head-dirty-$dirty"
}

# Writes DIR/kustomization.yaml: the cluster's overlay with every mesh image at TAG. kustomize
# refuses absolute resource paths, so the overlay names the cluster's directory relatively.
write_overlay() { # write_overlay CLUSTER TAG DIR
  local c=$1 tag=$2 dir=$3 rel repo
  [ "$tag" != dev ] || die "refusing to apply the tag dev (images are tagged by content)"
  mkdir -p "$dir"
  rel=$(realpath -m --relative-to="$dir" "$MK_DIR/clusters/$c")
  {
    echo "# Generated by multicluster-kind/up.sh: $c's overlay with the images tagged $tag."
    echo "apiVersion: kustomize.config.k8s.io/v1beta1"
    echo "kind: Kustomization"
    echo "resources:"
    echo "  - $rel"
    echo "images:"
    for repo in "${IMAGE_REPOS[@]}"; do
      echo "  - name: $repo"
      echo "    newTag: \"$tag\""
    done
  } >"$dir/kustomization.yaml"
}

# === pod CIDRs and kindnet's masquerade ===

# The pod CIDR of CLUSTER, from kind-CLUSTER.yaml (the one place it is written).
pod_cidr() { # pod_cidr CLUSTER
  local cidr
  cidr=$(sed -n 's/^[[:space:]]*podSubnet:[[:space:]]*"\{0,1\}\([0-9./]*\)"\{0,1\}[[:space:]]*$/\1/p' \
    "$MK_DIR/kind-$1.yaml")
  [ -n "$cidr" ] || die "kind-$1.yaml has no networking.podSubnet"
  echo "$cidr"
}

# Every cluster's pod CIDR, comma-separated, in CLUSTERS order: the value up.sh gives
# kindnet's POD_SUBNET in every cluster.
all_pod_cidrs() {
  local c cidr list=()
  for c in "${CLUSTERS[@]}"; do
    cidr=$(pod_cidr "$c") || exit 1
    list+=("$cidr")
  done
  (IFS=,; echo "${list[*]}")
}

# kind's kindnetd (iptables, the pinned kind v0.29 / kindest/node v1.33.1) reads POD_SUBNET
# as a comma-separated list and keeps the source address of traffic to each of them: one
# `-d CIDR -j RETURN` per entry in its nat chain KIND-MASQ-AGENT, then `-j MASQUERADE` for
# everything else. Its rules are added with "append unless present" and the chain is never
# flushed, so a CIDR added to a running cluster lands *after* the MASQUERADE rule and is
# never reached. This reads `iptables -t nat -S KIND-MASQ-AGENT` and names every CIDR of
# CIDRS (comma-separated) that has no RETURN before the MASQUERADE rule; it succeeds (prints
# nothing) when the chain keeps every CIDR's sources.
masq_chain_problem() { # masq_chain_problem CIDRS "$(iptables -t nat -S KIND-MASQ-AGENT)"
  local cidrs=$1 rules=$2 cidr line masq="" missing=()
  local -A kept=()
  while read -r line; do
    case $line in
      "-A KIND-MASQ-AGENT "*"-j MASQUERADE"*) masq=yes; break ;;
      "-A KIND-MASQ-AGENT -d "*"-j RETURN"*)
        cidr=${line#-A KIND-MASQ-AGENT -d }
        kept[${cidr%% *}]=yes ;;
    esac
  done <<<"$rules"
  for cidr in ${cidrs//,/ }; do
    [ -n "${kept[$cidr]:-}" ] || missing+=("$cidr")
  done
  if [ -z "$masq" ]; then
    echo "kindnet's KIND-MASQ-AGENT chain has no MASQUERADE rule (not synced yet, or not kindnet's iptables masquerade)"
    return 1
  fi
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "kindnet masquerades traffic to ${missing[*]} (no RETURN before its MASQUERADE rule)"
  return 1
}

# kind's kindnet DaemonSet (kube-system/kindnet) and where its POD_SUBNET is.
KINDNET_POD_SUBNET_JSONPATH='{.spec.template.spec.containers[?(@.name=="kindnet-cni")].env[?(@.name=="POD_SUBNET")].value}'

# Makes kindnet of CLUSTER keep pod source addresses to every cluster's pod CIDR (identities
# are by pod IP, so a masqueraded source is counted as world): POD_SUBNET on the kindnet
# DaemonSet lists every cluster's pod CIDR, so it holds across node restarts. A node whose
# chain was built from the old value (the new RETURNs after MASQUERADE) gets the chain
# flushed and its kindnet pod restarted, which rebuilds it in order; then each node's chain
# is checked until it is right (bounded), and up.sh stops if it never is.
keep_pod_sources() { # keep_pod_sources CLUSTER
  local c=$1 cidrs current node rules problem pod deadline
  cidrs=$(all_pod_cidrs) || exit 1
  current=$(kc "$c" -n kube-system get daemonset kindnet -o "jsonpath=$KINDNET_POD_SUBNET_JSONPATH") ||
    die "$c: no DaemonSet kube-system/kindnet: up.sh relies on kind's default CNI (do not set disableDefaultCNI)"
  if [ "$current" != "$cidrs" ]; then
    echo "$c: kindnet POD_SUBNET=$current: setting it to every cluster's pod CIDR"
    run kc "$c" -n kube-system set env daemonset/kindnet -c kindnet-cni "POD_SUBNET=$cidrs"
  fi
  run kc "$c" -n kube-system rollout status daemonset/kindnet --timeout=120s
  for node in $(kind get nodes --name "$c"); do
    # The standalone kindnet masquerades with nftables; nothing here would reach it.
    if docker exec "$node" sh -c 'command -v nft >/dev/null && nft list table inet kindnet-ipmasq' >/dev/null 2>&1; then
      die "$node: kindnet masquerades with nftables (table inet kindnet-ipmasq), not kind's iptables chain up.sh configures; use kind $KIND_VERSION_PINNED with $KIND_NODE_IMAGE_PINNED"
    fi
    rules=$(docker exec "$node" iptables -t nat -S KIND-MASQ-AGENT 2>/dev/null || true)
    problem=$(masq_chain_problem "$cidrs" "$rules") && continue
    echo "$node: $problem: rebuilding the chain"
    run docker exec "$node" iptables -t nat -F KIND-MASQ-AGENT
    pod=$(kc "$c" -n kube-system get pods -l app=kindnet --field-selector "spec.nodeName=$node" -o name)
    [ -z "$pod" ] || run kc "$c" -n kube-system delete "$pod" --wait=true
  done
  run kc "$c" -n kube-system rollout status daemonset/kindnet --timeout=120s
  # kindnetd writes its chain when it starts, after the pod is running: wait for it.
  for node in $(kind get nodes --name "$c"); do
    deadline=$((SECONDS + ${KINDNET_SYNC_TIMEOUT:-60}))
    until rules=$(docker exec "$node" iptables -t nat -S KIND-MASQ-AGENT 2>/dev/null) &&
      problem=$(masq_chain_problem "$cidrs" "$rules"); do
      [ $SECONDS -lt "$deadline" ] ||
        die "$node: ${problem:-the KIND-MASQ-AGENT chain of kindnet is missing} after ${KINDNET_SYNC_TIMEOUT:-60}s: cross-cluster pod traffic would lose its source address. Inspect with: docker exec $node iptables -t nat -S KIND-MASQ-AGENT; kubectl --context $(context "$c") -n kube-system logs ds/kindnet"
      sleep 1
    done
    echo "$node: kindnet keeps pod sources to $cidrs"
  done
}

# === host checks (up.sh): each names the problem and what to do ===
# The deciding parts take their input as arguments, so deploy-check runs them without Docker.

# The Docker platform of an architecture (docker info's Architecture, or uname -m). amd64
# and arm64 are built natively: mesh-agent's build.rs takes the kernel headers of the
# target's multiarch directory (/usr/include/<arch>-linux-gnu), the Dockerfile builds for
# the engine's own architecture and the demo images are multi-arch. Anything else stops.
arch_platform() { # arch_platform ARCH
  case $1 in
    x86_64 | amd64) echo linux/amd64 ;;
    aarch64 | arm64) echo linux/arm64 ;;
    *)
      echo "architecture $1 is not supported: mesh builds for x86_64 (amd64) and aarch64 (arm64) only (the eBPF programs need that architecture's kernel headers, and emulated images cannot load eBPF into the host's kernel). Use an amd64 or arm64 Linux host, or run the lab (scripts/demo.sh) instead"
      return 1 ;;
  esac
}

# Only Linux: the LoadBalancer addresses live on the kind Docker network, which only a Linux
# host reaches (Docker Desktop keeps it inside its VM), and meshctl is a Linux binary.
os_problem() { # os_problem "$(uname -s)"
  [ "$1" = Linux ] && return 0
  echo "this host runs $1, not Linux: up.sh needs the kind network's LoadBalancer addresses reachable from the host, which Docker Desktop does not route (its engine runs in a VM), and the meshctl it copies out of the image is a Linux binary. Run it on a Linux host (or a Linux VM with Docker), or run the lab (scripts/demo.sh) on Linux"
  return 1
}

cgroup_problem() { # cgroup_problem FSTYPE   (stat -fc %T /sys/fs/cgroup)
  [ "$1" = cgroup2fs ] && return 0
  echo "the host does not run cgroup v2 (/sys/fs/cgroup is $1, not cgroup2fs): mesh-agent attaches socket load balancing to the node's cgroup v2 root, which kind nodes only have on a cgroup v2 host. Boot with systemd.unified_cgroup_hierarchy=1 (or a distribution that defaults to cgroup v2)"
  return 1
}

kind_version_problem() { # kind_version_problem "$(kind version)" NODE_IMAGE
  local version
  version=$(awk '{print $2}' <<<"$1")
  [ "$2" != "$KIND_NODE_IMAGE_PINNED" ] && return 0 # the user chose an image: their call
  [ "$version" = "$KIND_VERSION_PINNED" ] && return 0
  echo "kind ${version:-(unknown version)} is not the release $KIND_NODE_IMAGE_PINNED was built for ($KIND_VERSION_PINNED): node images are only supported with their kind release. Install kind $KIND_VERSION_PINNED (https://kind.sigs.k8s.io/docs/user/quick-start/#installation), or set KIND_NODE_IMAGE to the v1.33 image your kind's release notes list"
  return 1
}

# The host path of the engine's unix socket, from DOCKER_HOST or the current docker context:
# rootless Docker listens at $XDG_RUNTIME_DIR/docker.sock, not /var/run/docker.sock.
docker_socket_of() { # docker_socket_of ENDPOINT
  case $1 in
    unix://*) echo "${1#unix://}" ;;
    *)
      echo "the Docker endpoint is $1, not a local unix socket: cloud-provider-kind runs as a container and needs the engine's socket bind-mounted; use a local engine (unset DOCKER_HOST or switch docker context)" >&2
      return 1 ;;
  esac
}

# Docker's containerd image store (driver-type io.containerd.snapshotter.v1) breaks
# `kind load docker-image` (kind#3795: `docker save` writes an index whose attestation
# manifest it leaves out, and the node's `ctr import --all-platforms` wants every child):
# images are then saved for the one platform (`docker image save --platform`, Docker 28+)
# and loaded with `kind load image-archive`.
uses_containerd_store() { # uses_containerd_store "$(docker info -f '{{.DriverStatus}}')"
  [[ $1 == *io.containerd.snapshotter* ]]
}

save_platform_problem() { # save_platform_problem "$(docker image save --help)"
  [[ $1 == *--platform* ]] && return 0
  echo "Docker uses the containerd image store, where 'kind load docker-image' fails (kind#3795), and this docker CLI's 'image save' has no --platform (Docker 28 added it) to work around it. Upgrade Docker to 28 or newer, or turn the containerd image store off (\"features\": {\"containerd-snapshotter\": false} in /etc/docker/daemon.json, then restart dockerd)"
  return 1
}

check_host() {
  local problem arch fstype endpoint
  problem=$(os_problem "$(uname -s)") || die "$problem"
  arch=$(docker info --format '{{.Architecture}}' 2>/dev/null || uname -m)
  DOCKER_PLATFORM=$(arch_platform "$arch") || die "$DOCKER_PLATFORM"
  # The engine's host is the one kind nodes share (it may be a VM): ask the engine first.
  case $(docker info --format '{{.CgroupVersion}}' 2>/dev/null) in
    2) ;;
    1) problem=$(cgroup_problem "a cgroup v1 hierarchy, says docker info") || die "$problem" ;;
    *)
      fstype=$(stat -fc %T /sys/fs/cgroup 2>/dev/null || echo unknown)
      problem=$(cgroup_problem "$fstype") || die "$problem" ;;
  esac
  problem=$(kind_version_problem "$(kind version 2>/dev/null)" "$KIND_NODE_IMAGE") || die "$problem"
  endpoint=${DOCKER_HOST:-$(docker context inspect --format '{{.Endpoints.docker.Host}}' 2>/dev/null)}
  DOCKER_SOCKET=$(docker_socket_of "${endpoint:-unix:///var/run/docker.sock}") || exit 1
  [ -S "$DOCKER_SOCKET" ] || die "the Docker socket $DOCKER_SOCKET (from ${DOCKER_HOST:+DOCKER_HOST}${DOCKER_HOST:-docker context inspect}) is not a socket on this host"
  if uses_containerd_store "$(docker info --format '{{.DriverStatus}}' 2>/dev/null)"; then
    problem=$(save_platform_problem "$(docker image save --help 2>&1)") || die "$problem"
  fi
  if [[ $(docker info --format '{{.SecurityOptions}}' 2>/dev/null) == *rootless* ]]; then
    echo "warning: rootless Docker: kind nodes run in a user namespace, where the kernel normally refuses to load eBPF programs; mesh-agent may not start (kubectl -n $NAMESPACE logs ds/mesh-agent). See https://kind.sigs.k8s.io/docs/user/rootless/" >&2
  fi
}

# Loads IMAGE into every node of CLUSTER (check_host set DOCKER_PLATFORM).
load_image() { # load_image IMAGE CLUSTER
  local image=$1 c=$2 archive
  if uses_containerd_store "$(docker info --format '{{.DriverStatus}}' 2>/dev/null)"; then
    archive="$STATE/images/${image//[\/:]/_}.tar"
    mkdir -p "$STATE/images"
    run docker image save --platform "$DOCKER_PLATFORM" --output "$archive" "$image"
    run kind load image-archive "$archive" --name "$c"
    rm -f "$archive"
  else
    run kind load docker-image "$image" --name "$c"
  fi
}

context() { echo "kind-$1"; }
kc() { # kc CLUSTER kubectl-args...
  local c=$1; shift
  kubectl --context "$(context "$c")" "$@"
}

# The address peers and meshctl use: the LoadBalancer ingress IP of mesh-apiserver.
lb_address() { # lb_address CLUSTER
  kc "$1" -n "$NAMESPACE" get svc mesh-apiserver -o jsonpath='{.status.loadBalancer.ingress[0].ip}'
}

wait_for_lb_address() { # wait_for_lb_address CLUSTER SECONDS
  local c=$1 deadline=$((SECONDS + $2)) ip=""
  until ip=$(lb_address "$c") && [ -n "$ip" ]; do
    [ $SECONDS -lt "$deadline" ] ||
      die "$c: mesh-apiserver got no LoadBalancer address in $2s (is $CLOUD_PROVIDER_KIND_NAME running? docker logs $CLOUD_PROVIDER_KIND_NAME)"
    sleep 2
  done
  echo "$ip"
}

# meshctl's client settings for CLUSTER (operator certificate, LoadBalancer address).
meshctl_env() { # meshctl_env CLUSTER
  local c=$1 pki="$STATE/pki/$1"
  MESH_SERVER="$(lb_address "$c"):7443"
  MESH_TLS_CA="$pki/ca.crt"
  MESH_TLS_CERT="$pki/operator-admin.crt"
  MESH_TLS_KEY="$pki/operator-admin.key"
  MESH_CLUSTER_NAME=$c
  export MESH_SERVER MESH_TLS_CA MESH_TLS_CERT MESH_TLS_KEY MESH_CLUSTER_NAME
}

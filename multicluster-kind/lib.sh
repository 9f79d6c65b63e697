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
# directory, then (when MESHCTL_FROM=cargo) this repository's cargo build, else the `meshctl`
# target of images/Dockerfile, copied out of the image (needs only Docker).
find_meshctl() {
  if [ -n "${MESHCTL:-}" ]; then
    [ -x "$MESHCTL" ] || die "MESHCTL=$MESHCTL is not an executable"
    PATH="$(cd "$(dirname "$MESHCTL")" && pwd):$PATH"
  elif ! command -v meshctl >/dev/null 2>&1; then
    if [ -x "$STATE/bin/meshctl" ]; then
      PATH="$STATE/bin:$PATH"
    elif [ "${MESHCTL_FROM:-docker}" = cargo ]; then
      require cargo
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

# Builds images/Dockerfile's `meshctl` target and copies the binary out of it with docker
# create + docker cp (nothing runs: the image has no shell). The binary is linked against
# glibc >= 2.36 (Debian bookworm's): no musl target is installed in the build image.
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
    die "$dir/meshctl does not run on this host (it needs glibc >= 2.36); install meshctl another way (MESHCTL_FROM=cargo, or MESHCTL=PATH)"
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

# Every (cluster, own pod CIDR, peer pod CIDR) whose traffic must keep its pod source
# address: one line per ordered pair of distinct clusters.
nomasq_pairs() {
  local c p
  for c in "${CLUSTERS[@]}"; do
    for p in "${CLUSTERS[@]}"; do
      [ "$c" = "$p" ] || echo "$c $(pod_cidr "$c") $(pod_cidr "$p")"
    done
  done
}

# kindnet (kind's in-tree kindnetd, iptables) masquerades whatever leaves its own POD_SUBNET
# through its KIND-MASQ-AGENT chain, which it appends to nat POSTROUTING; it has no setting
# for more non-masquerade CIDRs. A RETURN inserted first in POSTROUTING keeps cross-cluster
# pod traffic's source address (identities are by pod IP). Checked with -C first, so reruns
# add nothing; lost when a node container restarts (rerun up.sh).
keep_pod_sources() { # keep_pod_sources CLUSTER
  local c=$1 node own peer rule
  for node in $(kind get nodes --name "$c"); do
    # Newer standalone kindnet masquerades in its own nftables table, where an iptables
    # RETURN does not stop it: say so instead of leaving traffic silently masqueraded.
    if docker exec "$node" sh -c 'command -v nft >/dev/null && nft list table inet kindnet-ipmasq' >/dev/null 2>&1; then
      die "$node: kindnet masquerades with nftables (table inet kindnet-ipmasq), which the iptables exception up.sh adds cannot override; use kind $KIND_VERSION_PINNED with $KIND_NODE_IMAGE_PINNED"
    fi
    while read -r _ own peer; do
      rule=(POSTROUTING -s "$own" -d "$peer" -m comment --comment "mesh: keep pod source to peer cluster" -j RETURN)
      docker exec "$node" iptables -t nat -C "${rule[@]}" >/dev/null 2>&1 ||
        run docker exec "$node" iptables -t nat -I "${rule[0]}" 1 "${rule[@]:1}"
    done < <(nomasq_pairs | grep "^$c ")
  done
}

# === host checks (up.sh): each names the problem and what to do ===
# The deciding parts take their input as arguments, so deploy-check runs them without Docker.

arch_problem() { # arch_problem ARCH   (uname -m, or docker info's Architecture)
  case $1 in
    x86_64 | amd64) return 0 ;;
    aarch64 | arm64)
      echo "arm64 ($1) is not supported: mesh-agent's build.rs compiles bpf/ with x86_64's kernel headers (-I/usr/include/x86_64-linux-gnu) and images/Dockerfile builds amd64 images only; amd64 images under emulation cannot load eBPF into an arm64 kernel. Use an x86_64 Linux host, or run the lab (scripts/demo.sh) instead"
      return 1 ;;
    *)
      echo "architecture $1 is not supported: mesh builds for x86_64 only (bpf/ is compiled with x86_64's kernel headers)"
      return 1 ;;
  esac
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
# `kind load docker-image`; images are then saved to an archive and loaded from it.
uses_containerd_store() { # uses_containerd_store "$(docker info -f '{{.DriverStatus}}')"
  [[ $1 == *io.containerd.snapshotter* ]]
}

check_host() {
  local problem arch fstype endpoint
  arch=$(docker info --format '{{.Architecture}}' 2>/dev/null || uname -m)
  problem=$(arch_problem "$arch") || die "$problem"
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
  if [[ $(docker info --format '{{.SecurityOptions}}' 2>/dev/null) == *rootless* ]]; then
    echo "warning: rootless Docker: kind nodes run in a user namespace, where the kernel normally refuses to load eBPF programs; mesh-agent may not start (kubectl -n $NAMESPACE logs ds/mesh-agent). See https://kind.sigs.k8s.io/docs/user/rootless/" >&2
  fi
}

# Loads IMAGE into every node of CLUSTER.
load_image() { # load_image IMAGE CLUSTER
  local image=$1 c=$2 archive
  if uses_containerd_store "$(docker info --format '{{.DriverStatus}}' 2>/dev/null)"; then
    archive="$STATE/images/${image//[\/:]/_}.tar"
    mkdir -p "$STATE/images"
    run docker save --platform linux/amd64 --output "$archive" "$image"
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

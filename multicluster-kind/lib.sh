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
KIND_NODE_IMAGE=${KIND_NODE_IMAGE:-kindest/node:v1.33.1}
CLOUD_PROVIDER_KIND_IMAGE=${CLOUD_PROVIDER_KIND_IMAGE:-registry.k8s.io/cloud-provider-kind/cloud-controller-manager:v0.10.0}
CLOUD_PROVIDER_KIND_NAME=mesh-cloud-provider-kind
# The images deploy/kustomization.yaml refers to (scripts/build-images.sh builds them).
IMAGES=(localhost/mesh-apiserver:dev localhost/mesh-agent:dev)
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

# Puts meshctl on PATH: $MESHCTL, then PATH, then this repository's build.
find_meshctl() {
  if [ -n "${MESHCTL:-}" ]; then
    [ -x "$MESHCTL" ] || die "MESHCTL=$MESHCTL is not an executable"
    PATH="$(cd "$(dirname "$MESHCTL")" && pwd):$PATH"
  elif ! command -v meshctl >/dev/null 2>&1; then
    if [ -x "$ROOT/target/debug/meshctl" ]; then
      PATH="$ROOT/target/debug:$PATH"
    elif command -v cargo >/dev/null 2>&1; then
      say "Building meshctl"
      run cargo build --quiet --manifest-path "$ROOT/Cargo.toml" --bin meshctl
      PATH="$ROOT/target/debug:$PATH"
    fi
  fi
  export PATH
  require meshctl
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

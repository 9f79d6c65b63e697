#!/usr/bin/env bash
# The mesh demo on one machine: sets the machine up, builds mesh, starts one cluster
# (mesh-lab's Kubernetes API, a real etcd, a mesh-apiserver over mutual TLS), creates a
# global Service with kubectl and shows what the apiserver publishes, then cleans up.
#
# Usage: bash scripts/demo.sh        (as root on Debian; set KEEP=1 to leave it running)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

bold=$(printf '\033[1m'); dim=$(printf '\033[2m'); off=$(printf '\033[0m')
[ -t 1 ] || { bold=""; dim=""; off=""; }
say() { printf '\n%s==> %s%s\n' "$bold" "$*" "$off"; }
run() { printf '%s$ %s%s\n' "$dim" "$*" "$off"; "$@"; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_for() { # wait_for DESCRIPTION SECONDS COMMAND...
  local what=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      echo "demo: timed out waiting for $what" >&2
      return 1
    fi
    sleep 0.2
  done
}

say "Installing system packages (scripts/setup.sh)"
bash scripts/setup.sh

say "Building mesh"
cargo build --quiet --bins
bin=${CARGO_TARGET_DIR:-$root/target}/debug
export PATH="$bin:$PATH"

work=$(mktemp -d /tmp/mesh-demo.XXXXXX)
pids=()
cleanup() {
  if [ "${KEEP:-}" = "1" ]; then
    echo "KEEP=1: leaving processes ${pids[*]} and $work in place"
    return
  fi
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

etcd_port=$(free_port); etcd_peer=$(free_port); kube_port=$(free_port)
grpc_port=$(free_port); metrics_port=$(free_port)

say "Starting etcd on 127.0.0.1:$etcd_port"
etcd --name demo --data-dir "$work/etcd" \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
  --initial-cluster "demo=http://127.0.0.1:$etcd_peer" --log-level warn >"$work/etcd.log" 2>&1 &
pids+=($!)
wait_for etcd 20 curl -sf "http://127.0.0.1:$etcd_port/health"

say "Starting mesh-lab's Kubernetes API for cluster east on 127.0.0.1:$kube_port"
mesh-lab kube-api --listen "127.0.0.1:$kube_port" --dir "$work/kube" --cluster east \
  --context lab-east --service-cidr 10.96.0.0/16 >"$work/kube-api.log" 2>&1 &
pids+=($!)
export KUBECONFIG=$work/kube/kubeconfig
wait_for "the Kubernetes API" 30 test -s "$KUBECONFIG"
wait_for "the Kubernetes API" 30 kubectl get --raw /readyz
kctl() { run kubectl --cache-dir "$work/kube-cache" "$@"; }

say "Creating the cluster's CA and certificates with meshctl"
run meshctl ca create --cluster east --out-dir "$work/pki"
run meshctl cert issue --ca-dir "$work/pki" --cluster east --apiserver \
  --dns localhost --ip 127.0.0.1 --out-dir "$work/pki"
run meshctl cert issue --ca-dir "$work/pki" --cluster east --operator admin --out-dir "$work/pki"

say "Starting mesh-apiserver for cluster east (gRPC 127.0.0.1:$grpc_port, mutual TLS)"
mesh-apiserver --cluster-name east --cluster-id 1 --pod-cidr 10.1.0.0/16 \
  --service-cidr 10.96.0.0/16 --etcd-endpoints "http://127.0.0.1:$etcd_port" \
  --kubeconfig "$KUBECONFIG" --listen "127.0.0.1:$grpc_port" \
  --metrics-listen "127.0.0.1:$metrics_port" \
  --tls-cert "$work/pki/apiserver.crt" --tls-key "$work/pki/apiserver.key" \
  --tls-ca "$work/pki/ca.crt" >"$work/apiserver.log" 2>&1 &
pids+=($!)
wait_for "mesh-apiserver /readyz" 30 curl -sf "http://127.0.0.1:$metrics_port/readyz"

export MESH_SERVER=127.0.0.1:$grpc_port MESH_TLS_CA=$work/pki/ca.crt \
  MESH_TLS_CERT=$work/pki/operator-admin.crt MESH_TLS_KEY=$work/pki/operator-admin.key

say "Creating nodes, pods and a global Service with kubectl"
kctl apply -f examples/single-cluster.yaml
# No kubelet in this single-cluster demo: report node addresses and pod status as one would.
for n in 1 2; do
  kctl patch node "node-$n" --subresource=status --type=merge \
    -p "{\"status\":{\"addresses\":[{\"type\":\"InternalIP\",\"address\":\"192.168.50.$n\"}]}}"
done
for p in rebel-base-1:1:10 rebel-base-2:2:10 x-wing:1:20; do
  IFS=: read -r name node ip <<<"$p"
  kctl -n demo patch pod "$name" --subresource=status --type=merge -p "{\"status\":{\"phase\":\"Running\",\"hostIP\":\"192.168.50.$node\",\"podIP\":\"10.1.$node.$ip\",\"podIPs\":[{\"ip\":\"10.1.$node.$ip\"}],\"conditions\":[{\"type\":\"Ready\",\"status\":\"True\"}]}}"
done
kctl get nodes,pods,svc -A

say "What mesh-apiserver publishes (read over its mutual-TLS gRPC watch)"
wait_for "the service to be published" 30 sh -c "meshctl inspect services | grep -q rebel-base"
run meshctl inspect

say "Affinity local: kubectl annotate, and the published service follows"
kctl -n demo annotate svc rebel-base service.cilium.io/affinity=local
wait_for "affinity local" 30 sh -c "meshctl inspect services | grep -q local"
run meshctl inspect services

say "A malformed annotation is reported (log, Event, metric) and treated as none"
kctl -n demo annotate --overwrite svc rebel-base service.cilium.io/affinity=loca
wait_for "the Warning event" 30 sh -c "kubectl --cache-dir '$work/kube-cache' -n demo get events | grep -q InvalidAnnotation"
kctl -n demo get events
run meshctl inspect services

say "Status of the mesh as this apiserver sees it"
run meshctl status

say "Done. Everything started here is stopped and removed on exit."

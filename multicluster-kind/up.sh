#!/usr/bin/env bash
# Two kind clusters joined by mesh, as Cilium's Cluster Mesh kind demo:
#   1. builds the images (scripts/build-images.sh; SKIP_BUILD=1 to reuse them),
#   2. starts cloud-provider-kind (LoadBalancer addresses on the kind network),
#   3. creates kind clusters cluster1 and cluster2 (kind-cluster*.yaml: distinct pod and
#      service CIDRs) and loads the images,
#   4. installs mesh (kubectl apply -k clusters/<cluster>: cluster IDs 1 and 2),
#   5. creates each cluster's CA and certificates with meshctl and stores them as Secrets,
#   6. connects the clusters with meshctl connect and waits with meshctl status --wait.
# Safe to run again: existing clusters, CAs and images are reused.
#
# Usage: multicluster-kind/up.sh        then multicluster-kind/demo.sh, multicluster-kind/down.sh
# Needs: docker (with a running engine), kind, kubectl, meshctl (built from this repository
# when cargo is available). Linux: the LoadBalancer addresses must be reachable from the host.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

require docker kind kubectl
require_docker_engine
find_meshctl
mkdir -p "$STATE"
chmod 700 "$STATE"

if [ "${SKIP_BUILD:-}" != "1" ]; then
  say "Building the images"
  run bash "$ROOT/scripts/build-images.sh" dev
fi
for image in "${IMAGES[@]}"; do
  docker image inspect "$image" >/dev/null 2>&1 ||
    die "image $image is missing: run scripts/build-images.sh (or unset SKIP_BUILD)"
done

say "Creating the kind clusters"
for c in "${CLUSTERS[@]}"; do
  if kind get clusters 2>/dev/null | grep -qx "$c"; then
    echo "kind cluster $c exists: reusing it"
  else
    run kind create cluster --config "$MK_DIR/kind-$c.yaml" --image "$KIND_NODE_IMAGE" --wait 120s
  fi
  for image in "${IMAGES[@]}"; do
    run kind load docker-image "$image" --name "$c"
  done
done

say "Starting cloud-provider-kind for LoadBalancer addresses"
if [ -z "$(docker ps -q --filter "name=^${CLOUD_PROVIDER_KIND_NAME}\$")" ]; then
  docker rm -f "$CLOUD_PROVIDER_KIND_NAME" >/dev/null 2>&1 || true
  run docker run -d --name "$CLOUD_PROVIDER_KIND_NAME" --restart unless-stopped --network kind \
    -v /var/run/docker.sock:/var/run/docker.sock "$CLOUD_PROVIDER_KIND_IMAGE"
else
  echo "$CLOUD_PROVIDER_KIND_NAME is running"
fi

say "Installing mesh"
for c in "${CLUSTERS[@]}"; do
  run kc "$c" apply -k "$MK_DIR/clusters/$c"
done

say "Creating certificates with meshctl and storing them as Secrets"
for c in "${CLUSTERS[@]}"; do
  pki="$STATE/pki/$c"
  ip=$(wait_for_lb_address "$c" 180)
  echo "$c: mesh-apiserver LoadBalancer address $ip"
  [ -s "$pki/ca.crt" ] || run meshctl ca create --cluster "$c" --out-dir "$pki"
  # Reissued every run: the LoadBalancer address may have changed.
  run meshctl cert issue --ca-dir "$pki" --cluster "$c" --apiserver --out-dir "$pki" \
    --dns mesh-apiserver --dns "mesh-apiserver.$NAMESPACE" \
    --dns "mesh-apiserver.$NAMESPACE.svc" --dns "mesh-apiserver.$NAMESPACE.svc.cluster.local" \
    --ip "$ip"
  run meshctl cert issue --ca-dir "$pki" --cluster "$c" --operator admin --out-dir "$pki"
  agent_files=(--from-file="ca.crt=$pki/ca.crt")
  for node in $(kc "$c" get nodes -o jsonpath='{.items[*].metadata.name}'); do
    run meshctl cert issue --ca-dir "$pki" --cluster "$c" --agent "$node" --out-dir "$pki"
    agent_files+=(--from-file="agent-$node.crt=$pki/agent-$node.crt" --from-file="agent-$node.key=$pki/agent-$node.key")
  done
  kc "$c" -n "$NAMESPACE" create secret generic mesh-apiserver-tls --type=kubernetes.io/tls \
    --from-file="tls.crt=$pki/apiserver.crt" --from-file="tls.key=$pki/apiserver.key" \
    --from-file="ca.crt=$pki/ca.crt" --dry-run=client -o yaml | run kc "$c" apply -f -
  kc "$c" -n "$NAMESPACE" create secret generic mesh-agent-tls "${agent_files[@]}" \
    --dry-run=client -o yaml | run kc "$c" apply -f -
done

say "Waiting for mesh to run"
for c in "${CLUSTERS[@]}"; do
  run kc "$c" -n "$NAMESPACE" rollout status deployment/mesh-apiserver --timeout=300s
  run kc "$c" -n "$NAMESPACE" rollout status daemonset/mesh-agent --timeout=300s
done

say "Connecting the clusters"
run meshctl connect --context "$(context cluster1)" --destination-context "$(context cluster2)" \
  --namespace "$NAMESPACE" --peers-secret "$NAMESPACE/mesh-peers"

say "Waiting until every agent is synced with every cluster"
for c in "${CLUSTERS[@]}"; do
  meshctl_env "$c"
  run meshctl status --wait --timeout 5m
done

say "Ready. Next: multicluster-kind/demo.sh; remove everything with multicluster-kind/down.sh"

#!/usr/bin/env bash
# Two kind clusters joined by mesh, as Cilium's Cluster Mesh kind demo:
#   0. checks the host (Linux, amd64/arm64, cgroup v2, kind version, Docker socket and image
#      store),
#   1. builds the images (scripts/build-images.sh; SKIP_BUILD=1 to reuse them), tagged by
#      content (image_tag in lib.sh), and meshctl when none is installed (images/Dockerfile's
#      meshctl target, a static binary copied out with docker create + docker cp),
#   2. creates kind clusters cluster1 and cluster2 (kind-cluster*.yaml: distinct pod and
#      service CIDRs), loads the images, and keeps cross-cluster pod traffic's source
#      addresses (kindnet's POD_SUBNET lists every cluster's pod CIDR: no masquerade),
#   3. starts cloud-provider-kind (LoadBalancer addresses on the kind network),
#   4. installs mesh (an overlay of clusters/<cluster> with the built tag, under the state
#      directory: cluster IDs 1 and 2),
#   5. creates each cluster's CA and certificates with meshctl and stores them as Secrets,
#   6. connects the clusters with meshctl connect and waits with meshctl status --wait.
# Safe to run again: existing clusters, CAs and images are reused.
#
# Usage: multicluster-kind/up.sh        then multicluster-kind/demo.sh, multicluster-kind/down.sh
# Needs: docker (with a running engine), kind, kubectl, git. meshctl: MESHCTL, PATH, or built
# in Docker (MESHCTL_FROM=cargo builds it with cargo instead, which needs protoc). Linux on
# amd64 or arm64 with cgroup v2: the LoadBalancer addresses must be reachable from the host.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

require docker kind kubectl git
require_docker_engine
check_host
mkdir -p "$STATE"
chmod 700 "$STATE"
find_meshctl

tag=$(image_tag "$ROOT") || exit 1
images=()
for repo in "${IMAGE_REPOS[@]}"; do images+=("$repo:$tag"); done
if [ "${SKIP_BUILD:-}" != "1" ]; then
  say "Building the images (tag $tag)"
  run bash "$ROOT/scripts/build-images.sh" "$tag"
fi
for image in "${images[@]}"; do
  docker image inspect "$image" >/dev/null 2>&1 ||
    die "image $image is missing: run scripts/build-images.sh $tag (or unset SKIP_BUILD)"
done

say "Creating the kind clusters"
for c in "${CLUSTERS[@]}"; do
  if kind get clusters 2>/dev/null | grep -qx "$c"; then
    echo "kind cluster $c exists: reusing it"
  else
    run kind create cluster --config "$MK_DIR/kind-$c.yaml" --image "$KIND_NODE_IMAGE" --wait 120s
  fi
  for image in "${images[@]}"; do
    load_image "$image" "$c"
  done
done

say "Keeping pod source addresses between the clusters (no kindnet masquerade)"
for c in "${CLUSTERS[@]}"; do
  keep_pod_sources "$c"
done

say "Starting cloud-provider-kind for LoadBalancer addresses"
if [ -z "$(docker ps -q --filter "name=^${CLOUD_PROVIDER_KIND_NAME}\$")" ]; then
  docker rm -f "$CLOUD_PROVIDER_KIND_NAME" >/dev/null 2>&1 || true
  run docker run -d --name "$CLOUD_PROVIDER_KIND_NAME" --restart unless-stopped --network kind \
    -v "$DOCKER_SOCKET:/var/run/docker.sock" "$CLOUD_PROVIDER_KIND_IMAGE"
else
  echo "$CLOUD_PROVIDER_KIND_NAME is running"
fi

say "Installing mesh (images tagged $tag)"
for c in "${CLUSTERS[@]}"; do
  # A new tag changes the pod templates, so a rebuilt image rolls the pods.
  write_overlay "$c" "$tag" "$STATE/overlays/$c"
  run kc "$c" apply -k "$STATE/overlays/$c"
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

#!/usr/bin/env bash
# Removes what up.sh and demo.sh made: the LoadBalancers (so cloud-provider-kind removes
# its containers), the kind clusters, the cloud-provider-kind container, and the
# certificates and keys under the state directory. Safe to run when some are already gone.
#
# Usage: multicluster-kind/down.sh      (KEEP_PKI=1 keeps the CAs and certificates)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

require docker kind kubectl
require_docker_engine

existing=$(kind get clusters 2>/dev/null || true)
for c in "${CLUSTERS[@]}"; do
  if ! grep -qx "$c" <<<"$existing"; then
    echo "kind cluster $c does not exist"
    continue
  fi
  say "Removing kind cluster $c"
  # The Service's load-balancer finalizer returns only once cloud-provider-kind removed
  # the LoadBalancer's container; bounded, so a stopped provider does not hang this.
  run kc "$c" -n "$NAMESPACE" delete service mesh-apiserver --ignore-not-found --timeout=60s ||
    echo "warning: $c: the LoadBalancer was not cleaned up in time; continuing" >&2
  run kind delete cluster --name "$c"
done

if [ -n "$(docker ps -aq --filter "name=^${CLOUD_PROVIDER_KIND_NAME}\$")" ]; then
  say "Stopping cloud-provider-kind"
  run docker rm -f "$CLOUD_PROVIDER_KIND_NAME"
fi

if [ "${KEEP_PKI:-}" = "1" ]; then
  echo "KEEP_PKI=1: keeping $STATE"
elif [ -d "$STATE" ]; then
  say "Removing certificates and keys in $STATE"
  run rm -rf "$STATE"
fi
echo "Done."

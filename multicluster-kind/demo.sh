#!/usr/bin/env bash
# The Cluster Mesh demo on the two kind clusters of up.sh, step by step as the lab demo
# (scripts/demo.sh): rebel-base runs in both clusters and x-wing sends a bounded number of
# requests, counting the replies per cluster after each change:
#   1. a plain Service answers only from the local cluster;
#   2. service.cilium.io/global=true on both sides: both clusters answer;
#   3. service.cilium.io/affinity=local: only the local cluster answers;
#   4. the local rebel-base scaled to 0: the remote cluster answers (failover), and back;
#   5. service.cilium.io/affinity=remote: only the remote cluster answers;
#   6. internalTrafficPolicy: echo-1 (Cluster) answers from both nodes, echo-2 (Local)
#      only from the client's node.
# Each step waits (bounded) until the replies match, prints the counts, and fails if they
# never do. Re-running starts over (the demo namespace is recreated).
#
# Usage: multicluster-kind/demo.sh   (REQUESTS=20 per round, STEP_TIMEOUT=90 seconds)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

REQUESTS=${REQUESTS:-20}
STEP_TIMEOUT=${STEP_TIMEOUT:-90}

require kubectl kind
find_meshctl
for c in "${CLUSTERS[@]}"; do
  kc "$c" -n "$NAMESPACE" get deployment mesh-apiserver >/dev/null 2>&1 ||
    die "mesh is not installed in kind cluster $c (context $(context "$c")): run multicluster-kind/up.sh first"
done

# replies CLUSTER SERVICE: REQUESTS requests from x-wing, one JSON reply per line.
replies() {
  kc "$1" -n demo exec deploy/x-wing -- sh -c \
    "i=0; while [ \$i -lt $REQUESTS ]; do i=\$((i+1)); curl -s --max-time 2 http://$2/ || echo '{\"cluster\":\"(failed)\",\"node\":\"(failed)\"}'; done"
}

# check CLUSTER SERVICE FIELD EXPECTED...: repeats rounds of requests until the distinct
# values of FIELD in the replies are exactly EXPECTED; prints the counts of the last round.
check() {
  local c=$1 svc=$2 field=$3; shift 3
  local want got out deadline=$((SECONDS + STEP_TIMEOUT))
  want=$(printf '%s\n' "$@" | sort -u | tr '\n' ' ')
  while :; do
    out=$(replies "$c" "$svc" | grep -o "\"$field\":\"[^\"]*\"" | cut -d'"' -f4 || true)
    got=$(sort -u <<<"$out" | tr '\n' ' ')
    if [ "$got" = "$want" ] || [ $SECONDS -ge "$deadline" ]; then break; fi
    sleep 1
  done
  echo "  x-wing in $c -> $svc, $REQUESTS requests, replies per $field:"
  sort <<<"$out" | uniq -c | sed 's/^/   /'
  [ "$got" = "$want" ] ||
    die "expected replies from: $want; got: $got(after ${STEP_TIMEOUT}s)"
  echo "  ok: $want"
}

say "Deploying rebel-base and x-wing in both clusters"
for c in "${CLUSTERS[@]}"; do
  run kc "$c" delete namespace demo --ignore-not-found --wait=true --timeout=120s
  run kc "$c" apply -f "$MK_DIR/demo/rebel-base.yaml" -f "$MK_DIR/demo/x-wing.yaml"
  kc "$c" -n demo create configmap cluster-info --from-literal=name="$c" \
    --dry-run=client -o yaml | run kc "$c" apply -f -
done
run kc cluster1 apply -f "$MK_DIR/demo/echo.yaml"
for c in "${CLUSTERS[@]}"; do
  run kc "$c" -n demo rollout status deployment/rebel-base --timeout=180s
  run kc "$c" -n demo rollout status deployment/x-wing --timeout=180s
done
run kc cluster1 -n demo rollout status deployment/echo --timeout=180s

say "1. A plain Service: each cluster answers only itself"
check cluster1 rebel-base cluster cluster1
check cluster2 rebel-base cluster cluster2

say "2. service.cilium.io/global=true in both clusters: both clusters answer"
for c in "${CLUSTERS[@]}"; do
  run kc "$c" -n demo annotate service rebel-base service.cilium.io/global=true --overwrite
done
check cluster1 rebel-base cluster cluster1 cluster2
check cluster2 rebel-base cluster cluster1 cluster2

say "3. service.cilium.io/affinity=local in cluster1: only cluster1 answers its x-wing"
run kc cluster1 -n demo annotate service rebel-base service.cilium.io/affinity=local --overwrite
check cluster1 rebel-base cluster cluster1

say "4. Failover: cluster1's rebel-base scaled to 0, cluster2 answers; then back"
run kc cluster1 -n demo scale deployment rebel-base --replicas=0
check cluster1 rebel-base cluster cluster2
run kc cluster1 -n demo scale deployment rebel-base --replicas=2
run kc cluster1 -n demo rollout status deployment/rebel-base --timeout=180s
check cluster1 rebel-base cluster cluster1

say "5. service.cilium.io/affinity=remote in cluster1: only cluster2 answers its x-wing"
run kc cluster1 -n demo annotate service rebel-base service.cilium.io/affinity=remote --overwrite
check cluster1 rebel-base cluster cluster2

say "6. internalTrafficPolicy: echo-1 (Cluster) spreads over nodes, echo-2 (Local) stays on x-wing's node"
xwing_node=$(kc cluster1 -n demo get pods -l app=x-wing -o jsonpath='{.items[0].spec.nodeName}')
mapfile -t echo_nodes < <(kc cluster1 -n demo get pods -l app=echo -o jsonpath='{range .items[*]}{.spec.nodeName}{"\n"}{end}' | sort -u)
echo "  x-wing runs on $xwing_node; echo pods on ${echo_nodes[*]}"
check cluster1 echo-1 node "${echo_nodes[@]}"
check cluster1 echo-2 node "$xwing_node"

say "The mesh as cluster1's apiserver sees it"
meshctl_env cluster1
run meshctl status
if meshctl service explain --help >/dev/null 2>&1; then
  run meshctl service explain demo/rebel-base
fi

say "Done. The demo stays deployed; multicluster-kind/down.sh removes everything."

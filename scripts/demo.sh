#!/usr/bin/env bash
# The Cluster Mesh demo on one machine. Sets the machine up, builds mesh, starts a lab of two
# clusters (east, west: each a Kubernetes-compatible API, a real etcd, a mesh-apiserver
# behind a LoadBalancer address, two nodes as network namespaces with a real mesh-agent
# each), connects them with meshctl, then walks through Cilium's Cluster Mesh demo with
# kubectl, counting the replies per cluster of a bounded number of requests sent from an
# x-wing pod to rebel-base after each change:
#   1. a plain Service answers only from the local cluster;
#   2. service.cilium.io/global=true on both sides: both clusters answer; the service map
#      of x-wing's node (meshctl bpf lb list) holds backends of both clusters, and kubectl
#      logs shows the requests rebel-base served;
#   3. service.cilium.io/affinity=local: only the local cluster answers;
#   4. the local rebel-base scaled to 0: the remote cluster answers (failover), and back;
#   5. service.cilium.io/affinity=remote: only the remote cluster answers;
#   6. internalTrafficPolicy: echo-1 (Cluster) answers from both nodes, echo-2 (Local)
#      only from the client's node;
#   7. network policy: a default deny for namespace demo with the DNS allowance from Cilium's
#      docs, and Cilium's cluster-mesh example letting x-wing reach rebel-base only in west;
#      x-wing still resolves names and every connection goes to west (none refused),
#      `meshctl service explain --from` shows that choice, a second client (tie-fighter) is
#      refused at once (EPERM) and `meshctl policy check` says why, `meshctl bpf policy list`
#      shows the node's policy map;
#   8. flows: `meshctl observe --all-clusters` shows x-wing's connections to both clusters,
#      each cross-cluster one once with both ends; with west denying east's x-wing
#      (ingressDeny), the dropped flow names west's node and the rule.
# Each step waits (bounded) until the replies match, prints the counts, and fails if they
# never do. The lab is removed at the end (KEEP=1 leaves it running: `mesh-lab down`).
#
# Usage: bash scripts/demo.sh   (as root on Debian; REQUESTS=20 per round, STEP_TIMEOUT=60)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

REQUESTS=${REQUESTS:-20}
STEP_TIMEOUT=${STEP_TIMEOUT:-60}
LAB=${LAB:-demo}

bold=$(printf '\033[1m'); dim=$(printf '\033[2m'); off=$(printf '\033[0m')
[ -t 1 ] || { bold=""; dim=""; off=""; }
say() { printf '\n%s==> %s%s\n' "$bold" "$*" "$off"; }
run() { printf '%s$ %s%s\n' "$dim" "$*" "$off"; "$@"; }
die() { echo "demo: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: the lab creates network namespaces, cgroups and eBPF programs"

say "Installing system packages (scripts/setup.sh)"
bash scripts/setup.sh

say "Building mesh"
# A first build compiles about 400 crates and the eBPF programs: 4-8 minutes on 2 cores
# (later builds take seconds). cargo's own progress bar shows how far it is.
if [ -d "${CARGO_TARGET_DIR:-$root/target}/debug/.fingerprint" ]; then
  echo "cargo build --bins (incremental: usually under a minute)"
else
  echo "cargo build --bins (first build: about 4-8 minutes on 2 cores; progress below)"
fi
cargo build --bins --color "$([ -t 2 ] && echo always || echo never)"
bin=${CARGO_TARGET_DIR:-$root/target}/debug
export PATH="$bin:$PATH"

cleanup() {
  local rc=$?
  if [ "${KEEP:-}" = "1" ]; then
    echo "KEEP=1: the lab stays up; remove it with: mesh-lab down --name $LAB"
    return
  fi
  if [ $rc -ne 0 ] && [ -d "/run/mesh-lab/$LAB" ]; then
    local logs=${TMPDIR:-/tmp}/mesh-lab-$LAB-logs
    rm -rf "$logs" && mkdir -p "$logs"
    (cd "/run/mesh-lab/$LAB" && find . -name '*.log' -exec cp --parents {} "$logs" \;)
    echo "demo: failed; the lab's logs are copied to $logs; removing the lab" >&2
  fi
  mesh-lab down --name "$LAB" >/dev/null 2>&1 || mesh-lab down --name "$LAB"
}

say "Starting a lab of two clusters with two nodes each"
mesh-lab down --name "$LAB" >/dev/null 2>&1 || true
trap cleanup EXIT
run mesh-lab up --name "$LAB" --clusters 2 --nodes 2
KUBECONFIG=$(mesh-lab kubeconfig --name "$LAB")
export KUBECONFIG
CLUSTERS=(east west)
kc() { local c=$1; shift; run kubectl --context "$LAB-$c" "$@"; }
kq() { local c=$1; shift; kubectl --context "$LAB-$c" "$@"; }
run kubectl config get-contexts
run mesh-lab status --name "$LAB"

# replies CLUSTER SERVICE: REQUESTS requests from x-wing, one JSON reply per line. SERVICE is
# a name in namespace demo, or an address (http://ADDRESS/, no DNS lookup).
replies() {
  local url="http://$2.demo/"
  [[ $2 =~ ^[0-9.]+$ ]] && url="http://$2/"
  mesh-lab exec --name "$LAB" "$1" -n demo deploy/x-wing -- sh -c \
    "i=0; while [ \$i -lt $REQUESTS ]; do i=\$((i+1)); curl -s --max-time 2 $url || echo '{\"cluster\":\"(failed)\",\"node\":\"(failed)\",\"pod\":\"(failed)\"}'; echo; done"
}

# check CLUSTER SERVICE FIELD EXPECTED...: repeats rounds of requests until the distinct
# values of FIELD in the replies are exactly EXPECTED; prints the counts of the last round.
# Every request of every round counts: no step of this demo may fail a request (failover
# included), so one failed request in any round stops the demo.
check() {
  local c=$1 svc=$2 field=$3; shift 3
  local want got out failed rounds=0 deadline=$((SECONDS + STEP_TIMEOUT))
  want=$(printf '%s\n' "$@" | sort -u | tr '\n' ' ')
  while :; do
    rounds=$((rounds + 1))
    out=$(replies "$c" "$svc" | grep -o "\"$field\":\"[^\"]*\"" | cut -d'"' -f4 || true)
    failed=$(grep -c '^(failed)$' <<<"$out" || true)
    if [ "$failed" -gt 0 ]; then
      sort <<<"$out" | uniq -c | sed 's/^/   /'
      die "$failed of $REQUESTS requests from x-wing in $c to $svc failed in round $rounds"
    fi
    got=$(sort -u <<<"$out" | tr '\n' ' ')
    if [ "$got" = "$want" ] || [ $SECONDS -ge "$deadline" ]; then break; fi
    sleep 0.5
  done
  echo "  x-wing in $c -> $svc, $REQUESTS requests, replies per $field:"
  sort <<<"$out" | uniq -c | sed 's/^/   /'
  [ "$got" = "$want" ] ||
    die "expected replies from: $want; got: $got(after ${STEP_TIMEOUT}s)"
  echo "  ok: $want ($rounds rounds, $((rounds * REQUESTS)) requests, none failed)"
}

say "Deploying rebel-base and x-wing in both clusters, echo in east"
for c in "${CLUSTERS[@]}"; do
  kc "$c" apply -f examples/lab-demo/rebel-base.yaml -f examples/lab-demo/x-wing.yaml
done
kc east apply -f examples/lab-demo/echo.yaml
for c in "${CLUSTERS[@]}"; do
  kc "$c" -n demo rollout status deployment/rebel-base --timeout=60s
  kc "$c" -n demo rollout status deployment/x-wing --timeout=60s
done
kc east -n demo rollout status deployment/echo --timeout=60s
kc east -n demo get pods -o wide

say "1. A plain Service: each cluster answers only itself"
check east rebel-base cluster east
check west rebel-base cluster west

say "2. service.cilium.io/global=true in both clusters: both clusters answer"
for c in "${CLUSTERS[@]}"; do
  kc "$c" -n demo annotate service rebel-base service.cilium.io/global=true --overwrite
done
check east rebel-base cluster east west
check west rebel-base cluster east west

say "   The service map of x-wing's node: rebel-base's ClusterIP with local and remote backends"
eval "$(mesh-lab env --name "$LAB" east)"
xwing_node=$(kq east -n demo get pods -l app=x-wing -o jsonpath='{.items[0].spec.nodeName}')
vip=$(kq east -n demo get service rebel-base -o jsonpath='{.spec.clusterIP}')
declare -A cluster_of
for c in "${CLUSTERS[@]}"; do
  cluster_of[$(kq "$c" -n mesh-system get configmap mesh-config -o jsonpath='{.data.MESH_CLUSTER_ID}')]=$c
done
printf '%s$ meshctl bpf lb list --node %s   (rows of %s)%s\n' "$dim" "$xwing_node" "$vip" "$off"
meshctl bpf lb list --node "$xwing_node" | awk -v vip="$vip:" 'NR == 1 || index($1, vip) == 1'
mapfile -t ids < <(meshctl bpf lb list --node "$xwing_node" -o json |
  jq -r --arg svc "$vip:80/TCP" '[.[] | select(.service == $svc and .cluster_id != null) | .cluster_id] | unique | .[]')
names=()
for id in "${ids[@]}"; do names+=("${cluster_of[$id]:-id $id}"); done
echo "  backends of $vip:80 on $xwing_node come from clusters: ${names[*]}"
[ "${names[*]}" = "east west" ] || die "expected backends of east and west in the service map; got: ${names[*]}"
echo "  ok: east west"

say "   What west's rebel-base served to east's x-wing (kubectl logs: time, client, request, status, reply)"
xwing_ip=$(kq east -n demo get pods -l app=x-wing -o jsonpath='{.items[0].status.podIP}')
printf '%s$ kubectl --context %s -n demo logs -l app=rebel-base --prefix --tail=-1 | grep -F " %s:" | tail -3%s\n' \
  "$dim" "$LAB-west" "$xwing_ip" "$off"
served=$(kq west -n demo logs -l app=rebel-base --prefix --tail=-1 | grep -F " $xwing_ip:" || true)
[ -n "$served" ] || die "west's rebel-base logged no request from east's x-wing ($xwing_ip)"
tail -3 <<<"$served"

say "3. service.cilium.io/affinity=local in east: only east answers its x-wing"
kc east -n demo annotate service rebel-base service.cilium.io/affinity=local --overwrite
check east rebel-base cluster east

say "4. Failover: east's rebel-base scaled to 0, west answers; then back"
kc east -n demo scale deployment rebel-base --replicas=0
check east rebel-base cluster west
kc east -n demo scale deployment rebel-base --replicas=2
kc east -n demo rollout status deployment/rebel-base --timeout=60s
check east rebel-base cluster east

say "5. service.cilium.io/affinity=remote in east: only west answers east's x-wing"
kc east -n demo annotate service rebel-base service.cilium.io/affinity=remote --overwrite
check east rebel-base cluster west

say "6. internalTrafficPolicy: echo-1 (Cluster) spreads over nodes, echo-2 (Local) stays on x-wing's node"
mapfile -t echo_nodes < <(kq east -n demo get pods -l app=echo -o jsonpath='{range .items[*]}{.spec.nodeName}{"\n"}{end}' | sort -u)
echo "  x-wing runs on $xwing_node; echo pods on ${echo_nodes[*]}"
check east echo-1 node "${echo_nodes[@]}"
check east echo-2 node "$xwing_node"

say "7. Network policy across clusters: default deny, DNS allowed, x-wing may reach rebel-base only in west"
kc east -n demo annotate service rebel-base service.cilium.io/affinity- --overwrite
kc east apply -f examples/lab-demo/tie-fighter.yaml
kc east -n demo rollout status deployment/tie-fighter --timeout=90s
check east rebel-base cluster east west
# Cilium's cluster-mesh example first (it already puts x-wing's egress in default deny, so no
# request of x-wing fails in between), then namespace demo's default deny in both directions
# with the DNS allowance from Cilium's docs (kube-dns is a plain ClusterIP, translated by the
# agents' socket LB like every Service, so the egress check sees the CoreDNS pod's identity).
kc east apply -f examples/lab-demo/policy/x-wing-to-west.yaml
kc east apply -f examples/lab-demo/policy/default-deny.yaml
check east rebel-base cluster west
echo "  by name under default deny: the lookups were allowed, and every connection went to an"
echo "  allowed backend in west: none was refused on east's"
xwing_pod=$(kq east -n demo get pods -l app=x-wing -o jsonpath='{.items[0].metadata.name}')
tie_pod=$(kq east -n demo get pods -l app=tie-fighter -o jsonpath='{.items[0].metadata.name}')
east_rebel=$(kq east -n demo get pods -l app=rebel-base -o jsonpath='{.items[0].metadata.name}')
west_rebel=$(kq west -n demo get pods -l app=rebel-base -o jsonpath='{.items[0].metadata.name}')
run meshctl service explain demo/rebel-base --from "east/demo/$xwing_pod"
printf '%s$ meshctl policy check --from east/demo/%s --to east/demo/%s --port 8080/TCP%s\n' \
  "$dim" "$xwing_pod" "$east_rebel" "$off"
rc=0
meshctl policy check --from "east/demo/$xwing_pod" --to "east/demo/$east_rebel" --port 8080/TCP || rc=$?
[ "$rc" = 1 ] || die "meshctl policy check should deny x-wing -> east's rebel-base (exit 1), got exit $rc"
echo "  A second client, tie-fighter, may look rebel-base up but not connect to it:"
out=$(mesh-lab exec --name "$LAB" east -n demo deploy/tie-fighter -- sh -c \
  'getent hosts rebel-base.demo.svc.cluster.local && curl -sS -v --max-time 2 http://rebel-base.demo/' 2>&1) &&
  die "tie-fighter reached rebel-base under default deny: $out"
{ grep -E 'rebel-base|Trying|connect|curl:' <<<"$out" || true; } | sed 's/^/   /'
grep -q 'Operation not permitted' <<<"$out" ||
  die "tie-fighter's connect should be refused at once with EPERM (Operation not permitted): $out"
printf '%s$ meshctl policy check --from east/demo/%s --to west/demo/%s --port 8080/TCP%s\n' \
  "$dim" "$tie_pod" "$west_rebel" "$off"
rc=0
meshctl policy check --from "east/demo/$tie_pod" --to "west/demo/$west_rebel" --port 8080/TCP || rc=$?
[ "$rc" = 1 ] || die "meshctl policy check should deny tie-fighter -> west's rebel-base (exit 1), got exit $rc"
run meshctl bpf policy list --node "$xwing_node"
kc east -n demo delete ciliumnetworkpolicy x-wing-to-rebel-base-in-west default-deny
check east rebel-base cluster east west

say "8. Flows across clusters: meshctl observe (Hubble's Observer API, through east's relay)"
echo "  east's apiserver relays its agents' flows and, with --all-clusters, west's relay's: a"
echo "  connection to west is one flow with both ends (east's egress node, west's ingress node)"
run meshctl observe --all-clusters --from-pod demo/x-wing --protocol tcp --last 6 -o table
to_west=$(meshctl observe --all-clusters --from-pod demo/x-wing --protocol tcp --last 100 -o json |
  jq -s '[.[] | .flow // empty | select(.destination.cluster_name == "west" and .verdict == "FORWARDED"
          and ((.node_labels // []) | any(startswith("mesh.io/ingress-node=west/"))))] | length')
[ "$to_west" -gt 0 ] || die "meshctl observe shows no forwarded connection from east's x-wing to west with both ends"
echo "  ok: $to_west of x-wing's last connections went to west, each shown once with both ends"

say "   West denies east's x-wing at rebel-base (ingressDeny): the drop and its rule, seen from east"
kc west apply -f examples/lab-demo/policy/rebel-base-deny-east.yaml
echo "  (x-wing's requests that land in west now time out: west drops their SYN)"
deadline=$((SECONDS + STEP_TIMEOUT))
rule=""
while [ -z "$rule" ]; do
  [ $SECONDS -lt "$deadline" ] || die "no dropped flow from east's x-wing within ${STEP_TIMEOUT}s of the deny policy"
  REQUESTS=4 replies east rebel-base >/dev/null
  rule=$(meshctl observe --all-clusters --from-pod demo/x-wing --verdict DROPPED --last 20 -o json |
    jq -r 'select(.flow.ingress_denied_by) | .flow.ingress_denied_by[0] | "\(.kind) \(.namespace)/\(.name)"' | head -1)
done
run meshctl observe --all-clusters --from-pod demo/x-wing --verdict DROPPED --last 3 -o table
echo "  ok: dropped in west by $rule"
kc west -n demo delete ciliumnetworkpolicy rebel-base-deny-east-x-wing
check east rebel-base cluster east west

say "The mesh as east's apiserver sees it"
run meshctl status
run meshctl service explain demo/rebel-base --node "$xwing_node"

if [ "${KEEP:-}" = "1" ]; then say "Done. The lab stays up (KEEP=1)."; else say "Done."; fi

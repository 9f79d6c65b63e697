#!/usr/bin/env bash
# Regenerates the committed seed corpora (fuzz/corpus/<target>/seed-*): a few valid
# inputs per target, so libFuzzer starts from the formats' structure. Protobuf seeds are
# encoded by protoc from text format; certificates are made by openssl, once.
set -euo pipefail
cd "$(dirname "$0")"
proto=../proto/proto
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# seed TARGET NAME: stdin -> corpus/TARGET/seed-NAME
seed() { mkdir -p "corpus/$1"; cat > "corpus/$1/seed-$2"; }
# pb MESSAGE TEXT: the binary encoding of a mesh.v1 message given in protobuf text format.
pb() { printf '%s' "$2" | protoc -I "$proto" --encode="mesh.v1.$1" "$proto/mesh.proto"; }
# frames PART...: each part (a file) as a little-endian u16 length and its bytes.
frames() { for f in "$@"; do python3 -c 'import sys,struct; d=open(sys.argv[1],"rb").read(); sys.stdout.buffer.write(struct.pack("<H",len(d))+d)' "$f"; done; }
# shellcheck disable=SC2059 # the format is the escape of one byte
byte() { printf "\\x$(printf %02x "$1")"; }

rm -rf corpus
node='cluster: "east" name: "e1" internal_ips: "192.168.2.1" pod_cidrs: "10.2.0.0/24"'
endpoint='ip: "10.2.0.5" identity: 131372 host_ip: "192.168.2.1" node: "e1" namespace: "default" pod: "web-1"'
service='cluster: "east" namespace: "default" name: "web" shared: true affinity: AFFINITY_LOCAL ports { name: "http" protocol: PROTOCOL_TCP port: 80 } frontends: "10.96.0.10" backends { ip: "10.2.0.5" ports { name: "http" protocol: PROTOCOL_TCP port: 8080 } node: "e1" ready: true serving: true }'
config='name: "east" id: 2 pod_cidrs: "10.2.0.0/16" service_cidr: "10.96.0.0/16" version: "0.1.0"'
identity='id: 131372 labels: "k8s:app=web" labels: "k8s:io.cilium.k8s.policy.cluster=east" labels: "k8s:io.kubernetes.pod.namespace=default"'
policy_json='{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{"name":"allow-web","namespace":"default"},"spec":{"podSelector":{"matchLabels":{"app":"web"}},"ingress":[{"from":[{"podSelector":{"matchLabels":{"app":"client"}}}],"ports":[{"port":80,"protocol":"TCP"}]}]}}'
policy_esc=${policy_json//\"/\\\"}
policy="cluster: \"east\" kind: POLICY_KIND_NETWORK_POLICY namespace: \"default\" name: \"allow-web\" object: \"$policy_esc\""
link='cluster: "west" stale_since_unix_ms: 1700000000000'

# etcd_key
for k in mesh/v1/clusters/east/config mesh/v1/clusters/east/nodes/e1 \
  mesh/v1/clusters/east/endpoints/10.2.0.5 mesh/v1/clusters/east/services/default/web \
  mesh/v1/clusters/east/identities/131372 mesh/v1/clusters/east/synced/services \
  mesh/v1/clusters/east/policies/networkpolicies/default/allow-web \
  mesh/v1/clusters/east/policies/ciliumclusterwidenetworkpolicies/_/all mesh/v1/clusters/west/link; do
  printf '%s' "$k" | seed etcd_key "$(echo "$k" | tr / _)"
done

# etcd_value: kind number, then the value
{ byte 1; pb ClusterConfig "$config"; } | seed etcd_value config
{ byte 2; pb Node "$node"; } | seed etcd_value node
{ byte 3; pb Identity "$identity"; } | seed etcd_value identity
{ byte 4; pb Endpoint "$endpoint"; } | seed etcd_value endpoint
{ byte 5; pb GlobalService "$service"; } | seed etcd_value service
{ byte 6; pb Policy "$policy"; } | seed etcd_value policy
{ byte 7; pb PeerLink "$link"; } | seed etcd_value link

# watch_request: 0 WatchRequest, 1 AgentStatus
{ byte 0; pb WatchRequest 'clusters: "west" kinds: KIND_SERVICE kinds: KIND_ENDPOINT resume_revision: 42 heartbeat_interval_ms: 1000'; } | seed watch_request watch
{ byte 0; pb WatchRequest 'clusters: "east" clusters: "Bad!" kinds: KIND_POLICY'; } | seed watch_request watch-bad
{ byte 1; pb AgentStatus 'node: "n1" clusters { cluster: "east" synced: true endpoints: 3 services: 1 } map_entries { key: "services" value: 4 } version: "0.1.0"'; } | seed watch_request report

# watch_response: a snapshot, markers, live changes, a reconnection, a reset and its snapshot
ev() { printf 'events { kind: %s cluster: "%s" name: "%s" revision: %s %s }' "$@"; }
pb WatchResponse "events { $(ev KIND_NODE east e1 3 "node { $node }") $(ev KIND_ENDPOINT east 10.2.0.5 4 "endpoint { $endpoint }") }" > "$tmp/snap"
pb WatchResponse "revision: 5 events { $(ev KIND_SERVICE east default/web 5 "service { $service }") }" > "$tmp/snap-end"
pb WatchResponse 'revision: 5 synced { cluster: "east" kind: KIND_NODE }' > "$tmp/synced-node"
pb WatchResponse 'revision: 5 synced { cluster: "east" kind: KIND_ENDPOINT }' > "$tmp/synced-ep"
pb WatchResponse "revision: 7 events { $(ev KIND_ENDPOINT east 10.2.0.5 7 '') }" > "$tmp/delete"
pb WatchResponse 'revision: 9 progress {}' > "$tmp/progress"
pb WatchResponse 'reset { reason: "compacted" }' > "$tmp/reset"
pb WatchResponse "revision: 12 events { $(ev KIND_NODE east e2 12 'node { cluster: "east" name: "e2" }') }" > "$tmp/snap2"
: > "$tmp/reconnect"
frames "$tmp/snap" "$tmp/snap-end" "$tmp/synced-node" "$tmp/synced-ep" "$tmp/delete" "$tmp/progress" | seed watch_response live
frames "$tmp/snap" "$tmp/synced-node" "$tmp/reconnect" "$tmp/snap" "$tmp/reset" "$tmp/snap2" "$tmp/synced-node" "$tmp/synced-ep" "$tmp/progress" | seed watch_response reset

# grpc_messages: selector byte (see the target), then the message
{ byte 1; pb ClusterConfig "$config"; } | seed grpc_messages config
{ byte 3; pb StatusResponse "local { $config } clusters { cluster: \"east\" id: 2 local: true counts { kind: KIND_NODE count: 3 synced: true } } peers { cluster: \"west\" address: \"west:7443\" connected: true revision: 9 } revision: 10 leader: true"; } | seed grpc_messages status
{ byte 5; pb PeerStatus 'cluster: "west" address: "10.0.0.1:7443" connected: true synced: true revision: 99 last_error: "x"'; } | seed grpc_messages peer-status
{ byte 6; pb Event "$(ev KIND_SERVICE east default/web 5 "service { $service }" | sed 's/^events { //; s/ }$//')"; } | seed grpc_messages event
{ byte 7; cat "$tmp/snap"; } | seed grpc_messages watch-response
{ byte 8; pb PeerLink "$link"; } | seed grpc_messages link
{ byte 9; pb AgentStatus 'node: "n1" last_error: "none"'; } | seed grpc_messages agent-status

# annotations
printf 'service.cilium.io/global=true\nservice.cilium.io/shared=false\nservice.cilium.io/affinity=local\n' | seed annotations current
printf 'io.cilium/global-service=true\nio.cilium/service-affinity=Remote\n0=yes\n4=none\n' | seed annotations legacy

# certificates: a CA and a leaf with a SPIFFE URI SAN
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$tmp/ca.key" -out "$tmp/ca.pem" \
  -subj /CN=east-ca -days 3650 -addext basicConstraints=critical,CA:TRUE 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$tmp/leaf.key" -out "$tmp/leaf.csr" -subj /CN=agent 2>/dev/null
printf 'subjectAltName=URI:spiffe://east.mesh/agent/n1,DNS:mesh.east\n' > "$tmp/ext"
openssl x509 -req -in "$tmp/leaf.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" -CAcreateserial -days 3650 \
  -extfile "$tmp/ext" -out "$tmp/leaf.pem" 2>/dev/null
openssl x509 -in "$tmp/leaf.pem" -outform der -out "$tmp/leaf.der"
{ byte 0; cat "$tmp/ca.pem"; } | seed pem_cert ca-pem
{ byte 0; cat "$tmp/leaf.pem"; printf '\0'; cat "$tmp/leaf.key"; } | seed pem_cert identity
{ byte 1; cat "$tmp/leaf.der"; } | seed pem_cert leaf-der
{ byte 2; printf 'spiffe://east.mesh/agent/n1'; } | seed pem_cert spiffe

# peer_entry: the entry key, a newline, the content
{ printf 'east.yaml\nname: east\naddress: east.example:7443\nserverName: mesh.east\nca: |\n'; sed 's/^/  /' "$tmp/ca.pem"; } | seed peer_entry yaml
python3 -c 'import json,sys; print("west.json"); print(json.dumps({"address":"[fd00::1]:7443","ca":open(sys.argv[1]).read()}))' "$tmp/ca.pem" | seed peer_entry json

# lab_object: the resource type's index in mesh_lab::kube_api::resources::ALL, then the body
{ byte 1; printf '{"apiVersion":"v1","kind":"Pod","metadata":{"name":"web-1","labels":{"app":"web"}},"spec":{"nodeName":"n1","containers":[{"name":"c","image":"x","ports":[{"name":"http","containerPort":8080}]}]}}'; } | seed lab_object pod
{ byte 2; printf 'apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  annotations:\n    service.cilium.io/global: "true"\nspec:\n  selector: {app: web}\n  ports:\n  - {name: http, port: 80, targetPort: 8080}\n'; } | seed lab_object service-yaml
{ byte 8; printf '{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{"name":"web-x","labels":{"kubernetes.io/service-name":"web"}},"addressType":"IPv4","endpoints":[{"addresses":["10.1.0.5"],"conditions":{"ready":true}}],"ports":[{"name":"http","port":8080}]}'; } | seed lab_object endpointslice
{ byte 11; printf '{"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"web"},"spec":{"replicas":2,"selector":{"matchLabels":{"app":"web"}},"template":{"metadata":{"labels":{"app":"web"}},"spec":{"containers":[{"name":"c","image":"x"}]}}}}'; } | seed lab_object deployment
{ byte 14; printf '%s' "$policy_json"; } | seed lab_object networkpolicy
{ byte 15; printf 'apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: widgets.example.io\nspec:\n  group: example.io\n  scope: Namespaced\n  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wd]}\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema:\n      openAPIV3Schema:\n        type: object\n        properties:\n          spec: {type: object, properties: {size: {type: integer, minimum: 1}, color: {type: string, enum: [red, blue]}}}\n    additionalPrinterColumns:\n    - {name: Size, type: integer, jsonPath: .spec.size}\n'; } | seed lab_object crd
{ byte 4; printf '{"apiVersion":"v1","kind":"Secret","metadata":{"name":"peers"},"stringData":{"east.yaml":"address: a:1"}}'; } | seed lab_object secret

# lab_patch: type (0 merge, 1 JSON, 2 strategic, 3 apply), the target, NUL, the patch
target='{"metadata":{"name":"web","labels":{"a":"b"}},"spec":{"containers":[{"name":"c","image":"x","ports":[{"containerPort":80}]}]}}'
{ byte 0; printf '%s\0%s' "$target" '{"metadata":{"labels":{"a":null,"c":"d"}}}'; } | seed lab_patch merge
{ byte 1; printf '%s\0%s' "$target" '[{"op":"replace","path":"/metadata/name","value":"x"},{"op":"add","path":"/spec/containers/-","value":{"name":"d"}},{"op":"remove","path":"/metadata/labels/a"}]'; } | seed lab_patch json
# shellcheck disable=SC2016 # $patch is a strategic merge directive, not a variable
{ byte 2; printf '%s\0%s' "$target" '{"spec":{"containers":[{"name":"c","image":"y"},{"name":"d","$patch":"delete"}],"$setElementOrder/containers":[{"name":"c"}]}}'; } | seed lab_patch strategic
{ byte 3; printf '%s\0%s' "$target" 'metadata:\n  labels:\n    e: f\n'; } | seed lab_patch apply

# lab_selector
for s in 'app=web,tier in (fe, be)' '!missing,app!=db' 'tier notin (be),x' 'metadata.name=a,spec.nodeName!=x'; do
  printf '%s' "$s" | seed lab_selector "$(echo "$s" | md5sum | cut -c1-8)"
done

# policy: the lab demo's policies and a few constructs
n=0
for f in ../examples/lab-demo/policy/*.yaml; do
  awk -v RS='\n---\n' '{ print > "'"$tmp"'/p" NR }' "$f"
  for p in "$tmp"/p*; do n=$((n+1)); seed policy "example-$n" < "$p"; rm "$p"; done
done
printf '%s' "$policy_json" | seed policy networkpolicy
printf '%s' '{"apiVersion":"cilium.io/v2","kind":"CiliumClusterwideNetworkPolicy","metadata":{"name":"dns"},"spec":{"endpointSelector":{},"egress":[{"toEndpoints":[{"matchLabels":{"k8s:io.kubernetes.pod.namespace":"kube-system","k8s-app":"kube-dns"}}],"toPorts":[{"ports":[{"port":"53","protocol":"ANY"}]}]}],"egressDeny":[{"toEntities":["world"]}],"ingress":[{"fromCIDR":["10.0.0.0/8"]},{"fromEntities":["cluster","remote-node"]}]}}' | seed policy ccnp
printf '%s' '{"apiVersion":"cilium.io/v2","kind":"CiliumNetworkPolicy","metadata":{"name":"west","namespace":"default"},"specs":[{"endpointSelector":{"matchLabels":{"app":"web"}},"ingress":[{"fromEndpoints":[{"matchExpressions":[{"key":"io.cilium.k8s.policy.cluster","operator":"In","values":["west"]}]}],"toPorts":[{"ports":[{"port":"80-90","protocol":"TCP"}]}]}]}]}' | seed policy cnp
find corpus -type f | wc -l

//! CustomResourceDefinitions and NetworkPolicy in the lab's kube-api, driven with the real
//! kubectl and kube-rs: each test starts its own server (own port, temp dir, discovery cache).

mod common;

use std::time::Duration;

use common::{Lab, headers, row};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::discovery::{Discovery, Scope};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

const WIDGET_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names:
    plural: widgets
    singular: widget
    kind: Widget
    shortNames: [wdg]
    categories: [shopping]
  versions:
  - name: v1
    served: true
    storage: true
    subresources:
      status: {}
    additionalPrinterColumns:
    - name: Size
      type: integer
      jsonPath: .spec.size
    - name: Color
      type: string
      jsonPath: .spec.color
    - name: Ready
      type: string
      jsonPath: .status.conditions[?(@.type=="Ready")].status
    - name: Age
      type: date
      jsonPath: .metadata.creationTimestamp
    schema:
      openAPIV3Schema:
        type: object
        description: A widget of the tests.
        properties:
          spec:
            type: object
            description: What the widget should be.
            required: [size]
            properties:
              size:
                type: integer
                minimum: 1
                maximum: 10
                description: How big the widget is.
              color:
                type: string
                enum: [red, blue]
              name:
                type: string
                pattern: '^[a-z]+$'
              port:
                x-kubernetes-int-or-string: true
              extra:
                type: object
                x-kubernetes-preserve-unknown-fields: true
          status:
            type: object
            properties:
              conditions:
                type: array
                items:
                  type: object
                  properties:
                    type: {type: string}
                    status: {type: string}
  - name: v1beta1
    served: true
    storage: false
    schema:
      openAPIV3Schema:
        type: object
        x-kubernetes-preserve-unknown-fields: true
"#;

const GADGET_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gadgets.example.com
spec:
  group: example.com
  scope: Cluster
  names: {plural: gadgets, kind: Gadget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            x-kubernetes-preserve-unknown-fields: true
"#;

fn widget(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: {name}\n  namespace: shop\nspec: {spec}\n"
    )
}

/// Writes `text` to a file of the test's temp dir and returns its path.
fn file(lab: &Lab, name: &str, text: &str) -> String {
    let p = lab.dir.path().join(name);
    std::fs::write(&p, text).expect("writing a manifest");
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_applies_a_crd_and_uses_its_type() {
    let lab = Lab::start().await;
    let crd = file(&lab, "crd.yaml", WIDGET_CRD);
    assert_eq!(
        lab.ok(&["apply", "-f", &crd]).trim(),
        "customresourcedefinition.apiextensions.k8s.io/widgets.example.com created"
    );
    lab.ok(&[
        "wait",
        "--for=condition=Established",
        "crd/widgets.example.com",
        "--timeout=20s",
    ]);
    let got = lab.get_json(&["crd", "widgets.example.com"]);
    assert_eq!(got["status"]["acceptedNames"]["kind"], "Widget");
    assert_eq!(got["status"]["acceptedNames"]["listKind"], "WidgetList");
    let conds: Vec<(String, String)> = got["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["type"].as_str().unwrap().to_string(),
                c["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        conds.contains(&("NamesAccepted".into(), "True".into())),
        "{conds:?}"
    );
    assert!(
        conds.contains(&("Established".into(), "True".into())),
        "{conds:?}"
    );
    assert_eq!(got["status"]["storedVersions"], json!(["v1"]));

    // Discovery: short name, category, both served versions.
    let out = lab.ok(&["api-resources", "--api-group=example.com"]);
    let w = row(&out, "widgets");
    assert_eq!(w, ["widgets", "wdg", "example.com/v1", "true", "Widget"]);
    let out = lab.ok(&["api-versions"]);
    assert!(
        out.contains("example.com/v1\n") && out.contains("example.com/v1beta1\n"),
        "{out}"
    );

    lab.ok(&["create", "namespace", "shop"]);
    lab.apply(
        &widget(
            "small",
            "{size: 2, color: red, port: http, extra: {any: [1, 2]}}",
        ),
        &[],
    );
    lab.apply(&widget("big", "{size: 9, color: blue, port: 8080}"), &[]);

    // Printer columns: kubectl shows the CRD's columns, by short name and by category.
    let out = lab.ok(&["get", "wdg", "-n", "shop"]);
    assert_eq!(headers(&out), ["NAME", "SIZE", "COLOR", "READY", "AGE"]);
    assert_eq!(row(&out, "small")[..3], ["small", "2", "red"]);
    let out = lab.ok(&["get", "shopping", "-n", "shop"]);
    assert_eq!(row(&out, "big")[..3], ["big", "9", "blue"]);

    // Objects have a resourceVersion and generation; x-kubernetes-preserve-unknown-fields
    // and int-or-string keep what they declare.
    let small = lab.get_json(&["widget", "small", "-n", "shop"]);
    assert_eq!(small["metadata"]["generation"], 1);
    assert!(small["metadata"]["resourceVersion"].is_string());
    assert_eq!(small["spec"]["extra"]["any"], json!([1, 2]));
    assert_eq!(small["spec"]["port"], "http");

    // The other served version reads the same object.
    let beta = lab.get_json(&["widgets.v1beta1.example.com", "small", "-n", "shop"]);
    assert_eq!(beta["apiVersion"], "example.com/v1beta1");
    assert_eq!(beta["spec"]["size"], 2);

    // Invalid objects are refused with the field paths and words of kube-apiserver.
    let out = lab.kubectl_stdin(
        &["apply", "-f", "-"],
        &widget("bad", "{size: 11, color: pink, name: Bad}"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    for want in [
        "The Widget \"bad\" is invalid",
        "spec.size: Invalid value: 11: spec.size in body should be less than or equal to 10",
        "spec.color: Unsupported value: \"pink\": supported values: \"red\", \"blue\"",
        "spec.name: Invalid value: \"Bad\": spec.name in body should match '^[a-z]+$'",
    ] {
        assert!(err.contains(want), "want {want:?} in {err}");
    }
    let err = lab.fail(&[
        "create",
        "-f",
        &file(&lab, "w.yaml", &widget("nosize", "{color: red}")),
    ]);
    assert!(err.contains("spec.size: Required value"), "{err}");
    let err = lab.fail(&[
        "create",
        "-f",
        &file(&lab, "w2.yaml", &widget("typed", "{size: many}")),
    ]);
    assert!(
        err.contains(
            "spec.size: Invalid value: \"string\": spec.size in body must be of type integer: \"string\""
        ),
        "{err}"
    );

    // Unknown fields: kubectl's strict validation is refused, without it they are pruned.
    let unknown = widget("pruned", "{size: 3, bogus: 1}");
    let err = String::from_utf8_lossy(&lab.kubectl_stdin(&["apply", "-f", "-"], &unknown).stderr)
        .into_owned();
    assert!(
        err.contains("strict decoding error: unknown field \"spec.bogus\""),
        "{err}"
    );
    let out = lab.kubectl_stdin(&["apply", "--validate=false", "-f", "-"], &unknown);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pruned = lab.get_json(&["widget", "pruned", "-n", "shop"]);
    assert_eq!(pruned["spec"], json!({"size": 3}));

    // Status subresource: the main resource ignores status, status ignores spec.
    lab.ok(&[
        "patch",
        "widget",
        "small",
        "-n",
        "shop",
        "--type=merge",
        "-p",
        r#"{"spec":{"size":3},"status":{"conditions":[{"type":"Ready","status":"True"}]}}"#,
    ]);
    let small = lab.get_json(&["widget", "small", "-n", "shop"]);
    assert_eq!(small["spec"]["size"], 3);
    assert!(small.get("status").is_none(), "{small}");
    assert_eq!(
        small["metadata"]["generation"], 2,
        "a spec change bumps generation"
    );
    lab.ok(&[
        "patch",
        "widget",
        "small",
        "-n",
        "shop",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"spec":{"size":5},"status":{"conditions":[{"type":"Ready","status":"True"}]}}"#,
    ]);
    let small = lab.get_json(&["widget", "small", "-n", "shop"]);
    assert_eq!(small["spec"]["size"], 3);
    assert_eq!(small["status"]["conditions"][0]["status"], "True");
    assert_eq!(
        small["metadata"]["generation"], 2,
        "status writes keep generation"
    );
    let out = lab.ok(&["get", "widgets", "-n", "shop"]);
    assert_eq!(row(&out, "small")[..4], ["small", "3", "red", "True"]);

    // A watch sees changes of custom objects.
    let mut w = lab.spawn_lines(&[
        "get",
        "widgets",
        "-n",
        "shop",
        "-w",
        "--output-watch-events",
    ]);
    w.wait_line(Duration::from_secs(20), |l| l.contains("small"));
    lab.ok(&["label", "widget", "big", "-n", "shop", "tier=gold"]);
    let line = w.wait_line(Duration::from_secs(20), |l| {
        l.contains("big") && l.starts_with("MODIFIED")
    });
    assert!(line.contains("9"), "{line}");

    // kubectl explain reads the published schema.
    let out = lab.ok(&["explain", "widgets.spec.size"]);
    assert!(out.contains("How big the widget is."), "{out}");

    // A cluster-scoped type without printer columns: Name and Age.
    lab.apply(GADGET_CRD, &[]);
    lab.apply(
        "apiVersion: example.com/v1\nkind: Gadget\nmetadata: {name: g1}\nspec: {anything: [goes]}\n",
        &[],
    );
    let out = lab.ok(&["get", "gadgets.example.com"]);
    assert_eq!(headers(&out), ["NAME", "AGE"]);
    assert_eq!(row(&out, "g1")[0], "g1");

    // Deleting the CRD deletes its objects and the type.
    let out = lab.ok(&["delete", "-f", &crd]);
    assert!(out.contains("deleted"), "{out}");
    let line = w.wait_line(Duration::from_secs(20), |l| l.starts_with("DELETED"));
    assert!(line.contains("big") || line.contains("small") || line.contains("pruned"));
    let err = lab.fail(&["get", "widgets.example.com", "-n", "shop"]);
    assert!(
        err.contains("the server doesn't have a resource type"),
        "{err}"
    );
    let left = lab.api.store().resource_types();
    assert!(left.iter().all(|t| t.resource != "widgets"));
    assert!(left.iter().any(|t| t.resource == "gadgets"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_refuses_bad_crds() {
    let lab = Lab::start().await;
    let bad = WIDGET_CRD
        .replace("name: widgets.example.com", "name: widgets.example.org")
        .replace("type: integer\n                minimum", "minimum");
    let out = lab.kubectl_stdin(&["apply", "-f", "-"], &bad);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("The CustomResourceDefinition \"widgets.example.org\" is invalid"),
        "{err}"
    );
    assert!(
        err.contains("metadata.name: Invalid value: \"widgets.example.org\": must be spec.names.plural+\".\"+spec.group"),
        "{err}"
    );
    assert!(
        err.contains("spec.versions[0].schema.openAPIV3Schema.properties[spec].properties[size].type: Required value: must not be empty for specified object fields"),
        "{err}"
    );
    let two_storage = WIDGET_CRD.replace("storage: false", "storage: true");
    let out = lab.kubectl_stdin(&["apply", "-f", "-"], &two_storage);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("spec.versions: Invalid value: 2: must have exactly one version marked as storage version"),
        "{err}"
    );
}

const NETPOL: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web-allow
  namespace: pol
spec:
  podSelector:
    matchLabels: {app: web}
  ingress:
  - from:
    - namespaceSelector:
        matchLabels: {team: a}
      podSelector:
        matchLabels: {role: client}
    - ipBlock:
        cidr: 10.0.0.0/8
        except: [10.1.0.0/16]
    ports:
    - port: 80
    - port: http
      protocol: UDP
    - port: 8000
      endPort: 8080
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_network_policies() {
    let lab = Lab::start().await;
    lab.ok(&["create", "namespace", "pol"]);
    assert_eq!(
        lab.apply(NETPOL, &[]).trim(),
        "networkpolicy.networking.k8s.io/web-allow created"
    );
    lab.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-all, namespace: pol}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]\n",
        &[],
    );
    let out = lab.ok(&["get", "netpol", "-n", "pol"]);
    assert_eq!(headers(&out), ["NAME", "POD-SELECTOR", "AGE"]);
    assert_eq!(row(&out, "web-allow")[..2], ["web-allow", "app=web"]);
    assert_eq!(row(&out, "deny-all")[..2], ["deny-all", "<none>"]);
    let got = lab.get_json(&["networkpolicy", "web-allow", "-n", "pol"]);
    assert_eq!(got["spec"]["policyTypes"], json!(["Ingress"]));
    assert_eq!(got["spec"]["ingress"][0]["ports"][0]["protocol"], "TCP");
    assert_eq!(got["metadata"]["generation"], 1);

    // A change is applied as a patch, and bumps the generation.
    lab.apply(&NETPOL.replace("port: 80\n", "port: 81\n"), &[]);
    let got = lab.get_json(&["networkpolicy", "web-allow", "-n", "pol"]);
    assert_eq!(got["spec"]["ingress"][0]["ports"][0]["port"], 81);
    assert_eq!(got["metadata"]["generation"], 2);

    for (bad, want) in [
        (
            NETPOL.replace("endPort: 8080", "endPort: 7000"),
            "spec.ingress[0].ports[2].endPort: Invalid value: 8000: must be greater than or equal to `port`",
        ),
        (
            NETPOL.replace("- port: 8000\n", "- protocol: TCP\n"),
            "spec.ingress[0].ports[2].endPort: Invalid value: 8080: may not be specified when `port` is not specified",
        ),
        (
            NETPOL.replace("cidr: 10.0.0.0/8", "cidr: 10.0.0.0/40"),
            "spec.ingress[0].from[1].ipBlock.cidr: Invalid value: \"10.0.0.0/40\": must be a valid CIDR value",
        ),
        (
            NETPOL.replace("except: [10.1.0.0/16]", "except: [192.168.0.0/16]"),
            "spec.ingress[0].from[1].ipBlock.except[0]: Invalid value: \"192.168.0.0/16\": must be a strict subset of `cidr`",
        ),
        (
            NETPOL.replace("  ingress:\n", "  policyTypes: [Inbound]\n  ingress:\n"),
            "spec.policyTypes[0]: Unsupported value: \"Inbound\": supported values: \"Ingress\", \"Egress\"",
        ),
    ] {
        let bad = bad.replace("name: web-allow", "name: bad");
        let out = lab.kubectl_stdin(&["apply", "-f", "-"], &bad);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad}");
        assert!(
            err.contains("The NetworkPolicy \"bad\" is invalid") && err.contains(want),
            "want {want:?} in {err}"
        );
    }
    let out = lab.ok(&["delete", "netpol", "web-allow", "-n", "pol"]);
    assert!(out.contains("deleted"), "{out}");
    let out = lab.ok(&["get", "netpol", "-n", "pol", "-o", "name"]);
    assert_eq!(out.trim(), "networkpolicy.networking.k8s.io/deny-all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_discovers_and_watches_custom_resources() {
    let lab = Lab::start().await;
    lab.namespace("shop");
    let client = lab.client().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_yaml::from_str(WIDGET_CRD).unwrap();
    let made = crds.create(&PostParams::default(), &crd).await.unwrap();
    let conds = made.status.unwrap().conditions.unwrap();
    assert!(
        conds
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
    );

    // Discovery finds the type with its scope, through the aggregated documents.
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let (ar, caps) = discovery
        .groups()
        .find(|g| g.name() == "example.com")
        .expect("example.com group")
        .recommended_kind("Widget")
        .expect("Widget kind");
    assert_eq!((ar.version.as_str(), ar.plural.as_str()), ("v1", "widgets"));
    assert_eq!(caps.scope, Scope::Namespaced);
    assert!(caps.subresources.iter().any(|(s, _)| s.plural == "status"));

    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), "shop", &ar);
    let mut events = watcher::watcher(widgets.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "example.com/v1", "kind": "Widget",
        "metadata": {"name": "w1"},
        "spec": {"size": 4, "unknown": true},
    }))
    .unwrap();
    let created = widgets.create(&PostParams::default(), &obj).await.unwrap();
    assert!(created.data["spec"].get("unknown").is_none(), "pruned");
    let seen = tokio::time::timeout(Duration::from_secs(20), events.try_next())
        .await
        .expect("a watch event")
        .unwrap()
        .unwrap();
    assert_eq!(seen.metadata.name.as_deref(), Some("w1"));

    // Invalid: a 422 with the field named.
    let bad: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "example.com/v1", "kind": "Widget",
        "metadata": {"name": "w2"}, "spec": {"size": 0},
    }))
    .unwrap();
    match widgets.create(&PostParams::default(), &bad).await {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 422);
            assert!(
                e.message.contains("spec.size: Invalid value: 0: spec.size in body should be greater than or equal to 1"),
                "{}",
                e.message
            );
        }
        other => panic!("expected 422, got {other:?}"),
    }

    // Status through the subresource.
    let st = widgets
        .patch_status(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}})),
        )
        .await
        .unwrap();
    assert_eq!(st.data["status"]["conditions"][0]["type"], "Ready");

    // NetworkPolicy, typed.
    let np: Api<NetworkPolicy> = Api::namespaced(client.clone(), "shop");
    let p: NetworkPolicy =
        serde_yaml::from_str(&NETPOL.replace("namespace: pol", "namespace: shop")).unwrap();
    let made = np.create(&PostParams::default(), &p).await.unwrap();
    assert_eq!(
        made.spec.unwrap().policy_types.unwrap(),
        ["Ingress".to_string()]
    );
    assert_eq!(np.list(&Default::default()).await.unwrap().items.len(), 1);

    crds.delete("widgets.example.com", &Default::default())
        .await
        .unwrap();
    match widgets.get("w1").await {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 404),
        other => panic!("the type is gone, got {other:?}"),
    }
}

/// Policies as Cilium's documentation writes them: the Cluster Mesh example, the usual DNS
/// allowance (with an L7 DNS rule), L7 HTTP, FQDN, CIDR sets, deny rules and entities.
const CILIUM_DOCS: &str = r#"
apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: "allow-cross-cluster"
  namespace: demo
spec:
  description: "Allow x-wing in cluster1 to contact rebel-base in cluster2"
  endpointSelector:
    matchLabels:
      name: x-wing
      io.cilium.k8s.policy.cluster: cluster1
  egress:
  - toEndpoints:
    - matchLabels:
        name: rebel-base
        io.cilium.k8s.policy.cluster: cluster2
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: allow-dns
  namespace: demo
spec:
  endpointSelector: {}
  egress:
  - toEndpoints:
    - matchLabels:
        "k8s:io.kubernetes.pod.namespace": kube-system
        "k8s:k8s-app": kube-dns
    toPorts:
    - ports:
      - port: "53"
        protocol: ANY
      rules:
        dns:
        - matchPattern: "*"
  - toFQDNs:
    - matchName: "api.github.com"
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: l7-rule
  namespace: demo
spec:
  endpointSelector:
    matchLabels:
      app: myService
  ingress:
  - fromEndpoints:
    - matchExpressions:
      - key: io.cilium.k8s.policy.cluster
        operator: In
        values: [cluster1, cluster2]
    toPorts:
    - ports:
      - port: "80"
        protocol: TCP
      - port: "8000"
        endPort: 8080
        protocol: TCP
      rules:
        http:
        - method: GET
          path: "/path1$"
  ingressDeny:
  - fromEntities: [world]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata:
  name: cidr-and-entities
spec:
  endpointSelector:
    matchLabels:
      role: frontend
  enableDefaultDeny:
    egress: true
    ingress: false
  egress:
  - toEntities: [cluster, host, remote-node]
  - toCIDRSet:
    - cidr: 10.0.0.0/8
      except: [10.96.0.0/12]
    toCIDR: [192.0.2.1/32]
  egressDeny:
  - toEndpoints:
    - matchLabels:
        app: db
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata:
  name: several-specs
specs:
- endpointSelector: {matchLabels: {a: b}}
  ingress: [{fromEntities: [all]}]
- nodeSelector: {matchLabels: {node-role.kubernetes.io/control-plane: ""}}
  ingress: [{fromEntities: [remote-node]}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_crds_accept_cilium_policies_unchanged() {
    let lab = Lab::start().await;
    mesh_lab::mesh_crds::install(lab.api.store()).expect("installing the mesh CRDs");
    // Installing again (a restarted supervisor) keeps them.
    mesh_lab::mesh_crds::install(lab.api.store()).expect("installing the mesh CRDs again");
    lab.ok(&["create", "namespace", "demo"]);
    let out = lab.apply(CILIUM_DOCS, &[]);
    for name in [
        "ciliumnetworkpolicy.cilium.io/allow-cross-cluster created",
        "ciliumnetworkpolicy.cilium.io/allow-dns created",
        "ciliumnetworkpolicy.cilium.io/l7-rule created",
        "ciliumclusterwidenetworkpolicy.cilium.io/cidr-and-entities created",
        "ciliumclusterwidenetworkpolicy.cilium.io/several-specs created",
    ] {
        assert!(out.contains(name), "{name} not in {out}");
    }
    // Nothing was pruned: the stored objects are what was written.
    let dns = lab.get_json(&["cnp", "allow-dns", "-n", "demo"]);
    assert_eq!(
        dns["spec"]["egress"][0]["toPorts"][0]["rules"]["dns"][0]["matchPattern"],
        "*"
    );
    assert_eq!(
        dns["spec"]["egress"][0]["toEndpoints"][0]["matchLabels"]["k8s:k8s-app"],
        "kube-dns"
    );
    assert_eq!(
        dns["spec"]["egress"][1]["toFQDNs"][0]["matchName"],
        "api.github.com"
    );
    let l7 = lab.get_json(&["ciliumnetworkpolicies.cilium.io", "l7-rule", "-n", "demo"]);
    assert_eq!(
        l7["spec"]["ingress"][0]["toPorts"][0]["ports"][1]["endPort"],
        8080
    );
    assert_eq!(
        l7["spec"]["ingressDeny"][0]["fromEntities"],
        json!(["world"])
    );
    let ccnp = lab.get_json(&["ccnp", "several-specs"]);
    assert_eq!(
        ccnp["specs"][1]["ingress"][0]["fromEntities"],
        json!(["remote-node"])
    );

    // Cilium's printer columns.
    let out = lab.ok(&["get", "cnp", "-n", "demo"]);
    assert_eq!(headers(&out), ["NAME", "AGE", "VALID"]);
    row(&out, "allow-cross-cluster");
    let out = lab.ok(&["get", "ccnp"]);
    assert_eq!(headers(&out), ["NAME", "VALID"]);
    lab.ok(&[
        "patch",
        "ccnp",
        "cidr-and-entities",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"conditions":[{"type":"Valid","status":"True"}]}}"#,
    ]);
    let out = lab.ok(&["get", "ccnp"]);
    assert_eq!(
        row(&out, "cidr-and-entities"),
        ["cidr-and-entities", "True"]
    );
    let out = lab.ok(&["get", "ciliumpolicy", "-A"]);
    assert!(
        out.contains("allow-dns") && out.contains("several-specs"),
        "{out}"
    );

    // What the schema covers is checked, with the field named.
    for (bad, want) in [
        (
            "  egress:\n  - toPorts:\n    - ports:\n      - port: 53\n",
            "spec.egress[0].toPorts[0].ports[0].port: Invalid value: \"integer\": spec.egress[0].toPorts[0].ports[0].port in body must be of type string: \"integer\"",
        ),
        (
            "  egress:\n  - toPorts:\n    - ports:\n      - port: \"53\"\n        protocol: DNS\n",
            "spec.egress[0].toPorts[0].ports[0].protocol: Unsupported value: \"DNS\"",
        ),
        (
            "  ingress:\n  - fromEntities: [galaxy]\n",
            "spec.ingress[0].fromEntities[0]: Unsupported value: \"galaxy\"",
        ),
        (
            "  ingress:\n  - fromEndpoints:\n    - matchExpressions:\n      - key: a\n        operator: Near\n",
            "spec.ingress[0].fromEndpoints[0].matchExpressions[0].operator: Unsupported value: \"Near\"",
        ),
    ] {
        let yaml = format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: bad, namespace: demo}}\nspec:\n  endpointSelector: {{}}\n{bad}"
        );
        let out = lab.kubectl_stdin(&["apply", "-f", "-"], &yaml);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{yaml}");
        assert!(
            err.contains("The CiliumNetworkPolicy \"bad\" is invalid") && err.contains(want),
            "want {want:?} in {err}"
        );
    }
}

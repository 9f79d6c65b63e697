//! `meshctl connect` / `meshctl disconnect`: exchange peer entries between clusters through
//! their kube contexts, like `cilium clustermesh connect`.
//!
//! What is read from each cluster (all in `--namespace`, default `mesh-system`):
//! - **the apiserver's address**: Service `mesh-apiserver`, port named `grpc`: the first
//!   LoadBalancer ingress IP or hostname with the port; when there is none, the first node's
//!   InternalIP with the port's `nodePort`; `--source-endpoint` / `--destination-endpoint`
//!   (`host:port`) override both.
//! - **the CA**: `ca.crt` of Secret `mesh-apiserver-tls` (only the CA: keys never leave).
//! - **the ClusterConfig**: the ConfigMap the `mesh-apiserver` Deployment reads
//!   `MESH_CLUSTER_NAME` from (kustomize names it `mesh-config-<hash>`), or ConfigMap
//!   `mesh-config` when there is no such Deployment, or `--config-map`. Keys:
//!   `MESH_CLUSTER_NAME`, `MESH_CLUSTER_ID`, `MESH_POD_CIDR` (comma-separated),
//!   `MESH_SERVICE_CIDR` (optional). Reading the ConfigMap needs no client certificate.
//!
//! Before writing anything, every pair of clusters is checked: distinct names, distinct IDs,
//! no overlapping pod CIDRs (`mesh_core::validate::check_compatible`), an address and a CA
//! on each side. Then the entry of each cluster (`<name>.yaml`, see
//! `mesh_proto::peer_entry`) is written into the other's peer Secret (`--peers-secret`,
//! default `kube-system/mesh-peers` like the apiserver's flag; deploy/ uses
//! `mesh-system/mesh-peers`). The Secret's `data` is replaced (update with the read
//! resourceVersion), so removed keys disappear.
//!
//! `--connection-mode mesh` also connects the source to every cluster already in the
//! destination's peer Secret; those clusters are found by probing every context of the
//! kubeconfig for its cluster name.
//!
//! `--wait [--timeout]`: after writing, reads each side's `Status` until each reports the
//! other (and, on the source, every cluster it was connected to) connected and synced,
//! printing progress on stderr; on timeout it prints what is still missing and why and
//! fails. Reading `Status` needs an operator certificate of each cluster: it comes from
//! `--source-tls-dir` / `--destination-tls-dir`, each holding `ca.crt` (the cluster's CA),
//! `tls.crt` and `tls.key` (an operator certificate of that cluster, e.g.
//! `meshctl cert issue --operator NAME --name tls --out-dir DIR`), the layout of a
//! `kubernetes.io/tls` Secret. The apiserver is reached at the address written into the
//! peer entries. Missing or unreadable files are reported before anything is written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, ValueEnum};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret, Service};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use mesh_core::validate::check_compatible;
use mesh_core::{ClusterConfig, ClusterId, ClusterName};
use mesh_proto::pb;
use mesh_proto::peer_entry::{PeerSpec, parse_entry, render_entry};
use mesh_proto::tls::{ClientEndpoint, ClientTls};

use crate::status::peer_ready;
use mesh_core::parse_duration;

const ENTRY_EXTS: [&str; 3] = [".yaml", ".yml", ".json"];

#[derive(Args, Clone)]
pub struct KubeArgs {
    /// Kubeconfig file(s), `:`-separated (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<String>,
    /// Namespace of the mesh-apiserver Service, its TLS Secret and its ConfigMap.
    #[arg(long, default_value = "mesh-system")]
    namespace: String,
    /// The peer Secret the apiservers watch, NAMESPACE/NAME (the apiserver's --peers-secret;
    /// deploy/ uses mesh-system/mesh-peers).
    #[arg(long, default_value = "kube-system/mesh-peers")]
    peers_secret: String,
    /// The ConfigMap holding MESH_CLUSTER_NAME etc. (default: the one the mesh-apiserver
    /// Deployment references, else `mesh-config`).
    #[arg(long)]
    config_map: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConnectionMode {
    /// Connect the two clusters only.
    Direct,
    /// Also connect the source to every cluster already connected to the destination.
    Mesh,
}

#[derive(Args)]
pub struct ConnectArgs {
    #[command(flatten)]
    kube: KubeArgs,
    /// Kube context of the source cluster (default: the current context).
    #[arg(long)]
    context: Option<String>,
    /// Kube context of the destination cluster.
    #[arg(long)]
    destination_context: String,
    /// Address (host:port) of the source apiserver, instead of its Service's.
    #[arg(long)]
    source_endpoint: Option<String>,
    /// Address (host:port) of the destination apiserver, instead of its Service's.
    #[arg(long)]
    destination_endpoint: Option<String>,
    #[arg(long, value_enum, default_value_t = ConnectionMode::Direct)]
    connection_mode: ConnectionMode,
    /// After writing the peer Secrets, wait until each side reports the other connected
    /// and synced (needs --source-tls-dir and --destination-tls-dir).
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this long (with --wait).
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    timeout: Duration,
    /// Directory with ca.crt, tls.crt and tls.key: the source cluster's CA and an operator
    /// certificate of that cluster, to read its apiserver's Status (with --wait).
    #[arg(long, env = "MESH_SOURCE_TLS_DIR")]
    source_tls_dir: Option<PathBuf>,
    /// Like --source-tls-dir, for the destination cluster.
    #[arg(long, env = "MESH_DESTINATION_TLS_DIR")]
    destination_tls_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct DisconnectArgs {
    #[command(flatten)]
    kube: KubeArgs,
    /// Kube context of the source cluster (default: the current context).
    #[arg(long)]
    context: Option<String>,
    /// Kube context of the destination cluster.
    #[arg(long)]
    destination_context: String,
}

/// One cluster as connect sees it.
struct Cluster {
    context: String,
    client: kube::Client,
    config: ClusterConfig,
    /// The entry others get, or why there is none (reported by validation).
    entry: Result<PeerSpec, String>,
}

fn split_ns_name(s: &str) -> anyhow::Result<(String, String)> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() => {
            Ok((ns.to_owned(), name.to_owned()))
        }
        _ => bail!("--peers-secret {s:?}: expected NAMESPACE/NAME"),
    }
}

fn load_kubeconfig(k: &KubeArgs) -> anyhow::Result<Kubeconfig> {
    match &k.kubeconfig {
        Some(paths) if !paths.is_empty() => {
            let mut merged: Option<Kubeconfig> = None;
            for p in paths.split(':').filter(|p| !p.is_empty()) {
                let kc =
                    Kubeconfig::read_from(p).with_context(|| format!("reading kubeconfig {p}"))?;
                merged = Some(match merged {
                    None => kc,
                    Some(m) => m.merge(kc)?,
                });
            }
            merged.ok_or_else(|| anyhow!("--kubeconfig is empty"))
        }
        _ => {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            let path = home.join(".kube/config");
            Kubeconfig::read_from(&path).with_context(|| format!("reading {}", path.display()))
        }
    }
}

async fn client_for(
    kc: &Kubeconfig,
    context: Option<&str>,
) -> anyhow::Result<(String, kube::Client)> {
    let name = match context {
        Some(c) => c.to_owned(),
        None => kc
            .current_context
            .clone()
            .ok_or_else(|| anyhow!("no --context and no current context in the kubeconfig"))?,
    };
    let opts = KubeConfigOptions {
        context: Some(name.clone()),
        ..Default::default()
    };
    let config = kube::Config::from_custom_kubeconfig(kc.clone(), &opts)
        .await
        .with_context(|| format!("kube context {name:?}"))?;
    let client =
        kube::Client::try_from(config).with_context(|| format!("kube context {name:?}"))?;
    Ok((name, client))
}

/// The ConfigMap name holding the cluster's identity.
async fn config_map_name(client: &kube::Client, k: &KubeArgs) -> anyhow::Result<String> {
    if let Some(n) = &k.config_map {
        return Ok(n.clone());
    }
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &k.namespace);
    if let Some(d) = deployments.get_opt("mesh-apiserver").await? {
        let referenced = d
            .spec
            .template
            .spec
            .into_iter()
            .flat_map(|p| p.containers)
            .flat_map(|c| c.env.unwrap_or_default())
            .filter(|e| e.name == "MESH_CLUSTER_NAME")
            .find_map(|e| e.value_from?.config_map_key_ref.map(|r| r.name));
        if let Some(n) = referenced {
            return Ok(n);
        }
    }
    Ok("mesh-config".into())
}

async fn read_config(
    client: &kube::Client,
    context: &str,
    k: &KubeArgs,
) -> anyhow::Result<ClusterConfig> {
    let cm_name = config_map_name(client, k).await?;
    let ns = &k.namespace;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let cm = cms
        .get_opt(&cm_name)
        .await
        .with_context(|| format!("context {context:?}: reading ConfigMap {ns}/{cm_name}"))?
        .ok_or_else(|| anyhow!("context {context:?}: ConfigMap {ns}/{cm_name} not found"))?;
    let data = cm.data.unwrap_or_default();
    let key = |key: &str| {
        data.get(key)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| anyhow!("context {context:?}: ConfigMap {ns}/{cm_name} has no {key}"))
    };
    let name = ClusterName::new(key("MESH_CLUSTER_NAME")?)
        .with_context(|| format!("context {context:?}: MESH_CLUSTER_NAME"))?;
    let id: u32 = key("MESH_CLUSTER_ID")?
        .parse()
        .with_context(|| format!("context {context:?}: MESH_CLUSTER_ID"))?;
    let id = ClusterId::new(id).with_context(|| format!("context {context:?}: MESH_CLUSTER_ID"))?;
    let pod_cidrs = key("MESH_POD_CIDR")?
        .split(',')
        .map(|c| c.trim().parse())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("context {context:?}: MESH_POD_CIDR"))?;
    let service_cidr = match data.get("MESH_SERVICE_CIDR").map(|s| s.trim()) {
        Some(s) if !s.is_empty() => Some(
            s.parse()
                .with_context(|| format!("context {context:?}: MESH_SERVICE_CIDR"))?,
        ),
        _ => None,
    };
    Ok(ClusterConfig {
        name,
        id,
        pod_cidrs,
        service_cidr,
        capabilities: Vec::new(),
        version: String::new(),
    })
}

fn host_port(host: &str, port: i32) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The apiserver's address: override, LoadBalancer ingress, or node InternalIP + nodePort.
/// The inner error says why there is none (reported by validation).
async fn read_address(
    client: &kube::Client,
    ns: &str,
    endpoint: Option<&str>,
) -> anyhow::Result<Result<String, String>> {
    if let Some(e) = endpoint {
        return Ok(Ok(e.to_owned()));
    }
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let Some(svc) = services.get_opt("mesh-apiserver").await? else {
        return Ok(Err(format!("Service {ns}/mesh-apiserver not found")));
    };
    let Some(port) = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|ps| ps.iter().find(|p| p.name.as_deref() == Some("grpc")))
        .cloned()
    else {
        return Ok(Err(format!(
            "Service {ns}/mesh-apiserver has no port named grpc"
        )));
    };
    let ingress = svc
        .status
        .and_then(|s| s.load_balancer)
        .and_then(|lb| lb.ingress)
        .unwrap_or_default();
    if let Some(host) = ingress
        .iter()
        .find_map(|i| i.ip.clone().or_else(|| i.hostname.clone()))
        .filter(|h| !h.is_empty())
    {
        return Ok(Ok(host_port(&host, port.port)));
    }
    let Some(node_port) = port.node_port else {
        return Ok(Err(format!(
            "Service {ns}/mesh-apiserver has no LoadBalancer ingress and no nodePort \
             (use --source-endpoint/--destination-endpoint)"
        )));
    };
    let nodes: Api<Node> = Api::all(client.clone());
    let ip = nodes
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|n| n.status?.addresses)
        .flatten()
        .find(|a| a.type_ == "InternalIP")
        .map(|a| a.address);
    Ok(match ip {
        Some(ip) => Ok(host_port(&ip, node_port)),
        None => Err(format!(
            "Service {ns}/mesh-apiserver has no LoadBalancer ingress and no node has an InternalIP"
        )),
    })
}

async fn read_ca(client: &kube::Client, ns: &str) -> anyhow::Result<Result<String, String>> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let Some(s) = secrets.get_opt("mesh-apiserver-tls").await? else {
        return Ok(Err(format!("Secret {ns}/mesh-apiserver-tls not found")));
    };
    let data = s.data.unwrap_or_default();
    Ok(
        match data.get("ca.crt").map(|b| String::from_utf8(b.0.clone())) {
            Some(Ok(pem)) if !pem.trim().is_empty() => Ok(pem),
            _ => Err(format!("Secret {ns}/mesh-apiserver-tls has no ca.crt")),
        },
    )
}

async fn load_cluster(
    kc: &Kubeconfig,
    context: Option<&str>,
    endpoint: Option<&str>,
    k: &KubeArgs,
) -> anyhow::Result<Cluster> {
    let (context, client) = client_for(kc, context).await?;
    let config = read_config(&client, &context, k).await?;
    let address = read_address(&client, &k.namespace, endpoint).await?;
    let ca = read_ca(&client, &k.namespace).await?;
    let entry = address.and_then(|address| {
        ca.map(|ca_pem| PeerSpec {
            name: config.name.clone(),
            address,
            ca_pem,
            server_name: None,
        })
    });
    // Check the entry with the apiserver's own parser, so connect never writes one it rejects.
    let entry = entry
        .and_then(|spec| {
            let key = format!("{}.yaml", spec.name);
            parse_entry(&key, render_entry(&spec).as_bytes())
                .map_err(|e| e.to_string())
                .and_then(|p| p.ok_or_else(|| format!("{key} is not a peer entry")))
        })
        .map_err(|e| format!("cluster {} (context {context:?}): {e}", config.name));
    Ok(Cluster {
        context,
        client,
        config,
        entry,
    })
}

async fn read_peers(client: &kube::Client, ns: &str, name: &str) -> anyhow::Result<Option<Secret>> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    Ok(secrets.get_opt(name).await?)
}

/// Applies `change` to the peer Secret's `data`: update when it exists (optimistic
/// concurrency on the read resourceVersion), create otherwise.
async fn write_peers(
    client: &kube::Client,
    ns: &str,
    name: &str,
    change: impl FnOnce(&mut BTreeMap<String, ByteString>),
) -> anyhow::Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    match secrets.get_opt(name).await? {
        Some(mut s) => {
            let mut data = s.data.take().unwrap_or_default();
            change(&mut data);
            s.data = Some(data);
            s.string_data = None;
            secrets.replace(name, &PostParams::default(), &s).await?;
        }
        None => {
            let mut data = BTreeMap::new();
            change(&mut data);
            let s = Secret {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    namespace: Some(ns.to_owned()),
                    ..Default::default()
                },
                data: Some(data),
                ..Default::default()
            };
            secrets.create(&PostParams::default(), &s).await?;
        }
    }
    Ok(())
}

fn describe(c: &Cluster) -> String {
    format!(
        "cluster {} (id {}, context {:?})",
        c.config.name,
        c.config.id.get(),
        c.context
    )
}

fn address_of(c: &Cluster) -> &str {
    c.entry.as_ref().map(|e| e.address.as_str()).unwrap_or("")
}

fn entry_of(c: &Cluster) -> anyhow::Result<(String, ByteString)> {
    let spec = c.entry.as_ref().map_err(|e| anyhow!("{e}"))?;
    Ok((
        format!("{}.yaml", spec.name),
        ByteString(render_entry(spec).into_bytes()),
    ))
}

pub async fn run_connect(a: ConnectArgs) -> anyhow::Result<()> {
    let kc = load_kubeconfig(&a.kube)?;
    let (peers_ns, peers_name) = split_ns_name(&a.kube.peers_secret)?;
    let source = load_cluster(
        &kc,
        a.context.as_deref(),
        a.source_endpoint.as_deref(),
        &a.kube,
    )
    .await?;
    let dest = load_cluster(
        &kc,
        Some(&a.destination_context),
        a.destination_endpoint.as_deref(),
        &a.kube,
    )
    .await?;
    let mut others = Vec::new();
    if a.connection_mode == ConnectionMode::Mesh {
        let existing = read_peers(&dest.client, &peers_ns, &peers_name).await?;
        let mut wanted: Vec<String> = existing
            .and_then(|s| s.data)
            .unwrap_or_default()
            .keys()
            .filter_map(|k| ENTRY_EXTS.iter().find_map(|e| k.strip_suffix(e)))
            .map(str::to_owned)
            .filter(|n| n != source.config.name.as_str() && n != dest.config.name.as_str())
            .collect();
        for ctx in kc.contexts.iter().map(|c| c.name.clone()) {
            if wanted.is_empty() {
                break;
            }
            if ctx == source.context || ctx == dest.context {
                continue;
            }
            // Contexts that are not (reachable) mesh clusters are skipped.
            let Ok(c) = load_cluster(&kc, Some(&ctx), None, &a.kube).await else {
                continue;
            };
            if let Some(i) = wanted.iter().position(|n| n == c.config.name.as_str()) {
                wanted.remove(i);
                others.push(c);
            }
        }
        if !wanted.is_empty() {
            bail!(
                "--connection-mode mesh: no context of the kubeconfig is cluster(s) {} \
                 (peers of {}); nothing was written",
                wanted.join(", "),
                describe(&dest)
            );
        }
    }

    // Validate everything before writing anything.
    let mut all = vec![&source, &dest];
    all.extend(others.iter());
    let mut problems = Vec::new();
    for (i, x) in all.iter().enumerate() {
        if let Err(e) = &x.entry {
            problems.push(e.clone());
        }
        for y in &all[i + 1..] {
            if let Err(conflict) = check_compatible(&x.config, &y.config) {
                problems.push(format!("{} and {}: {conflict}", describe(x), describe(y)));
            }
        }
    }
    // With --wait, the operator certificates must load before anything is written.
    let mut waits = Vec::new();
    if a.wait {
        let mut targets: Vec<String> = all[1..].iter().map(|c| c.config.name.to_string()).collect();
        targets.sort();
        for (side, dir, flag, peers) in [
            (&source, &a.source_tls_dir, "--source-tls-dir", targets),
            (
                &dest,
                &a.destination_tls_dir,
                "--destination-tls-dir",
                vec![source.config.name.to_string()],
            ),
        ] {
            match (dir, &side.entry) {
                (None, _) => problems.push(format!(
                    "--wait needs {flag} (ca.crt, tls.crt, tls.key of an operator certificate of {}) to read its Status",
                    describe(side)
                )),
                (Some(dir), Ok(entry)) => match status_endpoint(dir, &side.config.name, &entry.address) {
                    Ok(endpoint) => waits.push(WaitSide {
                        name: side.config.name.to_string(),
                        endpoint,
                        peers,
                        client: None,
                    }),
                    Err(e) => problems.push(format!("{flag} for {}: {e:#}", describe(side))),
                },
                // The missing entry is already a problem.
                (Some(_), Err(_)) => {}
            }
        }
    }
    if !problems.is_empty() {
        bail!(
            "cannot connect; nothing was written:\n  {}",
            problems.join("\n  ")
        );
    }

    let (source_key, source_value) = entry_of(&source)?;
    for t in &all[1..] {
        let (k, v) = entry_of(t)?;
        write_peers(&source.client, &peers_ns, &peers_name, |d| {
            d.insert(k, v);
        })
        .await
        .with_context(|| format!("writing {peers_ns}/{peers_name} in {}", describe(&source)))?;
        let (k, v) = (source_key.clone(), source_value.clone());
        write_peers(&t.client, &peers_ns, &peers_name, |d| {
            d.insert(k, v);
        })
        .await
        .with_context(|| format!("writing {peers_ns}/{peers_name} in {}", describe(t)))?;
        println!(
            "connected {} at {} and {} at {}",
            describe(&source),
            address_of(&source),
            describe(t),
            address_of(t),
        );
    }
    if a.wait {
        return wait_connected(waits, a.timeout).await;
    }
    println!("run `meshctl status --wait` against either apiserver to wait until they are synced");
    Ok(())
}

/// One apiserver `--wait` reads, and the peers it must report connected and synced.
struct WaitSide {
    name: String,
    endpoint: ClientEndpoint,
    peers: Vec<String>,
    client: Option<pb::mesh_client::MeshClient<tonic::transport::Channel>>,
}

/// The endpoint of a cluster's apiserver with the operator certificate in `dir`.
fn status_endpoint(
    dir: &Path,
    cluster: &ClusterName,
    address: &str,
) -> anyhow::Result<ClientEndpoint> {
    let files = ["ca.crt", "tls.crt", "tls.key"].map(|f| dir.join(f));
    for f in &files {
        if !f.is_file() {
            bail!("{} not found", f.display());
        }
    }
    let tls = ClientTls::from_files(&files[0], &files[1], &files[2], Some(cluster.clone()))
        .with_context(|| format!("loading the TLS files of {}", dir.display()))?;
    let mut ep = ClientEndpoint::new(address.to_owned(), tls);
    ep.connect_timeout = Duration::from_secs(5);
    Ok(ep)
}

/// What is still missing on one side: empty when it reports every peer connected and synced.
async fn missing(side: &mut WaitSide) -> Vec<String> {
    const CALL: Duration = Duration::from_secs(5);
    if side.client.is_none() {
        match mesh_proto::tls::connect(&side.endpoint).await {
            Ok(c) => side.client = Some(c),
            Err(e) => {
                return vec![format!(
                    "{}: cannot reach its apiserver at {}: {e}",
                    side.name, side.endpoint.address
                )];
            }
        }
    }
    let Some(client) = side.client.as_mut() else {
        return Vec::new();
    };
    let resp = match tokio::time::timeout(CALL, client.status(pb::StatusRequest {})).await {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(status)) => {
            side.client = None;
            return vec![format!(
                "{}: Status failed: {}: {}",
                side.name,
                status.code(),
                status.message()
            )];
        }
        Err(_) => {
            side.client = None;
            return vec![format!(
                "{}: Status did not answer within {CALL:?}",
                side.name
            )];
        }
    };
    side.peers
        .iter()
        .filter_map(|p| peer_ready(&resp, p).err())
        .collect()
}

/// Polls every side's Status until nothing is missing or `timeout` passes; progress goes
/// to stderr, one line each time what is missing changes.
async fn wait_connected(mut sides: Vec<WaitSide>, timeout: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last = Vec::new();
    loop {
        let mut now_missing = Vec::new();
        for side in &mut sides {
            now_missing.extend(missing(side).await);
        }
        let elapsed = started.elapsed().as_secs();
        if now_missing.is_empty() {
            let pairs: Vec<String> = sides
                .iter()
                .map(|s| {
                    format!(
                        "{} sees {} connected and synced",
                        s.name,
                        s.peers.join(", ")
                    )
                })
                .collect();
            println!("synced after {elapsed}s: {}", pairs.join("; "));
            return Ok(());
        }
        if started.elapsed() >= timeout {
            bail!(
                "timed out after {timeout:?} waiting for the clusters to connect and sync; still missing:\n  - {}",
                now_missing.join("\n  - ")
            );
        }
        if now_missing != last {
            eprintln!("waiting ({elapsed}s): {}", now_missing.join("; "));
            last = now_missing;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn run_disconnect(a: DisconnectArgs) -> anyhow::Result<()> {
    let kc = load_kubeconfig(&a.kube)?;
    let (peers_ns, peers_name) = split_ns_name(&a.kube.peers_secret)?;
    let (sctx, sclient) = client_for(&kc, a.context.as_deref()).await?;
    let (dctx, dclient) = client_for(&kc, Some(&a.destination_context)).await?;
    let sname = read_config(&sclient, &sctx, &a.kube).await?.name;
    let dname = read_config(&dclient, &dctx, &a.kube).await?.name;
    for (client, ctx, own, remove) in [
        (&sclient, &sctx, &sname, &dname),
        (&dclient, &dctx, &dname, &sname),
    ] {
        if read_peers(client, &peers_ns, &peers_name).await?.is_none() {
            continue;
        }
        write_peers(client, &peers_ns, &peers_name, |d| {
            for ext in ENTRY_EXTS {
                d.remove(&format!("{remove}{ext}"));
            }
        })
        .await
        .with_context(|| {
            format!("writing {peers_ns}/{peers_name} in cluster {own} (context {ctx:?})")
        })?;
    }
    println!(
        "disconnected cluster {sname} (context {sctx:?}) and cluster {dname} (context {dctx:?})"
    );
    Ok(())
}

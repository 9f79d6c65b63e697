//! `meshctl service list` and `meshctl service explain NS/NAME [--node N]`: global services
//! as every cluster publishes them, and which backends a node's agent selects for one of
//! them (mesh-core's `select`, DESIGN.md section 5) with the reason for each left-out one.

use std::time::Duration;

use clap::{Args, Subcommand};
use mesh_core::select::{Excluded, SelectInput, Selection, select};
use mesh_core::{ClusterName, GlobalService};
use mesh_proto::pb;
use serde::Serialize;

use crate::conn::{ConnArgs, parse_duration};
use crate::inspect::snapshot;
use crate::output::{Format, table};

#[derive(Subcommand)]
pub enum ServiceCommand {
    /// Global services, one row per service and cluster.
    List(ListArgs),
    /// Which backends a node selects for a service and, for each one left out, why.
    Explain(ExplainArgs),
}

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Give up waiting for the snapshot after this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// The service, as NAMESPACE/NAME.
    service: String,
    /// The node whose selection to explain (matters for internalTrafficPolicy Local).
    #[arg(long, default_value = "")]
    node: String,
    /// The cluster the node is in (default: the apiserver's own cluster).
    #[arg(long = "local-cluster", value_name = "CLUSTER")]
    local_cluster: Option<String>,
    /// Give up waiting for the snapshot after this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

pub async fn run(cmd: ServiceCommand) -> anyhow::Result<()> {
    match cmd {
        ServiceCommand::List(a) => {
            let snap = snapshot(&a.conn, vec![], a.timeout).await?;
            let rows = list_rows(&snap.services);
            match a.output {
                Format::Table => print!("{}", list_table(&rows)),
                Format::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
                Format::Yaml => print!("{}", serde_yaml::to_string(&rows)?),
            }
            Ok(())
        }
        ServiceCommand::Explain(a) => {
            let local = match &a.local_cluster {
                Some(c) => c.clone(),
                None => {
                    let mut client = a.conn.connect().await?;
                    client
                        .info(pb::InfoRequest {})
                        .await
                        .map_err(|s| {
                            anyhow::anyhow!("info from {}: {}", a.conn.server, s.message())
                        })?
                        .into_inner()
                        .name
                }
            };
            let local = ClusterName::new(local.clone())
                .map_err(|e| anyhow::anyhow!("invalid cluster name {local:?}: {e}"))?;
            let snap = snapshot(&a.conn, vec![], a.timeout).await?;
            let report = explain(&snap.services, &local, &a.node, &a.service)?;
            match a.output {
                Format::Table => print!("{}", render_explain(&report)),
                Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Format::Yaml => print!("{}", serde_yaml::to_string(&report)?),
            }
            Ok(())
        }
    }
}

/// One row of `service list`: a service as one cluster publishes it.
#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct ListRow {
    pub service: String,
    pub cluster: String,
    pub frontends: Vec<String>,
    pub ports: Vec<String>,
    pub shared: bool,
    pub affinity: String,
    pub internal_traffic_policy: String,
    pub ready_backends: usize,
    pub total_backends: usize,
}

pub fn list_rows(services: &[GlobalService]) -> Vec<ListRow> {
    let mut rows: Vec<ListRow> = services
        .iter()
        .map(|s| ListRow {
            service: s.key(),
            cluster: s.cluster.to_string(),
            frontends: s.frontends.iter().map(|f| f.to_string()).collect(),
            ports: s.ports.iter().map(port_str).collect(),
            shared: s.shared,
            affinity: s.affinity.to_string(),
            internal_traffic_policy: s.internal_traffic_policy.to_string(),
            ready_backends: s.backends.iter().filter(|b| b.conditions.ready).count(),
            total_backends: s.backends.len(),
        })
        .collect();
    rows.sort_by(|a, b| (&a.service, &a.cluster).cmp(&(&b.service, &b.cluster)));
    rows
}

fn list_table(rows: &[ListRow]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.service.clone(),
                r.cluster.clone(),
                dash(r.frontends.join(",")),
                dash(r.ports.join(",")),
                r.shared.to_string(),
                r.affinity.clone(),
                r.internal_traffic_policy.clone(),
                format!("{}/{}", r.ready_backends, r.total_backends),
            ]
        })
        .collect();
    table(
        &[
            "SERVICE",
            "CLUSTER",
            "FRONTENDS",
            "PORTS",
            "SHARED",
            "AFFINITY",
            "POLICY",
            "READY/TOTAL",
        ],
        &cells,
    )
}

fn dash(s: String) -> String {
    if s.is_empty() { "-".into() } else { s }
}

fn port_str(p: &mesh_core::ServicePort) -> String {
    if p.name.is_empty() {
        format!("{}/{}", p.port, p.protocol)
    } else {
        format!("{}/{}({})", p.port, p.protocol, p.name)
    }
}

/// What `service explain` prints.
#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct Explanation {
    pub service: String,
    pub local_cluster: String,
    pub node: String,
    pub frontends: Vec<String>,
    pub affinity: String,
    pub internal_traffic_policy: String,
    pub ports: Vec<ExplainedPort>,
    pub excluded: Vec<ExcludedRow>,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct ExplainedPort {
    pub frontend: String,
    pub tier: String,
    pub used_failover: bool,
    pub backends: Vec<SelectedRow>,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct SelectedRow {
    pub cluster: String,
    pub address: String,
    pub node: String,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct ExcludedRow {
    pub cluster: String,
    pub ip: String,
    /// The frontend port it was left out for, or `*` for all of them.
    pub port: String,
    pub reason: String,
}

/// Runs selection for `NS/NAME` on `node` of `local` over every cluster's services.
pub fn explain(
    services: &[GlobalService],
    local: &ClusterName,
    node: &str,
    key: &str,
) -> anyhow::Result<Explanation> {
    let Some((ns, name)) = key.split_once('/') else {
        anyhow::bail!("expected NAMESPACE/NAME, got {key:?}");
    };
    let matching: Vec<&GlobalService> = services
        .iter()
        .filter(|s| s.namespace == ns && s.name == name)
        .collect();
    let Some(local_svc) = matching.iter().find(|s| s.cluster == *local) else {
        let elsewhere: Vec<String> = matching.iter().map(|s| s.cluster.to_string()).collect();
        if elsewhere.is_empty() {
            anyhow::bail!("global service {key} does not exist in any cluster");
        }
        anyhow::bail!(
            "global service {key} does not exist in cluster {local} (it exists only in {}): \
             frontends come only from the local Service, so it is not reachable by ClusterIP \
             from {local}; create the Service in {local} too",
            elsewhere.join(", ")
        );
    };
    let remotes: Vec<&GlobalService> = matching
        .iter()
        .copied()
        .filter(|s| s.cluster != *local)
        .collect();
    let sel = select(&SelectInput {
        local_cluster: local,
        node,
        local: local_svc,
        remotes: &remotes,
    });
    Ok(explanation(key, local, node, local_svc, &sel))
}

fn explanation(
    key: &str,
    local: &ClusterName,
    node: &str,
    svc: &GlobalService,
    sel: &Selection,
) -> Explanation {
    Explanation {
        service: key.to_string(),
        local_cluster: local.to_string(),
        node: node.to_string(),
        frontends: sel.frontends.iter().map(|f| f.to_string()).collect(),
        affinity: svc.affinity.to_string(),
        internal_traffic_policy: svc.internal_traffic_policy.to_string(),
        ports: sel
            .ports
            .iter()
            .map(|p| ExplainedPort {
                frontend: port_str(&p.frontend),
                tier: p.tier.to_string(),
                used_failover: p.used_failover,
                backends: p
                    .backends
                    .iter()
                    .map(|b| SelectedRow {
                        cluster: b.cluster.to_string(),
                        address: format!("{}:{}", b.ip, b.port),
                        node: b.node.clone(),
                    })
                    .collect(),
            })
            .collect(),
        excluded: sel.excluded.iter().map(excluded_row).collect(),
    }
}

fn excluded_row(e: &Excluded) -> ExcludedRow {
    ExcludedRow {
        cluster: e.cluster.to_string(),
        ip: e.ip.to_string(),
        port: e.port.as_ref().map(port_str).unwrap_or_else(|| "*".into()),
        reason: e.reason.to_string(),
    }
}

pub fn render_explain(e: &Explanation) -> String {
    let mut s = format!(
        "Service {} as node {:?} of cluster {} selects it (affinity {}, internalTrafficPolicy {})\n",
        e.service, e.node, e.local_cluster, e.affinity, e.internal_traffic_policy
    );
    s.push_str(&format!("Frontends: {}\n", dash(e.frontends.join(", "))));
    for p in &e.ports {
        s.push('\n');
        let failover = if p.used_failover { ", failover" } else { "" };
        s.push_str(&format!(
            "Port {} (tier {}{failover}):\n",
            p.frontend, p.tier
        ));
        if p.backends.is_empty() {
            s.push_str("  no backend: connections to this port are refused\n");
            continue;
        }
        let rows: Vec<Vec<String>> = p
            .backends
            .iter()
            .map(|b| {
                vec![
                    b.cluster.clone(),
                    b.address.clone(),
                    b.node.clone(),
                    p.tier.clone(),
                    if p.used_failover { "yes" } else { "no" }.to_string(),
                ]
            })
            .collect();
        for line in table(&["CLUSTER", "BACKEND", "NODE", "TIER", "FAILOVER"], &rows).lines() {
            s.push_str("  ");
            s.push_str(line);
            s.push('\n');
        }
    }
    s.push('\n');
    if e.excluded.is_empty() {
        s.push_str("No backend left out.\n");
    } else {
        s.push_str("Left out:\n");
        let rows: Vec<Vec<String>> = e
            .excluded
            .iter()
            .map(|x| {
                vec![
                    x.cluster.clone(),
                    x.ip.clone(),
                    x.port.clone(),
                    x.reason.clone(),
                ]
            })
            .collect();
        for line in table(&["CLUSTER", "BACKEND", "PORT", "REASON"], &rows).lines() {
            s.push_str("  ");
            s.push_str(line);
            s.push('\n');
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::{Affinity, Backend, BackendConditions, Protocol, ServicePort, TrafficPolicy};

    fn port(name: &str, protocol: Protocol, port: u16) -> ServicePort {
        ServicePort {
            name: name.into(),
            protocol,
            port,
        }
    }

    const READY: BackendConditions = BackendConditions {
        ready: true,
        serving: true,
        terminating: false,
    };
    const NOT_READY: BackendConditions = BackendConditions {
        ready: false,
        serving: false,
        terminating: false,
    };

    const TERMINATING_SERVING: BackendConditions = BackendConditions {
        ready: false,
        serving: true,
        terminating: true,
    };
    const TERMINATING: BackendConditions = BackendConditions {
        ready: false,
        serving: false,
        terminating: true,
    };

    fn backend(ip: &str, node: &str, conditions: BackendConditions) -> Backend {
        Backend {
            ip: ip.parse().unwrap(),
            ports: vec![port("http", Protocol::Tcp, 8080)],
            node: node.into(),
            zone: String::new(),
            conditions,
        }
    }

    fn svc(cluster: &str, backends: Vec<Backend>) -> GlobalService {
        GlobalService {
            cluster: ClusterName::new(cluster).unwrap(),
            namespace: "default".into(),
            name: "web".into(),
            shared: true,
            affinity: Affinity::None,
            internal_traffic_policy: TrafficPolicy::Cluster,
            ports: vec![port("http", Protocol::Tcp, 80)],
            frontends: vec!["10.96.0.10".parse().unwrap()],
            backends,
        }
    }

    /// One case: the services of every cluster, the node, and the expected selection and
    /// left-out rows as (cluster, ip, reason substring).
    struct Case {
        name: &'static str,
        services: Vec<GlobalService>,
        node: &'static str,
        selected: Vec<(&'static str, &'static str)>,
        excluded: Vec<(&'static str, &'static str, &'static str)>,
    }

    #[test]
    fn explain_gives_the_reason_for_each_left_out_backend() {
        let with = |mut s: GlobalService, f: &dyn Fn(&mut GlobalService)| {
            f(&mut s);
            s
        };
        let cases = vec![
            Case {
                name: "affinity local keeps local, leaves remote out",
                services: vec![
                    with(svc("east", vec![backend("10.1.0.1", "e1", READY)]), &|s| {
                        s.affinity = Affinity::Local
                    }),
                    svc("west", vec![backend("10.2.0.1", "w1", READY)]),
                ],
                node: "e1",
                selected: vec![("east", "10.1.0.1:8080")],
                excluded: vec![("west", "10.2.0.1", "affinity local")],
            },
            Case {
                name: "affinity remote keeps remote, leaves local out",
                services: vec![
                    with(svc("east", vec![backend("10.1.0.1", "e1", READY)]), &|s| {
                        s.affinity = Affinity::Remote
                    }),
                    svc("west", vec![backend("10.2.0.1", "w1", READY)]),
                ],
                node: "e1",
                selected: vec![("west", "10.2.0.1:8080")],
                excluded: vec![("east", "10.1.0.1", "affinity remote")],
            },
            Case {
                name: "not ready",
                services: vec![
                    svc(
                        "east",
                        vec![
                            backend("10.1.0.1", "e1", READY),
                            backend("10.1.0.2", "e1", NOT_READY),
                        ],
                    ),
                    svc("west", vec![backend("10.2.0.1", "w1", NOT_READY)]),
                ],
                node: "e1",
                selected: vec![("east", "10.1.0.1:8080")],
                excluded: vec![
                    ("east", "10.1.0.2", "not ready"),
                    ("west", "10.2.0.1", "not ready"),
                ],
            },
            Case {
                name: "not shared",
                services: vec![
                    svc("east", vec![backend("10.1.0.1", "e1", READY)]),
                    with(svc("west", vec![backend("10.2.0.1", "w1", READY)]), &|s| {
                        s.shared = false
                    }),
                ],
                node: "e1",
                selected: vec![("east", "10.1.0.1:8080")],
                excluded: vec![("west", "10.2.0.1", "does not share")],
            },
            Case {
                name: "internalTrafficPolicy Local",
                services: vec![
                    with(
                        svc(
                            "east",
                            vec![
                                backend("10.1.0.1", "e1", READY),
                                backend("10.1.0.2", "e2", READY),
                            ],
                        ),
                        &|s| s.internal_traffic_policy = TrafficPolicy::Local,
                    ),
                    svc("west", vec![backend("10.2.0.1", "w1", READY)]),
                ],
                node: "e1",
                selected: vec![("east", "10.1.0.1:8080")],
                excluded: vec![
                    (
                        "east",
                        "10.1.0.2",
                        "internalTrafficPolicy Local: on node \"e2\"",
                    ),
                    ("west", "10.2.0.1", "remote backends are never used"),
                ],
            },
            Case {
                name: "port mismatch",
                services: vec![
                    svc("east", vec![backend("10.1.0.1", "e1", READY)]),
                    svc(
                        "west",
                        vec![Backend {
                            ports: vec![port("grpc", Protocol::Tcp, 9090)],
                            ..backend("10.2.0.1", "w1", READY)
                        }],
                    ),
                ],
                node: "e1",
                selected: vec![("east", "10.1.0.1:8080")],
                excluded: vec![("west", "10.2.0.1", "no port named \"http\" with protocol")],
            },
            Case {
                name: "terminating: not serving, and serving but not needed",
                services: vec![svc(
                    "east",
                    vec![
                        backend("10.1.0.1", "e1", READY),
                        backend("10.1.0.2", "e1", TERMINATING_SERVING),
                        backend("10.1.0.3", "e1", TERMINATING),
                    ],
                )],
                node: "e1",
                selected: vec![("east", "10.1.0.1:8080")],
                excluded: vec![
                    (
                        "east",
                        "10.1.0.2",
                        "terminating: used only when no backend is ready",
                    ),
                    ("east", "10.1.0.3", "terminating and not serving"),
                ],
            },
            Case {
                name: "affinity local fails over to remote",
                services: vec![
                    with(
                        svc("east", vec![backend("10.1.0.1", "e1", NOT_READY)]),
                        &|s| s.affinity = Affinity::Local,
                    ),
                    svc("west", vec![backend("10.2.0.1", "w1", READY)]),
                ],
                node: "e1",
                selected: vec![("west", "10.2.0.1:8080")],
                excluded: vec![("east", "10.1.0.1", "not ready")],
            },
        ];
        let east = ClusterName::new("east").unwrap();
        for c in cases {
            let e = explain(&c.services, &east, c.node, "default/web")
                .unwrap_or_else(|err| panic!("{}: {err:#}", c.name));
            assert_eq!(e.ports.len(), 1, "{}", c.name);
            let selected: Vec<(String, String)> = e.ports[0]
                .backends
                .iter()
                .map(|b| (b.cluster.clone(), b.address.clone()))
                .collect();
            let want: Vec<(String, String)> = c
                .selected
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
            assert_eq!(selected, want, "{}: selected", c.name);
            assert_eq!(
                e.excluded.len(),
                c.excluded.len(),
                "{}: left out {:?}",
                c.name,
                e.excluded
            );
            for (cluster, ip, reason) in &c.excluded {
                assert!(
                    e.excluded
                        .iter()
                        .any(|x| x.cluster == *cluster && x.ip == *ip && x.reason.contains(reason)),
                    "{}: no row ({cluster}, {ip}, ..{reason}..) in {:?}",
                    c.name,
                    e.excluded
                );
            }
            // The table names every left-out backend with its reason.
            let text = render_explain(&e);
            for (_, ip, reason) in &c.excluded {
                assert!(
                    text.lines().any(|l| l.contains(ip) && l.contains(reason)),
                    "{}: table lacks {ip} / {reason}:\n{text}",
                    c.name
                );
            }
            if c.name.contains("fails over") {
                assert!(e.ports[0].used_failover, "{}", c.name);
                assert!(text.contains("failover"), "{text}");
            }
        }
    }

    #[test]
    fn explain_names_a_service_missing_locally() {
        let east = ClusterName::new("east").unwrap();
        let services = vec![svc("west", vec![backend("10.2.0.1", "w1", READY)])];
        let err = explain(&services, &east, "e1", "default/web")
            .unwrap_err()
            .to_string();
        assert!(err.contains("default/web"), "{err}");
        assert!(err.contains("does not exist in cluster east"), "{err}");
        assert!(err.contains("only in west"), "{err}");
        assert!(err.contains("not reachable by ClusterIP"), "{err}");
        let err = explain(&services, &east, "e1", "default/nope")
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not exist in any cluster"), "{err}");
        assert!(explain(&services, &east, "e1", "nope").is_err());
    }

    #[test]
    fn list_one_row_per_service_and_cluster() {
        let services = vec![
            svc("west", vec![backend("10.2.0.1", "w1", READY)]),
            svc(
                "east",
                vec![
                    backend("10.1.0.1", "e1", READY),
                    backend("10.1.0.2", "e1", NOT_READY),
                ],
            ),
        ];
        let rows = list_rows(&services);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].cluster, "east");
        assert_eq!((rows[0].ready_backends, rows[0].total_backends), (1, 2));
        let t = list_table(&rows);
        assert!(t.starts_with("SERVICE"), "{t}");
        assert!(
            t.contains("default/web   east      10.96.0.10   80/TCP(http)"),
            "{t}"
        );
        assert!(t.contains("1/2"), "{t}");
    }
}

//! The lab's cluster DNS, queried with hickory-resolver (a real client, UDP and TCP) while
//! kubectl changes the lab API's objects.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use common::Lab;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RecordType;
use hickory_resolver::{Resolver, TokioResolver};
use mesh_lab::dns::DnsServer;

fn resolver(addr: SocketAddr, tcp: bool) -> TokioResolver {
    let mut ns = if tcp {
        NameServerConfig::tcp(addr.ip())
    } else {
        NameServerConfig::udp(addr.ip())
    };
    for c in &mut ns.connections {
        c.port = addr.port();
    }
    let mut opts = ResolverOpts::default();
    // Every answer must come from the server, not from a cache.
    opts.cache_size = 0;
    opts.attempts = 1;
    let mut b = Resolver::builder_with_config(
        ResolverConfig::from_parts(None, vec![], vec![ns]),
        TokioRuntimeProvider::default(),
    );
    *b.options_mut() = opts;
    b.build().expect("resolver")
}

/// The A records of a name, or the response code of the failure.
async fn a(r: &TokioResolver, name: &str) -> Result<Vec<Ipv4Addr>, String> {
    match r.lookup(name, RecordType::A).await {
        Ok(l) => {
            let mut ips: Vec<Ipv4Addr> = l
                .answers()
                .iter()
                .filter_map(|rec| match &rec.data {
                    hickory_resolver::proto::rr::RData::A(a) => Some(a.0),
                    _ => None,
                })
                .collect();
            ips.sort();
            Ok(ips)
        }
        Err(e) if e.is_nx_domain() => Err("NXDOMAIN".into()),
        Err(e) if e.is_no_records_found() => Err("NODATA".into()),
        Err(e) => Err(format!("{e}")),
    }
}

fn cluster_ip(lab: &Lab, ns: &str, name: &str) -> Ipv4Addr {
    let v = lab.get_json(&["svc", name, "-n", ns]);
    v["spec"]["clusterIP"].as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_follow_the_store() {
    let lab = Lab::start().await;
    let dns = DnsServer::start(lab.api.store().clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let udp = resolver(dns.local_addr(), false);
    let tcp = resolver(dns.local_addr(), true);

    lab.ok(&["create", "namespace", "rebel"]);
    lab.ok(&[
        "create",
        "service",
        "clusterip",
        "base",
        "-n",
        "rebel",
        "--tcp=80:8080",
    ]);
    let ip = cluster_ip(&lab, "rebel", "base");
    for r in [&udp, &tcp] {
        assert_eq!(a(r, "base.rebel.svc.cluster.local.").await, Ok(vec![ip]));
        assert_eq!(
            a(r, "BASE.Rebel.svc.cluster.local.").await,
            Ok(vec![ip]),
            "names are case-insensitive"
        );
        assert_eq!(
            a(r, "other.rebel.svc.cluster.local.").await,
            Err("NXDOMAIN".into())
        );
        assert_eq!(
            a(r, "base.empire.svc.cluster.local.").await,
            Err("NXDOMAIN".into())
        );
        assert_eq!(a(r, "rebel.svc.cluster.local.").await, Err("NODATA".into()));
    }
    // Outside the zone: REFUSED, no forwarding.
    let e = udp.lookup("example.com.", RecordType::A).await.unwrap_err();
    assert!(
        format!("{e:?}").contains(&format!("{:?}", ResponseCode::Refused)),
        "{e:?}"
    );
    // AAAA of an existing name: no data, not NXDOMAIN.
    let e = udp
        .lookup("base.rebel.svc.cluster.local.", RecordType::AAAA)
        .await
        .unwrap_err();
    assert!(e.is_no_records_found() && !e.is_nx_domain(), "{e:?}");

    // A Service created after the server started, and one deleted.
    lab.ok(&[
        "create",
        "service",
        "clusterip",
        "late",
        "-n",
        "rebel",
        "--tcp=81",
    ]);
    let late = cluster_ip(&lab, "rebel", "late");
    assert_eq!(
        a(&udp, "late.rebel.svc.cluster.local.").await,
        Ok(vec![late])
    );
    lab.ok(&["delete", "service", "base", "-n", "rebel"]);
    assert_eq!(
        a(&tcp, "base.rebel.svc.cluster.local.").await,
        Err("NXDOMAIN".into())
    );

    // Headless: the ready endpoints of its slices.
    lab.apply(
        r#"
apiVersion: v1
kind: Service
metadata:
  name: db
  namespace: rebel
spec:
  clusterIP: None
  selector:
    app: db
  ports:
  - port: 5432
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-abcde
  namespace: rebel
  labels:
    kubernetes.io/service-name: db
addressType: IPv4
endpoints:
- addresses: ["10.1.1.7"]
  conditions: {ready: true}
- addresses: ["10.1.2.7"]
  conditions: {ready: false}
- addresses: ["10.1.1.8"]
ports:
- port: 5432
"#,
        &[],
    );
    let want: Vec<Ipv4Addr> = vec!["10.1.1.7".parse().unwrap(), "10.1.1.8".parse().unwrap()];
    assert_eq!(
        a(&udp, "db.rebel.svc.cluster.local.").await,
        Ok(want.clone())
    );
    assert_eq!(a(&tcp, "db.rebel.svc.cluster.local.").await, Ok(want));
    assert_eq!(
        a(&udp, "10-1-1-7.rebel.pod.cluster.local.").await,
        Ok(vec!["10.1.1.7".parse().unwrap()])
    );
    assert_eq!(dns.local_addr().ip(), IpAddr::from([127, 0, 0, 1]));
    dns.shutdown().await;
}

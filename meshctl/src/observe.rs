//! `meshctl observe`: flows from the apiserver's relay (Hubble's Observer API), with
//! Hubble's flags where they apply. The flags become `flow.FlowFilter`s evaluated by the
//! servers (`mesh_proto::flows`), exactly as `hubble observe` builds them: `--from-*` and
//! `--to-*` flags fill one filter; a flag naming either side (`--pod`, `--namespace`,
//! `--label`, `--ip`, `--port`, `--service`) makes two filters, one per side.

mod json;

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use mesh_core::parse_duration;
use mesh_proto::flows::{CLUSTER_LABEL, event_type, ports_of, protocol_of};
use mesh_proto::hubble::flow::{
    DropReason, Endpoint, EventTypeFilter, Flow, FlowFilter, TrafficDirection, Verdict,
};
use mesh_proto::hubble::observer::GetFlowsRequest;
use mesh_proto::hubble::observer::get_flows_response::ResponseTypes;
use mesh_proto::hubble::observer::observer_client::ObserverClient;
use mesh_proto::hubble::relay::NodeState;
use mesh_proto::tls::connect_channel;

use crate::conn::ConnArgs;

/// The gRPC metadata asking the relay for every connected cluster's flows.
pub const SCOPE_HEADER: &str = "x-mesh-scope";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum ObserveFormat {
    /// One line per flow, as `hubble observe`'s default.
    #[default]
    Compact,
    /// TIMESTAMP SOURCE DESTINATION TYPE VERDICT SUMMARY.
    Table,
    /// One GetFlowsResponse per line in protobuf's JSON mapping (Hubble's `-o json`).
    Json,
    /// The same as json (Hubble's `-o jsonpb`).
    Jsonpb,
}

#[derive(Args, Debug, Clone)]
pub struct ObserveArgs {
    #[command(flatten)]
    pub conn: ConnArgs,

    /// Keep streaming new flows.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// The last N flows, in total across every node (and cluster); default 20 unless
    /// following or --since/--first is given.
    #[arg(long, value_name = "N")]
    pub last: Option<u64>,
    /// The first N flows kept by the agents.
    #[arg(long, value_name = "N", conflicts_with_all = ["last", "follow"])]
    pub first: Option<u64>,
    /// Flows since this time: RFC 3339 (2026-12-05T07:00:00Z) or a duration ago (5m).
    #[arg(long)]
    pub since: Option<String>,
    /// Flows until this time: RFC 3339 or a duration ago.
    #[arg(long)]
    pub until: Option<String>,

    /// Flows from this pod: `[namespace/]pod` name prefix (namespace "default" when omitted).
    #[arg(long, value_name = "[NS/]POD")]
    pub from_pod: Vec<String>,
    /// Flows to this pod: `[namespace/]pod` name prefix.
    #[arg(long, value_name = "[NS/]POD")]
    pub to_pod: Vec<String>,
    /// Flows from or to this pod.
    #[arg(long, value_name = "[NS/]POD")]
    pub pod: Vec<String>,
    #[arg(long)]
    pub from_namespace: Vec<String>,
    #[arg(long)]
    pub to_namespace: Vec<String>,
    /// Flows from or to this namespace.
    #[arg(long, short = 'n')]
    pub namespace: Vec<String>,
    /// Source label selector (`key=value`, `key in (a,b)`, `!key`, ...).
    #[arg(long)]
    pub from_label: Vec<String>,
    #[arg(long)]
    pub to_label: Vec<String>,
    /// Source or destination label selector.
    #[arg(long, short = 'l')]
    pub label: Vec<String>,
    /// Flows from endpoints of this cluster (label io.cilium.k8s.policy.cluster).
    #[arg(long)]
    pub from_cluster: Vec<String>,
    #[arg(long)]
    pub to_cluster: Vec<String>,
    /// Source IP address or CIDR.
    #[arg(long)]
    pub from_ip: Vec<String>,
    #[arg(long)]
    pub to_ip: Vec<String>,
    /// Source or destination IP address or CIDR.
    #[arg(long)]
    pub ip: Vec<String>,
    /// Flows from this service: `[namespace/]name` prefix.
    #[arg(long)]
    pub from_service: Vec<String>,
    #[arg(long)]
    pub to_service: Vec<String>,
    /// Flows from or to this service.
    #[arg(long)]
    pub service: Vec<String>,
    /// Source or destination port.
    #[arg(long)]
    pub port: Vec<String>,
    #[arg(long)]
    pub from_port: Vec<String>,
    #[arg(long)]
    pub to_port: Vec<String>,
    /// tcp, udp, ...
    #[arg(long)]
    pub protocol: Vec<String>,
    /// FORWARDED, DROPPED, ...
    #[arg(long)]
    pub verdict: Vec<String>,
    /// Event type: trace, drop, policy-verdict, trace-sock.
    #[arg(long = "type", short = 't')]
    pub event_type: Vec<String>,
    /// Node name: `cluster/node`, `node` or `cluster/` (`*` wildcards).
    #[arg(long)]
    pub node_name: Vec<String>,
    /// ingress or egress.
    #[arg(long)]
    pub traffic_direction: Vec<String>,

    /// Also every connected cluster's own flows (through their relays).
    #[arg(long)]
    pub all_clusters: bool,

    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: ObserveFormat,
}

fn pod_pattern(s: &str) -> String {
    if s.contains('/') {
        s.to_owned()
    } else {
        format!("default/{s}")
    }
}

fn namespace_pattern(s: &str) -> String {
    format!("{}/", s.trim_end_matches('/'))
}

/// The verdict names Hubble accepts.
fn verdict(s: &str) -> anyhow::Result<i32> {
    Verdict::from_str_name(&s.to_ascii_uppercase())
        .map(|v| v as i32)
        .with_context(|| {
            format!("--verdict {s:?}: expected FORWARDED, DROPPED, ERROR, AUDIT, REDIRECTED, TRACED or TRANSLATED")
        })
}

fn direction(s: &str) -> anyhow::Result<i32> {
    match s.to_ascii_lowercase().as_str() {
        "ingress" => Ok(TrafficDirection::Ingress as i32),
        "egress" => Ok(TrafficDirection::Egress as i32),
        _ => bail!("--traffic-direction {s:?}: expected ingress or egress"),
    }
}

/// A time as Hubble's flags take it: RFC 3339, or a duration before `now`.
pub fn parse_time(flag: &str, s: &str, now: SystemTime) -> anyhow::Result<prost_types::Timestamp> {
    let t = if let Ok(d) = parse_duration(s) {
        now.checked_sub(d)
            .with_context(|| format!("{flag} {s:?}: before the epoch"))?
    } else {
        json::parse_rfc3339(s).with_context(|| {
            format!(
                "{flag} {s:?}: expected an RFC 3339 time (2026-12-05T07:00:00Z) or a duration (5m)"
            )
        })?
    };
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Ok(prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    })
}

impl ObserveArgs {
    /// The request these flags describe.
    pub fn request(&self, now: SystemTime) -> anyhow::Result<GetFlowsRequest> {
        let mut base = FlowFilter {
            source_pod: self.from_pod.iter().map(|p| pod_pattern(p)).collect(),
            destination_pod: self.to_pod.iter().map(|p| pod_pattern(p)).collect(),
            source_ip: self.from_ip.clone(),
            destination_ip: self.to_ip.clone(),
            source_service: self.from_service.clone(),
            destination_service: self.to_service.clone(),
            source_port: self.from_port.clone(),
            destination_port: self.to_port.clone(),
            protocol: self.protocol.clone(),
            node_name: self.node_name.clone(),
            ..Default::default()
        };
        base.source_pod
            .extend(self.from_namespace.iter().map(|n| namespace_pattern(n)));
        base.destination_pod
            .extend(self.to_namespace.iter().map(|n| namespace_pattern(n)));
        base.source_label = self.from_label.clone();
        base.source_label.extend(
            self.from_cluster
                .iter()
                .map(|c| format!("{CLUSTER_LABEL}={c}")),
        );
        base.destination_label = self.to_label.clone();
        base.destination_label.extend(
            self.to_cluster
                .iter()
                .map(|c| format!("{CLUSTER_LABEL}={c}")),
        );
        base.verdict = self
            .verdict
            .iter()
            .map(|v| verdict(v))
            .collect::<anyhow::Result<_>>()?;
        base.traffic_direction = self
            .traffic_direction
            .iter()
            .map(|d| direction(d))
            .collect::<anyhow::Result<_>>()?;
        base.event_type = self
            .event_type
            .iter()
            .map(|t| {
                event_type::by_name(t)
                    .map(|ty| EventTypeFilter {
                        r#type: ty,
                        match_sub_type: false,
                        sub_type: 0,
                    })
                    .with_context(|| {
                        format!("--type {t:?}: expected trace, drop, policy-verdict or trace-sock")
                    })
            })
            .collect::<anyhow::Result<_>>()?;

        // Either-side flags: one filter per side.
        let pods: Vec<String> = self
            .pod
            .iter()
            .map(|p| pod_pattern(p))
            .chain(self.namespace.iter().map(|n| namespace_pattern(n)))
            .collect();
        let either = !(pods.is_empty()
            && self.label.is_empty()
            && self.ip.is_empty()
            && self.port.is_empty()
            && self.service.is_empty());
        let whitelist = if either {
            let mut src = base.clone();
            src.source_pod.extend(pods.iter().cloned());
            src.source_label.extend(self.label.iter().cloned());
            src.source_ip.extend(self.ip.iter().cloned());
            src.source_port.extend(self.port.iter().cloned());
            src.source_service.extend(self.service.iter().cloned());
            let mut dst = base;
            dst.destination_pod.extend(pods);
            dst.destination_label.extend(self.label.iter().cloned());
            dst.destination_ip.extend(self.ip.iter().cloned());
            dst.destination_port.extend(self.port.iter().cloned());
            dst.destination_service.extend(self.service.iter().cloned());
            vec![src, dst]
        } else if base == FlowFilter::default() {
            vec![]
        } else {
            vec![base]
        };
        // Checked here too, so a typo is reported before anything is dialed.
        mesh_proto::flows::FlowFilters::new(&whitelist, &[])
            .map_err(|e| anyhow::anyhow!("invalid filter flag: {e}"))?;

        let since = self
            .since
            .as_deref()
            .map(|s| parse_time("--since", s, now))
            .transpose()?;
        let until = self
            .until
            .as_deref()
            .map(|s| parse_time("--until", s, now))
            .transpose()?;
        let (number, first) = match (self.first, self.last) {
            (Some(n), _) => (n, true),
            (None, Some(n)) => (n, false),
            // Hubble's default: the last 20, unless following or reading a time range.
            (None, None) if !self.follow && since.is_none() => (20, false),
            (None, None) => (0, false),
        };
        Ok(GetFlowsRequest {
            number,
            first,
            follow: self.follow,
            blacklist: vec![],
            whitelist,
            since,
            until,
        })
    }
}

pub async fn run(args: ObserveArgs) -> anyhow::Result<()> {
    let req = args.request(SystemTime::now())?;
    let ep = args.conn.endpoint()?;
    let channel = connect_channel(&ep)
        .await
        .with_context(|| format!("connecting to mesh-apiserver {}", args.conn.server))?;
    let mut client = ObserverClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let mut request = tonic::Request::new(req);
    if args.all_clusters {
        request
            .metadata_mut()
            .insert(SCOPE_HEADER, "all-clusters".parse().expect("ascii"));
    }
    let mut stream = client
        .get_flows(request)
        .await
        .map_err(|s| anyhow::anyhow!("GetFlows: {}: {}", s.code(), s.message()))?
        .into_inner();
    let mut out = std::io::stdout().lock();
    let mut rows = Vec::new();
    let streaming_table = args.follow && args.output == ObserveFormat::Table;
    if streaming_table {
        writeln!(out, "{}", table_line(&TABLE_HEADER.map(String::from)))?;
    }
    while let Some(resp) = stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("GetFlows stream: {}: {}", s.code(), s.message()))?
    {
        match args.output {
            ObserveFormat::Json | ObserveFormat::Jsonpb => {
                writeln!(out, "{}", json::response(&resp))?;
            }
            ObserveFormat::Compact | ObserveFormat::Table => match &resp.response_types {
                Some(ResponseTypes::Flow(f)) => {
                    if args.output == ObserveFormat::Compact {
                        writeln!(out, "{}", compact(f))?;
                    } else if streaming_table {
                        writeln!(out, "{}", table_line(&row(f)))?;
                    } else {
                        rows.push(row(f));
                    }
                }
                Some(ResponseTypes::NodeStatus(s)) => {
                    let state =
                        NodeState::try_from(s.state_change).map_or("UNKNOWN", |s| s.as_str_name());
                    eprintln!("{state}: {} ({})", s.node_names.join(", "), s.message);
                }
                Some(ResponseTypes::LostEvents(l)) => {
                    eprintln!("lost {} events ({})", l.num_events_lost, l.source);
                }
                None => {}
            },
        }
        if args.follow {
            out.flush()?;
        }
    }
    if args.output == ObserveFormat::Table && !streaming_table {
        let header = TABLE_HEADER.to_vec();
        write!(out, "{}", crate::output::table(&header, &rows))?;
    }
    Ok(())
}

const TABLE_HEADER: [&str; 6] = [
    "TIMESTAMP",
    "SOURCE",
    "DESTINATION",
    "TYPE",
    "VERDICT",
    "SUMMARY",
];

/// Fixed-width columns for follow mode (widths cannot wait for the end of the stream).
fn table_line(cells: &[String]) -> String {
    let widths = [19, 40, 40, 20, 10];
    let mut s = String::new();
    for (i, c) in cells.iter().enumerate() {
        s.push_str(c);
        if let Some(w) = widths.get(i) {
            let pad = (w + 3usize).saturating_sub(c.chars().count()).max(1);
            s.extend(std::iter::repeat_n(' ', pad));
        }
    }
    s.trim_end().to_owned()
}

/// `cluster/ns/pod:port`, or the IP when the endpoint is not a pod.
fn endpoint_name(ep: Option<&Endpoint>, ip: &str, port: Option<u16>) -> String {
    let base = match ep {
        Some(e) if !e.pod_name.is_empty() => {
            if e.cluster_name.is_empty() {
                format!("{}/{}", e.namespace, e.pod_name)
            } else {
                format!("{}/{}/{}", e.cluster_name, e.namespace, e.pod_name)
            }
        }
        _ => ip.to_owned(),
    };
    match port {
        Some(p) if p != 0 => format!("{base}:{p}"),
        _ => base,
    }
}

fn source_and_destination(f: &Flow) -> (String, String) {
    let (sp, dp) = ports_of(f);
    let ip = f.ip.as_ref();
    (
        endpoint_name(f.source.as_ref(), ip.map_or("", |i| &i.source), sp),
        endpoint_name(
            f.destination.as_ref(),
            ip.map_or("", |i| &i.destination),
            dp,
        ),
    )
}

fn type_of(f: &Flow) -> String {
    let t = f
        .event_type
        .as_ref()
        .map_or("unknown", |e| event_type::name(e.r#type));
    match TrafficDirection::try_from(f.traffic_direction) {
        Ok(TrafficDirection::Ingress) => format!("{t} ingress"),
        Ok(TrafficDirection::Egress) => format!("{t} egress"),
        _ => t.to_owned(),
    }
}

fn verdict_of(f: &Flow) -> &'static str {
    Verdict::try_from(f.verdict).map_or("UNKNOWN", |v| v.as_str_name())
}

fn policies(ps: &[mesh_proto::hubble::flow::Policy]) -> String {
    ps.iter()
        .map(|p| {
            if p.namespace.is_empty() {
                format!("{} {}", p.kind, p.name)
            } else {
                format!("{} {}/{}", p.kind, p.namespace, p.name)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a reader wants next to the verdict: the drop reason, then the server's summary
/// when it wrote one (mesh's agents and relay do: flags, service, backend, rules), else
/// protocol, service and the rules from the flow's fields.
pub fn summary(f: &Flow) -> String {
    let reason = (f.verdict == Verdict::Dropped as i32).then(|| {
        DropReason::try_from(f.drop_reason_desc)
            .map_or("UNKNOWN", |r| r.as_str_name())
            .to_owned()
    });
    if !f.summary.is_empty() {
        return reason
            .into_iter()
            .chain([f.summary.clone()])
            .collect::<Vec<_>>()
            .join("; ");
    }
    let mut parts = Vec::new();
    if let Some(p) = protocol_of(f) {
        parts.push(p.to_ascii_uppercase());
    }
    if let Some(s) = &f.destination_service {
        parts.push(format!("service {}/{}", s.namespace, s.name));
    }
    parts.extend(reason);
    for (what, ps) in [
        ("egress denied by", &f.egress_denied_by),
        ("ingress denied by", &f.ingress_denied_by),
        ("egress allowed by", &f.egress_allowed_by),
        ("ingress allowed by", &f.ingress_allowed_by),
    ] {
        if !ps.is_empty() {
            parts.push(format!("{what} {}", policies(ps)));
        }
    }
    parts.join("; ")
}

fn row(f: &Flow) -> Vec<String> {
    let (src, dst) = source_and_destination(f);
    vec![
        json::table_time(f.time.as_ref()),
        src,
        dst,
        type_of(f),
        verdict_of(f).to_owned(),
        summary(f),
    ]
}

/// `hubble observe`'s compact line.
fn compact(f: &Flow) -> String {
    let (src, dst) = source_and_destination(f);
    format!(
        "{} [{}]: {src} -> {dst} {} {} ({})",
        json::table_time(f.time.as_ref()),
        f.node_name,
        type_of(f),
        verdict_of(f),
        summary(f)
    )
}

#[cfg(test)]
mod tests;

//! Flows in protobuf's JSON mapping with the .proto field names (what `hubble observe -o
//! json` prints): enums by name, 64-bit integers as strings, timestamps in RFC 3339 with
//! `Z`, wrapper types as plain values, fields at their default value left out. Written for
//! the fields of Hubble's Flow that mesh fills (ARCHITECTURE.md, "Flows").

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_proto::hubble::flow::{
    DropReason, Endpoint, Flow, IpVersion, Layer4, LostEventSource, Policy, SocketTranslationPoint,
    TraceObservationPoint, TrafficDirection, Verdict, layer4,
};
use mesh_proto::hubble::observer::GetFlowsResponse;
use mesh_proto::hubble::observer::get_flows_response::ResponseTypes;
use mesh_proto::hubble::relay::NodeState;
use serde_json::{Map, Value, json};

#[derive(Default)]
struct Obj(Map<String, Value>);

impl Obj {
    fn str(mut self, k: &str, v: &str) -> Self {
        if !v.is_empty() {
            self.0.insert(k.into(), json!(v));
        }
        self
    }
    fn u32(mut self, k: &str, v: u32) -> Self {
        if v != 0 {
            self.0.insert(k.into(), json!(v));
        }
        self
    }
    fn i32(mut self, k: &str, v: i32) -> Self {
        if v != 0 {
            self.0.insert(k.into(), json!(v));
        }
        self
    }
    /// 64-bit integers are strings in protobuf's JSON mapping.
    fn u64(mut self, k: &str, v: u64) -> Self {
        if v != 0 {
            self.0.insert(k.into(), json!(v.to_string()));
        }
        self
    }
    fn bool(mut self, k: &str, v: bool) -> Self {
        if v {
            self.0.insert(k.into(), json!(true));
        }
        self
    }
    /// An enum by name; the zero value is left out.
    fn enum_(mut self, k: &str, v: i32, name: Option<&str>) -> Self {
        if v != 0 {
            self.0
                .insert(k.into(), name.map_or_else(|| json!(v), |n| json!(n)));
        }
        self
    }
    fn val(mut self, k: &str, v: Option<Value>) -> Self {
        if let Some(v) = v {
            self.0.insert(k.into(), v);
        }
        self
    }
    fn strs(mut self, k: &str, v: &[String]) -> Self {
        if !v.is_empty() {
            self.0.insert(k.into(), json!(v));
        }
        self
    }
    fn done(self) -> Value {
        Value::Object(self.0)
    }
}

/// RFC 3339 with `Z` and 0, 3, 6 or 9 fractional digits, as protobuf's JSON mapping.
pub fn timestamp(t: &prost_types::Timestamp) -> String {
    let secs = t.seconds;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let frac = match t.nanos {
        0 => String::new(),
        n if n % 1_000_000 == 0 => format!(".{:03}", n / 1_000_000),
        n if n % 1_000 == 0 => format!(".{:06}", n / 1_000),
        n => format!(".{n:09}"),
    };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}{frac}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's method).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<u32>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[13] != b':' || b[16] != b':' || !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    if h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos = 0u32;
    if let Some(r) = rest.strip_prefix('.') {
        let digits = r.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 9 {
            return None;
        }
        nanos = r[..digits].parse::<u32>().ok()? * 10u32.pow(9 - digits as u32);
        rest = &r[digits..];
    }
    let offset: i64 = match rest {
        "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) && &o[3..4] == ":" => {
            let oh = o[1..3].parse::<i64>().ok()?;
            let om = o[4..6].parse::<i64>().ok()?;
            let v = oh * 3600 + om * 60;
            if o.starts_with('-') { -v } else { v }
        }
        _ => return None,
    };
    let secs = days_from_civil(i64::from(y), mo, d) * 86_400
        + i64::from(h) * 3600
        + i64::from(mi) * 60
        + i64::from(se)
        - offset;
    let secs = u64::try_from(secs).ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// `Dec  5 07:13:49.123`, as Hubble's tables (UTC).
pub fn table_time(t: Option<&prost_types::Timestamp>) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let Some(t) = t else {
        return "-".into();
    };
    let (_, m, d) = civil_from_days(t.seconds.div_euclid(86_400));
    let rem = t.seconds.rem_euclid(86_400);
    format!(
        "{} {d:>2} {:02}:{:02}:{:02}.{:03}",
        MONTHS[(m - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        t.nanos / 1_000_000
    )
}

fn endpoint(e: &Endpoint) -> Value {
    Obj::default()
        .u32("ID", e.id)
        .u32("identity", e.identity)
        .str("cluster_name", &e.cluster_name)
        .str("namespace", &e.namespace)
        .strs("labels", &e.labels)
        .str("pod_name", &e.pod_name)
        .done()
}

fn l4(l: &Layer4) -> Value {
    let ports = |sp: u32, dp: u32| {
        Obj::default()
            .u32("source_port", sp)
            .u32("destination_port", dp)
    };
    match &l.protocol {
        Some(layer4::Protocol::Tcp(t)) => {
            let flags = t.flags.as_ref().map(|f| {
                Obj::default()
                    .bool("FIN", f.fin)
                    .bool("SYN", f.syn)
                    .bool("RST", f.rst)
                    .bool("PSH", f.psh)
                    .bool("ACK", f.ack)
                    .bool("URG", f.urg)
                    .bool("ECE", f.ece)
                    .bool("CWR", f.cwr)
                    .bool("NS", f.ns)
                    .done()
            });
            json!({"TCP": ports(t.source_port, t.destination_port).val("flags", flags).done()})
        }
        Some(layer4::Protocol::Udp(u)) => {
            json!({"UDP": ports(u.source_port, u.destination_port).done()})
        }
        Some(layer4::Protocol::Sctp(s)) => {
            json!({"SCTP": ports(s.source_port, s.destination_port).done()})
        }
        Some(layer4::Protocol::IcmPv4(i)) => {
            json!({"ICMPv4": Obj::default().u32("type", i.r#type).u32("code", i.code).done()})
        }
        Some(layer4::Protocol::IcmPv6(i)) => {
            json!({"ICMPv6": Obj::default().u32("type", i.r#type).u32("code", i.code).done()})
        }
        None => json!({}),
    }
}

fn policies(ps: &[Policy]) -> Option<Value> {
    (!ps.is_empty()).then(|| {
        Value::Array(
            ps.iter()
                .map(|p| {
                    Obj::default()
                        .str("name", &p.name)
                        .str("namespace", &p.namespace)
                        .strs("labels", &p.labels)
                        .u64("revision", p.revision)
                        .str("kind", &p.kind)
                        .done()
                })
                .collect(),
        )
    })
}

/// A Flow in protobuf's JSON mapping.
pub fn flow(f: &Flow) -> Value {
    let service = |s: &Option<mesh_proto::hubble::flow::Service>| {
        s.as_ref().map(|s| {
            Obj::default()
                .str("name", &s.name)
                .str("namespace", &s.namespace)
                .done()
        })
    };
    Obj::default()
        .val("time", f.time.as_ref().map(|t| json!(timestamp(t))))
        .str("uuid", &f.uuid)
        .enum_(
            "verdict",
            f.verdict,
            Verdict::try_from(f.verdict).ok().map(|v| v.as_str_name()),
        )
        .u32("drop_reason", f.drop_reason)
        .val(
            "ethernet",
            f.ethernet.as_ref().map(|e| {
                Obj::default()
                    .str("source", &e.source)
                    .str("destination", &e.destination)
                    .done()
            }),
        )
        .val(
            "IP",
            f.ip.as_ref().map(|i| {
                Obj::default()
                    .str("source", &i.source)
                    .str("destination", &i.destination)
                    .enum_(
                        "ipVersion",
                        i.ip_version,
                        IpVersion::try_from(i.ip_version)
                            .ok()
                            .map(|v| v.as_str_name()),
                    )
                    .bool("encrypted", i.encrypted)
                    .done()
            }),
        )
        .val("l4", f.l4.as_ref().map(l4))
        .val("source", f.source.as_ref().map(endpoint))
        .val("destination", f.destination.as_ref().map(endpoint))
        .enum_(
            "Type",
            f.r#type,
            mesh_proto::hubble::flow::FlowType::try_from(f.r#type)
                .ok()
                .map(|v| v.as_str_name()),
        )
        .str("node_name", &f.node_name)
        .strs("node_labels", &f.node_labels)
        .strs("source_names", &f.source_names)
        .strs("destination_names", &f.destination_names)
        .bool("reply", f.reply)
        .val(
            "event_type",
            f.event_type.as_ref().map(|e| {
                Obj::default()
                    .i32("type", e.r#type)
                    .i32("sub_type", e.sub_type)
                    .done()
            }),
        )
        .val("source_service", service(&f.source_service))
        .val("destination_service", service(&f.destination_service))
        .enum_(
            "traffic_direction",
            f.traffic_direction,
            TrafficDirection::try_from(f.traffic_direction)
                .ok()
                .map(|v| v.as_str_name()),
        )
        .u32("policy_match_type", f.policy_match_type)
        .enum_(
            "trace_observation_point",
            f.trace_observation_point,
            TraceObservationPoint::try_from(f.trace_observation_point)
                .ok()
                .map(|v| v.as_str_name()),
        )
        .enum_(
            "drop_reason_desc",
            f.drop_reason_desc,
            DropReason::try_from(f.drop_reason_desc)
                .ok()
                .map(|v| v.as_str_name()),
        )
        .val("is_reply", f.is_reply.map(|b| json!(b)))
        .u32("proxy_port", f.proxy_port)
        .enum_(
            "sock_xlate_point",
            f.sock_xlate_point,
            SocketTranslationPoint::try_from(f.sock_xlate_point)
                .ok()
                .map(|v| v.as_str_name()),
        )
        .u64("socket_cookie", f.socket_cookie)
        .u64("cgroup_id", f.cgroup_id)
        .val("egress_allowed_by", policies(&f.egress_allowed_by))
        .val("ingress_allowed_by", policies(&f.ingress_allowed_by))
        .val("egress_denied_by", policies(&f.egress_denied_by))
        .val("ingress_denied_by", policies(&f.ingress_denied_by))
        .str("Summary", &f.summary)
        .done()
}

/// One GetFlowsResponse: `{"flow":{...},"node_name":"...","time":"..."}`.
pub fn response(r: &GetFlowsResponse) -> Value {
    let mut o = Obj::default();
    o = match &r.response_types {
        Some(ResponseTypes::Flow(f)) => o.val("flow", Some(flow(f))),
        Some(ResponseTypes::NodeStatus(s)) => o.val(
            "node_status",
            Some(
                Obj::default()
                    .enum_(
                        "state_change",
                        s.state_change,
                        NodeState::try_from(s.state_change)
                            .ok()
                            .map(|v| v.as_str_name()),
                    )
                    .strs("node_names", &s.node_names)
                    .str("message", &s.message)
                    .done(),
            ),
        ),
        Some(ResponseTypes::LostEvents(l)) => o.val(
            "lost_events",
            Some(
                Obj::default()
                    .enum_(
                        "source",
                        l.source,
                        LostEventSource::try_from(l.source)
                            .ok()
                            .map(|v| v.as_str_name()),
                    )
                    .u64("num_events_lost", l.num_events_lost)
                    .val("cpu", l.cpu.map(|c| json!(c)))
                    .done(),
            ),
        ),
        None => o,
    };
    o.str("node_name", &r.node_name)
        .val("time", r.time.as_ref().map(|t| json!(timestamp(t))))
        .done()
}

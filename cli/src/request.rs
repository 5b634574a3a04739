//! Turns `lumen observe` flags into a GetFlowsRequest, the way Hubble does.
//!
//! Filter flags are applied in command-line order to a whitelist or (after
//! `--not`) a blacklist tracker. A tracker holds two FlowFilters, `left` and
//! `right`, OR'ed by the server: `--from-X`/`--to-X` and direction-less flags
//! set both, while "either side" flags (`--ip`, `--pod`, `--namespace`,
//! `--label`, `--port`, `--identity`) set the source field on the left and
//! the destination field on the right. Equal left and right collapse to one
//! filter.

use chrono::{DateTime, Utc};
use lumen_proto::event_type;
use lumen_proto::flow::{
    EventTypeFilter, FlowFilter, IpVersion, TcpFlags, TrafficDirection, Verdict,
};
use lumen_proto::observer::GetFlowsRequest;

use crate::args::ObserveArgs;
use crate::time::parse_time;

/// Flows printed when no count, range or follow is asked for (Hubble's default).
pub const DEFAULT_LAST: u64 = 20;

/// One filter flag occurrence, in command-line order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterFlag {
    /// clap id of the flag (see [`crate::args::FILTER_FLAGS`]).
    pub id: &'static str,
    /// Its value ("" for boolean flags).
    pub value: String,
    /// Preceded by `--not`.
    pub negated: bool,
}

/// A flag value that cannot become a filter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value {value:?} for --{flag}: {reason}")]
pub struct RequestError {
    pub flag: String,
    pub value: String,
    pub reason: String,
}

fn err(id: &str, value: &str, reason: impl Into<String>) -> RequestError {
    RequestError {
        flag: id.replace('_', "-").replace("event-type", "type"),
        value: value.to_owned(),
        reason: reason.into(),
    }
}

#[derive(Debug, Default)]
struct Tracker {
    left: Option<FlowFilter>,
    right: Option<FlowFilter>,
}

impl Tracker {
    fn both(&mut self, update: impl Fn(&mut FlowFilter)) {
        update(self.left.get_or_insert_with(FlowFilter::default));
        update(self.right.get_or_insert_with(FlowFilter::default));
    }

    fn split(&mut self, left: impl FnOnce(&mut FlowFilter), right: impl FnOnce(&mut FlowFilter)) {
        left(self.left.get_or_insert_with(FlowFilter::default));
        right(self.right.get_or_insert_with(FlowFilter::default));
    }

    fn into_filters(self) -> Vec<FlowFilter> {
        match (self.left, self.right) {
            (Some(l), Some(r)) if l == r => vec![l],
            (l, r) => l.into_iter().chain(r).collect(),
        }
    }
}

fn parse_verdict(v: &str) -> Result<i32, RequestError> {
    Verdict::from_str_name(&v.to_ascii_uppercase())
        .filter(|v| *v != Verdict::Unknown)
        .map(|v| v as i32)
        .ok_or_else(|| {
            err(
                "verdict",
                v,
                "expected FORWARDED, DROPPED, AUDIT, ERROR, REDIRECTED, TRACED or TRANSLATED",
            )
        })
}

fn parse_tcp_flags(v: &str) -> Result<TcpFlags, RequestError> {
    let mut flags = TcpFlags::default();
    for name in v.split(',').map(str::trim) {
        let slot = match name.to_ascii_uppercase().as_str() {
            "SYN" => &mut flags.syn,
            "FIN" => &mut flags.fin,
            "RST" => &mut flags.rst,
            "PSH" => &mut flags.psh,
            "ACK" => &mut flags.ack,
            "URG" => &mut flags.urg,
            "ECE" => &mut flags.ece,
            "CWR" => &mut flags.cwr,
            "NS" => &mut flags.ns,
            _ => return Err(err("tcp_flags", v, format!("unknown TCP flag {name:?}"))),
        };
        *slot = true;
    }
    Ok(flags)
}

fn parse_direction(v: &str) -> Result<i32, RequestError> {
    match v.to_ascii_lowercase().as_str() {
        "ingress" => Ok(TrafficDirection::Ingress as i32),
        "egress" => Ok(TrafficDirection::Egress as i32),
        _ => Err(err("traffic_direction", v, "expected ingress or egress")),
    }
}

fn parse_event_type(v: &str) -> Result<EventTypeFilter, RequestError> {
    let (ty, sub) = match v.split_once(':') {
        Some((t, s)) => (t, Some(s)),
        None => (v, None),
    };
    let r#type = event_type::from_name(ty)
        .or_else(|| ty.parse::<i32>().ok())
        .ok_or_else(|| err("event_type", v, "unknown event type"))?;
    let sub_type = match sub {
        None => None,
        Some(s) => Some(
            event_type::TRACE_SUB_TYPES
                .iter()
                .filter(|_| r#type == event_type::TRACE)
                .find(|(n, _)| n.eq_ignore_ascii_case(s))
                .map(|(_, v)| *v)
                .or_else(|| s.parse::<i32>().ok())
                .ok_or_else(|| err("event_type", v, "unknown event sub type"))?,
        ),
    };
    Ok(EventTypeFilter {
        r#type,
        match_sub_type: sub_type.is_some(),
        sub_type: sub_type.unwrap_or(0),
    })
}

fn with_namespace(pod: &str, namespace: Option<&String>) -> String {
    if pod.contains('/') {
        pod.to_owned()
    } else {
        format!("{}/{pod}", namespace.map_or("default", String::as_str))
    }
}

/// Applies the filter flags in order to a whitelist and a blacklist.
pub fn build_filters(
    flags: &[FilterFlag],
) -> Result<(Vec<FlowFilter>, Vec<FlowFilter>), RequestError> {
    let values = |id: &str| -> Vec<&String> {
        flags
            .iter()
            .filter(|f| f.id == id)
            .map(|f| &f.value)
            .collect()
    };
    let has = |ids: &[&str]| flags.iter().any(|f| ids.contains(&f.id));
    // A pod without a namespace takes the namespace flag of its side, else "default";
    // a namespace flag consumed that way is not a filter of its own.
    let (from_ns, to_ns, either_ns) = (
        values("from_namespace"),
        values("to_namespace"),
        values("namespace"),
    );
    let from_pod_ns = from_ns.first().or(either_ns.first()).copied();
    let to_pod_ns = to_ns.first().or(either_ns.first()).copied();
    let pods_from = has(&["from_pod", "pod"]);
    let pods_to = has(&["to_pod", "pod"]);

    let mut white = Tracker::default();
    let mut black = Tracker::default();
    for flag in flags {
        let t = if flag.negated { &mut black } else { &mut white };
        let v = flag.value.clone();
        match flag.id {
            "verdict" => {
                let verdict = parse_verdict(&v)?;
                t.both(|f| f.verdict.push(verdict));
            }
            "from_ip" => t.both(|f| f.source_ip.push(v.clone())),
            "to_ip" => t.both(|f| f.destination_ip.push(v.clone())),
            "ip" => t.split(
                |f| f.source_ip.push(v.clone()),
                |f| f.destination_ip.push(v.clone()),
            ),
            "from_pod" => {
                let p = with_namespace(&v, from_pod_ns);
                t.both(|f| f.source_pod.push(p.clone()));
            }
            "to_pod" => {
                let p = with_namespace(&v, to_pod_ns);
                t.both(|f| f.destination_pod.push(p.clone()));
            }
            "pod" => {
                let (s, d) = (
                    with_namespace(&v, from_pod_ns),
                    with_namespace(&v, to_pod_ns),
                );
                t.split(|f| f.source_pod.push(s), |f| f.destination_pod.push(d));
            }
            "from_namespace" if !pods_from => t.both(|f| f.source_pod.push(format!("{v}/"))),
            "to_namespace" if !pods_to => t.both(|f| f.destination_pod.push(format!("{v}/"))),
            "namespace" if !(pods_from || pods_to) => t.split(
                |f| f.source_pod.push(format!("{v}/")),
                |f| f.destination_pod.push(format!("{v}/")),
            ),
            "from_namespace" | "to_namespace" | "namespace" => {}
            "from_label" => t.both(|f| f.source_label.push(v.clone())),
            "to_label" => t.both(|f| f.destination_label.push(v.clone())),
            "label" => t.split(
                |f| f.source_label.push(v.clone()),
                |f| f.destination_label.push(v.clone()),
            ),
            "from_port" | "to_port" | "port" => {
                v.parse::<u16>()
                    .map_err(|_| err(flag.id, &v, "not a port number (0-65535)"))?;
                match flag.id {
                    "from_port" => t.both(|f| f.source_port.push(v.clone())),
                    "to_port" => t.both(|f| f.destination_port.push(v.clone())),
                    _ => t.split(
                        |f| f.source_port.push(v.clone()),
                        |f| f.destination_port.push(v.clone()),
                    ),
                }
            }
            "protocol" => t.both(|f| f.protocol.push(v.to_ascii_lowercase())),
            "tcp_flags" => {
                let flags = parse_tcp_flags(&v)?;
                t.both(|f| f.tcp_flags.push(flags));
            }
            "traffic_direction" => {
                let d = parse_direction(&v)?;
                t.both(|f| f.traffic_direction.push(d));
            }
            "node_name" => t.both(|f| f.node_name.push(v.clone())),
            "identity" | "from_identity" | "to_identity" => {
                let id: u32 = v
                    .parse()
                    .map_err(|_| err(flag.id, &v, "not a numeric identity"))?;
                match flag.id {
                    "from_identity" => t.both(|f| f.source_identity.push(id)),
                    "to_identity" => t.both(|f| f.destination_identity.push(id)),
                    _ => t.split(
                        |f| f.source_identity.push(id),
                        |f| f.destination_identity.push(id),
                    ),
                }
            }
            "event_type" => {
                let et = parse_event_type(&v)?;
                t.both(|f| f.event_type.push(et));
            }
            "ipv4" => t.both(|f| f.ip_version.push(IpVersion::IPv4 as i32)),
            "ipv6" => t.both(|f| f.ip_version.push(IpVersion::IPv6 as i32)),
            other => return Err(err(other, &v, "not a filter flag")),
        }
    }
    Ok((white.into_filters(), black.into_filters()))
}

/// Builds the request for `lumen observe`; `now` anchors relative times.
pub fn build_request(
    args: &ObserveArgs,
    flags: &[FilterFlag],
    now: DateTime<Utc>,
) -> Result<GetFlowsRequest, RequestError> {
    let (whitelist, blacklist) = build_filters(flags)?;
    let since = args
        .since
        .as_deref()
        .map(|s| parse_time(s, now).map_err(|e| err("since", s, e)))
        .transpose()?;
    let until = args
        .until
        .as_deref()
        .map(|s| parse_time(s, now).map_err(|e| err("until", s, e)))
        .transpose()?;
    let (number, first) = if args.all {
        (u64::MAX, false)
    } else if let Some(n) = args.first {
        (n, true)
    } else if let Some(n) = args.last {
        (n, false)
    } else if args.follow || since.is_some() || until.is_some() {
        (0, false)
    } else {
        (DEFAULT_LAST, false)
    };
    let field_mask = (!args.field_mask.is_empty()).then(|| prost_types::FieldMask {
        paths: args.field_mask.clone(),
    });
    Ok(GetFlowsRequest {
        number,
        first,
        follow: args.follow,
        whitelist,
        blacklist,
        since,
        until,
        field_mask,
        experimental: None,
    })
}

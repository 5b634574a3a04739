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
use lumen_proto::filter::{FilterError, FlowFilters};
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

/// Flags that cannot become a request: caught before connecting, and reported with
/// the user's flag names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A flag value that cannot become a filter or a time.
    #[error("invalid value {value:?} for --{flag}: {reason}")]
    Value {
        flag: String,
        value: String,
        reason: String,
    },
    /// An empty time range (the server would refuse it).
    #[error("--since {since} is after --until {until}")]
    TimeRange { since: String, until: String },
    /// A filter the filter compiler refuses that no flag can be blamed for.
    #[error("invalid filter: {0}")]
    Filter(#[source] FilterError),
}

fn err(id: &str, value: &str, reason: impl Into<String>) -> RequestError {
    RequestError::Value {
        flag: flag_name(id),
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// The command-line name of a clap id (`from_ip` -> `from-ip`, `event_type` -> `type`).
fn flag_name(id: &str) -> String {
    id.replace('_', "-").replace("event-type", "type")
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
    let (white, black) = (white.into_filters(), black.into_filters());
    // What the server will compile, compiled here first: a bad CIDR, label selector,
    // protocol or node pattern is reported by flag, before connecting.
    FlowFilters::compile(&white, &black).map_err(|e| filter_error(flags, e))?;
    Ok((white, black))
}

/// The flags that fill a FlowFilter field.
fn flags_of_field(field: &str) -> &'static [&'static str] {
    match field {
        "source_ip" => &["from_ip", "ip"],
        "destination_ip" => &["to_ip", "ip"],
        "source_pod" => &["from_pod", "pod", "from_namespace", "namespace"],
        "destination_pod" => &["to_pod", "pod", "to_namespace", "namespace"],
        "source_label" => &["from_label", "label"],
        "destination_label" => &["to_label", "label"],
        "source_port" => &["from_port", "port"],
        "destination_port" => &["to_port", "port"],
        "protocol" => &["protocol"],
        "node_name" => &["node_name"],
        "verdict" => &["verdict"],
        "traffic_direction" => &["traffic_direction"],
        "ip_version" => &["ipv4", "ipv6"],
        _ => &[],
    }
}

/// A filter compiler error told with the flag whose value it is: the first flag that
/// fills the field and whose value became the offending one (a pod gets its
/// namespace, a namespace a trailing '/', a protocol is lowercased).
fn filter_error(flags: &[FilterFlag], e: FilterError) -> RequestError {
    let FilterError::Invalid {
        field,
        value,
        reason,
    } = &e
    else {
        return RequestError::Filter(e);
    };
    let became = |f: &FilterFlag| {
        *value == f.value
            || value.eq_ignore_ascii_case(&f.value)
            || value.strip_suffix('/') == Some(f.value.as_str())
            || value
                .rsplit_once('/')
                .is_some_and(|(_, pod)| !f.value.contains('/') && pod == f.value)
    };
    let ids = flags_of_field(field);
    match flags.iter().find(|f| ids.contains(&f.id) && became(f)) {
        Some(f) => err(f.id, &f.value, reason.clone()),
        None => RequestError::Filter(e),
    }
}

/// A time for messages: RFC 3339, to the second unless that hides the difference.
fn rfc3339(t: &prost_types::Timestamp, fraction: bool) -> String {
    let format = if fraction {
        chrono::SecondsFormat::AutoSi
    } else {
        chrono::SecondsFormat::Secs
    };
    DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)).map_or_else(
        || format!("{}s", t.seconds),
        |d| d.to_rfc3339_opts(format, true),
    )
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
    if let (Some(s), Some(u)) = (&since, &until) {
        if (s.seconds, s.nanos) > (u.seconds, u.nanos) {
            let fraction = s.seconds == u.seconds;
            return Err(RequestError::TimeRange {
                since: rfc3339(s, fraction),
                until: rfc3339(u, fraction),
            });
        }
    }
    // As in Hubble, `--first 0` and `--last 0` are no count at all: the default
    // applies (20 flows, or none before `--follow` or a time range).
    let (number, first) = if args.all {
        (u64::MAX, false)
    } else if let Some(n) = args.first.filter(|n| *n > 0) {
        (n, true)
    } else if let Some(n) = args.last.filter(|n| *n > 0) {
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

//! Flow filters with Hubble's semantics, compiled once per request.
//!
//! Within one [`FlowFilter`] every set field must match (AND); the values of
//! one repeated field are alternatives (OR). A flow passes a request when it
//! matches any whitelist filter (or the whitelist is empty) and no blacklist
//! filter. Invalid values (a bad CIDR, selector, port or node-name pattern)
//! are a [`FilterError`] naming the field and the value, and so are Hubble
//! fields Lumen's flows cannot answer (L7, cluster names, node labels, CEL);
//! servers turn it into `INVALID_ARGUMENT`.
//!
//! ```
//! use lumen_proto::{filter::FlowFilters, flow::{FlowFilter, Verdict}};
//! let dropped = FlowFilter { verdict: vec![Verdict::Dropped as i32], ..Default::default() };
//! let filters = FlowFilters::compile(&[dropped], &[]).expect("valid filters");
//! assert!(!filters.matches(&Default::default()));
//! ```

mod glob;
mod labels;
#[cfg(test)]
mod tests;

use std::net::IpAddr;

use ipnet::IpNet;
use regex::Regex;

pub use glob::{NodeNamePattern, DEFAULT_CLUSTER};
pub use labels::{parse_label, Label, LabelSelector};

use crate::flow::{
    layer4::Protocol, Endpoint, EventTypeFilter, Flow, FlowFilter, NetworkInterface, TcpFlags,
    Verdict, Workload,
};
use crate::observer::{GetFlowsRequest, GetFlowsResponse};

/// A filter that cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// A value that does not parse.
    #[error("invalid {field} filter {value:?}: {reason}")]
    Invalid {
        /// The FlowFilter field, e.g. `source_ip`.
        field: &'static str,
        /// The offending value as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A Hubble field set that Lumen's flows cannot answer. Rejected rather
    /// than ignored: ignoring it would widen the filter to every flow (and a
    /// blacklist to none).
    #[error("FlowFilter field {field} is not supported by Lumen: {reason}")]
    Unsupported {
        /// The FlowFilter field, e.g. `node_labels`.
        field: &'static str,
        /// Why Lumen cannot answer it.
        reason: &'static str,
    },
}

impl FilterError {
    fn new(field: &'static str, value: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            value: value.into(),
            reason: reason.into(),
        }
    }

    /// The FlowFilter field at fault.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Invalid { field, .. } | Self::Unsupported { field, .. } => field,
        }
    }
}

/// Lumen reads no L7 payloads, so no flow carries an HTTP record.
const NO_L7: &str = "it does not parse L7 (HTTP) traffic, so no flow has an HTTP record to match";

/// The first Hubble field set in `f` that Lumen rejects, with why. Hubble
/// would match these against flow fields Lumen never fills, so every answer
/// would be empty (or, under a blacklist, everything) for a reason the user
/// cannot see.
fn unsupported(f: &FlowFilter) -> Option<FilterError> {
    let cel = f
        .experimental
        .as_ref()
        .is_some_and(|e| !e.cel_expression.is_empty());
    [
        // Hubble matches http_url and http_header only on flows with an HTTP
        // L7 record. Rejecting says why nothing would come; matching nothing
        // would leave `--http-url` looking like a broken query, and under
        // `--not` would silently pass everything.
        ("http_url", !f.http_url.is_empty(), NO_L7),
        ("http_header", !f.http_header.is_empty(), NO_L7),
        (
            "source_ip_xlated",
            !f.source_ip_xlated.is_empty(),
            "flows carry no post-SNAT source address",
        ),
        (
            "node_labels",
            !f.node_labels.is_empty(),
            "flows carry no node labels",
        ),
        (
            "source_cluster_name",
            !f.source_cluster_name.is_empty(),
            "endpoints carry no cluster name",
        ),
        (
            "destination_cluster_name",
            !f.destination_cluster_name.is_empty(),
            "endpoints carry no cluster name",
        ),
        (
            "ip_trace_id",
            !f.ip_trace_id.is_empty(),
            "the datapath reads no IP-option trace ids",
        ),
        (
            "experimental.cel_expression",
            cel,
            "it evaluates no CEL expressions",
        ),
    ]
    .into_iter()
    .find(|(_, set, _)| *set)
    .map(|(field, _, reason)| FilterError::Unsupported { field, reason })
}

/// Which endpoint of a flow a check looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

#[derive(Debug, Clone)]
enum IpMatch {
    Exact(IpAddr),
    Net(IpNet),
}

#[derive(Debug, Clone)]
struct PodMatch {
    namespace: Option<String>,
    pod_prefix: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
    Sctp,
    Icmp,
    Icmpv4,
    Icmpv6,
    Http,
    Dns,
    Kafka,
}

#[derive(Debug, Clone)]
enum Check {
    Uuid(Vec<String>),
    Ip(Side, Vec<IpMatch>),
    Pod(Side, Vec<PodMatch>),
    Fqdn(Side, Vec<Regex>),
    Label(Side, Vec<LabelSelector>),
    Service(Side, Vec<PodMatch>),
    Workload(Side, Vec<Workload>),
    Identity(Side, Vec<u32>),
    Port(Side, Vec<u16>),
    TrafficDirection(Vec<i32>),
    Verdict(Vec<i32>),
    EventType(Vec<EventTypeFilter>),
    HttpStatus(Vec<(String, bool)>),
    HttpMethod(Vec<String>),
    HttpPath(Vec<Regex>),
    DnsQuery(Vec<Regex>),
    Protocol(Vec<Proto>),
    Reply(Vec<bool>),
    TcpFlags(Vec<TcpFlags>),
    NodeName(Vec<NodeNamePattern>),
    IpVersion(Vec<i32>),
    TraceId(Vec<String>),
    DropReason(Vec<i32>),
    Interface(Vec<NetworkInterface>),
    Encrypted(Vec<bool>),
}

/// One compiled [`FlowFilter`].
#[derive(Debug, Clone, Default)]
pub struct CompiledFilter {
    checks: Vec<Check>,
}

/// A request's whitelist and blacklist, compiled.
#[derive(Debug, Clone, Default)]
pub struct FlowFilters {
    whitelist: Vec<CompiledFilter>,
    blacklist: Vec<CompiledFilter>,
}

impl FlowFilters {
    /// Compiles a whitelist and a blacklist.
    pub fn compile(
        whitelist: &[FlowFilter],
        blacklist: &[FlowFilter],
    ) -> Result<Self, FilterError> {
        Ok(Self {
            whitelist: whitelist
                .iter()
                .map(CompiledFilter::compile)
                .collect::<Result<_, _>>()?,
            blacklist: blacklist
                .iter()
                .map(CompiledFilter::compile)
                .collect::<Result<_, _>>()?,
        })
    }

    /// Compiles the filters of a `GetFlowsRequest`.
    pub fn from_request(req: &GetFlowsRequest) -> Result<Self, FilterError> {
        Self::compile(&req.whitelist, &req.blacklist)
    }

    /// Whether `flow` passes: matches some whitelist filter (or there is no
    /// whitelist) and no blacklist filter.
    pub fn matches(&self, flow: &Flow) -> bool {
        (self.whitelist.is_empty() || self.whitelist.iter().any(|f| f.matches(flow)))
            && !self.blacklist.iter().any(|f| f.matches(flow))
    }

    /// Whether a response passes: flows are filtered, lost-event and
    /// node-status messages always pass.
    pub fn matches_response(&self, resp: &GetFlowsResponse) -> bool {
        match &resp.response_types {
            Some(crate::observer::get_flows_response::ResponseTypes::Flow(f)) => self.matches(f),
            _ => true,
        }
    }

    /// True when every flow passes.
    pub fn is_empty(&self) -> bool {
        self.whitelist.is_empty() && self.blacklist.is_empty()
    }
}

/// Whether `flow` is a connection's policy verdict, which Hubble users select with
/// `--type policy-verdict`. Lumen reports a connection's policy decision in the record of
/// its first packet (FLOW_NEW, or FLOW_DROP when that packet was dropped) rather than in a
/// separate PolicyVerdict event, so that record (a trace or drop event) is the verdict: one
/// of a connection that a policy decided (a rule named as allowing or denying it, an audit
/// verdict, or a policy drop). Every policy drop report counts, as Cilium notifies a
/// verdict for every denied packet.
pub fn is_policy_verdict(flow: &Flow) -> bool {
    use crate::flow::{DropReason, LumenEventKind, Verdict};
    let kind = flow.lumen_event_kind;
    let policy_drop = flow.verdict == Verdict::Dropped as i32
        && (flow.drop_reason_desc == DropReason::PolicyDenied as i32
            || flow.drop_reason_desc == DropReason::PolicyDeny as i32);
    if kind == LumenEventKind::FlowDrop as i32 {
        return policy_drop;
    }
    kind == LumenEventKind::FlowNew as i32
        && (policy_drop
            || flow.verdict == Verdict::Audit as i32
            || !flow.ingress_allowed_by.is_empty()
            || !flow.egress_allowed_by.is_empty()
            || !flow.ingress_denied_by.is_empty()
            || !flow.egress_denied_by.is_empty())
}

fn endpoint(flow: &Flow, side: Side) -> Option<&Endpoint> {
    match side {
        Side::Source => flow.source.as_ref(),
        Side::Destination => flow.destination.as_ref(),
    }
}

fn ip_of(flow: &Flow, side: Side) -> Option<IpAddr> {
    let ip = flow.ip.as_ref()?;
    let s = match side {
        Side::Source => &ip.source,
        Side::Destination => &ip.destination,
    };
    s.parse().ok()
}

fn ports(flow: &Flow) -> Option<(u32, u32)> {
    match flow.l4.as_ref()?.protocol.as_ref()? {
        Protocol::Tcp(t) => Some((t.source_port, t.destination_port)),
        Protocol::Udp(u) => Some((u.source_port, u.destination_port)),
        Protocol::Sctp(s) => Some((s.source_port, s.destination_port)),
        Protocol::IcmPv4(_) | Protocol::IcmPv6(_) => None,
    }
}

fn tcp_flags_contain(have: &TcpFlags, want: &TcpFlags) -> bool {
    (!want.fin || have.fin)
        && (!want.syn || have.syn)
        && (!want.rst || have.rst)
        && (!want.psh || have.psh)
        && (!want.ack || have.ack)
        && (!want.urg || have.urg)
        && (!want.ece || have.ece)
        && (!want.cwr || have.cwr)
        && (!want.ns || have.ns)
}

fn parse_pod(field: &'static str, v: &str) -> Result<PodMatch, FilterError> {
    match v.split_once('/') {
        Some((ns, pod)) => {
            if ns.is_empty() {
                return Err(FilterError::new(field, v, "empty namespace before '/'"));
            }
            if pod.contains('/') {
                return Err(FilterError::new(
                    field,
                    v,
                    "expected [namespace/]name-prefix",
                ));
            }
            Ok(PodMatch {
                namespace: Some(ns.to_owned()),
                pod_prefix: pod.to_owned(),
            })
        }
        None if v.is_empty() => Err(FilterError::new(field, v, "empty value")),
        None => Ok(PodMatch {
            namespace: None,
            pod_prefix: v.to_owned(),
        }),
    }
}

impl PodMatch {
    fn matches(&self, namespace: &str, name: &str) -> bool {
        self.namespace.as_deref().is_none_or(|ns| ns == namespace)
            && (self.namespace.is_some() || !name.is_empty())
            && name.starts_with(&self.pod_prefix)
    }
}

fn compile_regexes(field: &'static str, vals: &[String]) -> Result<Vec<Regex>, FilterError> {
    vals.iter()
        .map(|v| Regex::new(v).map_err(|e| FilterError::new(field, v, e.to_string())))
        .collect()
}

/// FQDN patterns: `*` matches within a DNS name, everything else literally.
fn compile_fqdns(field: &'static str, vals: &[String]) -> Result<Vec<Regex>, FilterError> {
    vals.iter()
        .map(|v| {
            if v.is_empty() {
                return Err(FilterError::new(field, v, "empty value"));
            }
            let pattern = v.trim_end_matches('.');
            let re = format!(
                "^(?i){}\\.?$",
                regex::escape(pattern).replace("\\*", "[-a-zA-Z0-9_.]*")
            );
            Regex::new(&re).map_err(|e| FilterError::new(field, v, e.to_string()))
        })
        .collect()
}

fn check_enums(
    field: &'static str,
    vals: &[i32],
    valid: impl Fn(i32) -> bool,
) -> Result<(), FilterError> {
    match vals.iter().find(|v| !valid(**v)) {
        Some(v) => Err(FilterError::new(field, v.to_string(), "unknown enum value")),
        None => Ok(()),
    }
}

impl CompiledFilter {
    /// Compiles one filter, validating every value.
    pub fn compile(f: &FlowFilter) -> Result<Self, FilterError> {
        use Side::{Destination as Dst, Source as Src};
        if let Some(e) = unsupported(f) {
            return Err(e);
        }
        let mut checks = Vec::new();
        if !f.uuid.is_empty() {
            checks.push(Check::Uuid(f.uuid.clone()));
        }
        for (field, side, vals) in [
            ("source_ip", Src, &f.source_ip),
            ("destination_ip", Dst, &f.destination_ip),
        ] {
            if vals.is_empty() {
                continue;
            }
            let ips = vals
                .iter()
                .map(|v| {
                    if v.contains('/') {
                        v.parse::<IpNet>()
                            .map(|n| IpMatch::Net(n.trunc()))
                            .map_err(|e| FilterError::new(field, v, format!("not a CIDR: {e}")))
                    } else {
                        v.parse::<IpAddr>().map(IpMatch::Exact).map_err(|e| {
                            FilterError::new(field, v, format!("not an IP address: {e}"))
                        })
                    }
                })
                .collect::<Result<_, _>>()?;
            checks.push(Check::Ip(side, ips));
        }
        for (field, side, vals) in [
            ("source_pod", Src, &f.source_pod),
            ("destination_pod", Dst, &f.destination_pod),
        ] {
            if !vals.is_empty() {
                let pods = vals
                    .iter()
                    .map(|v| parse_pod(field, v))
                    .collect::<Result<_, _>>()?;
                checks.push(Check::Pod(side, pods));
            }
        }
        for (field, side, vals) in [
            ("source_service", Src, &f.source_service),
            ("destination_service", Dst, &f.destination_service),
        ] {
            if !vals.is_empty() {
                let svcs = vals
                    .iter()
                    .map(|v| parse_pod(field, v))
                    .collect::<Result<_, _>>()?;
                checks.push(Check::Service(side, svcs));
            }
        }
        for (field, side, vals) in [
            ("source_fqdn", Src, &f.source_fqdn),
            ("destination_fqdn", Dst, &f.destination_fqdn),
        ] {
            if !vals.is_empty() {
                checks.push(Check::Fqdn(side, compile_fqdns(field, vals)?));
            }
        }
        for (field, side, vals) in [
            ("source_label", Src, &f.source_label),
            ("destination_label", Dst, &f.destination_label),
        ] {
            if !vals.is_empty() {
                let sels = vals
                    .iter()
                    .map(|v| LabelSelector::parse(v).map_err(|e| FilterError::new(field, v, e)))
                    .collect::<Result<_, _>>()?;
                checks.push(Check::Label(side, sels));
            }
        }
        for (side, vals) in [(Src, &f.source_workload), (Dst, &f.destination_workload)] {
            if !vals.is_empty() {
                checks.push(Check::Workload(side, vals.clone()));
            }
        }
        for (side, vals) in [(Src, &f.source_identity), (Dst, &f.destination_identity)] {
            if !vals.is_empty() {
                checks.push(Check::Identity(side, vals.clone()));
            }
        }
        for (field, side, vals) in [
            ("source_port", Src, &f.source_port),
            ("destination_port", Dst, &f.destination_port),
        ] {
            if !vals.is_empty() {
                let ports = vals
                    .iter()
                    .map(|v| {
                        v.parse::<u16>()
                            .map_err(|_| FilterError::new(field, v, "not a port number (0-65535)"))
                    })
                    .collect::<Result<_, _>>()?;
                checks.push(Check::Port(side, ports));
            }
        }
        if !f.traffic_direction.is_empty() {
            check_enums("traffic_direction", &f.traffic_direction, |v| {
                crate::flow::TrafficDirection::try_from(v).is_ok()
            })?;
            checks.push(Check::TrafficDirection(f.traffic_direction.clone()));
        }
        if !f.verdict.is_empty() {
            check_enums("verdict", &f.verdict, |v| Verdict::try_from(v).is_ok())?;
            checks.push(Check::Verdict(f.verdict.clone()));
        }
        if !f.event_type.is_empty() {
            checks.push(Check::EventType(f.event_type.clone()));
        }
        if !f.http_status_code.is_empty() {
            let codes = f
                .http_status_code
                .iter()
                .map(|v| {
                    let (digits, prefix) = v
                        .strip_suffix('+')
                        .map_or((v.as_str(), false), |d| (d, true));
                    let valid = !digits.is_empty()
                        && digits.len() <= 3
                        && (prefix || digits.len() == 3)
                        && digits.bytes().all(|b| b.is_ascii_digit());
                    if valid {
                        Ok((digits.to_owned(), prefix))
                    } else {
                        Err(FilterError::new(
                            "http_status_code",
                            v,
                            "expected a status code like 404 or a prefix like 5+",
                        ))
                    }
                })
                .collect::<Result<_, _>>()?;
            checks.push(Check::HttpStatus(codes));
        }
        if !f.http_method.is_empty() {
            checks.push(Check::HttpMethod(
                f.http_method
                    .iter()
                    .map(|m| m.to_ascii_uppercase())
                    .collect(),
            ));
        }
        if !f.http_path.is_empty() {
            checks.push(Check::HttpPath(compile_regexes("http_path", &f.http_path)?));
        }
        if !f.dns_query.is_empty() {
            checks.push(Check::DnsQuery(compile_regexes("dns_query", &f.dns_query)?));
        }
        if !f.protocol.is_empty() {
            let protos = f
                .protocol
                .iter()
                .map(|p| {
                    Ok(match p.to_ascii_lowercase().as_str() {
                        "tcp" => Proto::Tcp,
                        "udp" => Proto::Udp,
                        "sctp" => Proto::Sctp,
                        "icmp" => Proto::Icmp,
                        "icmpv4" => Proto::Icmpv4,
                        "icmpv6" => Proto::Icmpv6,
                        "http" => Proto::Http,
                        "dns" => Proto::Dns,
                        "kafka" => Proto::Kafka,
                        _ => {
                            return Err(FilterError::new(
                                "protocol",
                                p,
                                "expected one of tcp, udp, sctp, icmp, icmpv4, icmpv6, http, dns, kafka",
                            ))
                        }
                    })
                })
                .collect::<Result<_, _>>()?;
            checks.push(Check::Protocol(protos));
        }
        if !f.reply.is_empty() {
            checks.push(Check::Reply(f.reply.clone()));
        }
        if !f.tcp_flags.is_empty() {
            checks.push(Check::TcpFlags(f.tcp_flags.clone()));
        }
        if !f.node_name.is_empty() {
            let pats = f
                .node_name
                .iter()
                .map(|v| {
                    NodeNamePattern::compile(v).map_err(|e| FilterError::new("node_name", v, e.0))
                })
                .collect::<Result<_, _>>()?;
            checks.push(Check::NodeName(pats));
        }
        if !f.ip_version.is_empty() {
            check_enums("ip_version", &f.ip_version, |v| {
                crate::flow::IpVersion::try_from(v).is_ok()
            })?;
            checks.push(Check::IpVersion(f.ip_version.clone()));
        }
        if !f.trace_id.is_empty() {
            checks.push(Check::TraceId(f.trace_id.clone()));
        }
        // Any number is accepted, as Hubble does: Hubble's enum has reasons
        // Lumen's datapath never reports, and those simply match no flow.
        if !f.drop_reason_desc.is_empty() {
            checks.push(Check::DropReason(f.drop_reason_desc.clone()));
        }
        if !f.interface.is_empty() {
            checks.push(Check::Interface(f.interface.clone()));
        }
        // Matched against IP.encrypted as Hubble does (no IP reads as false).
        // Lumen's datapath sees no WireGuard/IPsec state and never sets it,
        // so [false] matches every flow and [true] none: Hubble's answer for
        // flows not marked encrypted.
        if !f.encrypted.is_empty() {
            checks.push(Check::Encrypted(f.encrypted.clone()));
        }
        Ok(Self { checks })
    }

    /// Whether `flow` satisfies every field of this filter.
    pub fn matches(&self, flow: &Flow) -> bool {
        self.checks.iter().all(|c| check(c, flow))
    }
}

fn check(c: &Check, flow: &Flow) -> bool {
    use crate::flow::layer7::Record;
    let http = || match flow.l7.as_ref().and_then(|l7| l7.record.as_ref()) {
        Some(Record::Http(h)) => Some(h),
        _ => None,
    };
    match c {
        Check::Uuid(ids) => ids.contains(&flow.uuid),
        Check::Ip(side, ips) => ip_of(flow, *side).is_some_and(|ip| {
            ips.iter().any(|m| match m {
                IpMatch::Exact(want) => *want == ip,
                IpMatch::Net(net) => net.contains(&ip),
            })
        }),
        Check::Pod(side, pods) => endpoint(flow, *side)
            .is_some_and(|ep| pods.iter().any(|p| p.matches(&ep.namespace, &ep.pod_name))),
        Check::Service(side, svcs) => {
            let svc = match side {
                Side::Source => flow.source_service.as_ref(),
                Side::Destination => flow.destination_service.as_ref(),
            };
            svc.is_some_and(|s| svcs.iter().any(|p| p.matches(&s.namespace, &s.name)))
        }
        Check::Fqdn(side, pats) => {
            let names = match side {
                Side::Source => &flow.source_names,
                Side::Destination => &flow.destination_names,
            };
            names.iter().any(|n| pats.iter().any(|p| p.is_match(n)))
        }
        Check::Label(side, sels) => {
            endpoint(flow, *side).is_some_and(|ep| sels.iter().any(|s| s.matches(&ep.labels)))
        }
        Check::Workload(side, wls) => endpoint(flow, *side).is_some_and(|ep| {
            ep.workloads.iter().any(|have| {
                wls.iter().any(|want| {
                    (want.name.is_empty() || want.name == have.name)
                        && (want.kind.is_empty() || want.kind.eq_ignore_ascii_case(&have.kind))
                })
            })
        }),
        Check::Identity(side, ids) => {
            endpoint(flow, *side).is_some_and(|ep| ids.contains(&ep.identity))
        }
        Check::Port(side, want) => ports(flow).is_some_and(|(s, d)| {
            let p = if *side == Side::Source { s } else { d };
            want.iter().any(|w| u32::from(*w) == p)
        }),
        Check::TrafficDirection(dirs) => dirs.contains(&flow.traffic_direction),
        Check::Verdict(vs) => vs.contains(&flow.verdict),
        Check::EventType(ets) => ets.iter().any(|f| {
            let same = flow.event_type.as_ref().is_some_and(|et| {
                f.r#type == et.r#type && (!f.match_sub_type || f.sub_type == et.sub_type)
            });
            same || (f.r#type == crate::event_type::POLICY_VERDICT
                && !f.match_sub_type
                && is_policy_verdict(flow))
        }),
        Check::HttpStatus(codes) => http().is_some_and(|h| {
            let code = h.code.to_string();
            codes.iter().any(|(digits, prefix)| {
                if *prefix {
                    code.starts_with(digits.as_str())
                } else {
                    code == *digits
                }
            })
        }),
        Check::HttpMethod(ms) => {
            http().is_some_and(|h| ms.iter().any(|m| h.method.eq_ignore_ascii_case(m)))
        }
        Check::HttpPath(res) => http().is_some_and(|h| {
            let path = h.url.split_once("://").map_or(h.url.as_str(), |(_, rest)| {
                rest.find('/').map_or("/", |i| &rest[i..])
            });
            res.iter().any(|r| r.is_match(path))
        }),
        Check::DnsQuery(res) => match flow.l7.as_ref().and_then(|l7| l7.record.as_ref()) {
            Some(Record::Dns(d)) => res.iter().any(|r| r.is_match(&d.query)),
            _ => false,
        },
        Check::Protocol(ps) => {
            let l4 = flow.l4.as_ref().and_then(|l| l.protocol.as_ref());
            let l7 = flow.l7.as_ref().and_then(|l| l.record.as_ref());
            ps.iter().any(|p| match p {
                Proto::Tcp => matches!(l4, Some(Protocol::Tcp(_))),
                Proto::Udp => matches!(l4, Some(Protocol::Udp(_))),
                Proto::Sctp => matches!(l4, Some(Protocol::Sctp(_))),
                Proto::Icmp => matches!(l4, Some(Protocol::IcmPv4(_) | Protocol::IcmPv6(_))),
                Proto::Icmpv4 => matches!(l4, Some(Protocol::IcmPv4(_))),
                Proto::Icmpv6 => matches!(l4, Some(Protocol::IcmPv6(_))),
                Proto::Http => matches!(l7, Some(Record::Http(_))),
                Proto::Dns => matches!(l7, Some(Record::Dns(_))),
                Proto::Kafka => matches!(l7, Some(Record::Kafka(_))),
            })
        }
        Check::Reply(rs) => flow.is_reply.is_some_and(|r| rs.contains(&r)),
        Check::TcpFlags(want) => match flow.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
            Some(Protocol::Tcp(t)) => {
                let have = t.flags.unwrap_or_default();
                want.iter().any(|w| tcp_flags_contain(&have, w))
            }
            _ => false,
        },
        Check::NodeName(pats) => pats.iter().any(|p| p.matches(&flow.node_name)),
        Check::IpVersion(vs) => flow
            .ip
            .as_ref()
            .is_some_and(|ip| vs.contains(&ip.ip_version)),
        Check::TraceId(ids) => flow
            .trace_context
            .as_ref()
            .and_then(|t| t.parent.as_ref())
            .is_some_and(|p| ids.contains(&p.trace_id)),
        Check::DropReason(rs) => {
            flow.verdict == Verdict::Dropped as i32 && rs.contains(&flow.drop_reason_desc)
        }
        // Hubble's rule: a set index (> 0) and a set name must each equal the
        // flow's; an entry with neither matches any flow that has an interface.
        Check::Interface(want) => flow.interface.as_ref().is_some_and(|have| {
            want.iter().any(|w| {
                (w.index == 0 || w.index == have.index)
                    && (w.name.is_empty() || w.name == have.name)
            })
        }),
        Check::Encrypted(vs) => vs.contains(&flow.ip.as_ref().is_some_and(|ip| ip.encrypted)),
    }
}

//! Flow text formats, as `hubble observe` prints them: `compact` (one line
//! per flow), `table`, `dict` (key: value blocks) and `json` (one proto3-JSON
//! `GetFlowsResponse` per line). Lumen's extras (event kind, counters, RTT,
//! duration, deciding policy) are appended briefly. Lost-events and
//! node-status responses print in every format.

use std::fmt::Write as _;
use std::io::{self, Write};

use chrono::{DateTime, Utc};

use crate::flow::{
    layer4::Protocol, DropReason, Endpoint, Flow, FlowCounters, LostEvent, LostEventSource,
    LumenEventKind, Policy, TcpFlags, TraceObservationPoint, TrafficDirection, Verdict,
};
use crate::json::{self, JsonNames};
use crate::observer::{get_flows_response::ResponseTypes, GetFlowsResponse};
use crate::relay::{NodeState, NodeStatusEvent};

/// Output formats of `lumen observe -o`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Compact,
    Table,
    Dict,
    /// One `GetFlowsResponse` per line in proto3 JSON (Hubble's `json`/`jsonpb`).
    Json,
}

impl std::str::FromStr for OutputFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "compact" => Ok(Self::Compact),
            "table" => Ok(Self::Table),
            "dict" => Ok(Self::Dict),
            "json" | "jsonpb" => Ok(Self::Json),
            other => Err(format!(
                "unknown output format {other:?} (expected compact, table, dict, json or jsonpb)"
            )),
        }
    }
}

/// What to include besides the flow itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct FormatOptions {
    /// Print the node name (compact, table, dict).
    pub node_name: bool,
    /// Field names for JSON.
    pub json_names: JsonNames,
}

/// Writes responses in one format, keeping the state a format needs (the
/// table header, dict separators).
pub struct Printer<W: Write> {
    out: W,
    format: OutputFormat,
    opts: FormatOptions,
    written: u64,
}

const TABLE_WIDTHS: [usize; 6] = [22, 24, 40, 40, 24, 11];

impl<W: Write> Printer<W> {
    pub fn new(out: W, format: OutputFormat, opts: FormatOptions) -> Self {
        Self {
            out,
            format,
            opts,
            written: 0,
        }
    }

    /// Writes one response.
    pub fn write_response(&mut self, resp: &GetFlowsResponse) -> io::Result<()> {
        match self.format {
            OutputFormat::Json => {
                let line = json::to_string(resp, self.opts.json_names).map_err(io::Error::other)?;
                writeln!(self.out, "{line}")?;
            }
            OutputFormat::Compact => {
                if let Some(line) = compact_response(resp, &self.opts) {
                    writeln!(self.out, "{line}")?;
                }
            }
            OutputFormat::Table => self.write_table_row(resp)?,
            OutputFormat::Dict => self.write_dict(resp)?,
        }
        self.written += 1;
        self.out.flush()
    }

    /// Writes a bare flow (wrapped in a `GetFlowsResponse` for JSON).
    pub fn write_flow(&mut self, flow: &Flow) -> io::Result<()> {
        self.write_response(&GetFlowsResponse {
            node_name: flow.node_name.clone(),
            time: flow.time,
            response_types: Some(ResponseTypes::Flow(flow.clone())),
        })
    }

    /// Returns the writer.
    pub fn into_inner(self) -> W {
        self.out
    }

    fn write_table_row(&mut self, resp: &GetFlowsResponse) -> io::Result<()> {
        if self.written == 0 {
            let mut header = vec!["TIMESTAMP"];
            if self.opts.node_name {
                header.push("NODE");
            }
            header.extend(["SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]);
            writeln!(self.out, "{}", self.table_line(&header))?;
        }
        let ts = timestamp(resp.time.as_ref().or(match &resp.response_types {
            Some(ResponseTypes::Flow(f)) => f.time.as_ref(),
            _ => None,
        }));
        let node = response_node(resp);
        let cells: Vec<String> = match &resp.response_types {
            Some(ResponseTypes::Flow(f)) => {
                let (src, dst) = ordered_endpoints(f);
                vec![
                    src,
                    dst,
                    event_description(f),
                    verdict_name(f.verdict),
                    summary_with_extras(f),
                ]
            }
            Some(ResponseTypes::LostEvents(l)) => {
                vec![
                    String::new(),
                    String::new(),
                    "EVENTS LOST".into(),
                    String::new(),
                    lost_summary(l),
                ]
            }
            Some(ResponseTypes::NodeStatus(n)) => {
                vec![
                    String::new(),
                    String::new(),
                    "NODE STATUS".into(),
                    String::new(),
                    node_status_summary(n),
                ]
            }
            None => return Ok(()),
        };
        let mut row = vec![ts];
        if self.opts.node_name {
            row.push(node);
        }
        row.extend(cells);
        let refs: Vec<&str> = row.iter().map(String::as_str).collect();
        writeln!(self.out, "{}", self.table_line(&refs))
    }

    fn table_line(&self, cells: &[&str]) -> String {
        let mut widths: Vec<usize> = TABLE_WIDTHS.to_vec();
        if !self.opts.node_name {
            widths.remove(1);
        }
        let mut line = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                line.push_str(cell);
            } else {
                let w = widths.get(i).copied().unwrap_or(0);
                let _ = write!(line, "{cell:<w$} ");
            }
        }
        line.trim_end().to_owned()
    }

    fn write_dict(&mut self, resp: &GetFlowsResponse) -> io::Result<()> {
        if self.written > 0 {
            writeln!(self.out, "------------")?;
        }
        let mut rows: Vec<(&str, String)> = Vec::new();
        match &resp.response_types {
            Some(ResponseTypes::Flow(f)) => {
                rows.push((
                    "TIMESTAMP",
                    timestamp(f.time.as_ref().or(resp.time.as_ref())),
                ));
                if self.opts.node_name {
                    rows.push(("NODE", response_node(resp)));
                }
                let (src, dst) = ordered_endpoints(f);
                rows.push(("SOURCE", src));
                rows.push(("DESTINATION", dst));
                rows.push(("TYPE", event_description(f)));
                rows.push(("VERDICT", verdict_name(f.verdict)));
                rows.push(("SUMMARY", summary(f)));
                if f.drop_reason_desc != 0 {
                    rows.push((
                        "DROP REASON",
                        enum_name(
                            DropReason::try_from(f.drop_reason_desc)
                                .ok()
                                .map(|d| d.as_str_name()),
                            f.drop_reason_desc,
                        ),
                    ));
                }
                if let Some(kind) = lumen_kind(f) {
                    rows.push(("EVENT KIND", kind.to_owned()));
                }
                if let Some(c) = &f.counters {
                    rows.push(("COUNTERS", counters(c)));
                }
                if let Some(d) = &f.handshake_rtt {
                    rows.push(("HANDSHAKE RTT", duration(d)));
                }
                if let Some(d) = &f.flow_duration {
                    rows.push(("FLOW DURATION", duration(d)));
                }
                if let Some(p) = deciding_policy(f) {
                    rows.push(("POLICY", p));
                }
            }
            Some(ResponseTypes::LostEvents(l)) => {
                rows.push(("TIMESTAMP", timestamp(resp.time.as_ref())));
                if self.opts.node_name {
                    rows.push(("NODE", resp.node_name.clone()));
                }
                rows.push(("TYPE", "EVENTS LOST".to_owned()));
                rows.push(("SUMMARY", lost_summary(l)));
            }
            Some(ResponseTypes::NodeStatus(n)) => {
                rows.push(("TIMESTAMP", timestamp(resp.time.as_ref())));
                rows.push(("TYPE", "NODE STATUS".to_owned()));
                rows.push(("SUMMARY", node_status_summary(n)));
            }
            None => return Ok(()),
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in rows {
            writeln!(self.out, "{k:>width$}: {v}")?;
        }
        Ok(())
    }
}

fn response_node(resp: &GetFlowsResponse) -> String {
    match &resp.response_types {
        Some(ResponseTypes::Flow(f)) if !f.node_name.is_empty() => f.node_name.clone(),
        _ => resp.node_name.clone(),
    }
}

/// Formats a timestamp like Hubble (`Jan  2 15:04:05.000`, UTC).
pub fn timestamp(ts: Option<&prost_types::Timestamp>) -> String {
    let Some(ts) = ts else {
        return "N/A".to_owned();
    };
    let nanos = u32::try_from(ts.nanos).unwrap_or(0);
    match DateTime::<Utc>::from_timestamp(ts.seconds, nanos) {
        Some(t) => t.format("%b %e %H:%M:%S%.3f").to_string(),
        None => "N/A".to_owned(),
    }
}

/// Formats a duration briefly (`850µs`, `1.2ms`, `3.40s`).
pub fn duration(d: &prost_types::Duration) -> String {
    let nanos = i128::from(d.seconds) * 1_000_000_000 + i128::from(d.nanos);
    let f = nanos as f64;
    if nanos < 1_000 {
        format!("{nanos}ns")
    } else if nanos < 1_000_000 {
        format!("{:.0}µs", f / 1e3)
    } else if nanos < 1_000_000_000 {
        format!("{:.1}ms", f / 1e6)
    } else {
        format!("{:.2}s", f / 1e9)
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[unit])
    }
}

fn counters(c: &FlowCounters) -> String {
    format!(
        "{} pkts/{} -> {} pkts/{} <-",
        c.orig_packets,
        bytes(c.orig_bytes),
        c.reply_packets,
        bytes(c.reply_bytes)
    )
}

fn enum_name(name: Option<&str>, value: i32) -> String {
    name.map_or_else(|| value.to_string(), str::to_owned)
}

fn verdict_name(v: i32) -> String {
    enum_name(Verdict::try_from(v).ok().map(|v| v.as_str_name()), v)
}

/// Name of a reserved identity, as Hubble prints it.
pub fn reserved_identity(id: u32) -> Option<&'static str> {
    Some(match id {
        1 => "host",
        2 => "world",
        3 => "unmanaged",
        4 => "health",
        5 => "init",
        6 => "remote-node",
        7 => "kube-apiserver",
        8 => "ingress",
        9 => "world-ipv4",
        10 => "world-ipv6",
        _ => return None,
    })
}

fn identity(ep: Option<&Endpoint>) -> String {
    match ep.map(|e| e.identity) {
        None | Some(0) => String::new(),
        Some(id) => match reserved_identity(id) {
            Some(name) => format!(" ({name})"),
            None => format!(" (ID:{id})"),
        },
    }
}

fn host_port(host: &str, port: Option<u32>) -> String {
    match port {
        Some(p) if p != 0 => {
            if host.contains(':') && !host.contains('/') {
                format!("[{host}]:{p}")
            } else {
                format!("{host}:{p}")
            }
        }
        _ => host.to_owned(),
    }
}

/// `ns/pod:port (ID:n)` or `ip:port (ID:n)` for one side of a flow.
fn endpoint_str(flow: &Flow, source: bool) -> String {
    let ep = if source {
        flow.source.as_ref()
    } else {
        flow.destination.as_ref()
    };
    let ip = flow
        .ip
        .as_ref()
        .map(|ip| if source { &ip.source } else { &ip.destination });
    let port = flow
        .l4
        .as_ref()
        .and_then(|l4| l4.protocol.as_ref())
        .and_then(|p| match p {
            Protocol::Tcp(t) => Some(if source {
                t.source_port
            } else {
                t.destination_port
            }),
            Protocol::Udp(u) => Some(if source {
                u.source_port
            } else {
                u.destination_port
            }),
            Protocol::Sctp(s) => Some(if source {
                s.source_port
            } else {
                s.destination_port
            }),
            _ => None,
        });
    let names = if source {
        &flow.source_names
    } else {
        &flow.destination_names
    };
    let host = match ep {
        Some(e) if !e.pod_name.is_empty() => {
            if e.namespace.is_empty() {
                e.pod_name.clone()
            } else {
                format!("{}/{}", e.namespace, e.pod_name)
            }
        }
        _ => match names.first() {
            Some(n) => n.clone(),
            None => ip
                .filter(|s| !s.is_empty())
                .cloned()
                .unwrap_or_else(|| "N/A".to_owned()),
        },
    };
    format!("{}{}", host_port(&host, port), identity(ep))
}

/// Source and destination strings of the packet.
fn ordered_endpoints(flow: &Flow) -> (String, String) {
    (endpoint_str(flow, true), endpoint_str(flow, false))
}

fn arrow(flow: &Flow) -> &'static str {
    match flow.is_reply {
        None => "<>",
        Some(true) => "<-",
        Some(false) => "->",
    }
}

fn sentence_case(name: &str) -> String {
    let lower = name.to_ascii_lowercase().replace('_', " ");
    let mut chars = lower.chars();
    match chars.next() {
        Some(c) => c.to_ascii_uppercase().to_string() + chars.as_str(),
        None => String::new(),
    }
}

/// The observation point or event, like Hubble's TYPE column
/// (`to-endpoint`, `Policy denied`, `policy-verdict:L3-L4 INGRESS`).
pub fn event_description(flow: &Flow) -> String {
    let et = flow.event_type.unwrap_or_default();
    match et.r#type {
        crate::event_type::DROP => {
            let reason = DropReason::try_from(flow.drop_reason_desc).ok();
            match reason {
                Some(DropReason::Unknown) | None => "drop".to_owned(),
                Some(r) => sentence_case(r.as_str_name()),
            }
        }
        crate::event_type::POLICY_VERDICT => {
            let m = match flow.policy_match_type {
                0 => "none",
                1 => "L3-Only",
                2 => "L3-L4",
                3 => "L4-Only",
                4 => "all",
                _ => "other",
            };
            let dir = TrafficDirection::try_from(flow.traffic_direction)
                .map(|d| d.as_str_name())
                .unwrap_or("UNKNOWN");
            format!("policy-verdict:{m} {dir}")
        }
        _ => {
            let point = TraceObservationPoint::try_from(flow.trace_observation_point)
                .unwrap_or(TraceObservationPoint::UnknownPoint);
            if point != TraceObservationPoint::UnknownPoint {
                point.as_str_name().to_ascii_lowercase().replace('_', "-")
            } else if flow.verdict == Verdict::Dropped as i32 {
                let r = DropReason::try_from(flow.drop_reason_desc).unwrap_or(DropReason::Unknown);
                if r == DropReason::Unknown {
                    "drop".to_owned()
                } else {
                    sentence_case(r.as_str_name())
                }
            } else {
                crate::event_type::name(et.r#type)
                    .unwrap_or("unknown")
                    .to_owned()
            }
        }
    }
}

/// `SYN, ACK` style list of set flags.
pub fn tcp_flags(f: &TcpFlags) -> String {
    let all = [
        (f.syn, "SYN"),
        (f.fin, "FIN"),
        (f.rst, "RST"),
        (f.psh, "PSH"),
        (f.ack, "ACK"),
        (f.urg, "URG"),
        (f.ece, "ECE"),
        (f.cwr, "CWR"),
        (f.ns, "NS"),
    ];
    all.iter()
        .filter(|(set, _)| *set)
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

/// L4 summary like Hubble's (`TCP Flags: SYN`, `UDP`, `ICMPv4 EchoRequest`).
pub fn summary(flow: &Flow) -> String {
    match flow.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(Protocol::Tcp(t)) => match t.flags.as_ref().map(tcp_flags) {
            Some(s) if !s.is_empty() => format!("TCP Flags: {s}"),
            _ => "TCP".to_owned(),
        },
        Some(Protocol::Udp(_)) => "UDP".to_owned(),
        Some(Protocol::Sctp(_)) => "SCTP".to_owned(),
        Some(Protocol::IcmPv4(i)) => format!("ICMPv4 {}", icmpv4_type(i.r#type, i.code)),
        Some(Protocol::IcmPv6(i)) => format!("ICMPv6 {}", icmpv6_type(i.r#type, i.code)),
        None => String::new(),
    }
}

/// An ICMP type and code as Hubble prints them: gopacket's `ICMPv4TypeCode` /
/// `ICMPv6TypeCode` `String()` (`EchoRequest`, `DestinationUnreachable(Port)`,
/// `Redirect(Code: 9)`, and `143(0)` for a type gopacket has no name for).
/// A type without code names does not use the code (printed only when not 0).
fn icmp_type_code(names: &[IcmpName], t: u32, code: u32) -> String {
    let Some((_, name, codes)) = names.iter().find(|(n, _, _)| *n == t) else {
        return format!("{t}({code})");
    };
    if codes.is_empty() {
        return if code == 0 {
            (*name).to_owned()
        } else {
            format!("{name}(Code: {code})")
        };
    }
    match codes.iter().find(|(c, _)| *c == code) {
        Some((_, code_name)) => format!("{name}({code_name})"),
        None => format!("{name}(Code: {code})"),
    }
}

/// An ICMP type, its name, and the names of its codes.
type IcmpName = (u32, &'static str, &'static [(u32, &'static str)]);

/// gopacket's ICMPv4 names (layers/icmp4.go).
const ICMPV4: &[IcmpName] = &[
    (0, "EchoReply", &[]),
    (
        3,
        "DestinationUnreachable",
        &[
            (0, "Net"),
            (1, "Host"),
            (2, "Protocol"),
            (3, "Port"),
            (4, "FragmentationNeeded"),
            (5, "SourceRoutingFailed"),
            (6, "NetUnknown"),
            (7, "HostUnknown"),
            (8, "SourceIsolated"),
            (9, "NetAdminProhibited"),
            (10, "HostAdminProhibited"),
            (11, "NetTOS"),
            (12, "HostTOS"),
            (13, "CommAdminProhibited"),
            (14, "HostPrecedence"),
            (15, "PrecedenceCutoff"),
        ],
    ),
    (4, "SourceQuench", &[]),
    (
        5,
        "Redirect",
        &[(0, "Net"), (1, "Host"), (2, "TOS+Net"), (3, "TOS+Host")],
    ),
    (8, "EchoRequest", &[]),
    (9, "RouterAdvertisement", &[]),
    (10, "RouterSolicitation", &[]),
    (
        11,
        "TimeExceeded",
        &[(0, "TTLExceeded"), (1, "FragmentReassemblyTimeExceeded")],
    ),
    (
        12,
        "ParameterProblem",
        &[
            (0, "PointerIndicatesError"),
            (1, "MissingOption"),
            (2, "BadLength"),
        ],
    ),
    (13, "TimestampRequest", &[]),
    (14, "TimestampReply", &[]),
    (15, "InfoRequest", &[]),
    (16, "InfoReply", &[]),
    (17, "AddressMaskRequest", &[]),
    (18, "AddressMaskReply", &[]),
];

/// gopacket's ICMPv6 names (layers/icmp6.go). It names no MLD message (130-132, 143),
/// so Hubble prints those as `130(0)` ... `143(0)`, and so does Lumen.
const ICMPV6: &[IcmpName] = &[
    (
        1,
        "DestinationUnreachable",
        &[
            (0, "NoRouteToDst"),
            (1, "AdminProhibited"),
            (2, "BeyondScopeOfSrc"),
            (3, "AddressUnreachable"),
            (4, "PortUnreachable"),
            (5, "SrcAddressFailedPolicy"),
            (6, "RejectRouteToDst"),
        ],
    ),
    (2, "PacketTooBig", &[]),
    (
        3,
        "TimeExceeded",
        &[
            (0, "HopLimitExceeded"),
            (1, "FragmentReassemblyTimeExceeded"),
        ],
    ),
    (
        4,
        "ParameterProblem",
        &[
            (0, "ErroneousHeaderField"),
            (1, "UnrecognizedNextHeader"),
            (2, "UnrecognizedIPv6Option"),
        ],
    ),
    (128, "EchoRequest", &[]),
    (129, "EchoReply", &[]),
    (133, "RouterSolicitation", &[]),
    (134, "RouterAdvertisement", &[]),
    (135, "NeighborSolicitation", &[]),
    (136, "NeighborAdvertisement", &[]),
    (137, "Redirect", &[]),
];

fn icmpv4_type(t: u32, code: u32) -> String {
    icmp_type_code(ICMPV4, t, code)
}

fn icmpv6_type(t: u32, code: u32) -> String {
    icmp_type_code(ICMPV6, t, code)
}

/// `part` as a percentage of `whole` with two decimals, as `hubble status` and
/// `hubble list nodes` print a flow ring's fill (`0.10%`); `None` when `whole` is 0.
pub fn percent(part: u64, whole: u64) -> Option<String> {
    (whole > 0).then(|| format!("{:.2}%", part as f64 * 100.0 / whole as f64))
}

fn lumen_kind(flow: &Flow) -> Option<&'static str> {
    Some(
        match LumenEventKind::try_from(flow.lumen_event_kind).ok()? {
            LumenEventKind::Unspecified => return None,
            LumenEventKind::FlowNew => "new",
            LumenEventKind::FlowTcpFlags => "tcp-flags",
            LumenEventKind::FlowUpdate => "update",
            LumenEventKind::FlowClose => "close",
            LumenEventKind::FlowDrop => "drop",
            LumenEventKind::PacketTrace => "packet",
            LumenEventKind::FlowReply => "reply",
        },
    )
}

fn policy_names(ps: &[Policy]) -> String {
    ps.iter()
        .map(|p| {
            if p.namespace.is_empty() {
                p.name.clone()
            } else {
                format!("{}/{}", p.namespace, p.name)
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The policy that decided the flow, e.g. `ingress-denied-by:prod/deny-db`.
pub fn deciding_policy(flow: &Flow) -> Option<String> {
    [
        ("ingress-denied-by", &flow.ingress_denied_by),
        ("egress-denied-by", &flow.egress_denied_by),
        ("ingress-allowed-by", &flow.ingress_allowed_by),
        ("egress-allowed-by", &flow.egress_allowed_by),
    ]
    .iter()
    .filter(|(_, ps)| !ps.is_empty())
    .map(|(label, ps)| format!("{label}:{}", policy_names(ps)))
    .reduce(|a, b| format!("{a} {b}"))
}

/// Lumen extras in brief: event kind, RTT, duration, counters, policy.
pub fn lumen_extras(flow: &Flow) -> String {
    let mut parts = Vec::new();
    if let Some(kind) = lumen_kind(flow) {
        parts.push(format!("lumen:{kind}"));
    }
    if let Some(rtt) = &flow.handshake_rtt {
        parts.push(format!("rtt={}", duration(rtt)));
    }
    let kind =
        LumenEventKind::try_from(flow.lumen_event_kind).unwrap_or(LumenEventKind::Unspecified);
    if matches!(kind, LumenEventKind::FlowClose | LumenEventKind::FlowUpdate) {
        if let Some(d) = &flow.flow_duration {
            parts.push(format!("dur={}", duration(d)));
        }
        if let Some(c) = &flow.counters {
            parts.push(format!(
                "pkts={}/{} bytes={}/{}",
                c.orig_packets,
                c.reply_packets,
                bytes(c.orig_bytes),
                bytes(c.reply_bytes)
            ));
        }
    }
    if let Some(p) = deciding_policy(flow) {
        parts.push(p);
    }
    parts.join(" ")
}

fn summary_with_extras(flow: &Flow) -> String {
    let s = summary(flow);
    let extras = lumen_extras(flow);
    match (s.is_empty(), extras.is_empty()) {
        (_, true) => s,
        (true, false) => extras,
        (false, false) => format!("{s} {extras}"),
    }
}

fn lost_summary(l: &LostEvent) -> String {
    let source = enum_name(
        LostEventSource::try_from(l.source)
            .ok()
            .map(|s| s.as_str_name()),
        l.source,
    );
    match l.cpu {
        Some(cpu) => format!("{source} CPU({cpu}) {}", l.num_events_lost),
        None => format!("{source} {}", l.num_events_lost),
    }
}

fn node_status_summary(n: &NodeStatusEvent) -> String {
    let state = enum_name(
        NodeState::try_from(n.state_change)
            .ok()
            .map(|s| s.as_str_name()),
        n.state_change,
    );
    let mut s = format!("{state}: {}", n.node_names.join(", "));
    if !n.message.is_empty() {
        let _ = write!(s, " ({})", n.message);
    }
    s
}

/// One compact line for a flow (no trailing newline).
pub fn compact(flow: &Flow, opts: &FormatOptions) -> String {
    let mut line = timestamp(flow.time.as_ref());
    if opts.node_name && !flow.node_name.is_empty() {
        let _ = write!(line, " [{}]", flow.node_name);
    }
    // Replies read initiator first: `client <- server`, as Hubble prints them.
    let (mut src, mut dst) = ordered_endpoints(flow);
    if flow.is_reply == Some(true) {
        std::mem::swap(&mut src, &mut dst);
    }
    let _ = write!(
        line,
        ": {src} {} {dst} {} {}",
        arrow(flow),
        event_description(flow),
        verdict_name(flow.verdict)
    );
    let s = summary(flow);
    if !s.is_empty() {
        let _ = write!(line, " ({s})");
    }
    let extras = lumen_extras(flow);
    if !extras.is_empty() {
        let _ = write!(line, " {extras}");
    }
    line
}

/// One compact line for any response; `None` for an empty response.
pub fn compact_response(resp: &GetFlowsResponse, opts: &FormatOptions) -> Option<String> {
    let head = |resp: &GetFlowsResponse| {
        let mut h = timestamp(resp.time.as_ref());
        if opts.node_name && !resp.node_name.is_empty() {
            let _ = write!(h, " [{}]", resp.node_name);
        }
        h
    };
    match resp.response_types.as_ref()? {
        ResponseTypes::Flow(f) => {
            if opts.node_name && f.node_name.is_empty() && !resp.node_name.is_empty() {
                let mut f = f.clone();
                f.node_name.clone_from(&resp.node_name);
                Some(compact(&f, opts))
            } else {
                Some(compact(f, opts))
            }
        }
        ResponseTypes::LostEvents(l) => {
            Some(format!("{}: EVENTS LOST: {}", head(resp), lost_summary(l)))
        }
        ResponseTypes::NodeStatus(n) => Some(format!(
            "{}: NODE STATUS: {}",
            head(resp),
            node_status_summary(n)
        )),
    }
}

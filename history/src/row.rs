//! One `flows` row: built from a [`Flow`], encoded as RowBinary for a [`Layout`], decoded
//! back (spool replay, history reads) and turned into a [`Flow`] again.
//!
//! What history keeps of a flow is what the columns in [`crate::schema`] hold; a flow read
//! back has those fields and no others (no L7 record, no interface, policy labels and
//! revisions dropped, one workload per endpoint, `first_seen` derived from `flow_duration`).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::SystemTime;

use lumen_proto::flow::{
    layer4::Protocol, CiliumEventType, Endpoint, Flow, FlowCounters, IcmPv4, IcmPv6, Ip, Layer4,
    Policy, Sctp, Service, Tcp, TcpFlags, TraceContext, TraceParent, Udp, Workload,
};

use crate::rowbinary::{Dec, DecodeError, Enc};
use crate::schema::{Flavor, Layout};

/// A `flows` row in Rust.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowRow {
    pub time_ns: i64,
    pub node: String,
    pub batch_id: u64,
    pub flow_id: u64,
    pub event_kind: u8,
    pub verdict: u8,
    pub drop_reason: u16,
    pub ip_version: u8,
    pub src_ip: [u8; 16],
    pub dst_ip: [u8; 16],
    pub protocol: u8,
    pub src_port: u16,
    pub dst_port: u16,
    pub tcp_flags: u16,
    pub direction: u8,
    pub reply: u8,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub src: EndpointCols,
    pub dst: EndpointCols,
    pub egress_allowed_by: Vec<String>,
    pub ingress_allowed_by: Vec<String>,
    pub egress_denied_by: Vec<String>,
    pub ingress_denied_by: Vec<String>,
    pub orig_packets: u64,
    pub orig_bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub delta_packets: u64,
    pub delta_bytes: u64,
    pub handshake_rtt_ns: u64,
    pub flow_duration_ns: u64,
    pub event_type: i32,
    pub event_sub_type: i32,
    pub observation_point: u8,
    pub trace_id: String,
    pub uuid: String,
    // Version 2.
    pub tcp_flags_seen: u16,
    pub packet_length: u32,
}

/// The per-endpoint columns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointCols {
    pub namespace: String,
    pub pod: String,
    pub workload: String,
    pub workload_kind: String,
    pub labels: Vec<String>,
    pub names: Vec<String>,
    pub service: String,
}

const NS: i64 = 1_000_000_000;

fn ts_ns(t: &prost_types::Timestamp) -> i64 {
    t.seconds
        .saturating_mul(NS)
        .saturating_add(i64::from(t.nanos))
}

fn dur_ns(d: &prost_types::Duration) -> u64 {
    u64::try_from(
        d.seconds
            .saturating_mul(NS)
            .saturating_add(i64::from(d.nanos)),
    )
    .unwrap_or(0)
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The `time` a flow is stored under: its timestamp, or now when it has none.
pub fn flow_time_ns(flow: &Flow) -> i64 {
    flow.time.as_ref().map_or_else(now_ns, ts_ns)
}

/// IPv6 bytes of an address string, IPv4 mapped; zeros when absent or unparsable.
fn ip_bytes(s: &str) -> [u8; 16] {
    match s.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.to_ipv6_mapped().octets(),
        Ok(IpAddr::V6(v6)) => v6.octets(),
        Err(_) => [0; 16],
    }
}

fn ip_string(b: &[u8; 16], ip_version: u8) -> String {
    let v6 = Ipv6Addr::from(*b);
    match (ip_version, v6.to_ipv4_mapped()) {
        (1, Some(v4)) => v4.to_string(),
        _ => v6.to_string(),
    }
}

/// TCP flags as the wire bits (NS as bit 8).
pub fn tcp_flag_bits(f: &TcpFlags) -> u16 {
    u16::from(f.fin)
        | u16::from(f.syn) << 1
        | u16::from(f.rst) << 2
        | u16::from(f.psh) << 3
        | u16::from(f.ack) << 4
        | u16::from(f.urg) << 5
        | u16::from(f.ece) << 6
        | u16::from(f.cwr) << 7
        | u16::from(f.ns) << 8
}

fn tcp_flags_from_bits(b: u16) -> TcpFlags {
    TcpFlags {
        fin: b & 1 != 0,
        syn: b & 2 != 0,
        rst: b & 4 != 0,
        psh: b & 8 != 0,
        ack: b & 16 != 0,
        urg: b & 32 != 0,
        ece: b & 64 != 0,
        cwr: b & 128 != 0,
        ns: b & 256 != 0,
    }
}

fn small<T: TryFrom<i32> + Default>(v: i32) -> T {
    T::try_from(v).unwrap_or_default()
}

fn policy_strings(ps: &[Policy]) -> Vec<String> {
    ps.iter()
        .map(|p| format!("{}/{}/{}", p.kind, p.namespace, p.name))
        .collect()
}

fn policies_from(v: &[String]) -> Vec<Policy> {
    v.iter()
        .map(|s| {
            let mut it = s.splitn(3, '/');
            let kind = it.next().unwrap_or_default().to_owned();
            let namespace = it.next().unwrap_or_default().to_owned();
            let name = it.next().unwrap_or_default().to_owned();
            Policy {
                name,
                namespace,
                kind,
                ..Default::default()
            }
        })
        .collect()
}

/// The uuid Lumen's node exporter gives a flow event; stored as `''` when a flow's uuid is it.
pub fn derived_uuid(flow_id: u64, time_ns: i64) -> String {
    format!("{flow_id:016x}-{time_ns:x}")
}

impl EndpointCols {
    fn from_endpoint(ep: Option<&Endpoint>, service: Option<&Service>, names: &[String]) -> Self {
        let (namespace, pod, workload, workload_kind, labels) = match ep {
            Some(ep) => {
                let wl = ep.workloads.first();
                (
                    ep.namespace.clone(),
                    ep.pod_name.clone(),
                    wl.map(|w| w.name.clone()).unwrap_or_default(),
                    wl.map(|w| w.kind.clone()).unwrap_or_default(),
                    ep.labels.clone(),
                )
            }
            None => Default::default(),
        };
        Self {
            namespace,
            pod,
            workload,
            workload_kind,
            labels,
            names: names.to_vec(),
            service: service
                .map(|s| format!("{}/{}", s.namespace, s.name))
                .unwrap_or_default(),
        }
    }

    fn endpoint(&self, identity: u32) -> Option<Endpoint> {
        let empty = identity == 0
            && self.namespace.is_empty()
            && self.pod.is_empty()
            && self.workload.is_empty()
            && self.workload_kind.is_empty()
            && self.labels.is_empty();
        (!empty).then(|| Endpoint {
            identity,
            namespace: self.namespace.clone(),
            pod_name: self.pod.clone(),
            labels: self.labels.clone(),
            workloads: if self.workload.is_empty() && self.workload_kind.is_empty() {
                vec![]
            } else {
                vec![Workload {
                    name: self.workload.clone(),
                    kind: self.workload_kind.clone(),
                }]
            },
            ..Default::default()
        })
    }

    fn service(&self) -> Option<Service> {
        self.service.split_once('/').map(|(ns, name)| Service {
            name: name.to_owned(),
            namespace: ns.to_owned(),
        })
    }

    fn encode(&self, e: &mut Enc<'_>) {
        e.str(&self.namespace);
        e.str(&self.pod);
        e.str(&self.workload);
        e.str(&self.workload_kind);
    }
}

impl FlowRow {
    /// The row for `flow`, with the deltas from a [`DeltaTracker`].
    #[allow(deprecated)] // drop_reason: read when drop_reason_desc is unset, as Hubble does
    pub fn from_flow(flow: &Flow, batch_id: u64, delta: Delta) -> Self {
        let time_ns = flow_time_ns(flow);
        let (ip_version, src_ip, dst_ip) = match &flow.ip {
            Some(ip) => (
                small(ip.ip_version),
                ip_bytes(&ip.source),
                ip_bytes(&ip.destination),
            ),
            None => (0, [0; 16], [0; 16]),
        };
        let (protocol, src_port, dst_port, tcp_flags) =
            match flow.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
                Some(Protocol::Tcp(t)) => (
                    6,
                    t.source_port as u16,
                    t.destination_port as u16,
                    t.flags.as_ref().map_or(0, tcp_flag_bits),
                ),
                Some(Protocol::Udp(u)) => (17, u.source_port as u16, u.destination_port as u16, 0),
                Some(Protocol::Sctp(s)) => {
                    (132, s.source_port as u16, s.destination_port as u16, 0)
                }
                Some(Protocol::IcmPv4(i)) => (1, i.r#type as u16, i.code as u16, 0),
                Some(Protocol::IcmPv6(i)) => (58, i.r#type as u16, i.code as u16, 0),
                None => (0, 0, 0, 0),
            };
        let c = flow.counters.unwrap_or_default();
        let drop_reason = if flow.drop_reason_desc != 0 {
            small(flow.drop_reason_desc)
        } else {
            u16::try_from(flow.drop_reason).unwrap_or(0)
        };
        let uuid = if flow.uuid == derived_uuid(flow.flow_id, time_ns) {
            String::new()
        } else {
            flow.uuid.clone()
        };
        Self {
            time_ns,
            node: flow.node_name.clone(),
            batch_id,
            flow_id: flow.flow_id,
            event_kind: small(flow.lumen_event_kind),
            verdict: small(flow.verdict),
            drop_reason,
            ip_version,
            src_ip,
            dst_ip,
            protocol,
            src_port,
            dst_port,
            tcp_flags,
            direction: small(flow.traffic_direction),
            reply: match flow.is_reply {
                None => 0,
                Some(false) => 1,
                Some(true) => 2,
            },
            src_identity: flow.source.as_ref().map_or(0, |e| e.identity),
            dst_identity: flow.destination.as_ref().map_or(0, |e| e.identity),
            src: EndpointCols::from_endpoint(
                flow.source.as_ref(),
                flow.source_service.as_ref(),
                &flow.source_names,
            ),
            dst: EndpointCols::from_endpoint(
                flow.destination.as_ref(),
                flow.destination_service.as_ref(),
                &flow.destination_names,
            ),
            egress_allowed_by: policy_strings(&flow.egress_allowed_by),
            ingress_allowed_by: policy_strings(&flow.ingress_allowed_by),
            egress_denied_by: policy_strings(&flow.egress_denied_by),
            ingress_denied_by: policy_strings(&flow.ingress_denied_by),
            orig_packets: c.orig_packets,
            orig_bytes: c.orig_bytes,
            reply_packets: c.reply_packets,
            reply_bytes: c.reply_bytes,
            delta_packets: delta.packets,
            delta_bytes: delta.bytes,
            handshake_rtt_ns: flow.handshake_rtt.as_ref().map_or(0, dur_ns),
            flow_duration_ns: flow.flow_duration.as_ref().map_or(0, dur_ns),
            event_type: flow.event_type.as_ref().map_or(-1, |e| e.r#type),
            event_sub_type: flow.event_type.as_ref().map_or(0, |e| e.sub_type),
            observation_point: small(flow.trace_observation_point),
            trace_id: flow
                .trace_context
                .as_ref()
                .and_then(|t| t.parent.as_ref())
                .map(|p| p.trace_id.clone())
                .unwrap_or_default(),
            uuid,
            tcp_flags_seen: flow.tcp_flags_seen.as_ref().map_or(0, tcp_flag_bits),
            packet_length: flow.packet_length,
        }
    }

    /// Appends the row as RowBinary in `layout`.
    pub fn encode(&self, layout: Layout, buf: &mut Vec<u8>) {
        let mut e = Enc(buf);
        match layout.flavor {
            Flavor::Modern => e.i64(self.time_ns),
            Flavor::Compat => {
                e.u32(u32::try_from(self.time_ns.div_euclid(NS)).unwrap_or(0));
                e.u32(self.time_ns.rem_euclid(NS) as u32);
            }
        }
        e.str(&self.node);
        e.u64(self.batch_id);
        e.u64(self.flow_id);
        e.u8(self.event_kind);
        e.u8(self.verdict);
        e.u16(self.drop_reason);
        e.u8(self.ip_version);
        e.fixed16(&self.src_ip);
        e.fixed16(&self.dst_ip);
        e.u8(self.protocol);
        e.u16(self.src_port);
        e.u16(self.dst_port);
        e.u16(self.tcp_flags);
        e.u8(self.direction);
        e.u8(self.reply);
        e.u32(self.src_identity);
        e.u32(self.dst_identity);
        self.src.encode(&mut e);
        self.dst.encode(&mut e);
        e.strs(&self.src.labels);
        e.strs(&self.dst.labels);
        e.strs(&self.src.names);
        e.strs(&self.dst.names);
        e.str(&self.src.service);
        e.str(&self.dst.service);
        e.strs(&self.egress_allowed_by);
        e.strs(&self.ingress_allowed_by);
        e.strs(&self.egress_denied_by);
        e.strs(&self.ingress_denied_by);
        for v in [
            self.orig_packets,
            self.orig_bytes,
            self.reply_packets,
            self.reply_bytes,
            self.delta_packets,
            self.delta_bytes,
            self.handshake_rtt_ns,
            self.flow_duration_ns,
        ] {
            e.u64(v);
        }
        e.i32(self.event_type);
        e.i32(self.event_sub_type);
        e.u8(self.observation_point);
        e.str(&self.trace_id);
        e.str(&self.uuid);
        if layout.version >= 2 {
            e.u16(self.tcp_flags_seen);
            e.u32(self.packet_length);
        }
    }

    /// Decodes one row of `layout` from `d`.
    pub(crate) fn decode(d: &mut Dec<'_>, layout: Layout) -> Result<Self, DecodeError> {
        let time_ns = match layout.flavor {
            Flavor::Modern => d.i64()?,
            Flavor::Compat => {
                let s = i64::from(d.u32()?);
                s * NS + i64::from(d.u32()?)
            }
        };
        let mut r = FlowRow {
            time_ns,
            node: d.string()?,
            batch_id: d.u64()?,
            flow_id: d.u64()?,
            event_kind: d.u8()?,
            verdict: d.u8()?,
            drop_reason: d.u16()?,
            ip_version: d.u8()?,
            src_ip: d.fixed16()?,
            dst_ip: d.fixed16()?,
            protocol: d.u8()?,
            src_port: d.u16()?,
            dst_port: d.u16()?,
            tcp_flags: d.u16()?,
            direction: d.u8()?,
            reply: d.u8()?,
            src_identity: d.u32()?,
            dst_identity: d.u32()?,
            ..Default::default()
        };
        for ep in [&mut r.src, &mut r.dst] {
            ep.namespace = d.string()?;
            ep.pod = d.string()?;
            ep.workload = d.string()?;
            ep.workload_kind = d.string()?;
        }
        r.src.labels = d.strings()?;
        r.dst.labels = d.strings()?;
        r.src.names = d.strings()?;
        r.dst.names = d.strings()?;
        r.src.service = d.string()?;
        r.dst.service = d.string()?;
        r.egress_allowed_by = d.strings()?;
        r.ingress_allowed_by = d.strings()?;
        r.egress_denied_by = d.strings()?;
        r.ingress_denied_by = d.strings()?;
        r.orig_packets = d.u64()?;
        r.orig_bytes = d.u64()?;
        r.reply_packets = d.u64()?;
        r.reply_bytes = d.u64()?;
        r.delta_packets = d.u64()?;
        r.delta_bytes = d.u64()?;
        r.handshake_rtt_ns = d.u64()?;
        r.flow_duration_ns = d.u64()?;
        r.event_type = d.i32()?;
        r.event_sub_type = d.i32()?;
        r.observation_point = d.u8()?;
        r.trace_id = d.string()?;
        r.uuid = d.string()?;
        if layout.version >= 2 {
            r.tcp_flags_seen = d.u16()?;
            r.packet_length = d.u32()?;
        }
        Ok(r)
    }

    /// Decodes a whole payload of `layout`.
    pub fn decode_all(payload: &[u8], layout: Layout) -> Result<Vec<Self>, DecodeError> {
        let mut d = Dec::new(payload);
        let mut rows = Vec::new();
        while !d.is_empty() {
            rows.push(Self::decode(&mut d, layout)?);
        }
        Ok(rows)
    }

    /// The flow as history keeps it.
    #[allow(deprecated)] // drop_reason is still filled for old clients
    pub fn to_flow(&self) -> Flow {
        let time = prost_types::Timestamp {
            seconds: self.time_ns.div_euclid(NS),
            nanos: self.time_ns.rem_euclid(NS) as i32,
        };
        let duration = |ns: u64| prost_types::Duration {
            seconds: (ns / NS as u64) as i64,
            nanos: (ns % NS as u64) as i32,
        };
        let has_ip = self.ip_version != 0 || self.src_ip != [0; 16] || self.dst_ip != [0; 16];
        let (sp, dp) = (u32::from(self.src_port), u32::from(self.dst_port));
        let protocol = match self.protocol {
            6 => Some(Protocol::Tcp(Tcp {
                source_port: sp,
                destination_port: dp,
                flags: Some(tcp_flags_from_bits(self.tcp_flags)),
            })),
            17 => Some(Protocol::Udp(Udp {
                source_port: sp,
                destination_port: dp,
            })),
            132 => Some(Protocol::Sctp(Sctp {
                source_port: sp,
                destination_port: dp,
            })),
            1 => Some(Protocol::IcmPv4(IcmPv4 {
                r#type: sp,
                code: dp,
            })),
            58 => Some(Protocol::IcmPv6(IcmPv6 {
                r#type: sp,
                code: dp,
            })),
            _ => None,
        };
        let first_seen_ns = self
            .time_ns
            .saturating_sub(i64::try_from(self.flow_duration_ns).unwrap_or(0));
        Flow {
            time: Some(time),
            verdict: i32::from(self.verdict),
            drop_reason: u32::from(self.drop_reason),
            drop_reason_desc: i32::from(self.drop_reason),
            ip: has_ip.then(|| Ip {
                source: ip_string(&self.src_ip, self.ip_version),
                destination: ip_string(&self.dst_ip, self.ip_version),
                ip_version: i32::from(self.ip_version),
                encrypted: false,
            }),
            l4: protocol.map(|p| Layer4 { protocol: Some(p) }),
            source: self.src.endpoint(self.src_identity),
            destination: self.dst.endpoint(self.dst_identity),
            r#type: lumen_proto::flow::FlowType::L3L4 as i32,
            node_name: self.node.clone(),
            source_names: self.src.names.clone(),
            destination_names: self.dst.names.clone(),
            source_service: self.src.service(),
            destination_service: self.dst.service(),
            traffic_direction: i32::from(self.direction),
            trace_observation_point: i32::from(self.observation_point),
            is_reply: match self.reply {
                1 => Some(false),
                2 => Some(true),
                _ => None,
            },
            event_type: (self.event_type >= 0).then_some(CiliumEventType {
                r#type: self.event_type,
                sub_type: self.event_sub_type,
            }),
            trace_context: (!self.trace_id.is_empty()).then(|| TraceContext {
                parent: Some(TraceParent {
                    trace_id: self.trace_id.clone(),
                }),
            }),
            uuid: if self.uuid.is_empty() {
                derived_uuid(self.flow_id, self.time_ns)
            } else {
                self.uuid.clone()
            },
            egress_allowed_by: policies_from(&self.egress_allowed_by),
            ingress_allowed_by: policies_from(&self.ingress_allowed_by),
            egress_denied_by: policies_from(&self.egress_denied_by),
            ingress_denied_by: policies_from(&self.ingress_denied_by),
            lumen_event_kind: i32::from(self.event_kind),
            counters: Some(FlowCounters {
                orig_packets: self.orig_packets,
                orig_bytes: self.orig_bytes,
                reply_packets: self.reply_packets,
                reply_bytes: self.reply_bytes,
            }),
            handshake_rtt: (self.handshake_rtt_ns != 0).then(|| duration(self.handshake_rtt_ns)),
            flow_duration: Some(duration(self.flow_duration_ns)),
            flow_id: self.flow_id,
            first_seen: Some(prost_types::Timestamp {
                seconds: first_seen_ns.div_euclid(NS),
                nanos: first_seen_ns.rem_euclid(NS) as i32,
            }),
            tcp_flags_seen: (self.protocol == 6).then(|| tcp_flags_from_bits(self.tcp_flags_seen)),
            packet_length: self.packet_length,
            ..Default::default()
        }
    }
}

/// Packets and bytes a connection moved since its previous event at the same observation point.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delta {
    pub packets: u64,
    pub bytes: u64,
}

/// Turns cumulative per-connection counters into per-event deltas.
///
/// Keyed by node and `flow_id` (each observation point has its own conntrack entry and id).
/// A connection seen for the first time counts in full when it started after the tracker
/// did (its earlier bytes cannot have been counted elsewhere), and from this event on when it
/// started before (its bytes so far were counted by a previous writer or are unknown): the
/// rollups never count the same bytes twice. Entries idle for `idle_ns` are forgotten.
#[derive(Debug)]
pub struct DeltaTracker {
    started_ns: i64,
    idle_ns: i64,
    max_entries: usize,
    last: HashMap<(String, u64), (u64, u64, i64)>,
}

impl DeltaTracker {
    pub fn new(idle: std::time::Duration, max_entries: usize) -> Self {
        Self {
            started_ns: now_ns(),
            idle_ns: i64::try_from(idle.as_nanos()).unwrap_or(i64::MAX),
            max_entries,
            last: HashMap::new(),
        }
    }

    /// The delta of `flow`, remembering its counters.
    pub fn delta(&mut self, flow: &Flow) -> Delta {
        let c = flow.counters.unwrap_or_default();
        let packets = c.orig_packets.saturating_add(c.reply_packets);
        let bytes = c.orig_bytes.saturating_add(c.reply_bytes);
        // Drops and packets without conntrack carry their own packet only.
        if flow.flow_id == 0 || flow.verdict == lumen_proto::flow::Verdict::Dropped as i32 {
            return Delta { packets, bytes };
        }
        let time = flow_time_ns(flow);
        let key = (flow.node_name.clone(), flow.flow_id);
        let delta = match self.last.get(&key) {
            Some(&(p, b, _)) if p <= packets && b <= bytes => Delta {
                packets: packets - p,
                bytes: bytes - b,
            },
            Some(_) => Delta { packets, bytes },
            None => {
                let first_seen = flow.first_seen.as_ref().map_or(time, ts_ns);
                if first_seen >= self.started_ns
                    || flow.lumen_event_kind == lumen_proto::flow::LumenEventKind::FlowNew as i32
                {
                    Delta { packets, bytes }
                } else {
                    Delta::default()
                }
            }
        };
        if self.last.len() >= self.max_entries && !self.last.contains_key(&key) {
            self.expire(time);
        }
        if self.last.len() < self.max_entries || self.last.contains_key(&key) {
            self.last.insert(key, (packets, bytes, time));
        }
        delta
    }

    /// Forgets connections idle for longer than the idle timeout as of `now_ns`.
    pub fn expire(&mut self, now_ns: i64) {
        let idle = self.idle_ns;
        self.last
            .retain(|_, (_, _, seen)| now_ns.saturating_sub(*seen) < idle);
    }

    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lumen_proto::flow::{LumenEventKind, Verdict};

    pub(crate) fn sample_flow() -> Flow {
        Flow {
            time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 123_456_789,
            }),
            verdict: Verdict::Forwarded as i32,
            ip: Some(Ip {
                source: "10.0.1.5".into(),
                destination: "10.0.2.9".into(),
                ip_version: 1,
                encrypted: false,
            }),
            l4: Some(Layer4 {
                protocol: Some(Protocol::Tcp(Tcp {
                    source_port: 40000,
                    destination_port: 8080,
                    flags: Some(TcpFlags {
                        syn: true,
                        ack: true,
                        ..Default::default()
                    }),
                })),
            }),
            source: Some(Endpoint {
                identity: 1234,
                namespace: "shop".into(),
                pod_name: "web-7d9".into(),
                labels: vec!["k8s:app=web".into()],
                workloads: vec![Workload {
                    name: "web".into(),
                    kind: "Deployment".into(),
                }],
                ..Default::default()
            }),
            destination: Some(Endpoint {
                identity: 5678,
                namespace: "shop".into(),
                pod_name: "db-0".into(),
                labels: vec!["k8s:app=db".into(), "k8s:tier=data".into()],
                workloads: vec![Workload {
                    name: "db".into(),
                    kind: "StatefulSet".into(),
                }],
                ..Default::default()
            }),
            r#type: 1,
            node_name: "kind/node-1".into(),
            destination_service: Some(Service {
                name: "db".into(),
                namespace: "shop".into(),
            }),
            traffic_direction: 2,
            trace_observation_point: 5,
            is_reply: Some(false),
            event_type: Some(CiliumEventType {
                r#type: 4,
                sub_type: 3,
            }),
            egress_allowed_by: vec![Policy {
                name: "allow-db".into(),
                namespace: "shop".into(),
                kind: "NetworkPolicy".into(),
                ..Default::default()
            }],
            lumen_event_kind: LumenEventKind::FlowTcpFlags as i32,
            counters: Some(FlowCounters {
                orig_packets: 2,
                orig_bytes: 140,
                reply_packets: 1,
                reply_bytes: 74,
            }),
            handshake_rtt: Some(prost_types::Duration {
                seconds: 0,
                nanos: 55_000,
            }),
            flow_duration: Some(prost_types::Duration {
                seconds: 0,
                nanos: 60_000,
            }),
            flow_id: 0xfeed_beef,
            first_seen: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 123_396_789,
            }),
            tcp_flags_seen: Some(TcpFlags {
                syn: true,
                ack: true,
                ..Default::default()
            }),
            packet_length: 74,
            uuid: derived_uuid(0xfeed_beef, 1_700_000_000_123_456_789),
            ..Default::default()
        }
    }

    #[test]
    fn a_flow_survives_encode_decode() {
        let flow = sample_flow();
        for flavor in [Flavor::Modern, Flavor::Compat] {
            let layout = Layout::latest(flavor);
            let row = FlowRow::from_flow(
                &flow,
                42,
                Delta {
                    packets: 3,
                    bytes: 214,
                },
            );
            assert!(
                row.uuid.is_empty(),
                "node-exporter uuids are derived, not stored"
            );
            let mut buf = Vec::new();
            row.encode(layout, &mut buf);
            row.encode(layout, &mut buf);
            let back = FlowRow::decode_all(&buf, layout).expect("decodes");
            assert_eq!(back, vec![row.clone(), row.clone()]);
            assert_eq!(back[0].to_flow(), flow, "{flavor:?}");
        }
    }

    #[test]
    fn older_layouts_decode_without_new_columns() {
        let row = FlowRow::from_flow(&sample_flow(), 1, Delta::default());
        let v1 = Layout {
            flavor: Flavor::Compat,
            version: 1,
        };
        let mut buf = Vec::new();
        row.encode(v1, &mut buf);
        let back = FlowRow::decode_all(&buf, v1).expect("decodes");
        assert_eq!(back[0].packet_length, 0);
        assert_eq!(back[0].flow_id, row.flow_id);
    }

    #[test]
    fn ipv6_and_icmp_and_foreign_uuid() {
        let mut f = sample_flow();
        f.ip = Some(Ip {
            source: "fd00::1".into(),
            destination: "fd00::2".into(),
            ip_version: 2,
            encrypted: false,
        });
        f.l4 = Some(Layer4 {
            protocol: Some(Protocol::IcmPv6(IcmPv6 {
                r#type: 128,
                code: 0,
            })),
        });
        f.uuid = "c0ffee".into();
        let back = FlowRow::from_flow(&f, 1, Delta::default()).to_flow();
        assert_eq!(back.ip, f.ip);
        assert_eq!(back.l4, f.l4);
        assert_eq!(back.uuid, "c0ffee");
        assert_eq!(back.tcp_flags_seen, None);
    }

    #[test]
    fn deltas_never_count_bytes_twice() {
        let mut t = DeltaTracker::new(std::time::Duration::from_secs(600), 10);
        let mut f = sample_flow();
        // Started before the tracker: baseline only.
        assert_eq!(t.delta(&f), Delta::default());
        f.counters = Some(FlowCounters {
            orig_packets: 10,
            orig_bytes: 1000,
            reply_packets: 5,
            reply_bytes: 500,
        });
        assert_eq!(
            t.delta(&f),
            Delta {
                packets: 12,
                bytes: 1286
            }
        );
        assert_eq!(t.delta(&f), Delta::default());
        // A new connection counts in full.
        let mut n = sample_flow();
        n.flow_id = 7;
        n.lumen_event_kind = LumenEventKind::FlowNew as i32;
        assert_eq!(
            t.delta(&n),
            Delta {
                packets: 3,
                bytes: 214
            }
        );
        // Drops carry their own packet.
        let mut d = sample_flow();
        d.verdict = Verdict::Dropped as i32;
        assert_eq!(
            t.delta(&d),
            Delta {
                packets: 3,
                bytes: 214
            }
        );
        assert_eq!(t.len(), 2);
    }
}

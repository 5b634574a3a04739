//! Stored flows to the wire model (`flow.Flow`), Hubble-compatible fields plus Lumen's
//! 5000-range extensions.

use lumen_datapath_common::{direction, flow_flags, FlowReason};
use lumen_proto::flow::{
    self, layer4::Protocol, Endpoint, Flow, FlowCounters, IcmPv4, IcmPv6, Ip, Layer4,
    NetworkInterface, Tcp, TcpFlags, Udp,
};

use crate::{metadata::EndpointRef, pipeline::ip_of, store::StoredFlow};

/// Hubble's monitor event type for trace events (CiliumEventType.type), and the
/// observation-point sub types Lumen's two hooks correspond to.
pub const MONITOR_TYPE_TRACE: i32 = 4;
pub const MONITOR_TYPE_DROP: i32 = 1;
/// Trace sub type "to-endpoint" (Cilium TRACE_TO_LXC).
pub const TRACE_TO_LXC: i32 = 0;
/// Trace sub type "from-endpoint" (Cilium TRACE_FROM_LXC).
pub const TRACE_FROM_LXC: i32 = 5;

/// Static context of a conversion: this node's name, interface names, and the policy set
/// the rule ids refer to.
pub struct ConvertContext<'a> {
    pub node_name: &'a str,
    pub interface_name: &'a dyn Fn(u32) -> Option<String>,
    pub compiled: &'a lumen_policy::compile::CompiledPolicy,
    pub policies: &'a [lumen_policy::Policy],
}

/// Cilium's policy match types (Flow.policy_match_type).
pub mod match_type {
    pub const NONE: u32 = 0;
    pub const L3_ONLY: u32 = 1;
    pub const L3_L4: u32 = 2;
    pub const L4_ONLY: u32 = 3;
    pub const ALL: u32 = 4;
}

/// The policy (as Hubble's flow.Policy) and match type of a rule id.
pub fn attribution(rule_id: u32, ctx: &ConvertContext<'_>) -> Option<(flow::Policy, u32)> {
    let rule = crate::policy::rule_of(ctx.compiled, rule_id)?;
    let policy = ctx.policies.iter().find(|p| p.id == rule.policy);
    let kind = policy.map(|p| p.kind.to_string()).unwrap_or_default();
    let (label, mt) = match rule.rule {
        None => ("lumen.io/rule=default-deny".to_owned(), match_type::NONE),
        Some(i) => {
            let r = policy.and_then(|p| p.rules.get(i as usize));
            let mt = match r {
                Some(r) => match (&r.peers, r.ports.is_empty()) {
                    (lumen_policy::model::Peers::Any, true) => match_type::ALL,
                    (lumen_policy::model::Peers::Any, false) => match_type::L4_ONLY,
                    (_, true) => match_type::L3_ONLY,
                    (_, false) => match_type::L3_L4,
                },
                None => match_type::NONE,
            };
            let path = r
                .map(|r| r.path.clone())
                .unwrap_or_else(|| format!("rule[{i}]"));
            (format!("lumen.io/rule={path}"), mt)
        }
    };
    Some((
        flow::Policy {
            name: rule.policy.name.clone(),
            namespace: rule.policy.namespace.clone().unwrap_or_default(),
            labels: vec![label],
            revision: 0,
            kind,
        },
        mt,
    ))
}

pub fn timestamp(ns: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    }
}

pub fn duration(ns: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    }
}

pub fn tcp_flags(bits: u8) -> TcpFlags {
    TcpFlags {
        fin: bits & 0x01 != 0,
        syn: bits & 0x02 != 0,
        rst: bits & 0x04 != 0,
        psh: bits & 0x08 != 0,
        ack: bits & 0x10 != 0,
        urg: bits & 0x20 != 0,
        ece: bits & 0x40 != 0,
        cwr: bits & 0x80 != 0,
        ns: false,
    }
}

fn endpoint(ep: &Option<EndpointRef>, local_id: u32, identity: Option<u32>) -> Option<Endpoint> {
    let ep = ep.as_ref()?;
    Some(Endpoint {
        id: local_id,
        identity: identity.unwrap_or(ep.identity.0),
        namespace: ep.namespace.clone().unwrap_or_default(),
        labels: ep.labels.iter().map(|l| l.to_string()).collect(),
        pod_name: if ep.is_world() {
            String::new()
        } else {
            ep.pod.clone()
        },
        workloads: ep
            .workload
            .iter()
            .map(|w| flow::Workload {
                name: w.name.clone(),
                kind: w.kind.clone(),
            })
            .collect(),
    })
}

/// Convert one stored flow.
#[allow(deprecated)] // Flow.drop_reason is deprecated in Hubble but still filled for old clients.
pub fn to_flow(f: &StoredFlow, ctx: &ConvertContext<'_>) -> Flow {
    let src_ip = ip_of(f.family, &f.src);
    let dst_ip = ip_of(f.family, &f.dst);
    let reply = f.flags & flow_flags::REPLY != 0;
    let l3_only = f.flags & flow_flags::L3_ONLY != 0;
    // The packet crossed TC ingress of the host-side interface: it left the endpoint.
    let from_endpoint = f.hook_is_ingress();
    let (src_id, dst_id) = if from_endpoint {
        (f.ifindex, 0)
    } else {
        (0, f.ifindex)
    };
    let l4 = if l3_only && !matches!(f.proto, 1 | 58) {
        None
    } else {
        match f.proto {
            6 => Some(Protocol::Tcp(Tcp {
                source_port: u32::from(f.sport),
                destination_port: u32::from(f.dport),
                flags: Some(tcp_flags(f.tcp_flags)),
            })),
            17 => Some(Protocol::Udp(Udp {
                source_port: u32::from(f.sport),
                destination_port: u32::from(f.dport),
            })),
            132 => Some(Protocol::Sctp(flow::Sctp {
                source_port: u32::from(f.sport),
                destination_port: u32::from(f.dport),
            })),
            1 => Some(Protocol::IcmPv4(IcmPv4 {
                r#type: u32::from(f.icmp_type),
                code: u32::from(f.icmp_code),
            })),
            58 => Some(Protocol::IcmPv6(IcmPv6 {
                r#type: u32::from(f.icmp_type),
                code: u32::from(f.icmp_code),
            })),
            _ => None,
        }
    };
    let kind = match FlowReason::from_u8(f.reason) {
        Some(FlowReason::New) => flow::LumenEventKind::FlowNew,
        Some(FlowReason::TcpFlags) => flow::LumenEventKind::FlowTcpFlags,
        Some(FlowReason::Update) => flow::LumenEventKind::FlowUpdate,
        Some(FlowReason::Close) => flow::LumenEventKind::FlowClose,
        Some(FlowReason::Drop) => flow::LumenEventKind::FlowDrop,
        Some(FlowReason::Packet) => flow::LumenEventKind::PacketTrace,
        Some(FlowReason::Reply) => flow::LumenEventKind::FlowReply,
        None => flow::LumenEventKind::Unspecified,
    };
    let dropped = f.verdict == lumen_datapath_common::verdict::DROPPED;
    // The datapath's view of the peer's identity wins over metadata (CIDR identities).
    let peer = (f.peer_identity != 0).then_some(f.peer_identity);
    let (src_identity, dst_identity) = if from_endpoint {
        (None, peer)
    } else {
        (peer, None)
    };
    let policy = attribution(f.policy_rule_id, ctx);
    let denied = f.verdict != lumen_datapath_common::verdict::FORWARDED;
    let ingress = f.direction == direction::INGRESS;
    let pick = |want_ingress: bool, want_denied: bool| -> Vec<flow::Policy> {
        match &policy {
            Some((p, _)) if ingress == want_ingress && denied == want_denied => vec![p.clone()],
            _ => Vec::new(),
        }
    };
    let age_ns = i64::try_from(crate::store::decode_age(f.age)).unwrap_or(i64::MAX);
    Flow {
        time: Some(timestamp(f.time_ns)),
        uuid: format!("{:016x}-{:x}", f.flow_id, f.time_ns),
        verdict: i32::from(f.verdict),
        drop_reason: if dropped { u32::from(f.drop_reason) } else { 0 },
        drop_reason_desc: if dropped { i32::from(f.drop_reason) } else { 0 },
        ip: Some(Ip {
            source: src_ip.to_string(),
            destination: dst_ip.to_string(),
            ip_version: if src_ip.is_ipv4() {
                flow::IpVersion::IPv4 as i32
            } else {
                flow::IpVersion::IPv6 as i32
            },
            encrypted: false,
        }),
        l4: l4.map(|p| Layer4 { protocol: Some(p) }),
        source: endpoint(&f.src_endpoint, src_id, src_identity),
        destination: endpoint(&f.dst_endpoint, dst_id, dst_identity),
        r#type: flow::FlowType::L3L4 as i32,
        node_name: ctx.node_name.to_owned(),
        event_type: Some(flow::CiliumEventType {
            r#type: if dropped {
                MONITOR_TYPE_DROP
            } else {
                MONITOR_TYPE_TRACE
            },
            sub_type: if dropped {
                i32::from(f.drop_reason)
            } else if from_endpoint {
                TRACE_FROM_LXC
            } else {
                TRACE_TO_LXC
            },
        }),
        traffic_direction: match f.direction {
            direction::INGRESS => flow::TrafficDirection::Ingress as i32,
            direction::EGRESS => flow::TrafficDirection::Egress as i32,
            _ => flow::TrafficDirection::Unknown as i32,
        },
        trace_observation_point: if dropped {
            flow::TraceObservationPoint::UnknownPoint as i32
        } else if from_endpoint {
            flow::TraceObservationPoint::FromEndpoint as i32
        } else {
            flow::TraceObservationPoint::ToEndpoint as i32
        },
        is_reply: Some(reply),
        interface: Some(NetworkInterface {
            index: f.ifindex,
            name: (ctx.interface_name)(f.ifindex).unwrap_or_default(),
        }),
        lumen_event_kind: kind as i32,
        counters: Some(FlowCounters {
            orig_packets: u64::from(f.orig_packets),
            orig_bytes: f.orig_bytes,
            reply_packets: u64::from(f.reply_packets),
            reply_bytes: f.reply_bytes,
        }),
        handshake_rtt: (f.handshake_rtt_ns != 0).then(|| duration(i64::from(f.handshake_rtt_ns))),
        flow_duration: Some(duration(age_ns)),
        flow_id: f.flow_id,
        first_seen: Some(timestamp(f.time_ns - age_ns)),
        tcp_flags_seen: (f.proto == 6).then(|| tcp_flags(f.orig_tcp_flags | f.reply_tcp_flags)),
        packet_length: f.packet_len,
        ingress_allowed_by: pick(true, false),
        egress_allowed_by: pick(false, false),
        ingress_denied_by: pick(true, true),
        egress_denied_by: pick(false, true),
        policy_match_type: policy.as_ref().map_or(0, |(_, m)| *m),
        ..Default::default()
    }
}

impl StoredFlow {
    /// Whether the packet was seen at TC ingress of the host-side interface (leaving the
    /// endpoint). Derived from the connection direction and the reply flag.
    pub fn hook_is_ingress(&self) -> bool {
        let reply = self.flags & flow_flags::REPLY != 0;
        (self.direction == direction::EGRESS) != reply
    }
}

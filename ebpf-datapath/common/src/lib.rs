//! The kernel/user ABI of Lumen's eBPF datapath, shared byte for byte by the TC programs
//! (`lumen-datapath`) and user space (`lumen-node-exporter`).
//!
//! Rules for everything here: `#[repr(C)]`, fixed-width integers, explicit padding, no
//! `bool`, sizes asserted at compile time. Events start with a versioned [`EventHeader`];
//! a user-space decoder checks version, kind and length before reading a record.
#![no_std]

use core::mem::size_of;

/// Version of the event ABI. Bump on any change to a record's layout or meaning.
pub const ABI_VERSION: u16 = 1;

/// Map names, as the eBPF object declares them and user space looks them up.
pub mod map_names {
    pub const EVENTS: &str = "EVENTS";
    /// IPv6 conntrack ([`crate::ConntrackKey6`]).
    pub const CONNTRACK: &str = "CONNTRACK";
    /// IPv4 conntrack ([`crate::ConntrackKey4`]): a 20-byte key hashes and compares
    /// faster than the 44-byte IPv6 one, on every packet.
    pub const CONNTRACK4: &str = "CONNTRACK4";
    pub const COUNTERS: &str = "COUNTERS";
    pub const CONFIG: &str = "CONFIG";
    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const IPCACHE: &str = "IPCACHE";
    pub const POLICY: &str = "POLICY";
}

/// Program names in the eBPF object.
pub mod program_names {
    /// Attached to TC ingress of an endpoint's host-side interface: packets leaving the
    /// endpoint (endpoint egress).
    pub const FROM_ENDPOINT: &str = "lumen_from_endpoint";
    /// Attached to TC egress of an endpoint's host-side interface: packets entering the
    /// endpoint (endpoint ingress).
    pub const TO_ENDPOINT: &str = "lumen_to_endpoint";
    /// An empty program, the baseline of per-packet cost benchmarks (never attached).
    pub const EMPTY: &str = "lumen_empty";
}

/// Default ring buffer size in bytes (power of two, multiple of the page size).
pub const DEFAULT_RING_BYTES: u32 = 8 * 1024 * 1024;
/// Default maximum number of conntrack entries (LRU), per address family.
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 262_144;
/// Maximum number of endpoints (interfaces) on one node.
pub const MAX_ENDPOINTS: u32 = 16_384;
/// Default size of the ipcache (IP/CIDR -> identity).
pub const DEFAULT_IPCACHE_ENTRIES: u32 = 262_144;
/// Default size of the policy map (all endpoints' entries).
pub const DEFAULT_POLICY_ENTRIES: u32 = 1 << 20;

/// Kinds of records in the ring buffer. Numeric values are stable.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Flow = 1,
}

impl EventKind {
    pub fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(Self::Flow),
            _ => None,
        }
    }
}

/// Header of every ring buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// [`ABI_VERSION`] of the program that wrote the record.
    pub version: u16,
    /// An [`EventKind`].
    pub kind: u16,
    /// Length of the whole record in bytes, header included.
    pub len: u32,
}
const _: () = assert!(size_of::<EventHeader>() == 8);

/// Why a flow event was emitted (monitor aggregation). Stable numeric values.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowReason {
    /// First packet of a connection (a new conntrack entry).
    New = 1,
    /// A TCP flag not seen before in this direction (SYN-ACK carries the handshake RTT).
    TcpFlags = 2,
    /// Periodic update of a long-lived flow.
    Update = 3,
    /// FIN/RST closed the connection; packets after the close report again so the last
    /// close record of a connection carries its final counters.
    Close = 4,
    /// The packet was dropped.
    Drop = 5,
    /// Per-packet report (aggregation level [`AGGREGATION_NONE`]).
    Packet = 6,
    /// The first packet in the reply direction (a UDP or ICMP answer; TCP's is the SYN-ACK,
    /// reported as [`FlowReason::TcpFlags`]).
    Reply = 7,
}

impl FlowReason {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::New),
            2 => Some(Self::TcpFlags),
            3 => Some(Self::Update),
            4 => Some(Self::Close),
            5 => Some(Self::Drop),
            6 => Some(Self::Packet),
            7 => Some(Self::Reply),
            _ => None,
        }
    }
}

/// Verdict values in [`FlowEvent::verdict`] (Hubble's numbering).
pub mod verdict {
    pub const FORWARDED: u8 = 1;
    pub const DROPPED: u8 = 2;
    pub const AUDIT: u8 = 4;
}

/// Traffic direction relative to the endpoint (Hubble's numbering).
pub mod direction {
    pub const INGRESS: u8 = 1;
    pub const EGRESS: u8 = 2;
}

/// Address family in [`FlowKey::family`].
pub mod family {
    pub const IPV4: u8 = 4;
    pub const IPV6: u8 = 6;
}

/// TCP flag bits as on the wire (byte 13 of the TCP header).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    pub const ECE: u8 = 0x40;
    pub const CWR: u8 = 0x80;
}

/// Bits of [`FlowEvent::flags`].
pub mod flow_flags {
    /// The packet travels in the reply direction of its connection.
    pub const REPLY: u8 = 0x01;
    /// Only L3 was parsed: a non-first fragment, an unknown L4 protocol, or a truncated header.
    pub const L3_ONLY: u8 = 0x02;
    /// The packet is an IP fragment (first or later).
    pub const FRAGMENT: u8 = 0x04;
    /// The conntrack entry could not be created (map update failed); counters are this packet only.
    pub const NO_CONNTRACK: u8 = 0x08;
}

/// A connection's identity in conntrack, oriented as the first packet seen (the
/// originator is `saddr`). IPv4 addresses are IPv4-mapped into 16 bytes (`::ffff:a.b.c.d`).
/// Each endpoint keeps its own view (keyed by `ifindex`), as Cilium's per-endpoint conntrack.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Source port; for ICMP echo, the echo identifier; for other ICMP, type << 8 | code.
    pub sport: u16,
    /// Destination port; for ICMP echo, the echo identifier; 0 for other ICMP.
    pub dport: u16,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, anything else L3-only).
    pub proto: u8,
    /// [`family`] value.
    pub family: u8,
    pub _pad: [u8; 2],
    /// Host-side interface of the endpoint that observed the connection.
    pub ifindex: u32,
}
const _: () = assert!(size_of::<FlowKey>() == 44);

/// Key of the IPv4 conntrack map `CONNTRACK4`. A connection has one key for both
/// directions: of its two (address, port) ends, the one that sorts lower
/// ([`conntrack_low_first`]) is `lo_*`; [`ConntrackEntry::originator_low`] says which end
/// opened it. One lookup finds a reply's connection, and no packet needs a second lookup.
/// Each endpoint keeps its own view (keyed by `ifindex`), as Cilium's per-endpoint conntrack.
/// Addresses are the network-order bytes in memory order (`u32::from_ne_bytes`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConntrackKey4 {
    pub lo_addr: u32,
    pub hi_addr: u32,
    /// Ports as in [`FlowKey`] (ICMP: echo identifier, or type << 8 | code and 0).
    pub lo_port: u16,
    pub hi_port: u16,
    /// Host-side interface of the endpoint that observed the connection.
    pub ifindex: u32,
    /// IP protocol number, in a whole word: no padding bytes for the datapath to clear
    /// on every packet.
    pub proto: u32,
}
const _: () = assert!(size_of::<ConntrackKey4>() == 20);

/// Key of the IPv6 conntrack map `CONNTRACK`, ordered as [`ConntrackKey4`]; addresses as
/// four words of network-order bytes in memory order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConntrackKey6 {
    pub lo_addr: [u32; 4],
    pub hi_addr: [u32; 4],
    pub lo_port: u16,
    pub hi_port: u16,
    pub ifindex: u32,
    pub proto: u32,
}
const _: () = assert!(size_of::<ConntrackKey6>() == 44);

/// Whether the end (`a_addr`, `a_port`) is a conntrack key's low end against
/// (`b_addr`, `b_port`): addresses compared word by word as unsigned integers, then ports.
/// On a tie (a connection with itself) `a` is low, so such a flow has no reply direction.
#[inline(always)]
pub fn conntrack_low_first(a_addr: &[u32; 4], a_port: u16, b_addr: &[u32; 4], b_port: u16) -> bool {
    let mut i = 0;
    while i < 4 {
        if a_addr[i] != b_addr[i] {
            return a_addr[i] < b_addr[i];
        }
        i += 1;
    }
    a_port <= b_port
}

/// Conntrack state of one connection (value of the LRU hashes `CONNTRACK4` and `CONNTRACK`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackEntry {
    /// CLOCK_MONOTONIC ns (bpf_ktime_get_ns) of the first packet.
    pub first_seen_ns: u64,
    /// Time of the last packet to clock-tick precision (the established-flow path reads
    /// a per-CPU clock refreshed once per jiffy; exact when the packet emitted an event).
    pub last_seen_ns: u64,
    /// When an event for this entry was last emitted (aggregation clock).
    pub last_report_ns: u64,
    /// Time of the originator's SYN (0 if none seen).
    pub syn_ns: u64,
    /// SYN to SYN-ACK as seen at this interface; 0 until measured.
    pub handshake_rtt_ns: u64,
    pub orig_packets: u64,
    pub orig_bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// Random per-connection id (for correlating a connection's events).
    pub flow_id: u64,
    /// TCP flags seen: the originator's in bits 0-7, the responder's in bits 8-15 (one
    /// word so the datapath can update it with an atomic fetch-or; 64-bit because BPF
    /// atomics with fetch need 64-bit operands on the generic CPU).
    pub tcp_flags_seen: u64,
    /// [`direction`] of the originating packet relative to the endpoint.
    pub direction: u8,
    /// Non-zero once FIN from both sides or an RST was seen.
    pub closed: u8,
    /// Cached [`verdict`] for the connection (policy: next step).
    pub verdict: u8,
    pub drop_reason: u8,
    /// Policy rule that decided the verdict (0 = none).
    pub policy_rule_id: u32,
    /// Policy generation the cached verdict was computed under.
    pub policy_generation: u32,
    /// Identity of the peer of the connection (from the ipcache), cached with the verdict.
    pub peer_identity: u32,
    /// Non-zero when the originator is the key's low end (`lo_addr`, `lo_port`): packets
    /// from the other end are replies.
    pub originator_low: u8,
    pub _pad: [u8; 7],
}
const _: () = assert!(size_of::<ConntrackEntry>() == 112);

/// A flow record in the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    pub header: EventHeader,
    /// CLOCK_MONOTONIC ns of the packet that triggered the event.
    pub ts_ns: u64,
    pub first_seen_ns: u64,
    pub key: FlowKey,
    pub _pad0: u32,
    pub orig_packets: u64,
    pub orig_bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub handshake_rtt_ns: u64,
    pub flow_id: u64,
    /// skb->len of the triggering packet at the hook (L2 frame length).
    pub packet_len: u32,
    /// Endpoint id from the endpoints map (0 if the interface is unknown to it).
    pub endpoint_id: u32,
    /// Identities of source and destination of *this packet* (0 = unknown; policy: next step).
    pub src_identity: u32,
    pub dst_identity: u32,
    pub policy_rule_id: u32,
    /// A [`FlowReason`].
    pub reason: u8,
    /// A [`verdict`] value.
    pub verdict: u8,
    pub drop_reason: u8,
    /// [`direction`] of the connection relative to the endpoint.
    pub direction: u8,
    /// [`flow_flags`] bits.
    pub flags: u8,
    /// TCP flags of this packet.
    pub tcp_flags: u8,
    pub orig_tcp_flags: u8,
    pub reply_tcp_flags: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// Which hook saw the packet: 1 = TC ingress of the host-side interface, 2 = TC egress.
    pub hook: u8,
    pub _pad: [u8; 1],
}
const _: () = assert!(size_of::<FlowEvent>() == 152);

/// Hook values in [`FlowEvent::hook`].
pub mod hook {
    pub const TC_INGRESS: u8 = 1;
    pub const TC_EGRESS: u8 = 2;
}

/// Indexes into [`CpuState::counters`] (the per-CPU `COUNTERS` array).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Packets the programs ran on.
    PacketsSeen = 0,
    /// Events the aggregation decided to emit.
    EventsAttempted = 1,
    /// Events written into the ring buffer.
    EventsEmitted = 2,
    /// Ring buffer reservations that failed: events lost in the kernel.
    RingReserveFailed = 3,
    /// Conntrack entries created.
    ConntrackCreated = 4,
    /// Conntrack inserts that failed.
    ConntrackInsertFailed = 5,
    /// Packets that were not IPv4/IPv6 (ARP, ...): counted, not reported.
    NonIpPackets = 6,
    /// Packets whose headers could not be read.
    ParseErrors = 7,
    /// Bytes seen (skb->len at the hook).
    BytesSeen = 8,
    /// Gauge, not a counter: bytes pending in the ring when this CPU last submitted
    /// (user space reports the maximum over CPUs as the ring's fill).
    RingPendingBytes = 9,
    /// Packets dropped by policy.
    PolicyDropped = 10,
    /// Packets a policy in audit mode would have dropped (forwarded, reported AUDIT).
    PolicyAudited = 11,
    /// Drop reports not emitted because of the per-connection rate limit.
    DropReportsSuppressed = 12,
    /// Verdicts (re)computed from the policy map.
    PolicyLookups = 13,
}

/// Number of counter slots in [`CpuState::counters`].
pub const COUNTER_SLOTS: u32 = 16;

/// The one entry of the per-CPU array `COUNTERS`: this CPU's counters, indexed by
/// [`Counter`], and its clock cache. One map lookup per packet serves the packet and byte
/// counters and the established-flow path's clock.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuState {
    pub counters: [u64; COUNTER_SLOTS as usize],
    /// Jiffies (bpf_jiffies64) when `clock_ns` was read; internal to the datapath.
    pub clock_jiffies: u64,
    /// bpf_ktime_get_ns at the first packet of jiffy `clock_jiffies` on this CPU.
    pub clock_ns: u64,
}
const _: () = assert!(size_of::<CpuState>() == 144);

/// Every counter, in slot order, for user space to iterate.
pub const ALL_COUNTERS: [Counter; 14] = [
    Counter::PacketsSeen,
    Counter::EventsAttempted,
    Counter::EventsEmitted,
    Counter::RingReserveFailed,
    Counter::ConntrackCreated,
    Counter::ConntrackInsertFailed,
    Counter::NonIpPackets,
    Counter::ParseErrors,
    Counter::BytesSeen,
    Counter::RingPendingBytes,
    Counter::PolicyDropped,
    Counter::PolicyAudited,
    Counter::DropReportsSuppressed,
    Counter::PolicyLookups,
];

/// Monitor aggregation levels in [`DatapathConfig::aggregation`].
pub const AGGREGATION_NONE: u32 = 0;
/// Default: events on new flow, TCP flag change, close, drop, periodic update.
pub const AGGREGATION_FLOWS: u32 = 1;

/// The one entry of the `CONFIG` array, written by user space.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatapathConfig {
    /// [`AGGREGATION_NONE`] (every packet) or [`AGGREGATION_FLOWS`].
    pub aggregation: u32,
    /// Non-zero once user space has written the config (the programs use defaults before).
    pub initialized: u32,
    /// Interval of periodic updates for long-lived flows, ns.
    pub report_interval_ns: u64,
    /// Force a consumer wakeup when the ring holds at least this many bytes; below it,
    /// records are submitted with BPF_RB_NO_WAKEUP and the reader drains on a timer.
    pub wakeup_watermark_bytes: u64,
    /// Bumped by user space after every policy map change: conntrack entries with an older
    /// generation re-evaluate their verdict on their next packet.
    pub policy_generation: u32,
    /// Minimum interval between two drop reports of one connection, ms (drops are always
    /// counted).
    pub drop_report_interval_ms: u32,
}
const _: () = assert!(size_of::<DatapathConfig>() == 32);

impl DatapathConfig {
    pub const DEFAULT: Self = Self {
        aggregation: AGGREGATION_FLOWS,
        initialized: 1,
        report_interval_ns: 5_000_000_000,
        wakeup_watermark_bytes: 256 * 1024,
        policy_generation: 0,
        drop_report_interval_ms: 1000,
    };
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Drop reasons (Hubble's numbering).
pub mod drop_reason {
    /// Default deny: selected by a policy, no rule allows.
    pub const POLICY_DENIED: u8 = 133;
    /// An explicit deny rule matched.
    pub const POLICY_DENY: u8 = 181;
}

/// What the policy decides for one (endpoint, direction, peer, protocol, port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    /// Rule that decided (index into user space's rule table; 0 = none).
    pub rule_id: u32,
    /// Non-zero: deny.
    pub deny: u8,
    /// Non-zero (with `deny`): only report AUDIT, forward the packet.
    pub audit: u8,
    /// [`drop_reason`] of a deny.
    pub reason: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<PolicyValue>() == 8);

/// Data of a `POLICY` LPM-trie key. Bytes in prefix order: endpoint, direction, peer
/// identity, protocol, destination port (all big-endian). Prefix lengths:
/// [`POLICY_PREFIX_ANY_PROTO`] (peer, any protocol), [`POLICY_PREFIX_ANY_PORT`]
/// (peer, protocol, any port), up to [`POLICY_PREFIX_FULL`] (ports as aligned blocks).
/// Peer identity 0 is the wildcard peer, looked up second.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyKey {
    pub endpoint: [u8; 4],
    pub direction: u8,
    pub peer: [u8; 4],
    pub proto: u8,
    pub dport: [u8; 2],
}
const _: () = assert!(size_of::<PolicyKey>() == 12);

pub const POLICY_PREFIX_ANY_PROTO: u32 = 72;
pub const POLICY_PREFIX_ANY_PORT: u32 = 80;
pub const POLICY_PREFIX_FULL: u32 = 96;

/// Value of the `IPCACHE` LPM trie (key data: IPv6 or IPv4-mapped address, 16 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheValue {
    pub identity: u32,
    /// Reserved for endpoint flags (e.g. local endpoint); 0 today.
    pub flags: u32,
}
const _: () = assert!(size_of::<IpcacheValue>() == 8);

/// Value of the `ENDPOINTS` hash (key: ifindex u32).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointValue {
    pub endpoint_id: u32,
    pub identity: u32,
    /// Non-zero when some policy selects the endpoint for traffic entering it.
    pub ingress_enforced: u8,
    /// Non-zero when some policy selects the endpoint for traffic leaving it.
    pub egress_enforced: u8,
    pub _pad: [u8; 2],
    /// What a peer/port no policy entry matches gets, per direction.
    pub ingress_default: PolicyValue,
    pub egress_default: PolicyValue,
}
const _: () = assert!(size_of::<EndpointValue>() == 28);

#[cfg(feature = "user")]
mod user {
    #![allow(unsafe_code)]
    // SAFETY: all types are repr(C), made of integers and byte arrays with explicit
    // padding, so every bit pattern is valid and there are no implicit padding bytes.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::ConntrackKey4 {}
    unsafe impl aya::Pod for super::ConntrackKey6 {}
    unsafe impl aya::Pod for super::ConntrackEntry {}
    unsafe impl aya::Pod for super::FlowEvent {}
    unsafe impl aya::Pod for super::DatapathConfig {}
    unsafe impl aya::Pod for super::CpuState {}
    unsafe impl aya::Pod for super::EndpointValue {}
    unsafe impl aya::Pod for super::PolicyValue {}
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::IpcacheValue {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4]) -> [u32; 4] {
        [
            0,
            0,
            u32::from_ne_bytes([0, 0, 0xff, 0xff]),
            u32::from_ne_bytes(a),
        ]
    }

    /// Both directions of a connection must agree on which end is low, or a reply would
    /// miss its connection's entry.
    #[test]
    fn conntrack_ends_are_ordered_the_same_from_both_sides() {
        let ends = [
            (v4([10, 0, 0, 1]), 40000u16),
            (v4([10, 0, 0, 2]), 80),
            (v4([10, 0, 0, 2]), 40000),
            (v4([192, 168, 1, 1]), 0),
            ([0xfd00, 0, 0, 1], 443),
            ([0xfd00, 0, 0, 2], 443),
            ([0xfd00, 0, 1, 0], 1),
        ];
        for (a, pa) in ends {
            for (b, pb) in ends {
                let ab = conntrack_low_first(&a, pa, &b, pb);
                let ba = conntrack_low_first(&b, pb, &a, pa);
                if (a, pa) == (b, pb) {
                    assert!(ab && ba, "an end against itself is low");
                } else {
                    assert_ne!(ab, ba, "exactly one of {a:?}:{pa} and {b:?}:{pb} is low");
                }
            }
        }
    }

    #[test]
    fn same_address_orders_by_port() {
        let a = v4([10, 0, 0, 1]);
        assert!(conntrack_low_first(&a, 1000, &a, 2000));
        assert!(!conntrack_low_first(&a, 2000, &a, 1000));
    }
}

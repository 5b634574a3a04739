//! Lumen's TC programs for endpoint interfaces: parse Ethernet/IPv4/IPv6 and TCP/UDP/ICMP,
//! track connections in an LRU conntrack, and report flows through a BPF ring buffer with
//! monitor aggregation (new flow, TCP flag change, close, periodic update; or every packet).
//!
//! Both programs observe and let the packet continue (`TC_ACT_UNSPEC`, the next program or
//! the default action decides); policy verdicts come in a later step.
#![no_std]
#![no_main]
#![allow(unsafe_code, internal_features)]
#![feature(core_intrinsics)]

mod parse;

use core::intrinsics::{atomic_or, atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::{classifier, map},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use lumen_datapath_common::{
    direction, flow_flags, hook, tcp_flags, verdict, ConntrackEntry, Counter, DatapathConfig,
    EndpointValue, EventHeader, EventKind, FlowEvent, FlowKey, FlowReason, IpcacheValue, PolicyKey,
    PolicyValue, ABI_VERSION, AGGREGATION_NONE, COUNTER_SLOTS, DEFAULT_CONNTRACK_ENTRIES,
    DEFAULT_IPCACHE_ENTRIES, DEFAULT_POLICY_ENTRIES, DEFAULT_RING_BYTES, MAX_ENDPOINTS,
    POLICY_PREFIX_FULL,
};

use crate::parse::parse_packet;

/// `bpf_ringbuf_query` flag: bytes not yet consumed.
const BPF_RB_AVAIL_DATA: u64 = 0;

#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

#[map(name = "CONNTRACK")]
static CONNTRACK: LruHashMap<FlowKey, ConntrackEntry> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[map(name = "CONFIG")]
static CONFIG: Array<DatapathConfig> = Array::with_max_entries(1, 0);

#[map(name = "ENDPOINTS")]
static ENDPOINTS: HashMap<u32, EndpointValue> = HashMap::with_max_entries(MAX_ENDPOINTS, 0);

/// IP (IPv4-mapped or IPv6) -> identity, longest prefix.
#[map(name = "IPCACHE")]
static IPCACHE: LpmTrie<[u8; 16], IpcacheValue> =
    LpmTrie::with_max_entries(DEFAULT_IPCACHE_ENTRIES, 0);

/// (endpoint, direction, peer, protocol, port prefix) -> verdict.
#[map(name = "POLICY")]
static POLICY: LpmTrie<PolicyKey, PolicyValue> =
    LpmTrie::with_max_entries(DEFAULT_POLICY_ENTRIES, 0);

/// Per-CPU scratch space for a conntrack entry (the BPF stack is only 512 bytes).
#[map(name = "SCRATCH")]
static SCRATCH: PerCpuArray<ConntrackEntry> = PerCpuArray::with_max_entries(1, 0);

/// Reserved identity of addresses the ipcache does not know.
const IDENTITY_WORLD: u32 = 2;

#[classifier]
pub fn lumen_from_endpoint(ctx: TcContext) -> i32 {
    observe(&ctx, hook::TC_INGRESS)
}

#[classifier]
pub fn lumen_to_endpoint(ctx: TcContext) -> i32 {
    observe(&ctx, hook::TC_EGRESS)
}

/// Does nothing: the baseline the benchmarks compare the datapath's per-packet cost with
/// (loaded, never attached).
#[classifier]
pub fn lumen_empty(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

#[inline(always)]
fn observe(ctx: &TcContext, hook: u8) -> i32 {
    count(Counter::PacketsSeen, 1);
    count(Counter::BytesSeen, u64::from(ctx.len()));
    match try_observe(ctx, hook) {
        Ok(action) => action,
        Err(counter) => {
            count(counter, 1);
            TC_ACT_UNSPEC
        }
    }
}

#[inline(always)]
fn count(counter: Counter, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot of this CPU, valid for the program's run.
        unsafe { *slot += n };
    }
}

static DEFAULT_CONFIG: DatapathConfig = DatapathConfig::DEFAULT;

#[inline(always)]
fn config() -> &'static DatapathConfig {
    match CONFIG.get(0) {
        Some(c) if c.initialized != 0 => c,
        _ => &DEFAULT_CONFIG,
    }
}

/// Identity of `addr` from the ipcache (longest prefix), world if unknown.
#[inline(always)]
fn identity_of(addr: &[u8; 16]) -> u32 {
    match IPCACHE.get(Key::new(128, *addr)) {
        Some(v) => v.identity,
        None => IDENTITY_WORLD,
    }
}

/// The policy verdict for a connection of endpoint `ep` in direction `dir` (relative to
/// the endpoint) with `peer` on `proto`/`dport`. Lookup order (mirrors user space's
/// reference, `DirectionPolicy::lookup`): (peer, proto, port) → (peer, any) by longest
/// prefix, then the same for the wildcard peer 0, then the endpoint's default.
#[inline(always)]
fn decide(ep: &EndpointValue, dir: u8, peer: u32, proto: u8, dport: u16) -> PolicyValue {
    let (enforced, default) = if dir == direction::INGRESS {
        (ep.ingress_enforced, ep.ingress_default)
    } else {
        (ep.egress_enforced, ep.egress_default)
    };
    if enforced == 0 {
        return PolicyValue::default();
    }
    count(Counter::PolicyLookups, 1);
    let mut key = Key::new(
        POLICY_PREFIX_FULL,
        PolicyKey {
            endpoint: ep.endpoint_id.to_be_bytes(),
            direction: dir,
            peer: peer.to_be_bytes(),
            proto,
            dport: dport.to_be_bytes(),
        },
    );
    if let Some(v) = POLICY.get(&key) {
        return *v;
    }
    key.data.peer = [0; 4];
    if let Some(v) = POLICY.get(&key) {
        return *v;
    }
    default
}

/// IPv6 neighbour discovery and router messages (ICMPv6 133-137) are never subject to
/// policy: without them no IPv6 peer is reachable at all (Cilium answers them itself).
#[inline(always)]
fn policy_exempt(proto: u8, sport: u16, dport: u16) -> bool {
    proto == 58 && dport == 0 && (133..=137).contains(&(sport >> 8))
}

/// Verdict fields for a policy value.
#[inline(always)]
fn verdict_of(v: &PolicyValue) -> (u8, u8) {
    if v.deny == 0 {
        (verdict::FORWARDED, 0)
    } else if v.audit != 0 {
        (verdict::AUDIT, v.reason)
    } else {
        (verdict::DROPPED, v.reason)
    }
}

#[inline(always)]
fn try_observe(ctx: &TcContext, hook: u8) -> Result<i32, Counter> {
    let pkt = parse_packet(ctx)?;
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: reading a field of the context's __sk_buff.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let len = ctx.len();
    let cfg = config();
    // The endpoint is looked up only when a verdict is decided or an event is written,
    // keeping it off the established-flow path.
    // SAFETY: map value valid for the program run.
    let endpoint = || -> Option<&'static EndpointValue> { unsafe { ENDPOINTS.get(&ifindex) } };

    // Packets leaving the endpoint hit TC ingress of its host-side interface.
    let pkt_dir = if hook == hook::TC_INGRESS {
        direction::EGRESS
    } else {
        direction::INGRESS
    };

    let mut key = FlowKey {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        family: pkt.family,
        _pad: [0; 2],
        ifindex,
    };

    let mut reason: Option<FlowReason> = None;
    let mut is_reply = false;
    let mut no_ct = false;
    let mut fresh_entry = false;
    let mut entry_ptr = CONNTRACK.get_ptr_mut(&key);
    if entry_ptr.is_none() {
        // Try the reverse orientation: this packet may be a reply.
        key.saddr = pkt.daddr;
        key.daddr = pkt.saddr;
        key.sport = pkt.dport;
        key.dport = pkt.sport;
        entry_ptr = CONNTRACK.get_ptr_mut(&key);
        if entry_ptr.is_some() {
            is_reply = true;
        } else {
            key.saddr = pkt.saddr;
            key.daddr = pkt.daddr;
            key.sport = pkt.sport;
            key.dport = pkt.dport;
        }
    }
    // The per-CPU scratch entry serves as the new entry to insert and, if conntrack is
    // full, as the stand-in entry for this packet alone.
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Err(Counter::ParseErrors);
    };
    // SAFETY: this CPU's scratch slot, exclusively ours for the program run.
    let scratch = unsafe { &mut *scratch };
    if entry_ptr.is_none() {
        // (The scratch slot is only touched on this path and the no-conntrack path.)
        scratch.first_seen_ns = now;
        scratch.last_seen_ns = now;
        scratch.last_report_ns = now;
        scratch.syn_ns = 0;
        scratch.handshake_rtt_ns = 0;
        scratch.orig_packets = 0;
        scratch.orig_bytes = 0;
        scratch.reply_packets = 0;
        scratch.reply_bytes = 0;
        scratch.tcp_flags_seen = 0;
        scratch.direction = pkt_dir;
        scratch.closed = 0;
        scratch.verdict = verdict::FORWARDED;
        scratch.drop_reason = 0;
        scratch.policy_rule_id = 0;
        // Forces a policy decision below.
        scratch.policy_generation = cfg.policy_generation.wrapping_add(1);
        scratch.peer_identity = 0;
        scratch.flow_id = (u64::from(unsafe { bpf_get_prandom_u32() }) << 32)
            | u64::from(unsafe { bpf_get_prandom_u32() });
        // BPF_NOEXIST: if another CPU created it meanwhile, use theirs.
        if CONNTRACK.insert(&key, &*scratch, 1).is_ok() {
            count(Counter::ConntrackCreated, 1);
            reason = Some(FlowReason::New);
            fresh_entry = true;
        }
        entry_ptr = CONNTRACK.get_ptr_mut(&key);
        if entry_ptr.is_none() {
            count(Counter::ConntrackInsertFailed, 1);
            no_ct = true;
        }
    }

    let ev_entry: &ConntrackEntry;
    if let Some(e) = entry_ptr {
        // SAFETY: pointer into the LRU map value, valid for this program run; shared
        // counters are updated atomically because both directions of a connection can run
        // on different CPUs at once.
        let e = unsafe { &mut *e };
        // Verdict: decided when the connection starts and re-decided when the policy
        // changed since; replies follow their connection's verdict (stateful).
        if e.policy_generation != cfg.policy_generation {
            let peer_addr = if e.direction == direction::EGRESS {
                &key.daddr
            } else {
                &key.saddr
            };
            let peer = identity_of(peer_addr);
            let v = match endpoint() {
                Some(_) if policy_exempt(key.proto, key.sport, key.dport) => PolicyValue::default(),
                Some(ep) => decide(ep, e.direction, peer, key.proto, key.dport),
                None => PolicyValue::default(),
            };
            let (vd, why) = verdict_of(&v);
            e.verdict = vd;
            e.drop_reason = why;
            e.policy_rule_id = v.rule_id;
            e.peer_identity = peer;
            e.policy_generation = cfg.policy_generation;
        }
        unsafe {
            if is_reply {
                add_u64(&mut e.reply_packets, 1);
                add_u64(&mut e.reply_bytes, u64::from(len));
            } else {
                add_u64(&mut e.orig_packets, 1);
                add_u64(&mut e.orig_bytes, u64::from(len));
            }
        }
        e.last_seen_ns = now;

        if e.verdict == verdict::DROPPED {
            count(Counter::PolicyDropped, 1);
            let interval = u64::from(cfg.drop_report_interval_ms) * 1_000_000;
            if fresh_entry || now.wrapping_sub(e.last_report_ns) >= interval {
                reason = Some(FlowReason::Drop);
                e.last_report_ns = now;
            } else {
                reason = None;
                count(Counter::DropReportsSuppressed, 1);
            }
        } else {
            if e.verdict == verdict::AUDIT {
                count(Counter::PolicyAudited, 1);
            }
            if pkt.proto == 6 {
                let flags = pkt.tcp_flags;
                let shift = if is_reply { 8 } else { 0 };
                let bits = u64::from(flags) << shift;
                // Atomic only when this packet brings a flag not seen yet in its direction.
                let seen_now = e.tcp_flags_seen;
                let old = if seen_now & bits == bits {
                    seen_now
                } else {
                    unsafe { or_u64(&mut e.tcp_flags_seen, bits) }
                };
                let seen = old | bits;
                if !is_reply && flags & tcp_flags::SYN != 0 && flags & tcp_flags::ACK == 0 {
                    e.syn_ns = now;
                }
                if is_reply
                    && flags & (tcp_flags::SYN | tcp_flags::ACK)
                        == (tcp_flags::SYN | tcp_flags::ACK)
                    && e.handshake_rtt_ns == 0
                    && e.syn_ns != 0
                {
                    e.handshake_rtt_ns = now - e.syn_ns;
                }
                let was_closed = e.closed != 0;
                let fin_both = seen & u64::from(tcp_flags::FIN) != 0
                    && seen & (u64::from(tcp_flags::FIN) << 8) != 0;
                if flags & tcp_flags::RST != 0 || fin_both {
                    e.closed = 1;
                }
                if reason.is_none() {
                    if e.closed != 0 && (was_closed || old & bits != bits) {
                        reason = Some(FlowReason::Close);
                    } else if old & bits != bits {
                        reason = Some(FlowReason::TcpFlags);
                    }
                }
            }
            if reason.is_none() && now.wrapping_sub(e.last_report_ns) >= cfg.report_interval_ns {
                reason = Some(FlowReason::Update);
            }
            if reason.is_none() && cfg.aggregation == AGGREGATION_NONE {
                reason = Some(FlowReason::Packet);
            }
            if reason.is_some() {
                e.last_report_ns = now;
            }
        }
        ev_entry = e;
    } else {
        // No conntrack slot: decide for this packet alone.
        let peer_addr = if pkt_dir == direction::EGRESS {
            &key.daddr
        } else {
            &key.saddr
        };
        let peer = identity_of(peer_addr);
        let v = match endpoint() {
            Some(_) if policy_exempt(pkt.proto, pkt.sport, pkt.dport) => PolicyValue::default(),
            Some(ep) => decide(ep, pkt_dir, peer, pkt.proto, pkt.dport),
            None => PolicyValue::default(),
        };
        let (vd, why) = verdict_of(&v);
        scratch.verdict = vd;
        scratch.drop_reason = why;
        scratch.policy_rule_id = v.rule_id;
        scratch.peer_identity = peer;
        reason = Some(if vd == verdict::DROPPED {
            count(Counter::PolicyDropped, 1);
            FlowReason::Drop
        } else {
            FlowReason::New
        });
        scratch.orig_packets = 1;
        scratch.orig_bytes = u64::from(len);
        ev_entry = scratch;
    }
    let action = if ev_entry.verdict == verdict::DROPPED {
        TC_ACT_SHOT
    } else {
        TC_ACT_UNSPEC
    };
    if fresh_entry && ev_entry.verdict == verdict::DROPPED {
        reason = Some(FlowReason::Drop);
    }

    let Some(reason) = reason else {
        return Ok(action);
    };
    count(Counter::EventsAttempted, 1);
    let Some(mut slot) = EVENTS.reserve::<FlowEvent>(0) else {
        count(Counter::RingReserveFailed, 1);
        return Ok(action);
    };
    let (endpoint_id, ep_identity) = match endpoint() {
        Some(ep) => (ep.endpoint_id, ep.identity),
        None => (0, 0),
    };
    // Identities of this packet's source and destination.
    let endpoint_is_src = (ev_entry.direction == direction::EGRESS) != is_reply;
    let (src_identity, dst_identity) = if endpoint_is_src {
        (ep_identity, ev_entry.peer_identity)
    } else {
        (ev_entry.peer_identity, ep_identity)
    };
    let mut flags = pkt.flags;
    if is_reply {
        flags |= flow_flags::REPLY;
    }
    if no_ct {
        flags |= flow_flags::NO_CONNTRACK;
    }
    // Fill the reserved record in place (a FlowEvent on the stack would not fit).
    let ev: *mut FlowEvent = slot.as_mut_ptr();
    // SAFETY: `ev` points to a reserved, exclusively owned ring buffer record of the right
    // size; every field is written before submit.
    unsafe {
        (*ev).header = EventHeader {
            version: ABI_VERSION,
            kind: EventKind::Flow as u16,
            len: core::mem::size_of::<FlowEvent>() as u32,
        };
        (*ev).ts_ns = now;
        (*ev).first_seen_ns = ev_entry.first_seen_ns;
        (*ev).key = key;
        (*ev)._pad0 = 0;
        (*ev).orig_packets = ev_entry.orig_packets;
        (*ev).orig_bytes = ev_entry.orig_bytes;
        (*ev).reply_packets = ev_entry.reply_packets;
        (*ev).reply_bytes = ev_entry.reply_bytes;
        (*ev).handshake_rtt_ns = ev_entry.handshake_rtt_ns;
        (*ev).flow_id = ev_entry.flow_id;
        (*ev).packet_len = len;
        (*ev).endpoint_id = endpoint_id;
        (*ev).src_identity = src_identity;
        (*ev).dst_identity = dst_identity;
        (*ev).policy_rule_id = ev_entry.policy_rule_id;
        (*ev).reason = reason as u8;
        (*ev).verdict = ev_entry.verdict;
        (*ev).drop_reason = ev_entry.drop_reason;
        (*ev).direction = ev_entry.direction;
        (*ev).flags = flags;
        (*ev).tcp_flags = pkt.tcp_flags;
        (*ev).orig_tcp_flags = (ev_entry.tcp_flags_seen & 0xff) as u8;
        (*ev).reply_tcp_flags = ((ev_entry.tcp_flags_seen >> 8) & 0xff) as u8;
        (*ev).icmp_type = pkt.icmp_type;
        (*ev).icmp_code = pkt.icmp_code;
        (*ev).hook = hook;
        (*ev)._pad = [0; 1];
    }
    let pending = EVENTS.query(BPF_RB_AVAIL_DATA);
    if let Some(slot) = COUNTERS.get_ptr_mut(Counter::RingPendingBytes as u32) {
        // SAFETY: per-CPU slot of this CPU.
        unsafe { *slot = pending };
    }
    let wake = if pending >= cfg.wakeup_watermark_bytes {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    slot.submit(u64::from(wake));
    count(Counter::EventsEmitted, 1);
    Ok(action)
}

/// Atomic add (BPF_ATOMIC_ADD) on a map value field.
///
/// # Safety
/// `v` must point into a map value that lives for the program run.
#[inline(always)]
unsafe fn add_u64(v: &mut u64, n: u64) {
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(v as *mut u64, n) };
}

/// Atomic fetch-or (BPF_ATOMIC_OR | BPF_FETCH) on a map value field; returns the old value.
///
/// # Safety
/// As [`add_u64`].
#[inline(always)]
unsafe fn or_u64(v: &mut u64, bits: u64) -> u64 {
    unsafe { atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(v as *mut u64, bits) }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

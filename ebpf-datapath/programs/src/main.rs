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
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, TC_ACT_UNSPEC},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::{classifier, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use lumen_datapath_common::{
    direction, flow_flags, hook, tcp_flags, verdict, ConntrackEntry, Counter, DatapathConfig,
    EndpointValue, EventHeader, EventKind, FlowEvent, FlowKey, FlowReason, ABI_VERSION,
    AGGREGATION_NONE, COUNTER_SLOTS, DEFAULT_CONNTRACK_ENTRIES, DEFAULT_RING_BYTES, MAX_ENDPOINTS,
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
        Ok(()) => {}
        Err(counter) => count(counter, 1),
    }
    TC_ACT_UNSPEC
}

#[inline(always)]
fn count(counter: Counter, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot of this CPU, valid for the program's run.
        unsafe { *slot += n };
    }
}

#[inline(always)]
fn config() -> DatapathConfig {
    match CONFIG.get(0) {
        Some(c) if c.initialized != 0 => *c,
        _ => DatapathConfig::DEFAULT,
    }
}

#[inline(always)]
fn try_observe(ctx: &TcContext, hook: u8) -> Result<(), Counter> {
    let pkt = parse_packet(ctx)?;
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: reading a field of the context's __sk_buff.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let len = ctx.len();
    let cfg = config();

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
    let mut entry_ptr = CONNTRACK.get_ptr_mut(&key);
    if entry_ptr.is_none() {
        let rev = FlowKey {
            saddr: pkt.daddr,
            daddr: pkt.saddr,
            sport: pkt.dport,
            dport: pkt.sport,
            ..key
        };
        entry_ptr = CONNTRACK.get_ptr_mut(&rev);
        if entry_ptr.is_some() {
            is_reply = true;
            key = rev;
        }
    }
    if entry_ptr.is_none() {
        let flow_id = (u64::from(unsafe { bpf_get_prandom_u32() }) << 32)
            | u64::from(unsafe { bpf_get_prandom_u32() });
        let fresh = ConntrackEntry {
            first_seen_ns: now,
            last_seen_ns: now,
            last_report_ns: now,
            flow_id,
            direction: pkt_dir,
            verdict: verdict::FORWARDED,
            ..ConntrackEntry::default()
        };
        // BPF_NOEXIST: if another CPU created it meanwhile, use theirs.
        if CONNTRACK.insert(&key, &fresh, 1).is_ok() {
            count(Counter::ConntrackCreated, 1);
            reason = Some(FlowReason::New);
        }
        entry_ptr = CONNTRACK.get_ptr_mut(&key);
        if entry_ptr.is_none() {
            count(Counter::ConntrackInsertFailed, 1);
            no_ct = true;
        }
    }

    let mut ev_entry = ConntrackEntry {
        first_seen_ns: now,
        direction: pkt_dir,
        verdict: verdict::FORWARDED,
        ..ConntrackEntry::default()
    };
    if let Some(e) = entry_ptr {
        // SAFETY: pointer into the LRU map value, valid for this program run; shared
        // counters are updated atomically because both directions of a connection can run
        // on different CPUs at once.
        let e = unsafe { &mut *e };
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

        if pkt.proto == 6 {
            let flags = pkt.tcp_flags;
            let shift = if is_reply { 8 } else { 0 };
            let bits = u64::from(flags) << shift;
            let old = unsafe { or_u64(&mut e.tcp_flags_seen, bits) };
            let seen = old | bits;
            if !is_reply && flags & tcp_flags::SYN != 0 && flags & tcp_flags::ACK == 0 {
                e.syn_ns = now;
            }
            if is_reply
                && flags & (tcp_flags::SYN | tcp_flags::ACK) == (tcp_flags::SYN | tcp_flags::ACK)
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
        ev_entry = *e;
    } else if no_ct {
        reason = Some(FlowReason::New);
        if is_reply {
            ev_entry.reply_packets = 1;
            ev_entry.reply_bytes = u64::from(len);
        } else {
            ev_entry.orig_packets = 1;
            ev_entry.orig_bytes = u64::from(len);
        }
    }

    let Some(reason) = reason else {
        return Ok(());
    };
    count(Counter::EventsAttempted, 1);
    let Some(mut slot) = EVENTS.reserve::<FlowEvent>(0) else {
        return Err(Counter::RingReserveFailed);
    };
    let endpoint_id = match unsafe { ENDPOINTS.get(&ifindex) } {
        Some(ep) => ep.endpoint_id,
        None => 0,
    };
    let mut flags = pkt.flags;
    if is_reply {
        flags |= flow_flags::REPLY;
    }
    if no_ct {
        flags |= flow_flags::NO_CONNTRACK;
    }
    slot.write(FlowEvent {
        header: EventHeader {
            version: ABI_VERSION,
            kind: EventKind::Flow as u16,
            len: core::mem::size_of::<FlowEvent>() as u32,
        },
        ts_ns: now,
        first_seen_ns: ev_entry.first_seen_ns,
        key,
        _pad0: 0,
        orig_packets: ev_entry.orig_packets,
        orig_bytes: ev_entry.orig_bytes,
        reply_packets: ev_entry.reply_packets,
        reply_bytes: ev_entry.reply_bytes,
        handshake_rtt_ns: ev_entry.handshake_rtt_ns,
        flow_id: ev_entry.flow_id,
        packet_len: len,
        endpoint_id,
        src_identity: 0,
        dst_identity: 0,
        policy_rule_id: ev_entry.policy_rule_id,
        reason: reason as u8,
        verdict: ev_entry.verdict,
        drop_reason: ev_entry.drop_reason,
        direction: ev_entry.direction,
        flags,
        tcp_flags: pkt.tcp_flags,
        orig_tcp_flags: (ev_entry.tcp_flags_seen & 0xff) as u8,
        reply_tcp_flags: ((ev_entry.tcp_flags_seen >> 8) & 0xff) as u8,
        icmp_type: pkt.icmp_type,
        icmp_code: pkt.icmp_code,
        hook,
        _pad: [0; 1],
    });
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
    Ok(())
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

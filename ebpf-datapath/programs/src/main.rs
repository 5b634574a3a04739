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
    helpers::{bpf_get_prandom_u32, bpf_jiffies64, bpf_ktime_get_ns},
    macros::{classifier, map},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use lumen_datapath_common::{
    conntrack_low_first, direction, family, flow_flags, hook, tcp_flags, verdict, ConntrackEntry,
    ConntrackKey4, ConntrackKey6, Counter, CpuState, DatapathConfig, EndpointValue, EventHeader,
    EventKind, FlowEvent, FlowKey, FlowReason, IpcacheValue, PolicyKey, PolicyValue, ABI_VERSION,
    AGGREGATION_NONE, DEFAULT_CONNTRACK_ENTRIES, DEFAULT_IPCACHE_ENTRIES, DEFAULT_POLICY_ENTRIES,
    DEFAULT_RING_BYTES, MAX_ENDPOINTS, POLICY_PREFIX_FULL,
};

use crate::parse::{parse_packet, Packet};

/// `bpf_ringbuf_query` flag: bytes not yet consumed.
const BPF_RB_AVAIL_DATA: u64 = 0;

#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

/// IPv4 connections (20-byte key).
#[map(name = "CONNTRACK4")]
static CONNTRACK4: LruHashMap<ConntrackKey4, ConntrackEntry> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, 0);

/// IPv6 connections.
#[map(name = "CONNTRACK")]
static CONNTRACK: LruHashMap<ConntrackKey6, ConntrackEntry> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<CpuState> = PerCpuArray::with_max_entries(1, 0);

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
    let Some(cpu) = COUNTERS.get_ptr_mut(0) else {
        // Cannot happen (index 0 of a one-entry array); nothing to count into.
        return TC_ACT_UNSPEC;
    };
    // SAFETY: this CPU's entry, exclusively ours for the program run (TC programs do not
    // nest on a CPU).
    let cpu = unsafe { &mut *cpu };
    cpu.counters[Counter::PacketsSeen as usize] += 1;
    cpu.counters[Counter::BytesSeen as usize] += u64::from(ctx.len());
    match try_observe(ctx, hook, cpu) {
        Ok(action) => action,
        Err(counter) => {
            count(counter, 1);
            TC_ACT_UNSPEC
        }
    }
}

/// Add `n` to this CPU's `counter` (off the established-flow path: it looks the
/// per-CPU entry up again rather than carry it everywhere).
#[inline(always)]
fn count(counter: Counter, n: u64) {
    if let Some(cpu) = COUNTERS.get_ptr_mut(0) {
        // SAFETY: this CPU's entry, valid for the program's run.
        unsafe { (*cpu).counters[counter as usize] += n };
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

/// A packet's time. The established-flow path only needs time to decide whether a
/// periodic update or a drop report is due (intervals of seconds), so it reads the per-CPU
/// clock cache (`approx`, at most one jiffy old); `bpf_ktime_get_ns` (a helper call that
/// costs about as much as the rest of that path) runs only when an exact time is stored:
/// new entries, SYN/SYN-ACK times, and emitted events.
struct Now {
    approx: u64,
    exact: u64,
}

impl Now {
    #[inline(always)]
    fn read(cpu: &mut CpuState) -> Self {
        // bpf_jiffies64 is inlined by the verifier on 64-bit JITs: a load, no call.
        let jiffies = unsafe { bpf_jiffies64() };
        if cpu.clock_jiffies != jiffies {
            let ns = unsafe { bpf_ktime_get_ns() };
            cpu.clock_jiffies = jiffies;
            cpu.clock_ns = ns;
            return Self {
                approx: ns,
                exact: ns,
            };
        }
        Self {
            approx: cpu.clock_ns,
            exact: 0,
        }
    }

    #[inline(always)]
    fn exact(&mut self) -> u64 {
        if self.exact == 0 {
            self.exact = unsafe { bpf_ktime_get_ns() };
        }
        self.exact
    }

    /// Whether at least `interval` ns passed since `since` (an exact time, possibly
    /// written by another CPU a little ahead of this CPU's approximate clock).
    #[inline(always)]
    fn elapsed(&self, since: u64, interval: u64) -> bool {
        self.approx.saturating_sub(since) >= interval
    }
}

/// A packet's connection in conntrack: IPv4 in `CONNTRACK4` (20-byte key), IPv6 in
/// `CONNTRACK`. The key is built inside each family's branch, right where it is used, so
/// the IPv4 path never builds (or copies) the 44-byte IPv6 key.
struct Ct<'a> {
    pkt: &'a Packet,
    ifindex: u32,
    pkt_low: bool,
}

impl Ct<'_> {
    #[inline(always)]
    fn key4(&self) -> ConntrackKey4 {
        let p = self.pkt;
        let (lo_addr, hi_addr, lo_port, hi_port) = if self.pkt_low {
            (p.saddr[3], p.daddr[3], p.sport, p.dport)
        } else {
            (p.daddr[3], p.saddr[3], p.dport, p.sport)
        };
        ConntrackKey4 {
            lo_addr,
            hi_addr,
            lo_port,
            hi_port,
            ifindex: self.ifindex,
            proto: u32::from(p.proto),
        }
    }

    #[inline(always)]
    fn key6(&self) -> ConntrackKey6 {
        let p = self.pkt;
        let (lo_addr, hi_addr, lo_port, hi_port) = if self.pkt_low {
            (p.saddr, p.daddr, p.sport, p.dport)
        } else {
            (p.daddr, p.saddr, p.dport, p.sport)
        };
        ConntrackKey6 {
            lo_addr,
            hi_addr,
            lo_port,
            hi_port,
            ifindex: self.ifindex,
            proto: u32::from(p.proto),
        }
    }

    #[inline(always)]
    fn lookup(&self) -> Option<*mut ConntrackEntry> {
        if self.pkt.family == family::IPV4 {
            CONNTRACK4.get_ptr_mut(&self.key4())
        } else {
            CONNTRACK.get_ptr_mut(&self.key6())
        }
    }

    /// Insert `entry` unless the key exists (BPF_NOEXIST).
    #[inline(always)]
    fn insert_new(&self, entry: &ConntrackEntry) -> bool {
        const BPF_NOEXIST: u64 = 1;
        if self.pkt.family == family::IPV4 {
            CONNTRACK4.insert(&self.key4(), entry, BPF_NOEXIST).is_ok()
        } else {
            CONNTRACK.insert(&self.key6(), entry, BPF_NOEXIST).is_ok()
        }
    }
}

#[inline(always)]
fn bytes16(w: &[u32; 4]) -> [u8; 16] {
    let mut b = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let x = w[i].to_ne_bytes();
        b[4 * i] = x[0];
        b[4 * i + 1] = x[1];
        b[4 * i + 2] = x[2];
        b[4 * i + 3] = x[3];
        i += 1;
    }
    b
}

#[inline(always)]
fn try_observe(ctx: &TcContext, hook: u8, cpu: &mut CpuState) -> Result<i32, Counter> {
    let pkt = parse_packet(ctx)?;
    // SAFETY: reading a field of the context's __sk_buff.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let len = ctx.len();
    let cfg = config();
    let mut now = Now::read(cpu);
    // The endpoint is looked up only when a verdict is decided or an event is written,
    // keeping it off the established-flow path.
    // SAFETY: map value valid for the program run.
    let endpoint = || -> Option<&'static EndpointValue> { unsafe { ENDPOINTS.get(ifindex) } };

    // Packets leaving the endpoint hit TC ingress of its host-side interface.
    let pkt_dir = if hook == hook::TC_INGRESS {
        direction::EGRESS
    } else {
        direction::INGRESS
    };

    // Both directions of a connection share one key (its ends in canonical order), so
    // every packet, reply or not, takes exactly one lookup.
    let pkt_low = conntrack_low_first(&pkt.saddr, pkt.sport, &pkt.daddr, pkt.dport);
    let ct_key = Ct {
        pkt: &pkt,
        ifindex,
        pkt_low,
    };

    let mut reason: Option<FlowReason> = None;
    let mut no_ct = false;
    let mut fresh_entry = false;
    let mut entry_ptr = ct_key.lookup();
    let mut scratch_ptr: Option<*mut ConntrackEntry> = None;
    if entry_ptr.is_none() {
        // The per-CPU scratch entry serves as the new entry to insert and, if conntrack
        // is full, as the stand-in entry for this packet alone.
        let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
            return Err(Counter::ParseErrors);
        };
        scratch_ptr = Some(scratch);
        // SAFETY: this CPU's scratch slot, exclusively ours for the program run.
        let scratch = unsafe { &mut *scratch };
        let t = now.exact();
        scratch.first_seen_ns = t;
        scratch.last_seen_ns = t;
        scratch.last_report_ns = t;
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
        scratch.originator_low = u8::from(pkt_low);
        scratch._pad = [0; 7];
        scratch.flow_id = (u64::from(unsafe { bpf_get_prandom_u32() }) << 32)
            | u64::from(unsafe { bpf_get_prandom_u32() });
        // If another CPU created it meanwhile (either direction), use theirs.
        if ct_key.insert_new(scratch) {
            count(Counter::ConntrackCreated, 1);
            reason = Some(FlowReason::New);
            fresh_entry = true;
        }
        entry_ptr = ct_key.lookup();
        if entry_ptr.is_none() {
            count(Counter::ConntrackInsertFailed, 1);
            no_ct = true;
        }
    }

    let mut is_reply = false;
    let ev_entry: &ConntrackEntry;
    if let Some(e) = entry_ptr {
        // SAFETY: pointer into the LRU map value, valid for this program run; shared
        // counters are updated atomically because both directions of a connection can run
        // on different CPUs at once.
        let e = unsafe { &mut *e };
        is_reply = (e.originator_low != 0) != pkt_low;
        // Verdict: decided when the connection starts and re-decided when the policy
        // changed since; replies follow their connection's verdict (stateful).
        if e.policy_generation != cfg.policy_generation {
            // The originator's view: (saddr, sport) opened the connection to (daddr, dport).
            let (o_saddr, o_daddr, o_sport, o_dport) = if is_reply {
                (&pkt.daddr, &pkt.saddr, pkt.dport, pkt.sport)
            } else {
                (&pkt.saddr, &pkt.daddr, pkt.sport, pkt.dport)
            };
            let peer_addr = if e.direction == direction::EGRESS {
                o_daddr
            } else {
                o_saddr
            };
            let peer = identity_of(&bytes16(peer_addr));
            let v = match endpoint() {
                Some(_) if policy_exempt(pkt.proto, o_sport, o_dport) => PolicyValue::default(),
                Some(ep) => decide(ep, e.direction, peer, pkt.proto, o_dport),
                None => PolicyValue::default(),
            };
            let (vd, why) = verdict_of(&v);
            e.verdict = vd;
            e.drop_reason = why;
            e.policy_rule_id = v.rule_id;
            e.peer_identity = peer;
            e.policy_generation = cfg.policy_generation;
        }
        let mut first_reply = false;
        unsafe {
            if is_reply {
                // A plain read: fetch-add needs BPF v3 atomics, and two first replies racing
                // on two CPUs cost one extra event at most.
                first_reply = e.reply_packets == 0;
                add_u64(&mut e.reply_packets, 1);
                add_u64(&mut e.reply_bytes, u64::from(len));
            } else {
                add_u64(&mut e.orig_packets, 1);
                add_u64(&mut e.orig_bytes, u64::from(len));
            }
        }

        if e.verdict == verdict::DROPPED {
            count(Counter::PolicyDropped, 1);
            let interval = u64::from(cfg.drop_report_interval_ms) * 1_000_000;
            if fresh_entry || now.elapsed(e.last_report_ns, interval) {
                reason = Some(FlowReason::Drop);
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
                    e.syn_ns = now.exact();
                }
                if is_reply
                    && flags & (tcp_flags::SYN | tcp_flags::ACK)
                        == (tcp_flags::SYN | tcp_flags::ACK)
                    && e.handshake_rtt_ns == 0
                    && e.syn_ns != 0
                {
                    e.handshake_rtt_ns = now.exact().saturating_sub(e.syn_ns);
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
            if reason.is_none() && first_reply {
                reason = Some(FlowReason::Reply);
            }
            if reason.is_none() && now.elapsed(e.last_report_ns, cfg.report_interval_ns) {
                reason = Some(FlowReason::Update);
            }
            if reason.is_none() && cfg.aggregation == AGGREGATION_NONE {
                reason = Some(FlowReason::Packet);
            }
        }
        if reason.is_some() {
            let t = now.exact();
            e.last_report_ns = t;
            e.last_seen_ns = t;
        } else {
            e.last_seen_ns = now.approx;
        }
        ev_entry = e;
    } else {
        let Some(scratch) = scratch_ptr else {
            return Err(Counter::ParseErrors);
        };
        // SAFETY: as above.
        let scratch = unsafe { &mut *scratch };
        // No conntrack slot: decide for this packet alone.
        let peer_addr = if pkt_dir == direction::EGRESS {
            &pkt.daddr
        } else {
            &pkt.saddr
        };
        let peer = identity_of(&bytes16(peer_addr));
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
    emit(
        &pkt,
        ev_entry,
        reason,
        is_reply,
        no_ct,
        ifindex,
        len,
        now.exact(),
        hook,
        cfg,
    );
    Ok(action)
}

/// Write a flow event for `pkt` of the connection `ev_entry` into the ring buffer.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn emit(
    pkt: &Packet,
    ev_entry: &ConntrackEntry,
    reason: FlowReason,
    is_reply: bool,
    no_ct: bool,
    ifindex: u32,
    len: u32,
    now: u64,
    hook: u8,
    cfg: &DatapathConfig,
) {
    count(Counter::EventsAttempted, 1);
    let Some(mut slot) = EVENTS.reserve::<FlowEvent>(0) else {
        count(Counter::RingReserveFailed, 1);
        return;
    };
    let (endpoint_id, ep_identity) = match unsafe { ENDPOINTS.get(ifindex) } {
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
    // The event's key is oriented as the connection's first packet.
    let key = if is_reply {
        FlowKey {
            saddr: bytes16(&pkt.daddr),
            daddr: bytes16(&pkt.saddr),
            sport: pkt.dport,
            dport: pkt.sport,
            proto: pkt.proto,
            family: pkt.family,
            _pad: [0; 2],
            ifindex,
        }
    } else {
        FlowKey {
            saddr: bytes16(&pkt.saddr),
            daddr: bytes16(&pkt.daddr),
            sport: pkt.sport,
            dport: pkt.dport,
            proto: pkt.proto,
            family: pkt.family,
            _pad: [0; 2],
            ifindex,
        }
    };
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
    if let Some(cpu) = COUNTERS.get_ptr_mut(0) {
        // SAFETY: this CPU's entry.
        unsafe { (*cpu).counters[Counter::RingPendingBytes as usize] = pending };
    }
    let wake = if pending >= cfg.wakeup_watermark_bytes {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    slot.submit(u64::from(wake));
    count(Counter::EventsEmitted, 1);
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

//! The flow ring: the last N enriched flows, kept compactly (endpoint metadata is shared
//! through `Arc`s, not copied per flow), with a sequence number per flow so readers can
//! page through it without holding the lock, and a broadcast of new flows for followers,
//! with the node's flow watermark among them ([`Published`]).

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering},
        Arc, RwLock,
    },
};

use tokio::sync::broadcast;

use crate::metadata::EndpointRef;

/// One flow as kept in memory (128 bytes; see the size assertion below).
#[derive(Debug, Clone)]
pub struct StoredFlow {
    /// Wall-clock time of the event, ns since the Unix epoch.
    pub time_ns: i64,
    pub flow_id: u64,
    pub orig_bytes: u64,
    pub reply_bytes: u64,
    pub orig_packets: u32,
    pub reply_packets: u32,
    /// Handshake RTT in ns (saturates at ~4.29 s), 0 = not measured.
    pub handshake_rtt_ns: u32,
    /// Age of the connection at this event (time since its first packet), encoded by
    /// [`encode_age`]: µs below 35 minutes, seconds above.
    pub age: u32,
    /// Policy rule that decided the verdict (index into the compiled rule table; 0 = none).
    pub policy_rule_id: u32,
    /// Identity of the connection's peer as the datapath resolved it (0 = not resolved).
    pub peer_identity: u32,
    /// Host-side interface that observed the packet.
    pub ifindex: u32,
    /// Addresses of this packet (IPv4 mapped into IPv6 form).
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// L2 length of the packet that triggered the event.
    pub packet_len: u32,
    pub src_endpoint: Option<EndpointRef>,
    pub dst_endpoint: Option<EndpointRef>,
    pub proto: u8,
    pub family: u8,
    pub reason: u8,
    pub verdict: u8,
    pub drop_reason: u8,
    /// Connection direction relative to the endpoint (1 ingress, 2 egress).
    pub direction: u8,
    /// `flow_flags` bits (reply, L3-only, fragment).
    pub flags: u8,
    pub tcp_flags: u8,
    pub orig_tcp_flags: u8,
    pub reply_tcp_flags: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
}

const _: () = assert!(std::mem::size_of::<StoredFlow>() <= 128);

const AGE_SECONDS: u32 = 0x8000_0000;

/// Compact connection age: microseconds while they fit in 31 bits (about 35 minutes),
/// then whole seconds with the top bit set.
pub fn encode_age(ns: u64) -> u32 {
    let us = ns / 1_000;
    if us < u64::from(AGE_SECONDS) {
        us as u32
    } else {
        AGE_SECONDS | (ns / 1_000_000_000).min(u64::from(AGE_SECONDS - 1)) as u32
    }
}

/// Inverse of [`encode_age`], in ns.
pub fn decode_age(v: u32) -> u64 {
    if v & AGE_SECONDS != 0 {
        u64::from(v & !AGE_SECONDS) * 1_000_000_000
    } else {
        u64::from(v) * 1_000
    }
}

/// Bytes one stored flow costs in the ring (the struct; endpoint metadata is shared).
pub const STORED_FLOW_BYTES: usize = std::mem::size_of::<StoredFlow>();

struct Inner {
    buf: VecDeque<StoredFlow>,
    /// Sequence number of `buf[0]`.
    first_seq: u64,
}

/// What the ring tells its followers, in order.
#[derive(Debug, Clone)]
pub enum Published {
    /// A new flow and its sequence number.
    Flow(u64, StoredFlow),
    /// The flow watermark (wall ns): every flow older than this that will ever reach the
    /// ring came before this item (see [`FlowRing::advance`]).
    Watermark(i64),
}

/// Bounded in-memory ring of flows.
pub struct FlowRing {
    inner: RwLock<Inner>,
    capacity: usize,
    seen: AtomicU64,
    /// Flows evicted because the ring was full (the oldest go first).
    evicted: AtomicU64,
    /// Newest watermark published (`i64::MIN`: none yet).
    watermark: AtomicI64,
    tx: broadcast::Sender<Published>,
}

impl FlowRing {
    /// `capacity` flows; followers lag by at most `follow_queue` flows before they are
    /// told how many they lost.
    pub fn new(capacity: usize, follow_queue: usize) -> Arc<Self> {
        let (tx, _) = broadcast::channel(follow_queue.max(16));
        Arc::new(Self {
            inner: RwLock::new(Inner {
                buf: VecDeque::with_capacity(capacity.min(1 << 20)),
                first_seq: 0,
            }),
            capacity: capacity.max(1),
            seen: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            watermark: AtomicI64::new(i64::MIN),
            tx,
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Flows ever pushed.
    pub fn seen(&self) -> u64 {
        self.seen.load(Ordering::Relaxed)
    }

    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.read().buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Append a batch of flows.
    pub fn push_batch(&self, flows: Vec<StoredFlow>) {
        if flows.is_empty() {
            return;
        }
        let n = flows.len() as u64;
        let mut followers = Vec::new();
        let want_broadcast = self.tx.receiver_count() > 0;
        {
            let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
            for f in flows {
                if g.buf.len() == self.capacity {
                    g.buf.pop_front();
                    g.first_seq += 1;
                    self.evicted.fetch_add(1, Ordering::Relaxed);
                }
                let seq = g.first_seq + g.buf.len() as u64;
                if want_broadcast {
                    followers.push(Published::Flow(seq, f.clone()));
                }
                g.buf.push_back(f);
            }
        }
        self.seen.fetch_add(n, Ordering::Relaxed);
        for item in followers {
            // No receivers is fine; lagging receivers learn how many they missed.
            let _ = self.tx.send(item);
        }
    }

    /// Sequence number the next pushed flow will get.
    pub fn next_seq(&self) -> u64 {
        let g = self.read();
        g.first_seq + g.buf.len() as u64
    }

    /// Sequence number of the oldest flow still held.
    pub fn first_seq(&self) -> u64 {
        self.read().first_seq
    }

    /// Up to `max` flows starting at `from` (clamped to what is still held), oldest first.
    pub fn range(&self, from: u64, max: usize) -> Vec<(u64, StoredFlow)> {
        let g = self.read();
        let start = from.max(g.first_seq);
        let off = (start - g.first_seq) as usize;
        g.buf
            .iter()
            .skip(off)
            .take(max)
            .enumerate()
            .map(|(i, f)| (start + i as u64, f.clone()))
            .collect()
    }

    /// Up to `max` flows ending just before `before`, returned newest first.
    pub fn range_rev(&self, before: u64, max: usize) -> Vec<(u64, StoredFlow)> {
        let g = self.read();
        let end = before.min(g.first_seq + g.buf.len() as u64);
        if end <= g.first_seq {
            return Vec::new();
        }
        let end_off = (end - g.first_seq) as usize;
        g.buf
            .range(..end_off)
            .rev()
            .take(max)
            .enumerate()
            .map(|(i, f)| (end - 1 - i as u64, f.clone()))
            .collect()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Published> {
        self.tx.subscribe()
    }

    /// The one writer of the ring promises that no flow older than `watermark_ns` (wall
    /// ns) will be pushed from now on; followers get it in order with the flows. Only
    /// moves forward: an older watermark is ignored.
    pub fn advance(&self, watermark_ns: i64) {
        let before = self.watermark.fetch_max(watermark_ns, Ordering::AcqRel);
        if before < watermark_ns && self.tx.receiver_count() > 0 {
            let _ = self.tx.send(Published::Watermark(watermark_ns));
        }
    }

    /// Newest watermark published.
    pub fn watermark(&self) -> Option<i64> {
        Some(self.watermark.load(Ordering::Acquire)).filter(|w| *w != i64::MIN)
    }

    /// Flows per second over the last `window_ns` of flow time.
    pub fn rate(&self, now_ns: i64, window_ns: i64) -> f64 {
        let g = self.read();
        let from = now_ns - window_ns;
        let n = g.buf.iter().rev().take_while(|f| f.time_ns >= from).count();
        n as f64 / (window_ns as f64 / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(t: i64) -> StoredFlow {
        StoredFlow {
            time_ns: t,
            flow_id: t as u64,
            orig_bytes: 0,
            reply_bytes: 0,
            orig_packets: 0,
            reply_packets: 0,
            handshake_rtt_ns: 0,
            age: 0,
            policy_rule_id: 0,
            peer_identity: 0,
            ifindex: 0,
            src: [0; 16],
            dst: [0; 16],
            sport: 0,
            dport: 0,
            packet_len: 0,
            src_endpoint: None,
            dst_endpoint: None,
            proto: 6,
            family: 4,
            reason: 1,
            verdict: 1,
            drop_reason: 0,
            direction: 2,
            flags: 0,
            tcp_flags: 0,
            orig_tcp_flags: 0,
            reply_tcp_flags: 0,
            icmp_type: 0,
            icmp_code: 0,
        }
    }

    #[test]
    fn ages_round_trip_with_documented_precision() {
        assert_eq!(decode_age(encode_age(123_456_000)), 123_456_000);
        assert_eq!(decode_age(encode_age(999)), 0);
        let three_hours = 3 * 3600 * 1_000_000_000u64;
        assert_eq!(decode_age(encode_age(three_hours + 5)), three_hours);
    }

    #[test]
    fn evicts_oldest_and_keeps_sequence_numbers() {
        let ring = FlowRing::new(3, 16);
        ring.push_batch((0..5).map(flow).collect());
        assert_eq!(ring.len(), 3);
        assert_eq!(ring.seen(), 5);
        assert_eq!(ring.evicted(), 2);
        assert_eq!(ring.first_seq(), 2);
        let all: Vec<i64> = ring.range(0, 10).iter().map(|(_, f)| f.time_ns).collect();
        assert_eq!(all, vec![2, 3, 4]);
        let last2: Vec<u64> = ring
            .range_rev(u64::MAX, 2)
            .iter()
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(last2, vec![4, 3]);
    }

    #[test]
    fn followers_get_new_flows_in_order() {
        let ring = FlowRing::new(10, 16);
        let mut rx = ring.subscribe();
        ring.push_batch(vec![flow(1), flow(2)]);
        ring.advance(5);
        ring.advance(4);
        ring.push_batch(vec![flow(6)]);
        let got: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|p| match p {
                Published::Flow(seq, f) => format!("flow {seq} at {}", f.time_ns),
                Published::Watermark(w) => format!("watermark {w}"),
            })
            .collect();
        assert_eq!(
            got,
            ["flow 0 at 1", "flow 1 at 2", "watermark 5", "flow 2 at 6"],
            "in order, and the watermark never moves back"
        );
        assert_eq!(ring.watermark(), Some(5));
    }
}

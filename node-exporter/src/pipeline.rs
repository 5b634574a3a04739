//! The flow pipeline: ring reader (decode) ─► bounded queue of batches ─► enricher ─►
//! flow ring. The reader never blocks on a slow consumer: a full queue drops the batch and
//! counts every event in it as lost (`events_queue`).
//!
//! Each drain of the ring also establishes the node's flow watermark
//! ([`drain_watermark`]); it travels behind the drain's events through the same queue and
//! the enricher publishes it on the flow ring, in order with the flows, for following
//! clients (the relay's FlowBatches streams carry it).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use lumen_datapath_common::{family, FlowEvent};
use tokio::{io::unix::AsyncFd, sync::mpsc};
use tracing::{debug, warn};

use crate::{
    clock::{self, ClockOffset},
    decode::{decode, Record},
    metadata::MetadataHandle,
    metrics::{FlowLabels, Metrics},
    store::{FlowRing, StoredFlow},
};

/// Most events handed from the reader to the enricher in one message.
pub const BATCH: usize = 512;

/// What the ring reader hands the enricher, in order.
#[derive(Debug)]
pub enum Drained {
    /// Decoded events, in ring order.
    Events(Vec<FlowEvent>),
    /// Every event timestamped before this (CLOCK_MONOTONIC ns) came in an earlier
    /// message or was lost: see [`drain_watermark`].
    Watermark(u64),
}

/// The watermark a drain of the ring that started at `started_ns` (CLOCK_MONOTONIC, read
/// before the first record) establishes: `started − 2 × max_event_delay`, where
/// `max_event_delay` bounds how long an emitting program run takes from reading the
/// event's timestamp (`bpf_ktime_get_ns`, the same clock) or reserving its record,
/// whichever comes first, to committing it (`bpf_ringbuf_submit`). `None` before the
/// clock has run that long.
///
/// Why nothing older can come later. The ring is read in reservation order, and the
/// reader stops at the first record that is reserved but not yet committed: it cannot skip
/// it. So events of different CPUs come out slightly out of time order, and an event
/// committed before the drain may still wait behind an uncommitted one when it ends. Say
/// the drain started at D, stopped at some T ≥ D, and did not read an event E stamped at
/// t < D − 2d (d = `max_event_delay`). Either E was not committed at T: it is committed
/// within d of its stamp, so t > T − d ≥ D − d. Or E waited behind a record R reserved
/// before it and uncommitted at T: R's reservation is within d of its commit, which is
/// after T, so it is after D − d; E was reserved after R, and stamped at most d before
/// its own reservation, so t > D − 2d. Both contradict t < D − 2d: every event stamped
/// before D − 2d was read by this drain or an earlier one, and went into the queue to the
/// enricher ahead of the watermark (or was dropped there and counted lost, never late).
///
/// What it cannot promise: a program run delayed past d (a virtual CPU descheduled between
/// stamp and commit), or a wall-clock step backwards between converting two times (the
/// ring's own order breaks then too). Such flows reach the ring older than the watermark
/// already published; they are counted (`lumen_flow_watermark_misses_total`) and a relay
/// sees them as late flows.
pub fn drain_watermark(started_ns: i64, max_event_delay: Duration) -> Option<u64> {
    let d = i64::try_from(max_event_delay.as_nanos()).unwrap_or(i64::MAX);
    u64::try_from(started_ns.checked_sub(d.saturating_mul(2))?).ok()
}

/// Read the ring buffer until `shutdown` resolves: wake on data (the datapath forces a
/// wakeup above its watermark) or every `drain_interval`, drain everything available, and
/// follow each drain with the watermark it establishes ([`drain_watermark`]).
pub async fn run_reader(
    ring: RingBuf<MapData>,
    drain_interval: Duration,
    max_event_delay: Duration,
    tx: mpsc::Sender<Drained>,
    metrics: Arc<Metrics>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    // The ring buffer owns its fd and keeps it open for as long as the AsyncFd lives.
    #[allow(deprecated)]
    let fd = AsyncFd::new(ring);
    let mut fd = match fd {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "ring buffer fd not pollable");
            return;
        }
    };
    let mut tick = tokio::time::interval(drain_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = fd.readable_mut() => {
                match r {
                    Ok(mut guard) => {
                        drain(guard.get_inner_mut(), max_event_delay, &tx, &metrics);
                        guard.clear_ready();
                    }
                    Err(e) => {
                        warn!(error = %e, "ring buffer poll failed");
                        return;
                    }
                }
            }
            _ = tick.tick() => drain(fd.get_mut(), max_event_delay, &tx, &metrics),
            _ = shutdown.changed() => {
                drain(fd.get_mut(), max_event_delay, &tx, &metrics);
                return;
            }
        }
    }
}

fn drain(
    ring: &mut RingBuf<MapData>,
    max_event_delay: Duration,
    tx: &mpsc::Sender<Drained>,
    metrics: &Metrics,
) {
    // Before the first record: see drain_watermark.
    let started = clock::monotonic_ns();
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(item) = ring.next() {
        match decode(&item) {
            Ok(Record::Flow(ev)) => batch.push(ev),
            Err(e) => {
                debug!(error = %e, "undecodable ring buffer record");
                metrics.count_decode_error(e.reason());
            }
        }
        drop(item);
        if batch.len() == BATCH {
            send(
                std::mem::replace(&mut batch, Vec::with_capacity(BATCH)),
                tx,
                metrics,
            );
        }
    }
    if !batch.is_empty() {
        send(batch, tx, metrics);
    }
    if let Some(w) = drain_watermark(started, max_event_delay) {
        // A full queue drops it: the next drain says more.
        let _ = tx.try_send(Drained::Watermark(w));
    }
}

fn send(batch: Vec<FlowEvent>, tx: &mpsc::Sender<Drained>, metrics: &Metrics) {
    let n = batch.len() as u64;
    if let Err(e) = tx.try_send(Drained::Events(batch)) {
        match e {
            mpsc::error::TrySendError::Full(_) | mpsc::error::TrySendError::Closed(_) => {
                metrics.count_queue_loss(n)
            }
        }
    }
}

/// Enrich decoded events and append them to the flow ring; publish the reader's
/// watermarks on the ring in order with them, in wall-clock time as the flows' times.
pub async fn run_enricher(
    mut rx: mpsc::Receiver<Drained>,
    metadata: MetadataHandle,
    clock: Arc<ClockOffset>,
    ring: Arc<FlowRing>,
    metrics: Arc<Metrics>,
) {
    while let Some(msg) = rx.recv().await {
        let batch = match msg {
            Drained::Events(batch) => batch,
            Drained::Watermark(mono) => {
                ring.advance(clock.to_wall_ns(mono));
                continue;
            }
        };
        let meta = metadata.current();
        let flows: Vec<StoredFlow> = batch
            .iter()
            .map(|ev| {
                let f = enrich(ev, &meta, &clock);
                metrics
                    .flows_processed
                    .get_or_create(&flow_labels(&f))
                    .inc();
                f
            })
            .collect();
        if let Some(promised) = ring.watermark() {
            let misses = flows.iter().filter(|f| f.time_ns < promised).count();
            metrics.watermark_misses.inc_by(misses as u64);
        }
        ring.push_batch(flows);
    }
}

/// Build the stored flow for one event: addresses in packet order, endpoints looked up.
pub fn enrich(
    ev: &FlowEvent,
    meta: &crate::metadata::MetadataSnapshot,
    clock: &ClockOffset,
) -> StoredFlow {
    let reply = ev.flags & lumen_datapath_common::flow_flags::REPLY != 0;
    // The conntrack key is oriented as the connection; the packet may be the reply.
    let (src, dst, sport, dport) = if reply {
        (ev.key.daddr, ev.key.saddr, ev.key.dport, ev.key.sport)
    } else {
        (ev.key.saddr, ev.key.daddr, ev.key.sport, ev.key.dport)
    };
    let (sport, dport) = match ev.key.proto {
        6 | 17 | 132 => (sport, dport),
        _ => (0, 0),
    };
    // The peer is the side that is not the observing endpoint.
    let endpoint_is_src = (ev.direction == lumen_datapath_common::direction::EGRESS) != reply;
    let peer_identity = if endpoint_is_src {
        ev.dst_identity
    } else {
        ev.src_identity
    };
    StoredFlow {
        time_ns: clock.to_wall_ns(ev.ts_ns),
        flow_id: ev.flow_id,
        orig_bytes: ev.orig_bytes,
        reply_bytes: ev.reply_bytes,
        orig_packets: saturate(ev.orig_packets),
        reply_packets: saturate(ev.reply_packets),
        handshake_rtt_ns: saturate(ev.handshake_rtt_ns),
        age: crate::store::encode_age(ev.ts_ns.saturating_sub(ev.first_seen_ns)),
        policy_rule_id: ev.policy_rule_id,
        peer_identity,
        ifindex: ev.key.ifindex,
        src,
        dst,
        sport,
        dport,
        packet_len: ev.packet_len,
        src_endpoint: Some(meta.lookup(ip_of(ev.key.family, &src))),
        dst_endpoint: Some(meta.lookup(ip_of(ev.key.family, &dst))),
        proto: ev.key.proto,
        family: ev.key.family,
        reason: ev.reason,
        verdict: ev.verdict,
        drop_reason: ev.drop_reason,
        direction: ev.direction,
        flags: ev.flags,
        tcp_flags: ev.tcp_flags,
        orig_tcp_flags: ev.orig_tcp_flags,
        reply_tcp_flags: ev.reply_tcp_flags,
        icmp_type: ev.icmp_type,
        icmp_code: ev.icmp_code,
    }
}

fn saturate(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// The IP address of a 16-byte datapath address.
pub fn ip_of(fam: u8, a: &[u8; 16]) -> IpAddr {
    if fam == family::IPV4 {
        IpAddr::V4(Ipv4Addr::new(a[12], a[13], a[14], a[15]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*a))
    }
}

fn flow_labels(f: &StoredFlow) -> FlowLabels {
    FlowLabels {
        r#type: "L3_L4",
        subtype: reason_name(f.reason),
        verdict: verdict_name(f.verdict),
        protocol: protocol_name(f.proto, f.flags),
    }
}

pub fn reason_name(r: u8) -> &'static str {
    use lumen_datapath_common::FlowReason as R;
    match R::from_u8(r) {
        Some(R::New) => "new",
        Some(R::TcpFlags) => "tcp_flags",
        Some(R::Update) => "update",
        Some(R::Close) => "close",
        Some(R::Drop) => "drop",
        Some(R::Packet) => "packet",
        Some(R::Reply) => "reply",
        None => "unknown",
    }
}

pub fn verdict_name(v: u8) -> &'static str {
    use lumen_datapath_common::verdict as V;
    match v {
        V::FORWARDED => "FORWARDED",
        V::DROPPED => "DROPPED",
        V::AUDIT => "AUDIT",
        _ => "VERDICT_UNKNOWN",
    }
}

pub fn protocol_name(p: u8, flags: u8) -> &'static str {
    if flags & lumen_datapath_common::flow_flags::L3_ONLY != 0 && !matches!(p, 1 | 58) {
        return "IP";
    }
    match p {
        6 => "TCP",
        17 => "UDP",
        1 => "ICMPv4",
        58 => "ICMPv6",
        132 => "SCTP",
        _ => "IP",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_promises_twice_the_event_delay_before_it_started() {
        let ms = 1_000_000i64;
        let d = Duration::from_millis(5);
        assert_eq!(drain_watermark(100 * ms, d), Some(90 * ms as u64));
        assert_eq!(
            drain_watermark(9 * ms, d),
            None,
            "before the clock ran that long"
        );
    }

    #[tokio::test]
    async fn watermarks_reach_followers_in_order_with_flows_and_misses_are_counted() {
        let ring = FlowRing::new(64, 64);
        let mut rx = ring.subscribe();
        let metrics = Metrics::new();
        let clock = Arc::new(ClockOffset::new());
        let (tx, events) = mpsc::channel(8);
        let ev = |ts_ns| FlowEvent {
            ts_ns,
            ..Default::default()
        };
        let base = 1_000_000_000u64;
        for msg in [
            Drained::Events(vec![ev(base), ev(base + 2)]),
            Drained::Watermark(base + 10),
            // An older watermark (cannot happen from one reader, but) is no news.
            Drained::Watermark(base + 5),
            // An event stamped before the promise: the datapath took longer than allowed.
            Drained::Events(vec![ev(base + 7), ev(base + 12)]),
        ] {
            tx.send(msg).await.expect("enricher queue open");
        }
        drop(tx);
        run_enricher(
            events,
            MetadataHandle::default(),
            clock.clone(),
            ring.clone(),
            metrics.clone(),
        )
        .await;
        let wall = |mono: u64| clock.to_wall_ns(mono);
        let got: Vec<(&str, i64)> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|p| match p {
                crate::store::Published::Flow(_, f) => ("flow", f.time_ns),
                crate::store::Published::Watermark(w) => ("watermark", w),
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("flow", wall(base)),
                ("flow", wall(base + 2)),
                ("watermark", wall(base + 10)),
                ("flow", wall(base + 7)),
                ("flow", wall(base + 12)),
            ]
        );
        assert_eq!(metrics.watermark_misses.get(), 1);
    }
}

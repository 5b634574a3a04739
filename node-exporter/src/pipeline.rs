//! The flow pipeline: ring reader (decode) ─► bounded queue of batches ─► enricher ─►
//! flow ring. The reader never blocks on a slow consumer: a full queue drops the batch and
//! counts every event in it as lost (`events_queue`).

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
    clock::ClockOffset,
    decode::{decode, Record},
    metadata::MetadataHandle,
    metrics::{FlowLabels, Metrics},
    store::{FlowRing, StoredFlow},
};

/// Most events handed from the reader to the enricher in one message.
pub const BATCH: usize = 512;

/// Read the ring buffer until `shutdown` resolves: wake on data (the datapath forces a
/// wakeup above its watermark) or every `drain_interval`, drain everything available.
pub async fn run_reader(
    ring: RingBuf<MapData>,
    drain_interval: Duration,
    tx: mpsc::Sender<Vec<FlowEvent>>,
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
                        drain(guard.get_inner_mut(), &tx, &metrics);
                        guard.clear_ready();
                    }
                    Err(e) => {
                        warn!(error = %e, "ring buffer poll failed");
                        return;
                    }
                }
            }
            _ = tick.tick() => drain(fd.get_mut(), &tx, &metrics),
            _ = shutdown.changed() => {
                drain(fd.get_mut(), &tx, &metrics);
                return;
            }
        }
    }
}

fn drain(ring: &mut RingBuf<MapData>, tx: &mpsc::Sender<Vec<FlowEvent>>, metrics: &Metrics) {
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
}

fn send(batch: Vec<FlowEvent>, tx: &mpsc::Sender<Vec<FlowEvent>>, metrics: &Metrics) {
    let n = batch.len() as u64;
    if let Err(e) = tx.try_send(batch) {
        match e {
            mpsc::error::TrySendError::Full(_) | mpsc::error::TrySendError::Closed(_) => {
                metrics.count_queue_loss(n)
            }
        }
    }
}

/// Enrich decoded events and append them to the flow ring.
pub async fn run_enricher(
    mut rx: mpsc::Receiver<Vec<FlowEvent>>,
    metadata: MetadataHandle,
    clock: Arc<ClockOffset>,
    ring: Arc<FlowRing>,
    metrics: Arc<Metrics>,
) {
    while let Some(batch) = rx.recv().await {
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

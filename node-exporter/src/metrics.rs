//! Prometheus metrics of the node exporter, named in one place, served on `/metrics`.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc, Mutex,
};

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

use crate::datapath::DatapathCounters;

/// Metric names (without the `_total` suffix prometheus-client adds to counters).
pub mod names {
    pub const FLOWS_PROCESSED: &str = "lumen_flows_processed";
    pub const LOST_EVENTS: &str = "lumen_lost_events";
    pub const DISCARDED_EVENTS: &str = "lumen_discarded_events";
    pub const DATAPATH_PACKETS: &str = "lumen_datapath_packets";
    pub const DATAPATH_BYTES: &str = "lumen_datapath_bytes";
    pub const DATAPATH_EVENTS_ATTEMPTED: &str = "lumen_datapath_events_attempted";
    pub const DATAPATH_EVENTS_EMITTED: &str = "lumen_datapath_events_emitted";
    pub const DATAPATH_CONNTRACK_CREATED: &str = "lumen_datapath_conntrack_created";
    pub const DATAPATH_PARSE_ERRORS: &str = "lumen_datapath_parse_errors";
    pub const RING_BUFFER_PENDING_BYTES: &str = "lumen_ring_buffer_pending_bytes";
    pub const RING_BUFFER_SIZE_BYTES: &str = "lumen_ring_buffer_size_bytes";
    pub const FLOW_RING_FLOWS: &str = "lumen_flow_ring_flows";
    pub const FLOW_RING_CAPACITY: &str = "lumen_flow_ring_capacity";
    pub const ENDPOINTS: &str = "lumen_endpoints";
    pub const ATTACHED_INTERFACES: &str = "lumen_attached_interfaces";
    pub const METADATA_RELOAD_ERRORS: &str = "lumen_metadata_reload_errors";
    pub const GRPC_CLIENTS: &str = "lumen_observer_clients";
    pub const IDENTITY_COLLISIONS: &str = "lumen_identity_collisions";
    pub const POLICY_RELOAD_ERRORS: &str = "lumen_policy_reload_errors";
    pub const POLICY_GENERATION: &str = "lumen_policy_generation";
    pub const POLICY_CHANGE_SECONDS: &str = "lumen_policy_change_seconds";
    pub const POLICY_VERDICTS: &str = "lumen_datapath_policy_verdicts";
    pub const WATERMARK_MISSES: &str = "lumen_flow_watermark_misses";
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowLabels {
    /// Event type (Hubble's `type`: L3_L4) and Lumen's event kind as `subtype`.
    pub r#type: &'static str,
    pub subtype: &'static str,
    pub verdict: &'static str,
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    pub verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageReasonLabels {
    pub stage: &'static str,
    pub reason: &'static str,
}

/// Where lost events were lost (the `source` label; matches LostEvent sources).
pub mod lost_source {
    /// BPF ring buffer full: the datapath could not reserve a record.
    pub const RING_BUFFER: &str = "ring_buffer";
    /// The decoded-events queue to the enricher was full.
    pub const EVENTS_QUEUE: &str = "events_queue";
    /// A following client fell behind the flow ring.
    pub const FLOW_RING: &str = "flow_ring";
}

pub struct Metrics {
    registry: Mutex<Registry>,
    pub flows_processed: Family<FlowLabels, Counter>,
    pub lost_events: Family<SourceLabels, Counter>,
    pub discarded: Family<StageReasonLabels, Counter>,
    dp_packets: Counter,
    dp_bytes: Counter,
    dp_attempted: Counter,
    dp_emitted: Counter,
    dp_ct_created: Counter,
    dp_parse_errors: Counter,
    pub ring_pending: Gauge,
    pub ring_size: Gauge,
    pub flow_ring_flows: Gauge,
    pub flow_ring_capacity: Gauge,
    pub endpoints: Gauge,
    pub attached_interfaces: Gauge,
    pub metadata_errors: Counter,
    pub grpc_clients: Gauge,
    pub policy_errors: Counter,
    pub identity_collisions: Gauge,
    pub policy_generation: Gauge,
    /// From a change in the policy directory being noticed to its enforcement.
    pub policy_change_seconds: Histogram,
    pub policy_verdicts: Family<VerdictLabels, Counter>,
    /// Flows older than the watermark already published when they reached the flow ring.
    pub watermark_misses: Counter,
    last_dp: Mutex<DatapathCounters>,
    /// Events lost in the kernel so far (mirrors the datapath counter for ServerStatus).
    pub kernel_lost: AtomicU64,
    /// Events dropped at the enricher queue.
    pub queue_lost: AtomicU64,
    /// Flows following clients missed because they fell behind.
    pub follower_lost: AtomicU64,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let m = Self {
            registry: Mutex::new(Registry::default()),
            flows_processed: Family::default(),
            lost_events: Family::default(),
            discarded: Family::default(),
            dp_packets: Counter::default(),
            dp_bytes: Counter::default(),
            dp_attempted: Counter::default(),
            dp_emitted: Counter::default(),
            dp_ct_created: Counter::default(),
            dp_parse_errors: Counter::default(),
            ring_pending: Gauge::default(),
            ring_size: Gauge::default(),
            flow_ring_flows: Gauge::default(),
            flow_ring_capacity: Gauge::default(),
            endpoints: Gauge::default(),
            attached_interfaces: Gauge::default(),
            metadata_errors: Counter::default(),
            grpc_clients: Gauge::default(),
            policy_errors: Counter::default(),
            identity_collisions: Gauge::default(),
            policy_generation: Gauge::default(),
            // 0.5 ms .. ~16 s.
            policy_change_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            policy_verdicts: Family::default(),
            watermark_misses: Counter::default(),
            last_dp: Mutex::new(DatapathCounters::default()),
            kernel_lost: AtomicU64::new(0),
            queue_lost: AtomicU64::new(0),
            follower_lost: AtomicU64::new(0),
        };
        {
            let mut r = m.registry.lock().unwrap_or_else(|p| p.into_inner());
            use names::*;
            r.register(
                FLOWS_PROCESSED,
                "Flows processed by type, subtype, verdict and protocol",
                m.flows_processed.clone(),
            );
            r.register(
                LOST_EVENTS,
                "Events lost, by where they were lost",
                m.lost_events.clone(),
            );
            r.register(
                DISCARDED_EVENTS,
                "Events discarded by a pipeline stage, by reason",
                m.discarded.clone(),
            );
            r.register(
                DATAPATH_PACKETS,
                "Packets the datapath ran on",
                m.dp_packets.clone(),
            );
            r.register(
                DATAPATH_BYTES,
                "Bytes (L2) the datapath ran on",
                m.dp_bytes.clone(),
            );
            r.register(
                DATAPATH_EVENTS_ATTEMPTED,
                "Events the datapath tried to emit",
                m.dp_attempted.clone(),
            );
            r.register(
                DATAPATH_EVENTS_EMITTED,
                "Events written into the ring buffer",
                m.dp_emitted.clone(),
            );
            r.register(
                DATAPATH_CONNTRACK_CREATED,
                "Conntrack entries created",
                m.dp_ct_created.clone(),
            );
            r.register(
                DATAPATH_PARSE_ERRORS,
                "Packets whose headers could not be read",
                m.dp_parse_errors.clone(),
            );
            r.register(
                RING_BUFFER_PENDING_BYTES,
                "Bytes pending in the BPF ring buffer at the last submit (max over CPUs)",
                m.ring_pending.clone(),
            );
            r.register(
                RING_BUFFER_SIZE_BYTES,
                "Size of the BPF ring buffer",
                m.ring_size.clone(),
            );
            r.register(
                FLOW_RING_FLOWS,
                "Flows held in the in-memory flow ring",
                m.flow_ring_flows.clone(),
            );
            r.register(
                FLOW_RING_CAPACITY,
                "Capacity of the in-memory flow ring",
                m.flow_ring_capacity.clone(),
            );
            r.register(
                ENDPOINTS,
                "Endpoints known from the metadata source",
                m.endpoints.clone(),
            );
            r.register(
                ATTACHED_INTERFACES,
                "Interfaces the datapath is attached to",
                m.attached_interfaces.clone(),
            );
            r.register(
                WATERMARK_MISSES,
                "Flows older than the flow watermark already promised when they reached the flow ring (an event delayed past max_event_delay, or the wall clock stepped back); a relay sees them late",
                m.watermark_misses.clone(),
            );
            r.register(
                METADATA_RELOAD_ERRORS,
                "Rejected endpoint metadata reloads (last good kept)",
                m.metadata_errors.clone(),
            );
            r.register(
                GRPC_CLIENTS,
                "Observer clients streaming flows",
                m.grpc_clients.clone(),
            );
            r.register(
                POLICY_RELOAD_ERRORS,
                "Rejected policy files (their last good policies kept)",
                m.policy_errors.clone(),
            );
            r.register(
                POLICY_GENERATION,
                "Generation of the policy programmed in the datapath",
                m.policy_generation.clone(),
            );
            r.register(
                POLICY_CHANGE_SECONDS,
                "Time from noticing a policy file change (inotify, or the poll) to the change \
                 being enforced in the datapath: reread, compile, map sync",
                m.policy_change_seconds.clone(),
            );
            r.register(
                POLICY_VERDICTS,
                "Packets the datapath dropped or audited by policy",
                m.policy_verdicts.clone(),
            );
        }
        Arc::new(m)
    }

    /// Fold a new reading of the datapath's counters into the metrics.
    pub fn observe_datapath(&self, now: DatapathCounters) {
        let mut last = self.last_dp.lock().unwrap_or_else(|p| p.into_inner());
        let d = |n: u64, l: u64| n.saturating_sub(l);
        self.dp_packets
            .inc_by(d(now.packets_seen, last.packets_seen));
        self.dp_bytes.inc_by(d(now.bytes_seen, last.bytes_seen));
        self.dp_attempted
            .inc_by(d(now.events_attempted, last.events_attempted));
        self.dp_emitted
            .inc_by(d(now.events_emitted, last.events_emitted));
        self.dp_ct_created
            .inc_by(d(now.conntrack_created, last.conntrack_created));
        self.dp_parse_errors
            .inc_by(d(now.parse_errors, last.parse_errors));
        self.lost_events
            .get_or_create(&SourceLabels {
                source: lost_source::RING_BUFFER,
            })
            .inc_by(d(now.ring_reserve_failed, last.ring_reserve_failed));
        self.ring_pending.set(now.ring_pending_bytes as i64);
        self.policy_verdicts
            .get_or_create(&VerdictLabels { verdict: "DROPPED" })
            .inc_by(d(now.policy_dropped, last.policy_dropped));
        self.policy_verdicts
            .get_or_create(&VerdictLabels { verdict: "AUDIT" })
            .inc_by(d(now.policy_audited, last.policy_audited));
        self.kernel_lost
            .store(now.ring_reserve_failed, Ordering::Relaxed);
        *last = now;
    }

    pub fn count_queue_loss(&self, n: u64) {
        self.queue_lost.fetch_add(n, Ordering::Relaxed);
        self.lost_events
            .get_or_create(&SourceLabels {
                source: lost_source::EVENTS_QUEUE,
            })
            .inc_by(n);
        self.discarded
            .get_or_create(&StageReasonLabels {
                stage: "ring_reader",
                reason: "queue_full",
            })
            .inc_by(n);
    }

    pub fn count_follower_loss(&self, n: u64) {
        self.follower_lost.fetch_add(n, Ordering::Relaxed);
        self.lost_events
            .get_or_create(&SourceLabels {
                source: lost_source::FLOW_RING,
            })
            .inc_by(n);
        self.discarded
            .get_or_create(&StageReasonLabels {
                stage: "observer",
                reason: "slow_client",
            })
            .inc_by(n);
    }

    pub fn count_decode_error(&self, reason: &'static str) {
        self.discarded
            .get_or_create(&StageReasonLabels {
                stage: "decoder",
                reason,
            })
            .inc();
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if encode(&mut out, &r).is_err() {
            out.clear();
        }
        out
    }
}

/// `GET /metrics` on `addr`.
pub async fn serve(
    addr: std::net::SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::{routing::get, Router};
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let m = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    m.encode(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

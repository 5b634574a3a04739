//! The exporter's own counters: what it was given, sent, skipped and dropped.
//! Shared by the hot path (atomic increments), the Prometheus registry the
//! relay serves on /metrics, and [`OtlpStatus`] for `lumen status`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::config::Protocol;
use crate::encode::unix_nanos;

/// Prometheus metric names (prometheus-client appends `_total` to counters).
pub mod names {
    /// `{stage="otlp_logs", reason}`: log records dropped.
    pub const DISCARDED_EVENTS: &str = "lumen_otlp_discarded_events";
    /// `{outcome}`: log records by what happened to them.
    pub const LOG_RECORDS: &str = "lumen_otlp_log_records";
    /// `{signal, outcome}`: export requests.
    pub const EXPORT_REQUESTS: &str = "lumen_otlp_export_requests";
    /// `{signal}`: retried export attempts (not drops).
    pub const EXPORT_RETRIES: &str = "lumen_otlp_export_retries";
    /// Flows handed to the exporter.
    pub const FLOWS: &str = "lumen_otlp_flows";
    /// Log records waiting in the queue.
    pub const QUEUE_LENGTH: &str = "lumen_otlp_logs_queue_length";
    /// Series held for `lumen.flows`.
    pub const METRIC_SERIES: &str = "lumen_otlp_metric_series";
}

/// Why a log record was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discard {
    /// The queue was full (collector slow or down): drop-newest.
    QueueFull,
    /// Retried for `retry.max_elapsed` without success.
    RetriesExhausted,
    /// The collector refused it (non-retryable status or partial success).
    Rejected,
    /// Still queued or unsent when the shutdown grace period ended.
    Shutdown,
}

impl Discard {
    pub const ALL: [Discard; 4] = [
        Discard::QueueFull,
        Discard::RetriesExhausted,
        Discard::Rejected,
        Discard::Shutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Discard::QueueFull => "queue_full",
            Discard::RetriesExhausted => "retries_exhausted",
            Discard::Rejected => "rejected",
            Discard::Shutdown => "shutdown",
        }
    }
}

type Labels = Vec<(&'static str, &'static str)>;

/// Export health of one signal.
#[derive(Debug, Default)]
struct Health {
    last_success: Option<SystemTime>,
    last_error: Option<String>,
    failing: bool,
}

#[derive(Debug)]
pub(crate) struct SignalStats {
    pub ok: Counter,
    pub failed: Counter,
    pub retries: Counter,
    health: Mutex<Health>,
    signal: &'static str,
}

impl SignalStats {
    fn new(
        signal: &'static str,
        requests: &Family<Labels, Counter>,
        retries: &Family<Labels, Counter>,
    ) -> Self {
        Self {
            ok: requests.get_or_create_owned(&vec![("signal", signal), ("outcome", "ok")]),
            failed: requests.get_or_create_owned(&vec![("signal", signal), ("outcome", "error")]),
            retries: retries.get_or_create_owned(&vec![("signal", signal)]),
            health: Mutex::new(Health::default()),
            signal,
        }
    }

    pub(crate) fn success(&self) {
        self.ok.inc();
        let mut h = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        h.last_success = Some(SystemTime::now());
        if h.failing {
            h.failing = false;
            tracing::info!(signal = self.signal, "OTLP export recovered");
        }
    }

    pub(crate) fn failure(&self, error: &str) {
        self.failed.inc();
        let mut h = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        if !h.failing {
            // Once per outage, not once per attempt.
            tracing::warn!(signal = self.signal, %error, "OTLP export failing; retrying with backoff");
        }
        h.failing = true;
        h.last_error = Some(error.to_string());
    }

    fn status(&self) -> SignalStatus {
        let h = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        SignalStatus {
            requests_ok: self.ok.get(),
            requests_failed: self.failed.get(),
            retries: self.retries.get(),
            healthy: !h.failing,
            last_success_unix_nanos: h.last_success.map(unix_nanos),
            last_error: h.last_error.clone(),
        }
    }
}

/// All counters of one exporter.
#[derive(Debug)]
pub(crate) struct Stats {
    pub flows: Counter,
    pub enqueued: Counter,
    pub exported: Counter,
    pub filtered: Counter,
    pub sampled_out: Counter,
    discarded: [Counter; 4],
    pub queue_length: Gauge,
    pub series: Gauge,
    pub logs: SignalStats,
    pub metrics: SignalStats,
    discarded_family: Family<Labels, Counter>,
    records_family: Family<Labels, Counter>,
    requests_family: Family<Labels, Counter>,
    retries_family: Family<Labels, Counter>,
    queue_capacity: AtomicU64,
}

impl Stats {
    pub(crate) fn new() -> Self {
        let discarded_family = Family::<Labels, Counter>::default();
        let records_family = Family::<Labels, Counter>::default();
        let requests_family = Family::<Labels, Counter>::default();
        let retries_family = Family::<Labels, Counter>::default();
        let record = |outcome| records_family.get_or_create_owned(&vec![("outcome", outcome)]);
        let discarded = Discard::ALL.map(|d| {
            discarded_family
                .get_or_create_owned(&vec![("stage", "otlp_logs"), ("reason", d.as_str())])
        });
        Self {
            flows: Counter::default(),
            enqueued: record("enqueued"),
            exported: record("exported"),
            filtered: record("filtered_out"),
            sampled_out: record("sampled_out"),
            discarded,
            queue_length: Gauge::default(),
            series: Gauge::default(),
            logs: SignalStats::new("logs", &requests_family, &retries_family),
            metrics: SignalStats::new("metrics", &requests_family, &retries_family),
            discarded_family,
            records_family,
            requests_family,
            retries_family,
            queue_capacity: AtomicU64::new(0),
        }
    }

    pub(crate) fn discard(&self, why: Discard, n: u64) {
        self.discarded[why as usize].inc_by(n);
    }

    pub(crate) fn discarded(&self, why: Discard) -> u64 {
        self.discarded[why as usize].get()
    }

    pub(crate) fn set_queue_capacity(&self, n: usize) {
        self.queue_capacity.store(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            names::DISCARDED_EVENTS,
            "Flow log records the OTLP exporter dropped, by stage and reason",
            self.discarded_family.clone(),
        );
        registry.register(
            names::LOG_RECORDS,
            "Flow log records by outcome: enqueued, exported, filtered_out, sampled_out",
            self.records_family.clone(),
        );
        registry.register(
            names::EXPORT_REQUESTS,
            "OTLP export requests by signal and outcome",
            self.requests_family.clone(),
        );
        registry.register(
            names::EXPORT_RETRIES,
            "OTLP export attempts retried after a retryable failure",
            self.retries_family.clone(),
        );
        registry.register(
            names::FLOWS,
            "Flows handed to the OTLP exporter",
            self.flows.clone(),
        );
        registry.register(
            names::QUEUE_LENGTH,
            "Flow log records waiting for export",
            self.queue_length.clone(),
        );
        registry.register(
            names::METRIC_SERIES,
            "Attribute sets held for the lumen.flows metric",
            self.series.clone(),
        );
    }

    pub(crate) fn status(
        &self,
        endpoint: &str,
        protocol: Protocol,
        metrics_enabled: bool,
        logs_enabled: bool,
        queue_length: usize,
    ) -> OtlpStatus {
        OtlpStatus {
            endpoint: endpoint.to_string(),
            protocol,
            flows: self.flows.get(),
            metrics: metrics_enabled.then(|| MetricsStatus {
                series: self.series.get().max(0) as u64,
                export: self.metrics.status(),
            }),
            logs: logs_enabled.then(|| LogsStatus {
                queue_length: queue_length as u64,
                queue_capacity: self.queue_capacity.load(Ordering::Relaxed),
                enqueued: self.enqueued.get(),
                exported: self.exported.get(),
                filtered_out: self.filtered.get(),
                sampled_out: self.sampled_out.get(),
                discarded: DiscardedCounts {
                    queue_full: self.discarded(Discard::QueueFull),
                    retries_exhausted: self.discarded(Discard::RetriesExhausted),
                    rejected: self.discarded(Discard::Rejected),
                    shutdown: self.discarded(Discard::Shutdown),
                },
                export: self.logs.status(),
            }),
        }
    }
}

/// Snapshot for `lumen status` (serialises to JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OtlpStatus {
    pub endpoint: String,
    pub protocol: Protocol,
    /// Flows handed to the exporter.
    pub flows: u64,
    pub metrics: Option<MetricsStatus>,
    pub logs: Option<LogsStatus>,
}

/// Metrics pipeline state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MetricsStatus {
    /// Attribute sets held for `lumen.flows`.
    pub series: u64,
    pub export: SignalStatus,
}

/// Logs pipeline state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogsStatus {
    pub queue_length: u64,
    pub queue_capacity: u64,
    /// Records accepted into the queue.
    pub enqueued: u64,
    /// Records the collector accepted.
    pub exported: u64,
    /// Flows the allow/deny lists kept out (by choice, not drops).
    pub filtered_out: u64,
    /// Flows sampling kept out (by choice, not drops).
    pub sampled_out: u64,
    pub discarded: DiscardedCounts,
    pub export: SignalStatus,
}

/// Dropped log records by reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DiscardedCounts {
    pub queue_full: u64,
    pub retries_exhausted: u64,
    pub rejected: u64,
    pub shutdown: u64,
}

impl DiscardedCounts {
    pub fn total(&self) -> u64 {
        self.queue_full + self.retries_exhausted + self.rejected + self.shutdown
    }
}

/// Export requests of one signal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SignalStatus {
    pub requests_ok: u64,
    pub requests_failed: u64,
    pub retries: u64,
    /// False from the first failure until the next success.
    pub healthy: bool,
    pub last_success_unix_nanos: Option<u64>,
    pub last_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_names_and_labels() {
        let s = Stats::new();
        s.discard(Discard::QueueFull, 3);
        s.exported.inc_by(5);
        s.logs.failure("connection refused");
        let mut r = Registry::default();
        s.register(&mut r);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).expect("encodes");
        assert!(
            text.contains(
                "lumen_otlp_discarded_events_total{stage=\"otlp_logs\",reason=\"queue_full\"} 3"
            ),
            "{text}"
        );
        assert!(
            text.contains("lumen_otlp_log_records_total{outcome=\"exported\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("lumen_otlp_export_requests_total{signal=\"logs\",outcome=\"error\"} 1"),
            "{text}"
        );
        let st = s.status("http://c:4317", Protocol::Grpc, true, true, 0);
        let logs = st.logs.expect("logs on");
        assert_eq!(logs.discarded.total(), 3);
        assert!(!logs.export.healthy);
        assert_eq!(
            logs.export.last_error.as_deref(),
            Some("connection refused")
        );
        let json = serde_json::to_value(s.status("e", Protocol::HttpProtobuf, true, false, 0))
            .expect("json");
        assert_eq!(json["protocol"], "http/protobuf");
        assert!(json["logs"].is_null());
    }
}

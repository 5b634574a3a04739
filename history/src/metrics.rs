//! Prometheus metrics of the history writer, named in one place; the relay registers them.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

/// Metric names (without the `_total` suffix prometheus-client adds to counters).
pub mod names {
    pub const ROWS_WRITTEN: &str = "lumen_history_rows_written";
    pub const BATCHES_WRITTEN: &str = "lumen_history_batches_written";
    pub const INSERT_RETRIES: &str = "lumen_history_insert_retries";
    pub const INSERT_ERRORS: &str = "lumen_history_insert_errors";
    pub const INSERT_DURATION: &str = "lumen_history_insert_duration_seconds";
    pub const SPOOL_BYTES: &str = "lumen_history_spool_bytes";
    pub const SPOOL_SEGMENTS: &str = "lumen_history_spool_segments";
    pub const REPLAYED_BATCHES: &str = "lumen_history_replayed_batches";
    pub const LANDED_CHECKS: &str = "lumen_history_landed_checks";
    pub const LANDED_ROWS: &str = "lumen_history_landed_rows";
    pub const DEAD_LETTER_BATCHES: &str = "lumen_history_dead_letter_batches";
    pub const DEAD_LETTER_ROWS: &str = "lumen_history_dead_letter_rows";
    pub const CORRUPT_SEGMENTS: &str = "lumen_history_corrupt_segments";
    pub const DISCARDED_EVENTS: &str = "lumen_history_discarded_events";
    pub const PARTITIONS_DROPPED: &str = "lumen_history_partitions_dropped";
}

/// `stage` of the discarded-events counter.
pub const STAGE: &str = "history_writer";

/// Why flows were refused (the `reason` label).
pub mod reason {
    /// The spool is full (ClickHouse has been away for long) and the caller did not wait.
    pub const SPOOL_FULL: &str = "spool_full";
    /// The writer's input queue is full (momentary) and the caller did not wait.
    pub const QUEUE_FULL: &str = "queue_full";
    /// The writer has shut down.
    pub const CLOSED: &str = "closed";
    /// A batch could not be written to the spool (disk error) and ClickHouse was away.
    pub const SPOOL_IO: &str = "spool_io";
    /// Left in memory at shutdown: the spool was full or failing.
    pub const SHUTDOWN: &str = "shutdown";
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageReasonLabels {
    pub stage: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    /// `transient`, `permanent` or `unknown`.
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `landed`, `absent` or `partial`.
    pub result: &'static str,
}

/// The writer's metrics. Cheap to clone (shared handles).
#[derive(Clone, Debug)]
pub struct HistoryMetrics {
    pub rows_written: Counter,
    pub batches_written: Counter,
    pub insert_retries: Family<ClassLabels, Counter>,
    pub insert_errors: Family<ClassLabels, Counter>,
    pub insert_duration: Histogram,
    pub spool_bytes: Gauge,
    pub spool_segments: Gauge,
    pub replayed_batches: Counter,
    pub landed_checks: Family<ResultLabels, Counter>,
    /// Rows acknowledged because a check found their batch already in `flows`.
    pub landed_rows: Counter,
    pub dead_letter_batches: Counter,
    pub dead_letter_rows: Counter,
    pub corrupt_segments: Counter,
    pub discarded: Family<StageReasonLabels, Counter>,
    pub partitions_dropped: Counter,
}

impl Default for HistoryMetrics {
    fn default() -> Self {
        Self {
            rows_written: Counter::default(),
            batches_written: Counter::default(),
            insert_retries: Family::default(),
            insert_errors: Family::default(),
            // 1 ms .. ~33 s.
            insert_duration: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            spool_bytes: Gauge::default(),
            spool_segments: Gauge::default(),
            replayed_batches: Counter::default(),
            landed_checks: Family::default(),
            landed_rows: Counter::default(),
            dead_letter_batches: Counter::default(),
            dead_letter_rows: Counter::default(),
            corrupt_segments: Counter::default(),
            discarded: Family::default(),
            partitions_dropped: Counter::default(),
        }
    }
}

impl HistoryMetrics {
    /// Registers every metric in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        use names::*;
        let r = registry;
        r.register(
            ROWS_WRITTEN,
            "Flow rows inserted into ClickHouse",
            self.rows_written.clone(),
        );
        r.register(
            BATCHES_WRITTEN,
            "Batches inserted into ClickHouse",
            self.batches_written.clone(),
        );
        r.register(
            INSERT_RETRIES,
            "Insert attempts retried, by error class",
            self.insert_retries.clone(),
        );
        r.register(
            INSERT_ERRORS,
            "Failed insert attempts, by error class",
            self.insert_errors.clone(),
        );
        r.register(
            INSERT_DURATION,
            "Duration of successful inserts",
            self.insert_duration.clone(),
        );
        r.register(
            SPOOL_BYTES,
            "Bytes of batches waiting in the disk spool",
            self.spool_bytes.clone(),
        );
        r.register(
            SPOOL_SEGMENTS,
            "Batches waiting in the disk spool",
            self.spool_segments.clone(),
        );
        r.register(
            REPLAYED_BATCHES,
            "Batches read back from the spool and inserted",
            self.replayed_batches.clone(),
        );
        r.register(
            LANDED_CHECKS,
            "Checks whether a batch of unknown outcome is in ClickHouse, by result",
            self.landed_checks.clone(),
        );
        r.register(
            DEAD_LETTER_BATCHES,
            "Batches ClickHouse rejected for good, set aside in dead/",
            self.dead_letter_batches.clone(),
        );
        r.register(
            DEAD_LETTER_ROWS,
            "Rows of dead-lettered batches",
            self.dead_letter_rows.clone(),
        );
        r.register(
            CORRUPT_SEGMENTS,
            "Spool segments that failed their checks, moved to corrupt/",
            self.corrupt_segments.clone(),
        );
        r.register(
            DISCARDED_EVENTS,
            "Flows the writer refused, by stage and reason",
            self.discarded.clone(),
        );
        r.register(
            PARTITIONS_DROPPED,
            "Expired day partitions dropped (compatible schema)",
            self.partitions_dropped.clone(),
        );
    }

    pub(crate) fn discard(&self, reason: &'static str, n: u64) {
        self.discarded
            .get_or_create(&StageReasonLabels {
                stage: STAGE,
                reason,
            })
            .inc_by(n);
    }

    /// Flows refused for `reason` so far.
    pub fn discarded_count(&self, reason: &'static str) -> u64 {
        self.discarded
            .get_or_create(&StageReasonLabels {
                stage: STAGE,
                reason,
            })
            .get()
    }
}

//! The flow-logs pipeline: filter and sample in the caller, encode, and hand
//! the record to a bounded queue that never blocks (drop-newest, counted as
//! `queue_full`); one task batches the queue and exports with retry and
//! exponential backoff, giving a batch up (counted) only after
//! `retry.max_elapsed` or on a non-retryable answer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lumen_proto::filter::FlowFilters;
use lumen_proto::flow::Flow;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::{LogsConfig, OtlpConfig, RetryConfig};
use crate::encode::{self, LogsEnvelope, LogsRequest};
use crate::stats::{Discard, Stats};
use crate::transport::Transport;

/// Initial buffer of one encoded record: most flows fit without a regrowth.
const RECORD_CAPACITY: usize = 1536;

/// How often a filling batch looks at the queue.
const FILL_POLL: Duration = Duration::from_millis(5);

/// Longest Retry-After honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// An encoded LogRecord.
pub(crate) type Record = Vec<u8>;

/// The caller's side: filter, sample, encode, enqueue.
pub(crate) struct LogsInput {
    tx: mpsc::Sender<Record>,
    filters: FlowFilters,
    /// Keep a flow when `mix(flow_id) <= threshold`; `None` keeps all.
    threshold: Option<u64>,
    /// Sampling key for flows without an id.
    seq: AtomicU64,
    capacity: usize,
}

/// SplitMix64 finaliser: turns ids into uniformly spread 64-bit values.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Threshold for a sampling ratio, `None` when every flow is kept.
pub(crate) fn sampling_threshold(ratio: f64) -> Option<u64> {
    if ratio >= 1.0 {
        None
    } else {
        // ratio 0 keeps nothing: threshold 0 still keeps mix(x) == 0, which is
        // one id in 2^64; handled in `sampled`.
        Some((ratio * u64::MAX as f64) as u64)
    }
}

/// Whether a connection with this id is in the sample.
#[cfg(test)]
fn sampled(flow_id: u64, ratio: f64) -> bool {
    match sampling_threshold(ratio) {
        None => true,
        Some(_) if ratio <= 0.0 => false,
        Some(t) => mix(flow_id) <= t,
    }
}

impl LogsInput {
    pub(crate) fn offer(&self, flow: &Flow, node: &str, stats: &Stats) {
        if !self.filters.is_empty() && !self.filters.matches(flow) {
            stats.filtered.inc();
            return;
        }
        if let Some(t) = self.threshold {
            let key = if flow.flow_id != 0 {
                flow.flow_id
            } else {
                self.seq.fetch_add(1, Ordering::Relaxed)
            };
            if t == 0 || mix(key) > t {
                stats.sampled_out.inc();
                return;
            }
        }
        // Don't encode what cannot be queued.
        if self.tx.capacity() == 0 {
            stats.discard(Discard::QueueFull, 1);
            return;
        }
        let mut rec = Vec::with_capacity(RECORD_CAPACITY);
        encode::log_record(flow, node, SystemTime::now(), &mut rec);
        match self.tx.try_send(rec) {
            Ok(()) => {
                stats.enqueued.inc();
            }
            Err(mpsc::error::TrySendError::Full(_)) => stats.discard(Discard::QueueFull, 1),
            Err(mpsc::error::TrySendError::Closed(_)) => stats.discard(Discard::Shutdown, 1),
        }
    }

    pub(crate) fn queue_length(&self) -> usize {
        self.capacity - self.tx.capacity()
    }
}

/// Shutdown request: `Some(deadline)` once the exporter is stopping.
pub(crate) type ShutdownRx = watch::Receiver<Option<Instant>>;

pub(crate) struct LogsTask {
    rx: mpsc::Receiver<Record>,
    transport: Transport,
    envelope: LogsEnvelope,
    cfg: LogsConfig,
    retry: RetryConfig,
    timeout: Duration,
    stats: Arc<Stats>,
    shutdown: ShutdownRx,
    jitter: u64,
}

/// Creates the queue: the input for callers and the task that drains it.
pub(crate) fn pipeline(
    config: &OtlpConfig,
    filters: FlowFilters,
    transport: Transport,
    envelope: LogsEnvelope,
    stats: Arc<Stats>,
    shutdown: ShutdownRx,
) -> (LogsInput, LogsTask) {
    let cfg = &config.logs;
    let (tx, rx) = mpsc::channel(cfg.queue_capacity);
    stats.set_queue_capacity(cfg.queue_capacity);
    let input = LogsInput {
        tx,
        filters,
        threshold: sampling_threshold(cfg.sampling_ratio),
        seq: AtomicU64::new(1),
        capacity: cfg.queue_capacity,
    };
    let seed = encode::unix_nanos(SystemTime::now()) | 1;
    let task = LogsTask {
        rx,
        transport,
        envelope,
        cfg: cfg.clone(),
        retry: config.retry.clone(),
        timeout: config.timeout,
        stats,
        shutdown,
        jitter: seed,
    };
    (input, task)
}

enum Outcome {
    Sent,
    GaveUp,
}

impl LogsTask {
    pub(crate) async fn run(mut self) {
        let span = tracing::info_span!("otlp_logs");
        async move {
            let max = self.cfg.max_batch_size;
            let mut batch: Vec<Record> = Vec::with_capacity(max);
            loop {
                if self.stopping().is_some() {
                    break;
                }
                tokio::select! {
                    biased;
                    _ = self.shutdown.changed() => break,
                    n = self.rx.recv_many(&mut batch, max) => {
                        if n == 0 {
                            break;
                        }
                    }
                }
                // Let the batch fill until it is full or `batch_timeout` has
                // passed, looking at the queue every few milliseconds rather
                // than waking for each record (a wake-up per record would
                // cost more than encoding it).
                let fill_until = Instant::now() + self.cfg.batch_timeout;
                loop {
                    while batch.len() < max {
                        match self.rx.try_recv() {
                            Ok(r) => batch.push(r),
                            Err(_) => break,
                        }
                    }
                    let now = Instant::now();
                    if batch.len() >= max || now >= fill_until || self.stopping().is_some() {
                        break;
                    }
                    let nap = (fill_until - now).min(FILL_POLL);
                    tokio::select! {
                        _ = tokio::time::sleep(nap) => {}
                        _ = self.shutdown.changed() => {}
                    }
                }
                self.stats.queue_length.set(self.rx.len() as i64);
                self.export(&mut batch).await;
            }
            self.drain(batch).await;
        }
        .instrument(span)
        .await;
    }

    fn stopping(&self) -> Option<Instant> {
        if self.shutdown.has_changed().is_err() {
            // The exporter was dropped without `shutdown`: stop now.
            return Some(Instant::now());
        }
        *self.shutdown.borrow()
    }

    /// After a shutdown request: refuse new records, export what is queued
    /// until the deadline, count the rest.
    async fn drain(mut self, mut batch: Vec<Record>) {
        self.rx.close();
        let max = self.cfg.max_batch_size;
        loop {
            while batch.len() < max {
                match self.rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                break;
            }
            self.export(&mut batch).await;
        }
        self.stats.queue_length.set(0);
    }

    /// Exports one batch, retrying with backoff; empties `batch`.
    async fn export(&mut self, batch: &mut Vec<Record>) -> Outcome {
        if batch.is_empty() {
            return Outcome::Sent;
        }
        let n = batch.len() as u64;
        let body = LogsRequest {
            envelope: self.envelope.clone(),
            records: Arc::new(std::mem::replace(
                batch,
                Vec::with_capacity(self.cfg.max_batch_size),
            )),
        };
        let started = Instant::now();
        let mut backoff = self.retry.initial_backoff;
        loop {
            let deadline = self.stopping();
            let mut timeout = self.timeout;
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    self.stats.discard(Discard::Shutdown, n);
                    return Outcome::GaveUp;
                }
                timeout = timeout.min(left);
            }
            match self.transport.export_logs(&body, timeout).await {
                Ok(rejected) => {
                    let rejected = rejected.min(n);
                    self.stats.exported.inc_by(n - rejected);
                    if rejected > 0 {
                        tracing::warn!(rejected, "collector rejected part of a log batch");
                        self.stats.discard(Discard::Rejected, rejected);
                    }
                    self.stats.logs.success();
                    return Outcome::Sent;
                }
                Err(e) => {
                    self.stats.logs.failure(&e.message);
                    if !e.retryable {
                        tracing::error!(error = %e.message, records = n, "collector refused log batch");
                        self.stats.discard(Discard::Rejected, n);
                        return Outcome::GaveUp;
                    }
                    let wait = match e.retry_after {
                        // The collector knows best, within reason.
                        Some(d) => d.min(MAX_RETRY_AFTER),
                        None => self.jittered(backoff),
                    };
                    if started.elapsed() + wait > self.retry.max_elapsed {
                        tracing::error!(error = %e.message, records = n, "giving up on log batch");
                        self.stats.discard(Discard::RetriesExhausted, n);
                        return Outcome::GaveUp;
                    }
                    self.stats.logs.retries.inc();
                    let wake = Instant::now() + wait;
                    let wake = match self.stopping() {
                        Some(d) => wake.min(d),
                        None => wake,
                    };
                    tokio::select! {
                        _ = tokio::time::sleep_until(wake) => {}
                        // A shutdown request cuts the wait short: one last try.
                        _ = self.shutdown.changed() => {}
                    }
                    backoff = (backoff * 2).min(self.retry.max_backoff);
                }
            }
        }
    }

    /// `d` scaled by a factor in [0.8, 1.2).
    fn jittered(&mut self, d: Duration) -> Duration {
        self.jitter ^= self.jitter << 13;
        self.jitter ^= self.jitter >> 7;
        self.jitter ^= self.jitter << 17;
        let f = 0.8 + (self.jitter % 400) as f64 / 1000.0;
        d.mul_f64(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_is_per_connection_and_near_the_ratio() {
        let kept = (1..=100_000u64).filter(|id| sampled(*id, 0.25)).count();
        assert!((24_000..26_000).contains(&kept), "{kept}");
        assert!((1..1000u64).all(|id| sampled(id, 1.0)));
        assert!(!(1..1000u64).any(|id| sampled(id, 0.0)));
        // Same id, same answer.
        assert_eq!(sampled(42, 0.5), sampled(42, 0.5));
    }
}

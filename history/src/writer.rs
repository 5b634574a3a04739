//! The history writer: two tasks joined by the disk spool.
//!
//! ```text
//! submit(Vec<Flow>) ──bounded queue──▶ batcher ──seal──▶ spool (fsynced segment) ──▶ inserter ──▶ ClickHouse
//! ```
//!
//! - **batcher** (`history_batcher`): turns flows into RowBinary rows of one open batch per
//!   day partition, seals a batch at `batch.max_rows`, `batch.max_bytes` or `batch.max_delay`
//!   (defaults: 100k rows or 1 s, ClickHouse's "big batches, about one insert per second"),
//!   and writes it to the spool. Every batch goes through the spool, so a batch is durable
//!   once sealed and a restart replays exactly what was not yet in ClickHouse. When the spool
//!   is full the batcher waits: the queue fills and `submit` waits too (backpressure);
//!   `try_submit` refuses instead and counts the refusal by reason.
//! - **inserter** (`history_inserter`): inserts the oldest segment, one at a time and in
//!   order, with the `clickhouse` crate (RowBinary, LZ4), and deletes it once ClickHouse has
//!   acknowledged it. Transient errors (ClickHouse away, timeouts, overload) are retried with
//!   jittered exponential backoff for as long as it takes; permanent ones (schema and type
//!   errors) dead-letter the batch to `dead/` with a loud error; unrecognised ones are retried
//!   `retry.unknown_error_attempts` times and then dead-lettered. A segment that fails its
//!   checksum is moved to `corrupt/`, reported, and skipped.
//!
//! # No duplicates
//!
//! Each batch gets a random 64-bit id when sealed, stored in its segment and in the
//! `batch_id` column of each of its rows, so it is the same on every retry and replay. Before
//! re-sending a batch whose previous attempt may have reached the server (anything but
//! "connection refused"), and for the oldest segments after a restart (the one in flight
//! when the process died), the inserter counts the rows with that `batch_id` in `flows`:
//! all there → the batch is done; none → send it; some (an insert split across partitions
//! that died half way) → send only the missing rows. Inserts are sequential, so after a
//! restart the first batch found absent ends the checks. 18.16 has no insert deduplication
//! for non-replicated tables, so this check is what makes retries exactly-once there; on the
//! modern schema the batch id is also sent as `insert_deduplication_token` (the tables keep
//! a `non_replicated_deduplication_window`), so the server itself drops a repeated insert,
//! including its materialized-view rows. A ReplacingMergeTree was not chosen: it removes
//! duplicates only at merge time and the rollup views would still count them.
//!
//! Limit on 18.16: ClickHouse writes an insert to `flows` first and then to each view; a
//! server that dies (or shuts down) in between keeps the `flows` rows but not the rollup
//! rows, and a retry cannot tell. `flows` stays exact; the rollups may then miss those rows.
//! `lumen_history_landed_rows_total` counts the rows acknowledged that way, which bounds the
//! gap. The modern schema's deduplicated retry re-runs the views, so it has no such gap.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clickhouse::Client;
use lumen_proto::flow::Flow;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::config::HistoryConfig;
use crate::error::{certainly_not_sent, classify, ErrorClass, HistoryError};
use crate::metrics::{reason, HistoryMetrics};
use crate::migrate::SchemaInfo;
use crate::queries;
use crate::row::{flow_time_ns, DeltaTracker, FlowRow};
use crate::schema::{tables, Layout};
use crate::spool::{Batch, SegmentError, Spool};

/// Flows the writer did not take.
#[derive(Debug, thiserror::Error)]
#[error("history writer refused {count} flows: {reason}")]
pub struct Refused {
    /// A [`crate::metrics::reason`] value.
    pub reason: &'static str,
    pub count: usize,
}

/// What [`HistoryWriter::shutdown`] left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Batches still in the spool (inserted on the next start).
    pub spooled_batches: usize,
    pub spooled_bytes: u64,
    /// Rows that could not be spooled (spool full or failing) and were dropped.
    pub lost_rows: u64,
}

/// A snapshot of the writer's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterStatus {
    pub spool_batches: usize,
    pub spool_bytes: u64,
    /// Whether the last insert attempt succeeded.
    pub clickhouse_ok: bool,
    /// Earliest flow time (ns) not yet in ClickHouse, if any. History queries are complete
    /// before it; the relay serves later flows from its live buffer.
    pub pending_since_ns: Option<i64>,
}

enum Msg {
    Flows(Vec<Flow>),
    Flush(oneshot::Sender<()>),
}

const BLOCKED_NONE: u8 = 0;
const BLOCKED_SPOOL_FULL: u8 = 1;
const BLOCKED_SPOOL_IO: u8 = 2;

struct Shared {
    cfg: HistoryConfig,
    layout: Layout,
    client: Client,
    spool: Spool,
    metrics: HistoryMetrics,
    /// Recently sealed batches, so the inserter need not read them back from disk.
    cache: Mutex<(HashMap<u64, Batch>, usize)>,
    cache_max: usize,
    blocked: AtomicU8,
    clickhouse_ok: AtomicBool,
    open_min_ns: AtomicI64,
    /// A segment was appended / the batcher finished.
    work: Notify,
    /// A segment was removed (space freed).
    space: Notify,
    /// Stop the inserter (after the grace period).
    stop: Notify,
    stopping: AtomicBool,
    batcher_done: AtomicBool,
    lost_rows: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn update_spool_gauges(&self) {
        self.metrics.spool_bytes.set(self.spool.bytes() as i64);
        self.metrics
            .spool_segments
            .set(self.spool.segments() as i64);
    }
}

/// The history writer. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct HistoryWriter {
    tx: Mutex<Option<mpsc::Sender<Msg>>>,
    shared: Arc<Shared>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl HistoryWriter {
    /// Opens the spool (replaying what a previous run left) and starts the tasks. The schema
    /// must be current (see [`crate::migrate`]).
    pub async fn start(
        cfg: &HistoryConfig,
        schema: &SchemaInfo,
        metrics: HistoryMetrics,
    ) -> Result<Self, HistoryError> {
        crate::migrate::require_current(schema)?;
        Self::start_with(cfg, schema.flavor, true, metrics).await
    }

    /// Starts for a database of `flavor`. Unless `schema_confirmed`, the inserter first
    /// brings the schema up to date (or checks it, without `cfg.migrate`) once ClickHouse
    /// answers: this is how a relay starts and spools while ClickHouse is down.
    pub async fn start_with(
        cfg: &HistoryConfig,
        flavor: crate::schema::Flavor,
        schema_confirmed: bool,
        metrics: HistoryMetrics,
    ) -> Result<Self, HistoryError> {
        cfg.validate()?;
        let spool_dir = cfg.spool.dir.clone();
        let (max, fsync) = (cfg.spool.max_bytes, cfg.spool.fsync);
        let (spool, report) =
            tokio::task::spawn_blocking(move || Spool::open(&spool_dir, max, fsync))
                .await
                .map_err(|e| HistoryError::Spool {
                    path: cfg.spool.dir.clone(),
                    source: std::io::Error::other(e),
                })?
                .map_err(|source| HistoryError::Spool {
                    path: cfg.spool.dir.clone(),
                    source,
                })?;
        if report.segments > 0 || report.removed_tmp > 0 {
            info!(
                segments = report.segments,
                bytes = report.bytes,
                removed_tmp = report.removed_tmp,
                "history spool has batches from a previous run; replaying them"
            );
        }
        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
            layout: Layout::latest(flavor),
            client: crate::migrate::client(&cfg.clickhouse),
            spool,
            metrics,
            cache: Mutex::new((HashMap::new(), 0)),
            cache_max: cfg.batch.max_bytes.saturating_mul(4),
            blocked: AtomicU8::new(BLOCKED_NONE),
            clickhouse_ok: AtomicBool::new(true),
            open_min_ns: AtomicI64::new(i64::MAX),
            work: Notify::new(),
            space: Notify::new(),
            stop: Notify::new(),
            stopping: AtomicBool::new(false),
            batcher_done: AtomicBool::new(false),
            lost_rows: std::sync::atomic::AtomicU64::new(0),
        });
        shared.update_spool_gauges();
        let (tx, rx) = mpsc::channel(cfg.queue_capacity);
        let batcher = tokio::spawn(
            Batcher::new(shared.clone())
                .run(rx)
                .instrument(info_span!("history_batcher")),
        );
        let startup_last = shared.spool.pending().last().copied();
        let inserter = tokio::spawn(
            Inserter {
                shared: shared.clone(),
                check_upto: startup_last,
                schema_ready: schema_confirmed,
            }
            .run()
            .instrument(info_span!("history_inserter")),
        );
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            shared,
            tasks: Mutex::new(vec![batcher, inserter]),
        })
    }

    fn sender(&self) -> Option<mpsc::Sender<Msg>> {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Queues flows, waiting while the writer is backed up (backpressure).
    pub async fn submit(&self, flows: Vec<Flow>) -> Result<(), Refused> {
        let count = flows.len();
        let Some(tx) = self.sender() else {
            self.shared.metrics.discard(reason::CLOSED, count as u64);
            return Err(Refused {
                reason: reason::CLOSED,
                count,
            });
        };
        tx.send(Msg::Flows(flows)).await.map_err(|_| {
            self.shared.metrics.discard(reason::CLOSED, count as u64);
            Refused {
                reason: reason::CLOSED,
                count,
            }
        })
    }

    /// Queues flows if there is room now; otherwise refuses them, counted by reason.
    pub fn try_submit(&self, flows: Vec<Flow>) -> Result<(), Refused> {
        let count = flows.len();
        let refuse = |reason| {
            self.shared.metrics.discard(reason, count as u64);
            Err(Refused { reason, count })
        };
        let Some(tx) = self.sender() else {
            return refuse(reason::CLOSED);
        };
        match tx.try_send(Msg::Flows(flows)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => refuse(reason::CLOSED),
            Err(mpsc::error::TrySendError::Full(_)) => {
                refuse(match self.shared.blocked.load(Ordering::Relaxed) {
                    BLOCKED_SPOOL_FULL => reason::SPOOL_FULL,
                    BLOCKED_SPOOL_IO => reason::SPOOL_IO,
                    _ => reason::QUEUE_FULL,
                })
            }
        }
    }

    /// Returns once every flow submitted before the call is durable: in the spool (fsynced)
    /// or in ClickHouse.
    pub async fn flush(&self) -> Result<(), HistoryError> {
        let tx = self.sender().ok_or(HistoryError::Closed)?;
        let (ack, done) = oneshot::channel();
        tx.send(Msg::Flush(ack))
            .await
            .map_err(|_| HistoryError::Closed)?;
        done.await.map_err(|_| HistoryError::Closed)
    }

    /// Flushes, then waits until ClickHouse has every batch (the spool is empty), up to
    /// `timeout`. Returns whether it drained.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        if tokio::time::timeout(timeout, self.flush()).await.is_err() {
            return false;
        }
        while self.shared.spool.segments() > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// The writer's state now.
    pub fn status(&self) -> WriterStatus {
        let open = self.shared.open_min_ns.load(Ordering::Relaxed);
        let spooled = self.shared.spool.min_time_ns();
        let pending = match (open, spooled) {
            (i64::MAX, s) => s,
            (o, Some(s)) => Some(o.min(s)),
            (o, None) => Some(o),
        };
        WriterStatus {
            spool_batches: self.shared.spool.segments(),
            spool_bytes: self.shared.spool.bytes(),
            clickhouse_ok: self.shared.clickhouse_ok.load(Ordering::Relaxed),
            pending_since_ns: pending,
        }
    }

    /// Newest flow time (ns) in the spool: taken, not yet in ClickHouse.
    pub fn spooled_max_time_ns(&self) -> Option<i64> {
        self.shared.spool.max_time_ns()
    }

    /// Moves dead-lettered batches back into the queue (after fixing the schema).
    pub async fn requeue_dead_letters(&self) -> Result<usize, HistoryError> {
        let n = self
            .shared
            .spool
            .requeue_dead_letters()
            .map_err(|source| HistoryError::Spool {
                path: self.shared.spool.dir().to_owned(),
                source,
            })?;
        self.shared.update_spool_gauges();
        self.shared.work.notify_one();
        Ok(n)
    }

    /// Stops taking flows, seals and spools what is open, keeps inserting for up to `grace`,
    /// then stops. Whatever is still spooled is inserted by the next start.
    pub async fn shutdown(&self, grace: Duration) -> ShutdownReport {
        let deadline = Instant::now() + grace;
        // Closing the queue makes the batcher seal everything and exit.
        drop(self.tx.lock().unwrap_or_else(|e| e.into_inner()).take());
        while self.shared.spool.segments() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.stop.notify_waiters();
        self.shared.space.notify_waiters();
        self.shared.work.notify_waiters();
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tasks {
            let remaining =
                deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
            if tokio::time::timeout(remaining, t).await.is_err() {
                warn!("a history writer task did not stop in time");
            }
        }
        let report = ShutdownReport {
            spooled_batches: self.shared.spool.segments(),
            spooled_bytes: self.shared.spool.bytes(),
            lost_rows: self.shared.lost_rows.load(Ordering::Relaxed),
        };
        info!(?report, "history writer stopped");
        report
    }
}

impl Drop for HistoryWriter {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.stop.notify_waiters();
        self.shared.space.notify_waiters();
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }
}

// ---- batcher ----

const DAY_NS: i64 = 86_400 * 1_000_000_000;

struct OpenBatch {
    batch_id: u64,
    buf: Vec<u8>,
    rows: u32,
    min_ns: i64,
    max_ns: i64,
    opened: Instant,
}

struct Batcher {
    shared: Arc<Shared>,
    tracker: DeltaTracker,
    open: BTreeMap<i64, OpenBatch>,
}

impl Batcher {
    fn new(shared: Arc<Shared>) -> Self {
        let tracker = DeltaTracker::new(
            shared.cfg.connection_idle,
            shared.cfg.max_tracked_connections,
        );
        Self {
            shared,
            tracker,
            open: BTreeMap::new(),
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let max_delay = self.shared.cfg.batch.max_delay;
        loop {
            let deadline = self.open.values().map(|b| b.opened + max_delay).min();
            let msg = match deadline {
                Some(d) => tokio::select! {
                    m = rx.recv() => m,
                    () = tokio::time::sleep_until(d.into()) => {
                        self.seal_where(|b| b.opened + max_delay <= Instant::now()).await;
                        continue;
                    }
                },
                None => rx.recv().await,
            };
            match msg {
                Some(Msg::Flows(flows)) => self.add(flows).await,
                Some(Msg::Flush(ack)) => {
                    self.seal_where(|_| true).await;
                    let _ = ack.send(());
                }
                None => break,
            }
        }
        self.seal_where(|_| true).await;
        self.shared.batcher_done.store(true, Ordering::SeqCst);
        self.shared.work.notify_one();
        debug!("history batcher stopped");
    }

    async fn add(&mut self, flows: Vec<Flow>) {
        let layout = self.shared.layout;
        let (max_rows, max_bytes) = (
            self.shared.cfg.batch.max_rows as u32,
            self.shared.cfg.batch.max_bytes,
        );
        for flow in &flows {
            let t = flow_time_ns(flow);
            let day = t.div_euclid(DAY_NS);
            let delta = self.tracker.delta(flow);
            let ob = self.open.entry(day).or_insert_with(|| OpenBatch {
                batch_id: fastrand::u64(..),
                buf: Vec::with_capacity(64 << 10),
                rows: 0,
                min_ns: i64::MAX,
                max_ns: i64::MIN,
                opened: Instant::now(),
            });
            FlowRow::from_flow(flow, ob.batch_id, delta).encode(layout, &mut ob.buf);
            ob.rows += 1;
            ob.min_ns = ob.min_ns.min(t);
            ob.max_ns = ob.max_ns.max(t);
            if ob.rows >= max_rows || ob.buf.len() >= max_bytes {
                self.seal(day).await;
            }
        }
        self.publish_open_min();
    }

    fn publish_open_min(&self) {
        let min = self
            .open
            .values()
            .map(|b| b.min_ns)
            .min()
            .unwrap_or(i64::MAX);
        self.shared.open_min_ns.store(min, Ordering::Relaxed);
    }

    async fn seal_where(&mut self, pred: impl Fn(&OpenBatch) -> bool) {
        let days: Vec<i64> = self
            .open
            .iter()
            .filter(|(_, b)| pred(b))
            .map(|(d, _)| *d)
            .collect();
        for d in days {
            self.seal(d).await;
        }
        self.publish_open_min();
    }

    /// Writes an open batch to the spool, waiting for space if it is full.
    async fn seal(&mut self, day: i64) {
        let Some(ob) = self.open.remove(&day) else {
            return;
        };
        let batch = Batch {
            batch_id: ob.batch_id,
            layout: self.shared.layout,
            rows: ob.rows,
            min_time_ns: ob.min_ns,
            max_time_ns: ob.max_ns,
            payload: Bytes::from(ob.buf),
        };
        let mut backoff = Duration::from_millis(50);
        loop {
            let shared = self.shared.clone();
            let b = batch.clone();
            let res = tokio::task::spawn_blocking(move || shared.spool.try_append(&b)).await;
            match res {
                Ok(Ok(Some(seq))) => {
                    self.shared.blocked.store(BLOCKED_NONE, Ordering::Relaxed);
                    {
                        let mut cache = self.shared.cache.lock().unwrap_or_else(|e| e.into_inner());
                        if cache.1 + batch.payload.len() <= self.shared.cache_max {
                            cache.1 += batch.payload.len();
                            cache.0.insert(seq, batch);
                        }
                    }
                    self.shared.update_spool_gauges();
                    self.shared.work.notify_one();
                    return;
                }
                Ok(Ok(None)) => {
                    if self
                        .shared
                        .blocked
                        .swap(BLOCKED_SPOOL_FULL, Ordering::Relaxed)
                        != BLOCKED_SPOOL_FULL
                    {
                        warn!(
                            spool_bytes = self.shared.spool.bytes(),
                            "history spool is full; holding flows back until ClickHouse takes some"
                        );
                    }
                    let wait = self.shared.space.notified();
                    if self.shared.stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    let _ = tokio::time::timeout(Duration::from_millis(500), wait).await;
                }
                Ok(Err(e)) => {
                    self.shared
                        .blocked
                        .store(BLOCKED_SPOOL_IO, Ordering::Relaxed);
                    error!(error = %e, dir = %self.shared.spool.dir().display(), "cannot write to the history spool; retrying");
                    if self.shared.stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    error!(error = %e, "spool task failed");
                    break;
                }
            }
        }
        // Only reached when stopping with a full or failing spool.
        self.shared
            .lost_rows
            .fetch_add(u64::from(batch.rows), Ordering::Relaxed);
        self.shared
            .metrics
            .discard(reason::SHUTDOWN, u64::from(batch.rows));
        error!(
            rows = batch.rows,
            "history writer stopped with a batch it could not spool; it is lost"
        );
    }
}

// ---- inserter ----

struct Inserter {
    shared: Arc<Shared>,
    /// Segments up to this one were pending at start: check whether they landed before
    /// sending, until the first one that did not.
    check_upto: Option<u64>,
    /// The database is known to be at this build's schema version.
    schema_ready: bool,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct RowKey {
    t: i64,
    node: String,
    flow_id: u64,
    event_kind: u8,
}

enum Landed {
    All,
    None,
    /// These rows are missing.
    Partial(Batch),
}

impl Inserter {
    fn stopping(&self) -> bool {
        self.shared.stopping.load(Ordering::SeqCst)
    }

    async fn run(mut self) {
        loop {
            if self.stopping() {
                break;
            }
            let Some(seq) = self.shared.spool.head() else {
                if self.shared.batcher_done.load(Ordering::SeqCst) {
                    break;
                }
                let work = self.shared.work.notified();
                let stop = self.shared.stop.notified();
                if self.shared.spool.head().is_none() && !self.stopping() {
                    tokio::select! {
                        () = work => {}
                        () = stop => {}
                        // Belt and braces against a missed wake-up.
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
                continue;
            };
            if !self.schema_ready {
                self.ensure_schema().await;
                continue;
            }
            self.process(seq).await;
        }
        debug!("history inserter stopped");
    }

    /// Migrates or checks the schema; on failure waits and leaves `schema_ready` false.
    async fn ensure_schema(&mut self) {
        let cfg = &self.shared.cfg;
        let client = &self.shared.client;
        let r = if cfg.migrate {
            crate::migrate::migrate(client, cfg).await
        } else {
            crate::migrate::inspect(client, cfg).await
        };
        match r.and_then(|info| crate::migrate::require_current(&info).map(|()| info)) {
            Ok(info) => {
                if info.flavor != self.shared.layout.flavor {
                    warn!(
                        database = info.flavor.as_str(),
                        writer = self.shared.layout.flavor.as_str(),
                        "database flavor differs from the spool's; batches will be converted"
                    );
                }
                crate::migrate::save_schema_hint(self.shared.spool.dir(), &info);
                info!(
                    version = info.version,
                    "history schema is current; inserting"
                );
                self.schema_ready = true;
            }
            Err(e) => {
                debug!(error = %e, "history schema not confirmed yet");
                self.sleep_or_stop(self.backoff(3)).await;
            }
        }
    }

    async fn load(&self, seq: u64) -> Option<(Batch, bool)> {
        if let Some(b) = {
            let mut cache = self.shared.cache.lock().unwrap_or_else(|e| e.into_inner());
            let b = cache.0.remove(&seq);
            if let Some(b) = &b {
                cache.1 -= b.payload.len();
            }
            b
        } {
            return Some((b, false));
        }
        let shared = self.shared.clone();
        match tokio::task::spawn_blocking(move || shared.spool.read(seq)).await {
            Ok(Ok(b)) => Some((b, true)),
            Ok(Err(SegmentError::Corrupt { path, reason })) => {
                error!(
                    segment = %path.display(),
                    %reason,
                    "corrupt history spool segment; moving it to corrupt/ and skipping it"
                );
                self.shared.metrics.corrupt_segments.inc();
                if let Err(e) = self.shared.spool.quarantine(seq) {
                    error!(error = %e, "could not move the corrupt segment; deleting it");
                    let _ = self.shared.spool.remove(seq);
                }
                self.shared.update_spool_gauges();
                self.shared.space.notify_waiters();
                None
            }
            Ok(Err(e)) => {
                error!(error = %e, "cannot read a history spool segment; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                None
            }
            Err(e) => {
                error!(error = %e, "spool read task failed");
                None
            }
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let r = &self.shared.cfg.retry;
        let exp = r
            .initial_backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(r.max_backoff);
        // Jitter: somewhere in [exp/2, exp], so many relays do not retry in lockstep.
        exp / 2 + exp.mul_f64(fastrand::f64() / 2.0)
    }

    async fn sleep_or_stop(&self, d: Duration) {
        let stop = self.shared.stop.notified();
        if self.stopping() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(d) => {}
            () = stop => {}
        }
    }

    async fn process(&mut self, seq: u64) {
        let Some((mut batch, from_disk)) = self.load(seq).await else {
            return;
        };
        let target = self.shared.layout;
        if batch.layout.flavor != target.flavor || batch.layout.version > target.version {
            match transcode(&batch, target) {
                Ok(b) => batch = b,
                Err(e) => {
                    self.dead_letter(seq, &batch, &format!("cannot convert spooled rows: {e}"));
                    return;
                }
            }
        }
        let mut check = self.check_upto.is_some_and(|upto| seq <= upto);
        let mut attempt: u32 = 0;
        let mut unknown_attempts: u32 = 0;
        let mut permanent_attempts: u32 = 0;
        let mut token_suffix = 0u32;
        loop {
            if self.stopping() {
                return;
            }
            if check {
                match self.landed(&batch).await {
                    Ok(Landed::All) => {
                        self.ack(seq, &batch, Duration::ZERO, from_disk, true);
                        return;
                    }
                    Ok(Landed::None) => {
                        if self.check_upto.is_some_and(|upto| seq <= upto) {
                            // Later segments were never sent by the previous run.
                            self.check_upto = None;
                        }
                        check = false;
                    }
                    Ok(Landed::Partial(missing)) => {
                        warn!(
                            batch_id = batch.batch_id,
                            missing = missing.rows,
                            of = batch.rows,
                            "batch partly in ClickHouse; sending only the missing rows"
                        );
                        batch = missing;
                        token_suffix += 1;
                        check = false;
                    }
                    Err(e) => {
                        debug!(error = %e, "cannot check whether a batch landed; retrying");
                        self.shared.clickhouse_ok.store(false, Ordering::Relaxed);
                        self.shared
                            .metrics
                            .insert_retries
                            .get_or_create(&crate::metrics::ClassLabels { class: "transient" })
                            .inc();
                        self.sleep_or_stop(self.backoff(attempt)).await;
                        attempt = attempt.saturating_add(1);
                        continue;
                    }
                }
            }
            let started = Instant::now();
            match self.insert(&batch, token_suffix).await {
                Ok(()) => {
                    self.ack(seq, &batch, started.elapsed(), from_disk, false);
                    return;
                }
                Err(e) => {
                    let class = classify(&e);
                    self.shared.clickhouse_ok.store(false, Ordering::Relaxed);
                    self.shared
                        .metrics
                        .insert_errors
                        .get_or_create(&crate::metrics::ClassLabels {
                            class: class.as_str(),
                        })
                        .inc();
                    if !certainly_not_sent(&e) {
                        check = true;
                    }
                    // Errors that say the batch is bad are retried a bounded number of
                    // times (a stopping server answers that way too), then set aside.
                    let limited = match class {
                        ErrorClass::Permanent => Some((
                            &mut permanent_attempts,
                            self.shared.cfg.retry.permanent_error_attempts,
                            "rejected",
                        )),
                        ErrorClass::Unknown => Some((
                            &mut unknown_attempts,
                            self.shared.cfg.retry.unknown_error_attempts,
                            "unrecognised error",
                        )),
                        ErrorClass::Transient => None,
                    };
                    if let Some((attempts, limit, what)) = limited {
                        *attempts += 1;
                        if *attempts >= limit.max(1) {
                            let note = format!("{what}, gave up after {attempts} attempts: {e}");
                            self.dead_letter(seq, &batch, &note);
                            return;
                        }
                        warn!(error = %e, attempt = *attempts, "ClickHouse insert failed ({what}); retrying before setting the batch aside");
                    } else if attempt == 0 {
                        warn!(error = %e, "ClickHouse insert failed; spooling and retrying");
                    } else {
                        debug!(error = %e, attempt, "ClickHouse insert failed again");
                    }
                    self.shared
                        .metrics
                        .insert_retries
                        .get_or_create(&crate::metrics::ClassLabels {
                            class: class.as_str(),
                        })
                        .inc();
                    self.sleep_or_stop(self.backoff(attempt)).await;
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }

    fn ack(&self, seq: u64, batch: &Batch, took: Duration, from_disk: bool, by_check: bool) {
        if let Err(e) = self.shared.spool.remove(seq) {
            error!(error = %e, "cannot delete an inserted spool segment");
        }
        if !self.shared.clickhouse_ok.swap(true, Ordering::Relaxed) {
            info!(
                spooled = self.shared.spool.segments(),
                "ClickHouse inserts succeed again"
            );
        }
        let m = &self.shared.metrics;
        if by_check {
            debug!(batch_id = batch.batch_id, "batch was already in ClickHouse");
            m.landed_rows.inc_by(u64::from(batch.rows));
        } else {
            m.rows_written.inc_by(u64::from(batch.rows));
            m.batches_written.inc();
            m.insert_duration.observe(took.as_secs_f64());
        }
        if from_disk {
            m.replayed_batches.inc();
        }
        self.shared.update_spool_gauges();
        self.shared.space.notify_waiters();
    }

    fn dead_letter(&self, seq: u64, batch: &Batch, error: &str) {
        error!(
            batch_id = batch.batch_id,
            rows = batch.rows,
            %error,
            dir = %self.shared.spool.dir().join(crate::spool::DEAD_DIR).display(),
            "ClickHouse rejected a history batch for good; set aside as a dead letter"
        );
        let note = format!(
            "batch_id: {}\nrows: {}\nlayout: {:?}\nerror: {error}\n",
            batch.batch_id, batch.rows, batch.layout
        );
        if let Err(e) = self.shared.spool.dead_letter(seq, &note) {
            error!(error = %e, "cannot move the batch to dead/");
        }
        self.shared.metrics.dead_letter_batches.inc();
        self.shared
            .metrics
            .dead_letter_rows
            .inc_by(u64::from(batch.rows));
        self.shared.update_spool_gauges();
        self.shared.space.notify_waiters();
    }

    async fn insert(
        &self,
        batch: &Batch,
        token_suffix: u32,
    ) -> Result<(), clickhouse::error::Error> {
        let cfg = &self.shared.cfg;
        let sql = format!(
            "INSERT INTO {}.{} ({}) FORMAT RowBinary",
            cfg.clickhouse.database,
            tables::FLOWS,
            batch.layout.column_list()
        );
        let t = cfg.clickhouse.request_timeout;
        let mut ins = self
            .shared
            .client
            .insert_formatted_with(sql)
            .with_timeouts(Some(t), Some(t));
        if self.shared.layout.flavor == crate::schema::Flavor::Modern {
            let token = if token_suffix == 0 {
                batch.batch_id.to_string()
            } else {
                format!("{}-{token_suffix}", batch.batch_id)
            };
            ins = ins
                .with_setting("insert_deduplication_token", token)
                .with_setting("deduplicate_blocks_in_dependent_materialized_views", "1");
        }
        // Compressed frames of ~1 MiB stream better than one huge frame.
        const CHUNK: usize = 1 << 20;
        let mut off = 0;
        while off < batch.payload.len() {
            let end = (off + CHUNK).min(batch.payload.len());
            ins.send(batch.payload.slice(off..end)).await?;
            off = end;
        }
        ins.end().await
    }

    async fn landed(&self, batch: &Batch) -> Result<Landed, clickhouse::error::Error> {
        let db = &self.shared.cfg.clickhouse.database;
        let flavor = self.shared.layout.flavor;
        let (lo, hi) = (batch.min_time_ns, batch.max_time_ns);
        let timeout = self.shared.cfg.clickhouse.request_timeout;
        let q = queries::batch_rows(flavor, db, lo, hi, batch.batch_id);
        let n: u64 = match tokio::time::timeout(
            timeout,
            q.to_query(&self.shared.client).fetch_one(),
        )
        .await
        {
            Ok(r) => r?,
            Err(_) => return Err(clickhouse::error::Error::TimedOut),
        };
        let result = if n == 0 {
            Landed::None
        } else if n >= u64::from(batch.rows) {
            Landed::All
        } else {
            let q = queries::batch_row_keys(flavor, db, lo, hi, batch.batch_id);
            let keys: Vec<RowKey> = q.to_query(&self.shared.client).fetch_all().await?;
            let mut present: HashMap<(i64, String, u64, u8), u32> = HashMap::new();
            for k in keys {
                *present
                    .entry((k.t, k.node, k.flow_id, k.event_kind))
                    .or_default() += 1;
            }
            let rows = FlowRow::decode_all(&batch.payload, batch.layout)
                .map_err(|e| clickhouse::error::Error::Custom(e.to_string()))?;
            let mut buf = Vec::new();
            let mut missing = 0u32;
            for r in rows {
                let key = (r.time_ns, r.node.clone(), r.flow_id, r.event_kind);
                match present.get_mut(&key) {
                    Some(c) if *c > 0 => *c -= 1,
                    _ => {
                        r.encode(batch.layout, &mut buf);
                        missing += 1;
                    }
                }
            }
            Landed::Partial(Batch {
                rows: missing,
                payload: Bytes::from(buf),
                ..batch.clone()
            })
        };
        let label = match &result {
            Landed::All => "landed",
            Landed::None => "absent",
            Landed::Partial(_) => "partial",
        };
        self.shared
            .metrics
            .landed_checks
            .get_or_create(&crate::metrics::ResultLabels { result: label })
            .inc();
        Ok(result)
    }
}

/// Re-encodes a spooled batch for another layout (a database of the other flavor, e.g.
/// after the spool directory moved).
fn transcode(batch: &Batch, to: Layout) -> Result<Batch, crate::rowbinary::DecodeError> {
    let rows = FlowRow::decode_all(&batch.payload, batch.layout)?;
    let mut buf = Vec::with_capacity(batch.payload.len());
    for r in &rows {
        r.encode(to, &mut buf);
    }
    Ok(Batch {
        layout: to,
        payload: Bytes::from(buf),
        ..batch.clone()
    })
}

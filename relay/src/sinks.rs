//! The relay's sinks: flow history in ClickHouse (`lumen-history`) and OTLP export
//! (`lumen-otlp`). Both are fed by one follower of the relay's own merged, cluster-wide
//! stream (an in-process GetFlows client, so server TLS does not matter), so they see
//! exactly what clients see, in time order. The follower resumes after an interruption;
//! flows a slow sink could not take are counted by the relay's client queue like any slow
//! client's (LostEvent, metrics) and in the sinks' status as `relay_queue_full`.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use futures::StreamExt;
use lumen_proto::{
    flow::Flow,
    observer::{get_flows_response::ResponseTypes, GetFlowsRequest, LumenSinkStatus},
};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::{history_join::HistoryView, metrics::Metrics, observer::Relay};

/// Most flows handed to the sinks at once.
const BATCH: usize = 4096;
/// A partial batch waits at most this long.
const FLUSH: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("history (ClickHouse): {0}")]
    History(String),
    #[error("OTLP export: {0}")]
    Otlp(String),
}

/// Running sinks.
pub struct Sinks {
    history: Option<Arc<lumen_history::History>>,
    otlp: Option<lumen_otlp::OtlpExporter>,
    task: Option<JoinHandle<()>>,
    report: SinkReport,
}

/// What the follower has done, shared with [`SinkReport`].
#[derive(Default)]
struct Progress {
    /// Flows handed to the sinks.
    handed: AtomicU64,
    /// Flows the relay dropped from the follower's stream because the sinks fell behind
    /// (its LostEvent records).
    lost: AtomicU64,
}

/// The sinks' state for ServerStatus (`lumen status`).
#[derive(Clone)]
pub struct SinkReport {
    history: Option<HistorySide>,
    otlp: Option<lumen_otlp::FlowRecorder>,
    progress: Arc<Progress>,
    /// Time of the newest flow handed to the sinks (ns).
    handed_ns: Arc<AtomicI64>,
}

#[derive(Clone)]
struct HistorySide {
    history: Arc<lumen_history::History>,
    metrics: lumen_history::HistoryMetrics,
    target: String,
}

/// Loss reason of flows the relay dropped before the sinks got them.
const RELAY_QUEUE_FULL: &str = "relay_queue_full";

impl SinkReport {
    /// One status per configured sink.
    pub fn status(&self) -> Vec<LumenSinkStatus> {
        let lost = self.progress.lost.load(Ordering::Relaxed);
        let handed = self.progress.handed.load(Ordering::Relaxed);
        let mut out = Vec::new();
        if let Some(h) = &self.history {
            let w = h.history.writer().status();
            let mut dropped: HashMap<String, u64> = [
                lumen_history::metrics::reason::SPOOL_FULL,
                lumen_history::metrics::reason::QUEUE_FULL,
                lumen_history::metrics::reason::CLOSED,
                lumen_history::metrics::reason::SPOOL_IO,
                lumen_history::metrics::reason::SHUTDOWN,
            ]
            .into_iter()
            .map(|r| (r.to_owned(), h.metrics.discarded_count(r)))
            .collect();
            dropped.insert("dead_letter".into(), h.metrics.dead_letter_rows.get());
            dropped.insert(RELAY_QUEUE_FULL.into(), lost);
            dropped.retain(|_, n| *n > 0);
            let complete =
                HistoryView::new(h.history.clone(), self.handed_ns.clone()).complete_until_ns();
            out.push(LumenSinkStatus {
                name: "history".into(),
                target: h.target.clone(),
                healthy: w.clickhouse_ok,
                last_error: if w.clickhouse_ok {
                    String::new()
                } else {
                    "inserts into ClickHouse are failing; batches spool to disk".into()
                },
                flows: handed,
                written: h.metrics.rows_written.get(),
                queued: w.spool_batches as u64,
                queued_bytes: w.spool_bytes,
                dropped,
                complete_until: Some(crate::wire::ns_timestamp(complete)),
            });
        }
        if let Some(o) = &self.otlp {
            let s = o.status();
            let mut dropped: HashMap<String, u64> = HashMap::new();
            let mut healthy = true;
            let mut last_error = String::new();
            let mut signal = |e: &lumen_otlp::SignalStatus| {
                healthy &= e.healthy;
                if last_error.is_empty() {
                    if let Some(err) = e.last_error.as_ref().filter(|_| !e.healthy) {
                        last_error = err.clone();
                    }
                }
            };
            if let Some(m) = &s.metrics {
                signal(&m.export);
            }
            let (mut written, mut queued) = (0, 0);
            if let Some(l) = &s.logs {
                signal(&l.export);
                written = l.exported;
                queued = l.queue_length;
                for (reason, n) in [
                    ("queue_full", l.discarded.queue_full),
                    ("retries_exhausted", l.discarded.retries_exhausted),
                    ("rejected", l.discarded.rejected),
                    ("shutdown", l.discarded.shutdown),
                ] {
                    dropped.insert(reason.into(), n);
                }
            }
            dropped.insert(RELAY_QUEUE_FULL.into(), lost);
            dropped.retain(|_, n| *n > 0);
            out.push(LumenSinkStatus {
                name: "otlp".into(),
                target: format!("{} {}", s.protocol.as_str(), s.endpoint),
                healthy,
                last_error,
                flows: s.flows,
                written,
                queued,
                queued_bytes: 0,
                dropped,
                complete_until: None,
            });
        }
        out
    }
}

impl Sinks {
    /// Start the configured sinks and the follower of `relay` (the relay's own API).
    pub async fn start(
        history: Option<&lumen_history::HistoryConfig>,
        otlp: Option<&lumen_otlp::OtlpConfig>,
        relay_name: &str,
        relay: Arc<Relay>,
        since: i64,
        metrics: &Metrics,
        stop: watch::Receiver<bool>,
    ) -> Result<Sinks, SinkError> {
        let history_cfg = history;
        let history_side = match history {
            Some(cfg) => {
                let m = lumen_history::HistoryMetrics::default();
                metrics.register_extra(|r| m.register(r));
                let h = lumen_history::History::start(cfg, m.clone())
                    .await
                    .map_err(|e| SinkError::History(e.to_string()))?;
                info!("history sink started");
                Some(HistorySide {
                    history: Arc::new(h),
                    metrics: m,
                    target: format!(
                        "{} database {}",
                        cfg.clickhouse.url, cfg.clickhouse.database
                    ),
                })
            }
            None => None,
        };
        let history = history_side.as_ref().map(|h| h.history.clone());
        // Resume after the newest flow history already has (a restart or crash of this
        // relay), within the configured window; otherwise start at the relay's start.
        let mut since = since;
        if let (Some(h), Some(cfg)) = (&history, history_cfg) {
            let window = i64::try_from(cfg.resume_window.as_nanos()).unwrap_or(i64::MAX);
            if window > 0 {
                if let Some(t) = h.newest_taken_ns(since.saturating_sub(window)).await {
                    if t < since {
                        info!(
                            resume_after_ns = t,
                            "history resumes after its newest stored flow"
                        );
                        since = t;
                    }
                }
            }
        }
        let otlp = match otlp {
            Some(cfg) => {
                let e = lumen_otlp::OtlpExporter::start(cfg, relay_name)
                    .map_err(|e| SinkError::Otlp(e.to_string()))?;
                metrics.register_extra(|r| e.register_metrics(r));
                info!("OTLP sink started");
                Some(e)
            }
            None => None,
        };
        // Flows newer than `since` (the relay's start) are the sinks': the follower asks
        // for them, so those received while the sinks started are covered too.
        let report = SinkReport {
            history: history_side,
            otlp: otlp.as_ref().map(|e| e.recorder()),
            progress: Arc::new(Progress::default()),
            handed_ns: Arc::new(AtomicI64::new(since)),
        };
        let task = (history.is_some() || otlp.is_some()).then(|| {
            tokio::spawn(follow(
                relay,
                since,
                Handover {
                    history: history.clone(),
                    otlp: report.otlp.clone(),
                    handed_ns: report.handed_ns.clone(),
                    progress: report.progress.clone(),
                    relay_name: relay_name.to_owned(),
                },
                stop,
            ))
        });
        Ok(Sinks {
            history,
            otlp,
            task,
            report,
        })
    }

    /// History as the relay's GetFlows reads it (with how far it is complete).
    pub fn history_view(&self) -> Option<HistoryView> {
        self.history
            .as_ref()
            .map(|h| HistoryView::new(h.clone(), self.report.handed_ns.clone()))
    }

    /// The sinks' state, for ServerStatus.
    pub fn report(&self) -> SinkReport {
        self.report.clone()
    }

    /// Flush and stop: what was handed over is inserted or spooled within `grace`.
    pub async fn shutdown(self, grace: Duration) {
        if let Some(t) = self.task {
            let _ = tokio::time::timeout(grace, t).await;
        }
        if let Some(h) = self.history {
            let report = h.shutdown(grace).await;
            info!(?report, "history sink stopped");
        }
        if let Some(e) = self.otlp {
            let status = e.shutdown(grace).await;
            info!(?status, "OTLP sink stopped");
        }
    }
}

async fn follow(relay: Arc<Relay>, since: i64, sinks: Handover, mut stop: watch::Receiver<bool>) {
    // Start from the relay's start (flows the nodes saw while the sinks started are not
    // missed) and resume after an interruption from the last flow handed over.
    let mut resume_ns: i64 = since;
    loop {
        if *stop.borrow() {
            return;
        }
        let req = GetFlowsRequest {
            follow: true,
            since: Some(crate::wire::ns_timestamp(resume_ns.saturating_add(1))),
            ..Default::default()
        };
        // In process: the same merged stream as a client gets (its queue, its losses).
        let mut stream = relay.live(req);
        let mut batch: Vec<Flow> = Vec::with_capacity(BATCH);
        let mut tick = tokio::time::interval(FLUSH);
        loop {
            tokio::select! {
                msg = stream.next() => match msg.map(|r| r.map(|raw| {
                    let node = raw.node_name.clone();
                    (raw.to_response(), node)
                })) {
                    Some(Ok((Ok(resp), node_name))) => match resp.response_types {
                        Some(ResponseTypes::Flow(f)) => {
                            if let Some(t) = &f.time {
                                resume_ns = crate::wire::timestamp_ns(t);
                            }
                            batch.push(f);
                            if batch.len() >= BATCH {
                                sinks.hand_over(&mut batch).await;
                            }
                        }
                        Some(ResponseTypes::LostEvents(l)) => {
                            if *node_name == *sinks.relay_name {
                                // The relay dropped these from this stream: the sinks
                                // fell behind it.
                                sinks.progress.lost.fetch_add(l.num_events_lost, Ordering::Relaxed);
                            }
                            if let Some(o) = &sinks.otlp {
                                o.record_lost_event(&l, &node_name);
                            }
                        }
                        _ => {}
                    },
                    Some(Ok((Err(e), _))) => {
                        warn!(error = %e, "sinks: an undecodable flow in the relay's stream; skipped");
                    }
                    Some(Err(status)) => {
                        warn!(error = %status, "sinks: the relay refused the follower; retrying");
                        sinks.hand_over(&mut batch).await;
                        break;
                    }
                    None => {
                        sinks.hand_over(&mut batch).await;
                        break;
                    }
                },
                _ = tick.tick() => sinks.hand_over(&mut batch).await,
                _ = stop.changed() => {
                    sinks.hand_over(&mut batch).await;
                    return;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// What the follower hands flows to.
struct Handover {
    history: Option<Arc<lumen_history::History>>,
    otlp: Option<lumen_otlp::FlowRecorder>,
    handed_ns: Arc<AtomicI64>,
    progress: Arc<Progress>,
    relay_name: String,
}

impl Handover {
    async fn hand_over(&self, batch: &mut Vec<Flow>) {
        if batch.is_empty() {
            return;
        }
        let flows = std::mem::take(batch);
        self.progress
            .handed
            .fetch_add(flows.len() as u64, Ordering::Relaxed);
        let newest = flows
            .iter()
            .filter_map(|f| f.time.as_ref())
            .map(crate::wire::timestamp_ns)
            .max();
        if let Some(o) = &self.otlp {
            for f in &flows {
                o.record(f, "");
            }
        }
        if let Some(h) = &self.history {
            // Backpressure: while ClickHouse and the spool are backed up, the relay's client
            // queue for this follower fills and its losses are counted there.
            if let Err(e) = h.writer().submit(flows).await {
                warn!(error = ?e, "history refused flows");
            }
        }
        // Handed over (inserted, or pending in the writer): history is complete up to here.
        if let Some(t) = newest {
            self.handed_ns.fetch_max(t, Ordering::AcqRel);
        }
    }
}

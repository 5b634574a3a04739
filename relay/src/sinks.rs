//! The relay's sinks: flow history in ClickHouse (`lumen-history`) and OTLP export
//! (`lumen-otlp`). Both are fed by one follower of the relay's own merged, cluster-wide
//! stream (a loopback GetFlows client), so they see exactly what clients see, in time
//! order. The follower reconnects on failure; flows a slow sink could not take are
//! counted by the relay's client queue like any slow client's (LostEvent, metrics).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc,
    },
    time::Duration,
};

use lumen_proto::{
    flow::Flow,
    observer::{
        get_flows_response::ResponseTypes, observer_client::ObserverClient, GetFlowsRequest,
    },
};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::{history_join::HistoryView, metrics::Metrics};

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
    #[error("sinks read the relay's own API over loopback, which server TLS would refuse; run sinks on a relay without server_tls")]
    Tls,
}

/// Running sinks.
pub struct Sinks {
    history: Option<Arc<lumen_history::History>>,
    otlp: Option<lumen_otlp::OtlpExporter>,
    task: Option<JoinHandle<()>>,
    /// Time of the newest flow handed to the history writer (ns).
    handed_ns: Arc<AtomicI64>,
}

impl Sinks {
    /// Start the configured sinks and the follower of `relay` (the relay's own API).
    pub async fn start(
        history: Option<&lumen_history::HistoryConfig>,
        otlp: Option<&lumen_otlp::OtlpConfig>,
        relay_name: &str,
        relay: SocketAddr,
        since: i64,
        metrics: &Metrics,
        stop: watch::Receiver<bool>,
    ) -> Result<Sinks, SinkError> {
        let history = match history {
            Some(cfg) => {
                let m = lumen_history::HistoryMetrics::default();
                metrics.register_extra(|r| m.register(r));
                let h = lumen_history::History::start(cfg, m)
                    .await
                    .map_err(|e| SinkError::History(e.to_string()))?;
                info!("history sink started");
                Some(Arc::new(h))
            }
            None => None,
        };
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
        let handed_ns = Arc::new(AtomicI64::new(since));
        let task = (history.is_some() || otlp.is_some()).then(|| {
            tokio::spawn(follow(
                relay,
                since,
                Handover {
                    history: history.clone(),
                    otlp: otlp.as_ref().map(|e| e.recorder()),
                    handed_ns: handed_ns.clone(),
                },
                stop,
            ))
        });
        Ok(Sinks {
            history,
            otlp,
            task,
            handed_ns,
        })
    }

    /// History as the relay's GetFlows reads it (with how far it is complete).
    pub fn history_view(&self) -> Option<HistoryView> {
        self.history
            .as_ref()
            .map(|h| HistoryView::new(h.clone(), self.handed_ns.clone()))
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

async fn follow(relay: SocketAddr, since: i64, sinks: Handover, mut stop: watch::Receiver<bool>) {
    let url = format!("http://{relay}");
    // Start from the relay's start (flows the nodes saw while the sinks connected are not
    // missed) and resume after a reconnect from the last flow handed over.
    let mut resume_ns: Option<i64> = Some(since);
    loop {
        if *stop.borrow() {
            return;
        }
        let mut client = match ObserverClient::connect(url.clone()).await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "sinks: connecting to the relay API failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stop.changed() => return,
                }
            }
        };
        let req = GetFlowsRequest {
            follow: true,
            since: resume_ns.map(|ns| {
                let ns = ns + 1;
                prost_types::Timestamp {
                    seconds: ns.div_euclid(1_000_000_000),
                    nanos: ns.rem_euclid(1_000_000_000) as i32,
                }
            }),
            ..Default::default()
        };
        let mut stream = match client.get_flows(req).await {
            Ok(r) => r.into_inner(),
            Err(e) => {
                warn!(error = %e, "sinks: GetFlows on the relay failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stop.changed() => return,
                }
            }
        };
        let mut batch: Vec<Flow> = Vec::with_capacity(BATCH);
        let mut tick = tokio::time::interval(FLUSH);
        loop {
            tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(resp)) => match resp.response_types {
                        Some(ResponseTypes::Flow(f)) => {
                            if let Some(t) = &f.time {
                                resume_ns = Some(t.seconds * 1_000_000_000 + i64::from(t.nanos));
                            }
                            batch.push(f);
                            if batch.len() >= BATCH {
                                sinks.hand_over(&mut batch).await;
                            }
                        }
                        Some(ResponseTypes::LostEvents(l)) => {
                            if let Some(o) = &sinks.otlp {
                                o.record_lost_event(&l, &resp.node_name);
                            }
                        }
                        _ => {}
                    },
                    Ok(None) | Err(_) => {
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
}

impl Handover {
    async fn hand_over(&self, batch: &mut Vec<Flow>) {
        if batch.is_empty() {
            return;
        }
        let flows = std::mem::take(batch);
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

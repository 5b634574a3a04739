//! Prometheus metrics of the relay, named in one place, served on `/metrics` (with the
//! per-node state as JSON on `/nodes`).

use std::sync::{Arc, Mutex};

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// Metric names (without the `_total` suffix prometheus-client adds to counters).
pub mod names {
    /// 1 for the node's current connection state, 0 for the others.
    pub const NODE_STATE: &str = "lumen_relay_node_state";
    pub const NODE_RECONNECTS: &str = "lumen_relay_node_reconnects";
    pub const HEALTH_PROBES_LATE: &str = "lumen_relay_health_probes_late";
    pub const FLOWS_RECEIVED: &str = "lumen_relay_flows_received";
    pub const FLOWS_SENT: &str = "lumen_relay_flows_sent";
    pub const DISCARDED_EVENTS: &str = "lumen_relay_discarded_events";
    pub const LATE_FLOWS: &str = "lumen_relay_late_flows";
    pub const WINDOW_RELEASED: &str = "lumen_relay_reorder_window_released_flows";
    pub const CLIENTS: &str = "lumen_relay_clients";
    pub const NODES: &str = "lumen_relay_nodes";
    pub const HISTORY_FLOWS_SERVED: &str = "lumen_relay_history_flows_served";
}

/// Connection states as the `state` label.
pub mod state {
    pub const CONNECTING: &str = "connecting";
    pub const CONNECTED: &str = "connected";
    pub const UNAVAILABLE: &str = "unavailable";
    pub const ALL: [&str; 3] = [CONNECTING, CONNECTED, UNAVAILABLE];
}

/// Why the relay discarded events (the `reason` label, stage = `merge` or `client`).
pub mod reason {
    /// A flow arrived after newer ones had been sent and `late_flows` is `drop`.
    pub const LATE: &str = "late";
    /// A following client read too slowly and its queue was full.
    pub const SLOW_CLIENT: &str = "slow_client";
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeStateLabels {
    pub node: String,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageReasonLabels {
    pub stage: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    /// `observer` (one flow per response) or `batches` (FlowBatches).
    pub api: &'static str,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    pub node_state: Family<NodeStateLabels, Gauge>,
    pub node_reconnects: Family<NodeLabels, Counter>,
    pub health_probes_late: Family<NodeLabels, Counter>,
    pub flows_received: Family<NodeLabels, Counter>,
    pub flows_sent: Family<ApiLabels, Counter>,
    pub discarded: Family<StageReasonLabels, Counter>,
    pub late_flows: Counter,
    pub window_released: Counter,
    pub clients: Gauge,
    pub nodes: Gauge,
    pub history_flows_served: Counter,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let m = Self {
            registry: Mutex::new(Registry::default()),
            node_state: Family::default(),
            node_reconnects: Family::default(),
            health_probes_late: Family::default(),
            flows_received: Family::default(),
            flows_sent: Family::default(),
            discarded: Family::default(),
            late_flows: Counter::default(),
            window_released: Counter::default(),
            clients: Gauge::default(),
            nodes: Gauge::default(),
            history_flows_served: Counter::default(),
        };
        registry.register(
            names::NODE_STATE,
            "Connection state of each node (1 = current state)",
            m.node_state.clone(),
        );
        registry.register(
            names::NODE_RECONNECTS,
            "Times a node became connected again after being unavailable",
            m.node_reconnects.clone(),
        );
        registry.register(
            names::HEALTH_PROBES_LATE,
            "Health probes a connected node answered too late (probed again at once; a second late answer makes it unavailable)",
            m.health_probes_late.clone(),
        );
        registry.register(
            names::FLOWS_RECEIVED,
            "Flows received from each node",
            m.flows_received.clone(),
        );
        registry.register(
            names::FLOWS_SENT,
            "Flows sent to clients",
            m.flows_sent.clone(),
        );
        registry.register(
            names::DISCARDED_EVENTS,
            "Events the relay discarded, by stage and reason",
            m.discarded.clone(),
        );
        registry.register(
            names::LATE_FLOWS,
            "Flows that arrived after newer flows had been sent (missed the reordering window)",
            m.late_flows.clone(),
        );
        registry.register(
            names::WINDOW_RELEASED,
            "Flows sent because the reordering window ran out while a node was quiet",
            m.window_released.clone(),
        );
        registry.register(
            names::CLIENTS,
            "GetFlows streams being served",
            m.clients.clone(),
        );
        registry.register(names::NODES, "Nodes known to the relay", m.nodes.clone());
        registry.register(
            names::HISTORY_FLOWS_SERVED,
            "Flows sent to clients from history (ClickHouse): the part of a since/until range older than the seam with the live stream",
            m.history_flows_served.clone(),
        );
        *m.registry.lock().unwrap_or_else(|p| p.into_inner()) = registry;
        Arc::new(m)
    }

    /// Register metrics of another component (the sinks) in the relay's registry.
    pub fn register_extra(&self, f: impl FnOnce(&mut Registry)) {
        f(&mut self.registry.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Sets the node's state gauge (1 for `current`, 0 for the others).
    pub fn set_node_state(&self, node: &str, current: Option<&'static str>) {
        for s in state::ALL {
            self.node_state
                .get_or_create(&NodeStateLabels {
                    node: node.to_owned(),
                    state: s,
                })
                .set(i64::from(Some(s) == current));
        }
    }

    /// Forgets a node that left.
    pub fn remove_node(&self, node: &str) {
        for s in state::ALL {
            self.node_state.remove(&NodeStateLabels {
                node: node.to_owned(),
                state: s,
            });
        }
    }

    pub fn discard(&self, stage: &'static str, reason: &'static str, n: u64) {
        if n > 0 {
            self.discarded
                .get_or_create(&StageReasonLabels { stage, reason })
                .inc_by(n);
        }
    }

    /// Every event the relay discarded, whatever the stage and reason.
    pub fn discarded_total(&self) -> u64 {
        // One label set at a time: the family's lock is held while a guard lives.
        let mut total = 0;
        for (stage, r) in [("client", reason::SLOW_CLIENT), ("merge", reason::LATE)] {
            let n = self
                .discarded
                .get_or_create(&StageReasonLabels { stage, reason: r })
                .get();
            total += n;
        }
        total
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let reg = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if encode(&mut out, &reg).is_err() {
            out.clear();
        }
        out
    }
}

/// Serves `/metrics` and `/nodes` (JSON) on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    pool: Arc<crate::pool::NodePool>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::{routing::get, Router};
    let app = Router::new()
        .route(
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
        )
        .route(
            "/nodes",
            get(move || {
                let p = pool.clone();
                async move { axum::Json(p.describe()) }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

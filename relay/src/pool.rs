//! The nodes the relay fans in: one gRPC client (one HTTP/2 connection, multiplexing every
//! client's streams) per node, a health task per node that probes it and reconnects with
//! exponential backoff and full jitter, and the per-node state that ServerStatus,
//! GetNodes, `/nodes` and the metrics report.
//!
//! Discovery sources (static list, DNS, peer service) each hand the pool their current set
//! of nodes; the pool keeps the union, starting clients for nodes that join and stopping
//! those of nodes that leave, and tells running fan-outs through [`NodePool::subscribe`].

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, SystemTime},
};

use lumen_proto::observer::{
    observer_client::ObserverClient, GetNodesRequest, ServerStatusRequest, ServerStatusResponse,
};
use tokio::sync::{watch, Notify};
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

use crate::{
    backoff::{Backoff, Jitter},
    metrics::{state, Metrics},
    tls::NodeTls,
};

/// A node as a discovery source announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// Name, when the source knows it (else learned from the node, else the address).
    pub name: Option<String>,
    /// `host:port` of its Observer API.
    pub address: String,
    /// Name its TLS certificate carries, when the source knows it.
    pub tls_server_name: Option<String>,
}

impl NodeSpec {
    pub fn new(name: Option<String>, address: impl Into<String>) -> Self {
        Self {
            name,
            address: address.into(),
            tls_server_name: None,
        }
    }
}

/// Connection state of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnState {
    /// Not probed yet.
    Connecting,
    Connected,
    /// The last attempt failed; retried with backoff.
    Unavailable {
        reason: String,
    },
}

impl ConnState {
    pub fn label(&self) -> &'static str {
        match self {
            ConnState::Connecting => state::CONNECTING,
            ConnState::Connected => state::CONNECTED,
            ConnState::Unavailable { .. } => state::UNAVAILABLE,
        }
    }
}

/// What the relay knows about a node right now.
#[derive(Debug, Clone)]
pub struct NodeStatus {
    pub state: ConnState,
    /// Bumped every time the node becomes connected.
    pub epoch: u64,
    /// Since when the node is in `state`.
    pub since: SystemTime,
    /// Last successful answer.
    pub last_seen: Option<SystemTime>,
    /// Name the node reports (GetNodes), if any.
    pub reported_name: Option<String>,
    pub version: String,
    pub server_status: Option<ServerStatusResponse>,
    /// The node stopped being part of the cluster.
    pub gone: bool,
}

/// Whether a node serves the Lumen-only FlowBatches RPC.
pub mod batch_support {
    pub const UNKNOWN: u8 = 0;
    pub const YES: u8 = 1;
    pub const NO: u8 = 2;
}

/// One node and its client.
pub struct Node {
    pub spec: NodeSpec,
    configured_name: Mutex<Option<String>>,
    channel: Channel,
    tls_server_name: Option<String>,
    status: watch::Sender<NodeStatus>,
    kick: Notify,
    stop: watch::Sender<bool>,
    batches: AtomicU8,
}

impl Node {
    /// Display name: announced by discovery, else reported by the node, else the address.
    pub fn name(&self) -> String {
        if let Some(n) = self
            .configured_name
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return n;
        }
        self.status
            .borrow()
            .reported_name
            .clone()
            .unwrap_or_else(|| self.spec.address.clone())
    }

    pub fn address(&self) -> &str {
        &self.spec.address
    }

    pub fn status(&self) -> NodeStatus {
        self.status.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<NodeStatus> {
        self.status.subscribe()
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub fn tls_server_name(&self) -> Option<&str> {
        self.tls_server_name.as_deref()
    }

    /// A stream to this node failed: check it now instead of at the next health tick.
    pub fn report_failure(&self) {
        self.kick.notify_one();
    }

    pub fn batch_support(&self) -> u8 {
        self.batches.load(Ordering::Relaxed)
    }

    pub fn set_batch_support(&self, v: u8) {
        self.batches.store(v, Ordering::Relaxed);
    }

    pub fn is_gone(&self) -> bool {
        self.status.borrow().gone
    }
}

/// Connection settings shared by every node client.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub backoff: Backoff,
    pub health_interval: Duration,
    pub dial_timeout: Duration,
    pub request_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub tls: Option<NodeTls>,
}

impl PoolSettings {
    pub fn from_config(c: &crate::config::Config, tls: Option<NodeTls>) -> Self {
        Self {
            backoff: c.backoff(),
            health_interval: c.health_interval,
            dial_timeout: c.dial_timeout,
            request_timeout: c.request_timeout,
            keepalive_interval: c.keepalive_interval,
            keepalive_timeout: c.keepalive_timeout,
            tls,
        }
    }

    /// A lazily connecting channel to `address`: nothing is dialled until a request needs
    /// it, so reconnects happen at the pace of the health task's backoff.
    pub fn channel(
        &self,
        address: &str,
        announced_tls_name: Option<&str>,
    ) -> Result<(Channel, Option<String>), String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut ep = Endpoint::from_shared(format!("{scheme}://{address}"))
            .map_err(|e| format!("invalid node address {address:?}: {e}"))?
            .connect_timeout(self.dial_timeout)
            .tcp_nodelay(true)
            .tcp_keepalive(Some(self.keepalive_interval * 3))
            .http2_keep_alive_interval(self.keepalive_interval)
            .keep_alive_timeout(self.keepalive_timeout)
            .keep_alive_while_idle(true)
            // Each client stream may hold at most 1 MiB in flight; the connection's window
            // is large so streams of slow clients never starve the others.
            .initial_stream_window_size(Some(1 << 20))
            .initial_connection_window_size(Some(256 << 20));
        let mut server_name = None;
        if let Some(tls) = &self.tls {
            let name = tls.server_name(announced_tls_name, address);
            ep = ep
                .tls_config(tls.client_config(&name))
                .map_err(|e| format!("TLS towards {address}: {e}"))?;
            server_name = Some(name);
        }
        Ok((ep.connect_lazy(), server_name))
    }
}

/// Every node the relay fans in.
pub struct NodePool {
    settings: PoolSettings,
    metrics: Arc<Metrics>,
    nodes: RwLock<BTreeMap<String, Arc<Node>>>,
    sources: Mutex<BTreeMap<String, Vec<NodeSpec>>>,
    changes: watch::Sender<u64>,
}

impl NodePool {
    pub fn new(settings: PoolSettings, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            settings,
            metrics,
            nodes: RwLock::new(BTreeMap::new()),
            sources: Mutex::new(BTreeMap::new()),
            changes: watch::channel(0).0,
        })
    }

    pub fn settings(&self) -> &PoolSettings {
        &self.settings
    }

    /// Current nodes, by address.
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.nodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Changes whenever nodes join or leave.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Replaces what discovery source `source` announces; starts and stops clients so the
    /// pool holds the union of every source (by address; the first source naming a node
    /// wins). Must be called within a tokio runtime.
    pub fn update_source(self: &Arc<Self>, source: &str, specs: Vec<NodeSpec>) {
        let wanted: BTreeMap<String, NodeSpec> = {
            let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
            sources.insert(source.to_owned(), specs);
            let mut all = BTreeMap::new();
            for specs in sources.values() {
                for s in specs {
                    all.entry(s.address.clone()).or_insert_with(|| s.clone());
                }
            }
            all
        };
        let mut changed = false;
        let mut nodes = self.nodes.write().unwrap_or_else(|p| p.into_inner());
        let leaving: Vec<String> = nodes
            .iter()
            .filter(|(addr, node)| {
                wanted
                    .get(*addr)
                    .is_none_or(|w| w.tls_server_name != node.spec.tls_server_name)
            })
            .map(|(a, _)| a.clone())
            .collect();
        for addr in leaving {
            if let Some(node) = nodes.remove(&addr) {
                let name = node.name();
                info!(node = %name, address = %addr, "node left");
                node.status.send_modify(|s| s.gone = true);
                let _ = node.stop.send(true);
                self.metrics.remove_node(&name);
                changed = true;
            }
        }
        for (addr, spec) in wanted {
            if let Some(node) = nodes.get(&addr) {
                let mut name = node
                    .configured_name
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if *name != spec.name {
                    *name = spec.name.clone();
                    changed = true;
                }
                continue;
            }
            match self.start_node(spec) {
                Ok(node) => {
                    info!(node = %node.name(), address = %addr, "node joined");
                    nodes.insert(addr, node);
                    changed = true;
                }
                Err(e) => warn!(address = %addr, error = %e, "cannot relay node"),
            }
        }
        self.metrics.nodes.set(nodes.len() as i64);
        drop(nodes);
        if changed {
            self.changes.send_modify(|g| *g += 1);
        }
    }

    fn start_node(self: &Arc<Self>, spec: NodeSpec) -> Result<Arc<Node>, String> {
        let (channel, tls_server_name) = self
            .settings
            .channel(&spec.address, spec.tls_server_name.as_deref())?;
        let (status, _) = watch::channel(NodeStatus {
            state: ConnState::Connecting,
            epoch: 0,
            since: SystemTime::now(),
            last_seen: None,
            reported_name: None,
            version: String::new(),
            server_status: None,
            gone: false,
        });
        let node = Arc::new(Node {
            configured_name: Mutex::new(spec.name.clone()),
            spec,
            channel,
            tls_server_name,
            status,
            kick: Notify::new(),
            stop: watch::channel(false).0,
            batches: AtomicU8::new(batch_support::UNKNOWN),
        });
        self.metrics
            .set_node_state(&node.name(), Some(state::CONNECTING));
        tokio::spawn(health(
            node.clone(),
            self.settings.clone(),
            self.metrics.clone(),
        ));
        Ok(node)
    }

    /// Stops every node client.
    pub fn shutdown(&self) {
        for node in self.nodes() {
            let _ = node.stop.send(true);
        }
    }

    /// Per-node state for `/nodes`.
    pub fn describe(&self) -> serde_json::Value {
        let nodes: Vec<serde_json::Value> = self
            .nodes()
            .iter()
            .map(|n| {
                let s = n.status();
                let secs = |t: Option<SystemTime>| {
                    t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs_f64())
                };
                serde_json::json!({
                    "name": n.name(),
                    "address": n.address(),
                    "state": s.state.label(),
                    "reason": match &s.state { ConnState::Unavailable { reason } => Some(reason.clone()), _ => None },
                    "since": secs(Some(s.since)),
                    "last_seen": secs(s.last_seen),
                    "version": s.version,
                    "tls": n.tls_server_name(),
                    "batches": match n.batch_support() { batch_support::YES => Some(true), batch_support::NO => Some(false), _ => None },
                })
            })
            .collect();
        serde_json::json!({ "nodes": nodes })
    }

    /// Names of every node by state, for ServerStatus.
    pub fn counts(&self) -> (Vec<Arc<Node>>, Vec<Arc<Node>>) {
        self.nodes()
            .into_iter()
            .partition(|n| n.status().state == ConnState::Connected)
    }
}

/// Short, client-safe description of a failed call.
pub fn describe_status(s: &tonic::Status) -> String {
    let msg = s.message();
    let src = std::error::Error::source(s).map(|e| {
        // The innermost cause says most ("Connection refused").
        let mut cur: &dyn std::error::Error = e;
        while let Some(next) = cur.source() {
            cur = next;
        }
        cur.to_string()
    });
    match (msg.is_empty(), src) {
        (_, Some(src)) if !msg.contains(&src) => format!("{:?}: {msg}: {src}", s.code()),
        (true, _) => format!("{:?}", s.code()),
        _ => format!("{:?}: {msg}", s.code()),
    }
}

/// Probes `node` (ServerStatus) every health interval while it answers; after a failure
/// retries with exponential backoff and full jitter until it answers again. A connected
/// node that answers one probe late is probed again at once before it is called
/// unavailable: a node busy serving large queries is slow, not gone (a refused or broken
/// connection counts at once; a hung node is also caught by the transport's keepalive).
async fn health(node: Arc<Node>, settings: PoolSettings, metrics: Arc<Metrics>) {
    let mut stop = node.stop.subscribe();
    let mut rng = Jitter::default();
    let mut attempt: u32 = 0;
    let mut late_answers: u32 = 0;
    let mut metrics_name = node.name();
    let mut client = ObserverClient::new(node.channel());
    loop {
        if *stop.borrow() {
            return;
        }
        let probe = tokio::time::timeout(
            settings.request_timeout,
            client.server_status(ServerStatusRequest {}),
        )
        .await;
        let was_connected = node.status.borrow().state == ConnState::Connected;
        match probe {
            Ok(Ok(resp)) => {
                let resp = resp.into_inner();
                attempt = 0;
                late_answers = 0;
                if !was_connected {
                    // Learn the node's own name and version once per connection.
                    let nodes = tokio::time::timeout(
                        settings.request_timeout,
                        client.get_nodes(GetNodesRequest {}),
                    )
                    .await;
                    let own = match nodes {
                        Ok(Ok(r)) => r.into_inner().nodes.into_iter().next(),
                        _ => None,
                    };
                    let reconnect = node.status.borrow().epoch > 0;
                    node.status.send_modify(|s| {
                        s.state = ConnState::Connected;
                        s.epoch += 1;
                        s.since = SystemTime::now();
                        if let Some(own) = &own {
                            if !own.name.is_empty() {
                                s.reported_name = Some(own.name.clone());
                            }
                            s.version = own.version.clone();
                        } else if s.version.is_empty() {
                            s.version = resp.version.clone();
                        }
                    });
                    if reconnect {
                        info!(node = %node.name(), "node reconnected");
                    } else {
                        info!(node = %node.name(), address = %node.address(), "node connected");
                    }
                    let name = node.name();
                    if name != metrics_name {
                        metrics.remove_node(&metrics_name);
                        metrics_name = name;
                    }
                    if reconnect {
                        metrics
                            .node_reconnects
                            .get_or_create(&crate::metrics::NodeLabels {
                                node: metrics_name.clone(),
                            })
                            .inc();
                    }
                    metrics.set_node_state(&metrics_name, Some(state::CONNECTED));
                }
                node.status.send_modify(|s| {
                    s.last_seen = Some(SystemTime::now());
                    s.server_status = Some(resp);
                });
                tokio::select! {
                    _ = tokio::time::sleep(settings.health_interval) => {}
                    _ = node.kick.notified() => debug!(node = %node.name(), "stream failed; checking the node"),
                    _ = stop.changed() => return,
                }
            }
            Ok(Err(status)) => {
                let reason = describe_status(&status);
                mark_unavailable(&node, &metrics, &metrics_name, reason, was_connected);
                let delay = settings.backoff.delay(attempt, &mut rng);
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => return,
                }
            }
            Err(_) if was_connected && late_answers == 0 => {
                late_answers = 1;
                metrics
                    .health_probes_late
                    .get_or_create(&crate::metrics::NodeLabels {
                        node: metrics_name.clone(),
                    })
                    .inc();
                debug!(node = %node.name(), "no answer to a health probe in time; probing again");
            }
            Err(_) => {
                let reason = if late_answers > 0 {
                    format!("no answer within {:?}, twice", settings.request_timeout)
                } else {
                    format!("no answer within {:?}", settings.request_timeout)
                };
                late_answers = 0;
                mark_unavailable(&node, &metrics, &metrics_name, reason, was_connected);
                let delay = settings.backoff.delay(attempt, &mut rng);
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

fn mark_unavailable(
    node: &Node,
    metrics: &Metrics,
    metrics_name: &str,
    reason: String,
    was_connected: bool,
) {
    let changed = node.status.borrow().state
        != ConnState::Unavailable {
            reason: reason.clone(),
        };
    if was_connected {
        warn!(node = %node.name(), reason = %reason, "node unavailable; retrying with backoff");
    } else if changed {
        debug!(node = %node.name(), reason = %reason, "node still unavailable");
    }
    if changed {
        node.status.send_modify(|s| {
            if !matches!(s.state, ConnState::Unavailable { .. }) {
                s.since = SystemTime::now();
            }
            s.state = ConnState::Unavailable { reason };
        });
        metrics.set_node_state(metrics_name, Some(state::UNAVAILABLE));
    }
}

//! Lumen's node exporter: loads the eBPF datapath and attaches it to endpoint interfaces
//! (following them as they come and go), reads flow events from the BPF ring buffer,
//! decodes and enriches them with endpoint metadata, keeps the last flows in a ring, and
//! serves them over the Hubble-compatible Observer gRPC API and Prometheus `/metrics`.
//!
//! Tasks and queues (see docs/architecture.md):
//! `ring_reader` ─(bounded batches, drop-newest + counted)─► `enricher` ─► flow ring ─►
//! Observer clients (broadcast; a slow follower gets LostEvent records).

pub mod capabilities;
pub mod clock;
pub mod config;
pub mod convert;
pub mod datapath;
pub mod decode;
pub mod fswatch;
pub mod inspect;
pub mod interfaces;
pub mod metadata;
pub mod metrics;
pub mod observer;
pub mod pipeline;
pub mod policy;
pub mod store;
pub mod test_run;

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use lumen_datapath_common::{DatapathConfig, AGGREGATION_FLOWS, AGGREGATION_NONE};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::{
    clock::ClockOffset,
    config::{Aggregation, Config},
    datapath::{Datapath, LoadOptions},
    interfaces::InterfacePatterns,
    metadata::{EndpointsWatcher, MetadataHandle},
    metrics::Metrics,
    store::FlowRing,
};

/// Version reported in ServerStatus and GetNodes.
pub const VERSION: &str = concat!("lumen-node-exporter/", env!("CARGO_PKG_VERSION"));

/// What a policy compile depends on besides the policy files: the metadata generation and
/// the local endpoints' (interface, ifindex) pairs.
pub type PolicyInputs = (u64, Vec<(String, u32)>);

/// What the running exporter shares between its tasks and the Observer service.
pub struct NodeState {
    pub config: Config,
    pub ring: Arc<FlowRing>,
    pub metrics: Arc<Metrics>,
    pub metadata: MetadataHandle,
    pub started_ns: i64,
    pub datapath: Arc<Mutex<Datapath>>,
    /// Policy state: files, compiled set, what is programmed in the kernel.
    pub policy: Mutex<policy::PolicyEngine>,
    /// The compiled policy set in force (rule table for attribution).
    pub compiled: Arc<std::sync::RwLock<Arc<lumen_policy::compile::CompiledPolicy>>>,
    /// The policies in force.
    pub policies: Arc<std::sync::RwLock<Arc<Vec<lumen_policy::Policy>>>>,
    /// Metadata generation and local endpoint interfaces the policy was last applied for.
    pub policy_inputs: Mutex<Option<PolicyInputs>>,
    /// Names of interfaces ever attached, by ifindex (flows outlive their interface).
    pub ifnames: std::sync::RwLock<std::collections::HashMap<u32, String>>,
}

impl NodeState {
    pub fn interface_names(&self) -> std::collections::HashMap<u32, String> {
        self.ifnames
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn datapath_config(cfg: &Config) -> DatapathConfig {
    DatapathConfig {
        aggregation: match cfg.aggregation {
            Aggregation::Flows => AGGREGATION_FLOWS,
            Aggregation::Packets => AGGREGATION_NONE,
        },
        initialized: 1,
        report_interval_ns: cfg.report_interval.as_nanos().min(u128::from(u64::MAX)) as u64,
        wakeup_watermark_bytes: cfg.wakeup_watermark_bytes,
        policy_generation: 0,
        drop_report_interval_ms: 1000,
    }
}

/// Run the exporter until `shutdown` resolves, then detach everything.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    capabilities::check()?;
    let mut dp = Datapath::load(LoadOptions {
        ring_bytes: config.ring_buffer_bytes,
        conntrack_entries: config.conntrack_entries,
        conntrack_entries_ipv6: config.conntrack_entries_ipv6,
    })?;
    dp.set_config(datapath_config(&config))?;
    let events = dp.take_ring()?;
    let datapath = Arc::new(Mutex::new(dp));

    let metrics = Metrics::new();
    metrics.ring_size.set(i64::from(config.ring_buffer_bytes));
    metrics
        .flow_ring_capacity
        .set(config.flow_ring_capacity as i64);
    let ring = FlowRing::new(config.flow_ring_capacity, config.follow_queue);
    let metadata = MetadataHandle::default();
    let clock = Arc::new(ClockOffset::new());
    let (stop_tx, stop_rx) = watch::channel(false);

    let engine = policy::PolicyEngine::new(config.policy_dir.clone(), config.policy_mode);
    let compiled = engine.compiled.clone();
    let policies = engine.policies.clone();
    let state = Arc::new(NodeState {
        policy: Mutex::new(engine),
        compiled: compiled.clone(),
        policies,
        config: config.clone(),
        ring: ring.clone(),
        metrics: metrics.clone(),
        metadata: metadata.clone(),
        started_ns: clock::realtime_ns(),
        datapath: datapath.clone(),
        ifnames: Default::default(),
        policy_inputs: Mutex::new(None),
    });

    // Pipeline.
    let (ev_tx, ev_rx) = mpsc::channel(config.event_queue_batches);
    let reader = tokio::spawn(pipeline::run_reader(
        events,
        // Every heartbeat then has a newer watermark to send.
        config.drain_interval.min(config.watermark_heartbeat),
        config.max_event_delay,
        ev_tx,
        metrics.clone(),
        stop_rx.clone(),
    ));
    let enricher = tokio::spawn(pipeline::run_enricher(
        ev_rx,
        metadata.clone(),
        clock.clone(),
        ring.clone(),
        metrics.clone(),
    ));

    // Attachment: interfaces by pattern and local endpoints' interfaces.
    let (kick_tx, mut kick_rx) = mpsc::channel::<()>(16);
    tokio::spawn(interfaces::watch_links(
        kick_tx.clone(),
        Duration::from_millis(500),
    ));
    // The cluster's nodes for the peer service: the `nodes:` of the endpoints file in force.
    let (peers_tx, peers_rx) = watch::channel(Vec::new());
    if let Some(path) = config.endpoints_file.clone() {
        let watcher = EndpointsWatcher {
            path,
            poll: config.endpoints_poll_interval,
            allocator: identity_allocator(&config.identity_labels)?,
        };
        let kick = kick_tx.clone();
        tokio::spawn(watcher.run(
            metadata.clone(),
            metrics.clone(),
            move |snap| {
                let _ = kick.try_send(());
                let nodes = lumen_relay::peer::peer_nodes(snap.index.nodes());
                peers_tx.send_if_modified(|cur| {
                    let changed = *cur != nodes;
                    *cur = nodes;
                    changed
                });
            },
            stop_rx.clone(),
        ));
    }
    let patterns = InterfacePatterns::new(config.interfaces.clone());
    reconcile(&state, &patterns);
    let reconciler = {
        let state = state.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    k = kick_rx.recv() => if k.is_none() { return },
                    _ = stop.changed() => return,
                }
                // Coalesce bursts of notifications.
                tokio::time::sleep(Duration::from_millis(20)).await;
                while kick_rx.try_recv().is_ok() {}
                reconcile(&state, &patterns);
            }
        })
    };

    // Policy directory: reload changed files, recompile, reprogram.
    if let Some(dir) = config.policy_dir.clone() {
        let state = state.clone();
        let mut stop = stop_rx.clone();
        let poll = config.endpoints_poll_interval;
        // A change wakes the reload at once (inotify); the poll is the fallback.
        let mut wake = fswatch::watch_dir(&dir);
        tokio::spawn(async move {
            loop {
                let noticed = std::time::Instant::now();
                let changed = {
                    let Ok(mut engine) = state.policy.lock() else {
                        return;
                    };
                    let metrics = state.metrics.clone();
                    engine.reload_files(&mut |_| {
                        metrics.policy_errors.inc();
                    })
                };
                if changed && apply_policy(&state) {
                    let took = noticed.elapsed();
                    state
                        .metrics
                        .policy_change_seconds
                        .observe(took.as_secs_f64());
                    info!(took_ms = took.as_secs_f64() * 1e3, "policy change enforced");
                }
                tokio::select! {
                    _ = tokio::time::sleep(poll) => {}
                    _ = fswatch::changed(&mut wake) => {}
                    _ = stop.changed() => return,
                }
            }
        });
    }

    // Datapath counters, gauges and the clock offset, once a second.
    {
        let state = state.clone();
        let clock = clock.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => return,
                }
                refresh_gauges(&state);
                clock.refresh();
            }
        });
    }

    // Servers.
    if let Some(addr) = config.metrics_address {
        let m = metrics.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let sd = async move {
                let _ = stop.changed().await;
            };
            if let Err(e) = metrics::serve(addr, m, sd).await {
                warn!(%addr, error = %e, "metrics server failed");
            }
        });
    }
    let tls = match &config.server_tls {
        Some(t) => Some(lumen_relay::tls::server_config(t).context("the Observer API's TLS")?),
        None => None,
    };
    let grpc = {
        let listener = tokio::net::TcpListener::bind(config.listen_address)
            .await
            .with_context(|| format!("binding the Observer API on {}", config.listen_address))?;
        info!(address = %config.listen_address, "Observer API listening");
        let svc = observer::ObserverService::new(state.clone());
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let sd = async move {
                let _ = stop.changed().await;
            };
            if let Err(e) = observer::serve(listener, svc, peers_rx, tls, sd).await {
                warn!(error = %e, "Observer API server failed");
            }
        })
    };

    shutdown.await;
    info!("shutting down: detaching the datapath");
    let _ = stop_tx.send(true);
    if let Ok(mut dp) = datapath.lock() {
        dp.detach_all();
    }
    let grace = config.shutdown_grace;
    let _ = tokio::time::timeout(grace, async {
        let _ = reader.await;
        let _ = enricher.await;
        let _ = reconciler.await;
        let _ = grpc.await;
    })
    .await;
    Ok(())
}

fn refresh_gauges(state: &NodeState) {
    let Ok(dp) = state.datapath.lock() else {
        return;
    };
    match dp.counters() {
        Ok(c) => state.metrics.observe_datapath(c),
        Err(e) => warn!(error = %e, "reading datapath counters failed"),
    }
    state
        .metrics
        .attached_interfaces
        .set(dp.attached_interfaces().len() as i64);
    state.metrics.flow_ring_flows.set(state.ring.len() as i64);
}

/// Make attachments and the endpoints map match the interfaces and metadata now present.
fn reconcile(state: &NodeState, patterns: &InterfacePatterns) {
    let present = interfaces::list_interfaces();
    let snap = state.metadata.current();
    let node = state.config.node_name.as_str();
    let mut wanted: BTreeSet<String> = present
        .keys()
        .filter(|n| patterns.matches(n))
        .cloned()
        .collect();
    if state.config.attach_endpoint_interfaces {
        for ep in snap.index.local_endpoints(node) {
            if let Some(i) = &ep.interface {
                if present.contains_key(i) {
                    wanted.insert(i.clone());
                }
            }
        }
    }
    let Ok(mut dp) = state.datapath.lock() else {
        return;
    };
    for (name, idx) in dp.attached_interfaces() {
        match present.get(&name) {
            None => dp.forget(&name),
            Some(now) if *now != idx => dp.forget(&name),
            Some(_) if !wanted.contains(&name) => dp.detach(&name),
            Some(_) => {}
        }
    }
    for name in &wanted {
        if let Some(idx) = present.get(name) {
            if let Err(e) = dp.attach(name, *idx) {
                warn!(iface = %name, error = %e, "attach failed");
            }
        }
    }
    drop(dp);
    // Recompile only when what the policy depends on changed: the metadata version or
    // which local endpoints have an interface (and its ifindex). Unrelated link events
    // (other interfaces coming and going) cost a rescan, not a policy compile.
    let inputs = (
        snap.generation,
        snap.index
            .local_endpoints(node)
            .filter_map(|ep| {
                let i = ep.interface.as_deref()?;
                Some((i.to_owned(), *present.get(i)?))
            })
            .collect::<Vec<_>>(),
    );
    let changed = {
        let mut last = state
            .policy_inputs
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let changed = last.as_ref() != Some(&inputs);
        *last = Some(inputs);
        changed
    };
    if changed {
        apply_policy(state);
    }
    let Ok(dp) = state.datapath.lock() else {
        return;
    };
    let attached = dp.attached_interfaces();
    state.metrics.attached_interfaces.set(attached.len() as i64);
    let mut names = state.ifnames.write().unwrap_or_else(|p| p.into_inner());
    for (name, idx) in attached {
        names.insert(idx, name);
    }
}

/// The identity allocator for the configured identity-relevant label patterns (Cilium's
/// `--labels` syntax: `[source:]key-prefix`, `!` to exclude; empty = the default set).
pub fn identity_allocator(patterns: &[String]) -> anyhow::Result<lumen_policy::IdentityAllocator> {
    if patterns.is_empty() {
        return Ok(lumen_policy::IdentityAllocator::default());
    }
    lumen_policy::IdentityAllocator::from_patterns(patterns)
        .map_err(|e| anyhow::anyhow!("identity_labels: {e}"))
}

/// Compile the policy set against the current metadata and program the datapath maps
/// (ipcache, policy, endpoints) incrementally.
/// Compiles and programs the policy in force; false when programming failed.
pub fn apply_policy(state: &NodeState) -> bool {
    let present = interfaces::list_interfaces();
    let snap = state.metadata.current();
    let (Ok(mut engine), Ok(mut dp)) = (state.policy.lock(), state.datapath.lock()) else {
        return false;
    };
    let started = std::time::Instant::now();
    let ifindex_of = |name: &str| present.get(name).copied();
    match engine.apply(&mut dp, &snap.index, &state.config.node_name, &ifindex_of) {
        Ok(()) => {
            state
                .metrics
                .policy_generation
                .set(i64::from(engine.generation));
            tracing::debug!(took = ?started.elapsed(), generation = engine.generation, "policy programmed");
            true
        }
        Err(e) => {
            warn!(error = %e, "programming policy maps failed");
            false
        }
    }
}

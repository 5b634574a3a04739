//! Lumen's relay: discovers the cluster's node exporters, keeps one client per node
//! (reconnecting with jittered exponential backoff), fans every GetFlows request out to
//! them and merges the answers in time order, serving the Hubble-compatible Observer API
//! (`lumen observe --server <relay>` works as against a node) plus the Lumen-only batched
//! FlowBatches API.
//!
//! Modules, in the order a flow crosses them:
//!
//! - [`discovery`]: static list, DNS names, `peer.Peer` service ─► [`pool`]
//! - [`pool`]: one client and health task per node; per-node state
//! - [`batches`]: the batched node RPC (client side, and the server adapter node exporters
//!   mount); per-flow GetFlows fallback
//! - [`fanout`]: per client: one task per node ─► [`merge`] ─► [`queue`] ─► response stream
//! - [`observer`]: the relay's gRPC API; [`request`]: request validation
//! - [`wire`]: responses with flows left encoded; [`peer`]: the Peer service (server side)
//! - [`metrics`], [`config`], [`tls`], [`backoff`]
//! - [`synthetic`]: in-memory nodes over real sockets, for tests, benchmarks and demos
//!
//! `--last N` through the relay means the N most recent flows *cluster-wide*: every node
//! is asked for its last N, the relay merges them and keeps the newest N (Hubble's relay
//! returns N per node).

pub mod backoff;
pub mod batches;
pub mod config;
pub mod discovery;
pub mod fanout;
pub mod history_join;
pub mod merge;
pub mod metrics;
pub mod observer;
pub mod peer;
pub mod pool;
pub mod proto;
pub mod queue;
pub mod request;
pub mod sinks;
pub mod synthetic;
pub mod tls;
pub mod wire;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    config::{Config, ConfigError},
    discovery::{Resolver, SystemResolver},
    fanout::FanoutSettings,
    metrics::Metrics,
    observer::{Relay, RelayObserverServer},
    pool::{NodePool, PoolSettings},
    tls::{NodeTls, TlsError},
};

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("binding {what} on {address}: {source}")]
    Bind {
        what: &'static str,
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Discovery(String),
    #[error("gRPC server: {0}")]
    Server(#[from] tonic::transport::Error),
    #[error(transparent)]
    Sink(#[from] sinks::SinkError),
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// A running relay.
pub struct RelayHandle {
    /// Where the Observer API listens (the bound port when the config said 0).
    pub address: SocketAddr,
    pub metrics_address: Option<SocketAddr>,
    pub pool: Arc<NodePool>,
    pub metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    grace: Duration,
    sinks: Option<sinks::Sinks>,
}

impl RelayHandle {
    /// Stops serving (streams end), stops discovery and node clients.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Some(s) = self.sinks {
            s.shutdown(self.grace).await;
        }
        self.pool.shutdown();
        let grace = self.grace;
        let _ = tokio::time::timeout(grace, futures::future::join_all(self.tasks)).await;
    }
}

/// Starts a relay with the system resolver.
pub async fn start(config: Config) -> Result<RelayHandle, StartError> {
    start_with_resolver(config, Arc::new(SystemResolver)).await
}

/// Starts a relay: binds its listeners, starts discovery and node clients, serves.
pub async fn start_with_resolver(
    config: Config,
    resolver: Arc<dyn Resolver>,
) -> Result<RelayHandle, StartError> {
    config.validate()?;
    // The sinks keep every flow from the relay's start: taken before any node is
    // connected, so flows received while the sinks start up (migrations can take a
    // while) are not skipped.
    let sinks_since = wire::now_ns() - 1;
    let node_tls = config.node_tls.as_ref().map(NodeTls::load).transpose()?;
    let server_tls = config
        .server_tls
        .as_ref()
        .map(tls::server_config)
        .transpose()?;
    let metrics = Metrics::new();
    let pool = NodePool::new(
        PoolSettings::from_config(&config, node_tls),
        metrics.clone(),
    );
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();

    discovery::add_static(&pool, &config.nodes).map_err(StartError::Discovery)?;
    for name in &config.dns {
        tasks.push(tokio::spawn(discovery::follow_dns(
            pool.clone(),
            name.clone(),
            config.dns_refresh_interval,
            resolver.clone(),
            stop_rx.clone(),
        )));
    }
    if let Some(peer) = &config.peer_service {
        tasks.push(tokio::spawn(discovery::follow_peers(
            pool.clone(),
            peer.clone(),
            config.backoff(),
            stop_rx.clone(),
        )));
    }

    let relay = Arc::new(Relay {
        pool: pool.clone(),
        settings: Arc::new(FanoutSettings::from_config(&config)),
        metrics: metrics.clone(),
        max_number: config.max_number,
        max_clients: config.max_clients,
        request_timeout: config.request_timeout,
        history: std::sync::OnceLock::new(),
        sinks: std::sync::OnceLock::new(),
        stopping: stop_rx.clone(),
    });

    let listener = tokio::net::TcpListener::bind(config.listen_address)
        .await
        .map_err(|source| StartError::Bind {
            what: "the Observer API",
            address: config.listen_address,
            source,
        })?;
    let address = listener.local_addr().map_err(|source| StartError::Bind {
        what: "the Observer API",
        address: config.listen_address,
        source,
    })?;
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
        .tcp_nodelay(true);
    if let Some(tls) = server_tls {
        builder = builder.tls_config(tls)?;
    }
    let router = builder
        .add_service(RelayObserverServer::new(relay.clone()))
        .add_service(observer::batches_server(relay.clone()));
    let router =
        proto::with_reflection(router, &["observer.Observer", "lumen.relay.v1.FlowBatches"])?;
    // Small messages (a watermark, one flow) go out at once: Nagle would hold them until
    // the client's delayed ACK, tens of ms. (`tcp_nodelay` above does not apply to a
    // listener of our own.)
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    {
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let sd = async move {
                let _ = stop.changed().await;
            };
            if let Err(e) = router.serve_with_incoming_shutdown(incoming, sd).await {
                warn!(error = %e, "Observer API server failed");
            }
        }));
    }
    info!(%address, "relay Observer API listening");

    let mut metrics_address = None;
    if let Some(addr) = config.metrics_address {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind {
                what: "the metrics endpoint",
                address: addr,
                source,
            })?;
        metrics_address = l.local_addr().ok();
        let (m, p) = (metrics.clone(), pool.clone());
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let sd = async move {
                let _ = stop.changed().await;
            };
            if let Err(e) = metrics::serve(l, m, p, sd).await {
                warn!(error = %e, "metrics server failed");
            }
        }));
        info!(address = ?metrics_address, "relay metrics listening");
    }

    let sinks = if config.history.is_some() || config.otlp.is_some() {
        Some(
            sinks::Sinks::start(
                config.history.as_ref(),
                config.otlp.as_ref(),
                &config.name,
                relay.clone(),
                sinks_since,
                &metrics,
                stop_rx.clone(),
            )
            .await?,
        )
    } else {
        None
    };
    if let Some(s) = &sinks {
        let _ = relay.sinks.set(s.report());
        if let Some(view) = s.history_view() {
            let _ = relay.history.set(view);
        }
    }

    Ok(RelayHandle {
        address,
        metrics_address,
        pool,
        metrics,
        stop,
        tasks,
        grace: config.shutdown_grace,
        sinks,
    })
}

/// Runs a relay until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    let handle = start(config).await?;
    shutdown.await;
    info!("shutting down");
    handle.shutdown().await;
    Ok(())
}

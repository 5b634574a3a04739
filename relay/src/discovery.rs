//! Where the relay learns its nodes: a static list, DNS names (every address a name
//! resolves to is a node; re-resolved periodically), and a `peer.Peer` service streaming
//! the cluster's nodes and their changes. Each source hands the pool its full current set.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use futures::future::BoxFuture;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    backoff::{Backoff, Jitter},
    config::{parse_static_node, with_default_port, DEFAULT_NODE_PORT},
    pool::{describe_status, NodePool, NodeSpec},
    proto::peer::{peer_client::PeerClient, ChangeNotificationType, NotifyRequest},
};

/// Source name of the static list.
pub const STATIC: &str = "static";

/// Registers the static nodes.
pub fn add_static(pool: &Arc<NodePool>, nodes: &[String]) -> Result<(), String> {
    let specs = nodes
        .iter()
        .map(|n| parse_static_node(n).map(|s| NodeSpec::new(s.name, s.address)))
        .collect::<Result<Vec<_>, _>>()?;
    pool.update_source(STATIC, specs);
    Ok(())
}

/// Resolves a `host:port` to addresses (the system resolver, or a map in tests).
pub trait Resolver: Send + Sync + 'static {
    fn resolve(&self, host_port: &str) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>>;
}

/// The system resolver (`getaddrinfo`, through tokio).
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve(&self, host_port: &str) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
        let hp = host_port.to_owned();
        Box::pin(async move { Ok(tokio::net::lookup_host(hp).await?.collect()) })
    }
}

/// Keeps the pool's nodes equal to what `name` resolves to, re-resolving every
/// `interval` until `stop`. A failed lookup keeps the previous set.
pub async fn follow_dns(
    pool: Arc<NodePool>,
    name: String,
    interval: Duration,
    resolver: Arc<dyn Resolver>,
    mut stop: watch::Receiver<bool>,
) {
    let host_port = match with_default_port(&name, DEFAULT_NODE_PORT) {
        Ok(hp) => hp,
        Err(e) => {
            warn!(name = %name, error = %e, "invalid DNS node name");
            return;
        }
    };
    let host = crate::tls::host_of(&host_port).to_owned();
    let source = format!("dns:{host_port}");
    let mut last: Option<Vec<SocketAddr>> = None;
    loop {
        match resolver.resolve(&host_port).await {
            Ok(mut addrs) => {
                addrs.sort();
                addrs.dedup();
                if last.as_ref() != Some(&addrs) {
                    info!(name = %host_port, addresses = ?addrs, "DNS nodes");
                    let specs = addrs
                        .iter()
                        .map(|a| NodeSpec {
                            name: None,
                            address: a.to_string(),
                            tls_server_name: Some(host.clone()),
                        })
                        .collect();
                    pool.update_source(&source, specs);
                    last = Some(addrs);
                }
            }
            Err(e) => {
                warn!(name = %host_port, error = %e, "DNS lookup failed; keeping the previous nodes")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
    }
}

/// How long notifications must pause before the collected set is applied (a
/// (re)connected peer service first sends every node, one notification each).
const PEER_SETTLE: Duration = Duration::from_millis(100);

/// Follows a `peer.Peer` service at `address`: nodes added, updated and deleted while
/// running. On a broken stream it reconnects with backoff and full jitter, keeping the
/// last known nodes meanwhile.
pub async fn follow_peers(
    pool: Arc<NodePool>,
    address: String,
    backoff: Backoff,
    mut stop: watch::Receiver<bool>,
) {
    const SOURCE: &str = "peer";
    let address = match with_default_port(&address, DEFAULT_NODE_PORT) {
        Ok(a) => a,
        Err(e) => {
            warn!(address = %address, error = %e, "invalid peer service address");
            return;
        }
    };
    let (channel, _) = match pool.settings().channel(&address, None) {
        Ok(c) => c,
        Err(e) => {
            warn!(address = %address, error = %e, "cannot reach the peer service");
            return;
        }
    };
    let mut rng = Jitter::default();
    let mut attempt = 0u32;
    loop {
        let mut client = PeerClient::new(channel.clone());
        let run = async {
            let mut stream = client.notify(NotifyRequest {}).await?.into_inner();
            info!(address = %address, "following the peer service");
            let mut peers: BTreeMap<String, NodeSpec> = BTreeMap::new();
            let mut dirty = false;
            loop {
                let next = if dirty {
                    match tokio::time::timeout(PEER_SETTLE, stream.message()).await {
                        Ok(m) => m?,
                        Err(_) => {
                            pool.update_source(SOURCE, peers.values().cloned().collect());
                            dirty = false;
                            attempt = 0;
                            continue;
                        }
                    }
                } else {
                    stream.message().await?
                };
                let Some(n) = next else {
                    return Err(tonic::Status::unavailable(
                        "the peer service ended the stream",
                    ));
                };
                let kind = ChangeNotificationType::try_from(n.r#type)
                    .unwrap_or(ChangeNotificationType::Unknown);
                debug!(name = %n.name, address = %n.address, ?kind, "peer change");
                match kind {
                    ChangeNotificationType::PeerAdded | ChangeNotificationType::PeerUpdated => {
                        let Ok(addr) = with_default_port(&n.address, DEFAULT_NODE_PORT) else {
                            warn!(name = %n.name, address = %n.address, "peer with an invalid address ignored");
                            continue;
                        };
                        peers.insert(
                            n.name.clone(),
                            NodeSpec {
                                name: Some(n.name.clone()).filter(|s| !s.is_empty()),
                                address: addr,
                                tls_server_name: n
                                    .tls
                                    .map(|t| t.server_name)
                                    .filter(|s| !s.is_empty()),
                            },
                        );
                    }
                    ChangeNotificationType::PeerDeleted => {
                        peers.remove(&n.name);
                    }
                    ChangeNotificationType::Unknown => continue,
                }
                dirty = true;
            }
        };
        let result: Result<(), tonic::Status> = tokio::select! {
            r = run => r,
            _ = stop.changed() => return,
        };
        if let Err(e) = result {
            warn!(address = %address, error = %describe_status(&e), "peer service unavailable; retrying with backoff");
        }
        let delay = backoff.delay(attempt, &mut rng);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return,
        }
    }
}

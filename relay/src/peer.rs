//! The `peer.Peer` service (Hubble's shape): announces the cluster's nodes from a node
//! list, every node as PEER_ADDED on connect, then each change. Node exporters serve it
//! from the `nodes:` list of their endpoint metadata file ([`peer_nodes`], updated with
//! every accepted reload of the file); relays follow it with
//! [`crate::discovery::follow_peers`].

use std::{collections::BTreeMap, pin::Pin};

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status};

use crate::proto::peer::{
    peer_server::{Peer, PeerServer},
    ChangeNotification, ChangeNotificationType, NotifyRequest, Tls,
};

/// A node as the peer service announces it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PeerNode {
    pub name: String,
    /// `host:port` of its Observer API.
    pub address: String,
    /// Name on its TLS certificate, when it serves TLS.
    pub tls_server_name: Option<String>,
}

/// Serves the nodes of a watch channel (whoever owns the sender keeps it current).
pub struct PeerService {
    nodes: watch::Receiver<Vec<PeerNode>>,
    /// The sender of a fixed list, kept so the channel stays open.
    _fixed: Option<watch::Sender<Vec<PeerNode>>>,
}

impl PeerService {
    pub fn new(nodes: watch::Receiver<Vec<PeerNode>>) -> Self {
        Self {
            nodes,
            _fixed: None,
        }
    }

    /// A fixed list.
    pub fn fixed(nodes: Vec<PeerNode>) -> Self {
        let (tx, rx) = watch::channel(nodes);
        Self {
            nodes: rx,
            _fixed: Some(tx),
        }
    }

    pub fn into_server(self) -> PeerServer<Self> {
        PeerServer::new(self)
    }
}

fn notification(n: &PeerNode, kind: ChangeNotificationType) -> ChangeNotification {
    ChangeNotification {
        name: n.name.clone(),
        address: n.address.clone(),
        r#type: kind as i32,
        tls: n.tls_server_name.as_ref().map(|s| Tls {
            server_name: s.clone(),
        }),
    }
}

/// The notifications that turn `old` into `new` (by node name).
pub fn diff(old: &[PeerNode], new: &[PeerNode]) -> Vec<ChangeNotification> {
    let old: BTreeMap<&str, &PeerNode> = old.iter().map(|n| (n.name.as_str(), n)).collect();
    let new_map: BTreeMap<&str, &PeerNode> = new.iter().map(|n| (n.name.as_str(), n)).collect();
    let mut out = Vec::new();
    for (name, n) in &old {
        if !new_map.contains_key(name) {
            out.push(notification(n, ChangeNotificationType::PeerDeleted));
        }
    }
    for (name, n) in &new_map {
        match old.get(name) {
            None => out.push(notification(n, ChangeNotificationType::PeerAdded)),
            Some(o) if o != n => out.push(notification(n, ChangeNotificationType::PeerUpdated)),
            Some(_) => {}
        }
    }
    out
}

type NotifyStream = Pin<Box<dyn Stream<Item = Result<ChangeNotification, Status>> + Send>>;

#[tonic::async_trait]
impl Peer for PeerService {
    type NotifyStream = NotifyStream;

    async fn notify(
        &self,
        _request: Request<NotifyRequest>,
    ) -> Result<Response<NotifyStream>, Status> {
        let mut rx = self.nodes.clone();
        let (tx, out) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut current: Vec<PeerNode> = rx.borrow_and_update().clone();
            for n in diff(&[], &current) {
                if tx.send(Ok(n)).await.is_err() {
                    return;
                }
            }
            loop {
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                }
                let next = rx.borrow_and_update().clone();
                for n in diff(&current, &next) {
                    if tx.send(Ok(n)).await.is_err() {
                        return;
                    }
                }
                current = next;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }
}

/// The peers of the `nodes:` of an endpoint metadata file, sorted.
pub fn peer_nodes(nodes: &[lumen_policy::NodeSpec]) -> Vec<PeerNode> {
    let mut out: Vec<PeerNode> = nodes
        .iter()
        .map(|n| PeerNode {
            name: n.name.clone(),
            address: n.address.clone(),
            tls_server_name: n.tls_server_name.clone(),
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, addr: &str) -> PeerNode {
        PeerNode {
            name: name.into(),
            address: addr.into(),
            tls_server_name: None,
        }
    }

    #[test]
    fn diff_reports_joins_leaves_and_moves() {
        let old = vec![node("a", "1:1"), node("b", "2:2")];
        let new = vec![node("b", "2:3"), node("c", "3:3")];
        let d: Vec<(String, i32)> = diff(&old, &new)
            .into_iter()
            .map(|n| (n.name, n.r#type))
            .collect();
        assert_eq!(
            d,
            vec![
                ("a".to_string(), ChangeNotificationType::PeerDeleted as i32),
                ("b".to_string(), ChangeNotificationType::PeerUpdated as i32),
                ("c".to_string(), ChangeNotificationType::PeerAdded as i32),
            ]
        );
    }
}

//! Component tests of node discovery (peer service, DNS), TLS and mutual TLS, following
//! `--last N`, and a relay fanning in another relay over the batched RPC.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod pki;

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::*;
use futures::future::BoxFuture;
use lumen_proto::{
    observer::{
        observer_client::ObserverClient, GetFlowsRequest, GetNodesRequest, ServerStatusRequest,
    },
    relay::NodeState,
};
use lumen_relay::{
    config::{NodeTlsConfig, ServerTlsConfig},
    discovery::Resolver,
    peer::PeerNode,
    synthetic::ServeOptions,
    wire::now_ns,
};
use pki::Pki;
use tonic::transport::Channel;

fn batched() -> ServeOptions {
    ServeOptions {
        batches: true,
        ..Default::default()
    }
}

async fn node_names(c: &mut ObserverClient<Channel>) -> Vec<(String, i32)> {
    let mut v: Vec<(String, i32)> = c
        .get_nodes(GetNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes
        .into_iter()
        .map(|n| (n.name, n.state))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_announced_by_a_peer_service_join_and_leave_while_running() {
    let b = TestNode::start("node-b", batched());
    let c = TestNode::start("node-c", batched());
    let peer = |n: &TestNode| PeerNode {
        name: n.node.name().to_owned(),
        address: n.address.to_string(),
        tls_server_name: None,
    };
    // node-a serves the Peer service, as node exporters do, announcing a and b.
    let (peers_tx, peers_rx) = tokio::sync::watch::channel(Vec::new());
    let a = TestNode::start(
        "node-a",
        ServeOptions {
            batches: true,
            peers: Some(peers_rx),
            ..Default::default()
        },
    );
    peers_tx.send_replace(vec![peer(&a), peer(&b)]);
    for n in [&a, &b, &c] {
        n.push_times([now_ns()]);
    }
    let mut config = relay_config(&[]);
    config.peer_service = Some(a.address.to_string());
    let relay = start_relay(config).await;
    wait_connected(&relay, 2).await;
    let mut client_ = client(relay.address).await;
    assert_eq!(
        node_names(&mut client_).await,
        vec![
            ("node-a".to_string(), NodeState::NodeConnected as i32),
            ("node-b".to_string(), NodeState::NodeConnected as i32)
        ]
    );
    let mut s = client_
        .get_flows(GetFlowsRequest {
            follow: true,
            number: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    assert!(
        read_until(&mut s, &mut got, Duration::from_secs(5), |r| count_flows(r)
            >= 2)
        .await
    );

    // node-c joins: the following client gets it without asking again.
    peers_tx.send_replace(vec![peer(&a), peer(&b), peer(&c)]);
    assert!(
        read_until(&mut s, &mut got, Duration::from_secs(10), |r| statuses_of(
            r
        )
        .iter()
        .any(
            |e| e.state_change == NodeState::NodeConnected as i32 && e.node_names == vec!["node-c"]
        ))
        .await
    );
    c.push_times([now_ns()]);
    assert!(
        read_until(&mut s, &mut got, Duration::from_secs(10), |r| flows_of(r)
            .iter()
            .any(|f| f.node_name == "node-c"))
        .await
    );
    // node-b leaves.
    peers_tx.send_replace(vec![peer(&a), peer(&c)]);
    assert!(
        read_until(&mut s, &mut got, Duration::from_secs(10), |r| statuses_of(
            r
        )
        .iter()
        .any(
            |e| e.state_change == NodeState::NodeGone as i32 && e.node_names == vec!["node-b"]
        ))
        .await
    );
    wait_for("node-b forgotten", Duration::from_secs(5), || {
        let mut cl = client_.clone();
        async move { node_names(&mut cl).await.iter().all(|(n, _)| n != "node-b") }
    })
    .await;
    relay.shutdown().await;
}

/// A resolver whose answer the test changes.
struct FakeDns(Arc<Mutex<Vec<SocketAddr>>>);

impl Resolver for FakeDns {
    fn resolve(&self, host_port: &str) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
        let answer = if host_port == "nodes.lumen.test:4244" {
            Ok(self.0.lock().unwrap().clone())
        } else {
            Err(std::io::Error::other(format!("no such name {host_port}")))
        };
        Box::pin(async move { answer })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_name_resolving_to_many_addresses_is_many_nodes() {
    let nodes: Vec<TestNode> = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|n| TestNode::start(n, batched()))
        .collect();
    let answer = Arc::new(Mutex::new(vec![nodes[0].address, nodes[1].address]));
    let mut config = relay_config(&[]);
    config.dns = vec!["nodes.lumen.test".to_owned()];
    config.dns_refresh_interval = Duration::from_millis(100);
    let relay = lumen_relay::start_with_resolver(config, Arc::new(FakeDns(answer.clone())))
        .await
        .unwrap();
    wait_connected(&relay, 2).await;
    let mut c = client(relay.address).await;
    // Names come from the nodes themselves (GetNodes).
    let names: Vec<String> = node_names(&mut c)
        .await
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, vec!["node-a", "node-b"]);
    *answer.lock().unwrap() = vec![nodes[1].address, nodes[2].address];
    wait_for("DNS change followed", Duration::from_secs(10), || {
        let mut cl = c.clone();
        async move {
            let n = node_names(&mut cl).await;
            n == vec![
                ("node-b".to_string(), NodeState::NodeConnected as i32),
                ("node-c".to_string(), NodeState::NodeConnected as i32),
            ]
        }
    })
    .await;
    relay.shutdown().await;

    // The system resolver: `localhost` is one address here.
    let mut config = relay_config(&[]);
    config.dns = vec![format!("localhost:{}", nodes[0].address.port())];
    let relay = lumen_relay::start(config).await.unwrap();
    wait_connected(&relay, 1).await;
    relay.shutdown().await;
}

fn exists(p: &Path) -> bool {
    p.exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_between_clients_relay_and_nodes() {
    let pki = Pki::new(&["node.lumen.test", "relay.lumen.test", "relay-client", "cli"]);
    let nodes: Vec<TestNode> = ["node-a", "node-b"]
        .iter()
        .map(|n| {
            let t = TestNode::start(
                n,
                ServeOptions {
                    batches: true,
                    tls: Some(pki.mtls_server("node.lumen.test")),
                    ..Default::default()
                },
            );
            t.push_times([now_ns()]);
            t
        })
        .collect();
    let specs: Vec<String> = nodes.iter().map(TestNode::spec).collect();
    let mut config = relay_config(&specs);
    config.node_tls = Some(NodeTlsConfig {
        ca_file: Some(pki.path("ca.pem")),
        cert_file: Some(pki.path("relay-client.pem")),
        key_file: Some(pki.path("relay-client-key.pem")),
        server_name: Some("node.lumen.test".to_owned()),
    });
    config.server_tls = Some(ServerTlsConfig {
        cert_file: pki.path("relay.lumen.test.pem"),
        key_file: pki.path("relay.lumen.test-key.pem"),
        client_ca_file: Some(pki.path("ca.pem")),
    });
    // Sinks follow the relay in process, so server TLS does not keep them out (the
    // collector is unreachable here; what counts is that the sink gets the flows).
    config.otlp = Some(
        serde_yaml::from_str("endpoint: http://127.0.0.1:9\nlogs:\n  enabled: true\n")
            .expect("otlp config"),
    );
    assert!(exists(&pki.path("ca.pem")));
    let relay = start_relay(config).await;
    wait_connected(&relay, 2).await;

    let mut c = pki
        .client(&relay.address.to_string(), "relay.lumen.test", Some("cli"))
        .await
        .expect("mTLS client connects");
    let flows = flows_of(&get_all(&mut c, GetFlowsRequest::default()).await);
    assert_eq!(flows.len(), 2);
    let nodes_resp = c.get_nodes(GetNodesRequest {}).await.unwrap().into_inner();
    assert!(nodes_resp.nodes.iter().all(|n| n
        .tls
        .as_ref()
        .is_some_and(|t| t.enabled && t.server_name == "node.lumen.test")));

    // Without a client certificate the relay refuses the client.
    let refused = match pki
        .client(&relay.address.to_string(), "relay.lumen.test", None)
        .await
    {
        Err(_) => true,
        Ok(mut c) => c.get_nodes(GetNodesRequest {}).await.is_err(),
    };
    assert!(refused, "a client without a certificate must be refused");

    for n in &nodes {
        n.push_times([now_ns()]);
    }
    let mut sink_flows = 0;
    for _ in 0..100 {
        let status = c
            .server_status(ServerStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        let otlp = status
            .sinks
            .iter()
            .find(|s| s.name == "otlp")
            .expect("otlp sink");
        sink_flows = otlp.flows;
        if sink_flows == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        sink_flows, 2,
        "the OTLP sink of a TLS relay got the new flows"
    );
    relay.shutdown().await;

    // A relay without a client certificate cannot use the nodes, and says why.
    let mut config = relay_config(&specs);
    config.node_tls = Some(NodeTlsConfig {
        ca_file: Some(pki.path("ca.pem")),
        server_name: Some("node.lumen.test".to_owned()),
        ..Default::default()
    });
    let relay = start_relay(config).await;
    wait_for("nodes refused", Duration::from_secs(10), || {
        let bad = relay.pool.nodes().iter().all(|n| {
            matches!(
                n.status().state,
                lumen_relay::pool::ConnState::Unavailable { .. }
            )
        });
        async move { bad }
    })
    .await;
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_last_n_sends_the_cluster_s_newest_then_live_flows() {
    let nodes: Vec<TestNode> = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|n| TestNode::start(n, batched()))
        .collect();
    let base = now_ns() - 10_000_000_000;
    for (k, n) in nodes.iter().enumerate() {
        n.push_times((0..200).map(|i| base + (3 * i + k as i64) * 1_000_000));
    }
    let specs: Vec<String> = nodes.iter().map(TestNode::spec).collect();
    let relay = start_relay(relay_config(&specs)).await;
    wait_connected(&relay, 3).await;
    let mut c = client(relay.address).await;
    let mut s = c
        .get_flows(GetFlowsRequest {
            number: 20,
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    assert!(
        read_until(&mut s, &mut got, Duration::from_secs(10), |r| count_flows(
            r
        ) >= 20)
        .await
    );
    let history = flows_of(&got);
    assert_eq!(history.len(), 20, "exactly the 20 newest, cluster-wide");
    let newest: Vec<i64> = (580..600).map(|j| base + j * 1_000_000).collect();
    assert_eq!(history.iter().map(time_of).collect::<Vec<_>>(), newest);
    let now = now_ns();
    nodes[1].push_times([now, now + 1]);
    assert!(
        read_until(&mut s, &mut got, Duration::from_secs(10), |r| count_flows(
            r
        ) >= 22)
        .await
    );
    assert_eq!(
        flows_of(&got)[20..].iter().map(time_of).collect::<Vec<_>>(),
        vec![now, now + 1]
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_fans_in_another_relay_over_the_batched_rpc() {
    let nodes: Vec<TestNode> = ["node-a", "node-b"]
        .iter()
        .map(|n| TestNode::start(n, batched()))
        .collect();
    let base = now_ns() - 1_000_000_000;
    for (k, n) in nodes.iter().enumerate() {
        n.push_times((0..300).map(|i| base + (2 * i + k as i64) * 1000));
    }
    let specs: Vec<String> = nodes.iter().map(TestNode::spec).collect();
    let inner = start_relay(relay_config(&specs)).await;
    wait_connected(&inner, 2).await;
    let outer = start_relay(relay_config(&[format!("shard-1={}", inner.address)])).await;
    wait_connected(&outer, 1).await;
    let mut c = client(outer.address).await;
    let flows = flows_of(&get_all(&mut c, GetFlowsRequest::default()).await);
    assert_eq!(flows.len(), 600);
    assert!(is_sorted(&flows));
    // Each flow keeps the name of the node that saw it.
    assert_eq!(
        flows.iter().filter(|f| f.node_name == "node-a").count(),
        300
    );
    assert_eq!(
        outer.pool.nodes()[0].batch_support(),
        lumen_relay::pool::batch_support::YES,
        "relays serve FlowBatches"
    );
    outer.shutdown().await;
    inner.shutdown().await;
}

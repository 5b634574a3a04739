//! Shared harness of the relay's component tests: synthetic nodes on real sockets, an
//! in-process relay, and Observer clients.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    future::Future,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use lumen_proto::{
    flow::Flow,
    observer::{
        get_flows_response::ResponseTypes, observer_client::ObserverClient, GetFlowsRequest,
        GetFlowsResponse,
    },
    relay::NodeStatusEvent,
};
use lumen_relay::{
    config::Config,
    synthetic::{flow, NodeServer, ServeOptions, SyntheticNode},
    wire::timestamp_ns,
    RelayHandle,
};
use tonic::transport::Channel;

pub fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A relay config for tests: ephemeral ports, fast health checks and retries.
pub fn relay_config(nodes: &[String]) -> Config {
    Config {
        listen_address: any_port(),
        metrics_address: Some(any_port()),
        nodes: nodes.to_vec(),
        sort_window: Duration::from_millis(100),
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        health_interval: Duration::from_millis(200),
        request_timeout: Duration::from_secs(2),
        dial_timeout: Duration::from_secs(1),
        shutdown_grace: Duration::from_secs(2),
        ..Config::default()
    }
}

pub struct TestNode {
    pub node: Arc<SyntheticNode>,
    pub server: Option<NodeServer>,
    pub address: SocketAddr,
    pub opts: ServeOptions,
}

impl TestNode {
    pub fn start(name: &str, opts: ServeOptions) -> TestNode {
        // A deep follow queue: these tests are about the relay's losses, not the node's.
        let node = SyntheticNode::new(name, 1 << 16);
        let server = NodeServer::start(node.clone(), any_port(), opts.clone()).expect("start node");
        TestNode {
            address: server.address,
            node,
            server: Some(server),
            opts,
        }
    }

    /// `name=127.0.0.1:port`
    pub fn spec(&self) -> String {
        format!("{}={}", self.node.name(), self.address)
    }

    pub fn kill(&mut self) {
        if let Some(s) = self.server.take() {
            s.kill();
        }
    }

    /// Serves again on the same port (a restarted node keeps its flows here).
    pub fn restart(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match NodeServer::start(self.node.clone(), self.address, self.opts.clone()) {
                Ok(s) => {
                    self.server = Some(s);
                    return;
                }
                Err(e) if Instant::now() < deadline => {
                    eprintln!("rebinding {}: {e}", self.address);
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("cannot rebind {}: {e}", self.address),
            }
        }
    }

    /// Pushes `n` flows at times `start + i * step` (ns).
    pub fn push_times(&self, times: impl IntoIterator<Item = i64>) {
        let name = self.node.name().to_owned();
        let base = self.node.len() as u64;
        self.node.push(
            times
                .into_iter()
                .enumerate()
                .map(|(i, t)| flow(&name, t, base + i as u64)),
        );
    }
}

pub async fn start_relay(config: Config) -> RelayHandle {
    lumen_relay::start(config).await.expect("relay starts")
}

pub async fn client(addr: SocketAddr) -> ObserverClient<Channel> {
    let ch = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to relay");
    ObserverClient::new(ch).max_decoding_message_size(64 << 20)
}

/// Waits until the relay sees `n` connected nodes.
pub async fn wait_connected(relay: &RelayHandle, n: usize) {
    wait_for("nodes connected", Duration::from_secs(10), || {
        let c = relay
            .pool
            .nodes()
            .iter()
            .filter(|n| n.status().state == lumen_relay::pool::ConnState::Connected)
            .count();
        async move { c == n }
    })
    .await;
}

pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every response of a non-following request.
pub async fn get_all(
    c: &mut ObserverClient<Channel>,
    req: GetFlowsRequest,
) -> Vec<GetFlowsResponse> {
    let mut s = c
        .get_flows(req)
        .await
        .expect("GetFlows accepted")
        .into_inner();
    let mut out = Vec::new();
    let read = async {
        while let Some(r) = s.message().await.expect("stream ok") {
            out.push(r);
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("stream ends");
    out
}

pub fn flows_of(responses: &[GetFlowsResponse]) -> Vec<Flow> {
    responses
        .iter()
        .filter_map(|r| match &r.response_types {
            Some(ResponseTypes::Flow(f)) => Some(f.clone()),
            _ => None,
        })
        .collect()
}

/// Flows among `responses` (without copying them: predicates run per message).
pub fn count_flows(responses: &[GetFlowsResponse]) -> usize {
    responses
        .iter()
        .filter(|r| matches!(r.response_types, Some(ResponseTypes::Flow(_))))
        .count()
}

pub fn statuses_of(responses: &[GetFlowsResponse]) -> Vec<NodeStatusEvent> {
    responses
        .iter()
        .filter_map(|r| match &r.response_types {
            Some(ResponseTypes::NodeStatus(s)) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

pub fn lost_of(responses: &[GetFlowsResponse]) -> u64 {
    responses
        .iter()
        .filter_map(|r| match &r.response_types {
            Some(ResponseTypes::LostEvents(l)) => Some(l.num_events_lost),
            _ => None,
        })
        .sum()
}

pub fn time_of(f: &Flow) -> i64 {
    f.time.as_ref().map(timestamp_ns).unwrap_or_default()
}

pub fn is_sorted(flows: &[Flow]) -> bool {
    flows.windows(2).all(|w| time_of(&w[0]) <= time_of(&w[1]))
}

/// Reads a following stream into `sink` until `done` says so or `limit` passes.
pub async fn read_until(
    s: &mut tonic::codec::Streaming<GetFlowsResponse>,
    sink: &mut Vec<GetFlowsResponse>,
    limit: Duration,
    mut done: impl FnMut(&[GetFlowsResponse]) -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while !done(sink) {
        match tokio::time::timeout_at(deadline, s.message()).await {
            Ok(Ok(Some(r))) => sink.push(r),
            Ok(Ok(None)) => return done(sink),
            Ok(Err(e)) => panic!("stream failed: {e}"),
            Err(_) => return false,
        }
    }
    true
}

pub async fn metrics_text(relay: &RelayHandle) -> String {
    let addr = relay.metrics_address.expect("metrics enabled");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

/// The value of the first sample line starting with `prefix`.
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

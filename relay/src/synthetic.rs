//! A synthetic node: an in-memory flow ring served over the Observer API with the node
//! exporter's GetFlows semantics (last/first N, since/until, filters, field mask, follow
//! with lost-events records for lagging followers), and optionally FlowBatches. For the
//! relay's component tests, benchmarks and demos: real gRPC servers on real sockets, with
//! flows made up instead of captured.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, RwLock,
    },
};

use lumen_proto::{
    field_mask::FlowFieldMask,
    filter::FlowFilters,
    flow::{
        layer4::Protocol, Endpoint, Flow, FlowType, Ip, IpVersion, Layer4, LostEvent,
        LostEventSource, Tcp, TrafficDirection, Verdict, Workload,
    },
    observer::{
        get_flows_response::ResponseTypes,
        observer_server::{Observer, ObserverServer},
        GetAgentEventsRequest, GetAgentEventsResponse, GetDebugEventsRequest,
        GetDebugEventsResponse, GetFlowsRequest, GetFlowsResponse, GetNamespacesRequest,
        GetNamespacesResponse, GetNodesRequest, GetNodesResponse, Namespace, Node,
        ServerStatusRequest, ServerStatusResponse,
    },
    relay::NodeState,
};
use tokio::sync::{broadcast, mpsc};
use tonic::{Request, Response, Status};

use crate::wire::{now_ns, ns_timestamp, timestamp_ns};

/// The ring capacity a synthetic node reports (ServerStatus, GetNodes `max_flows`).
pub const RING_CAPACITY: u64 = 1_000_000;

/// A node's flows, in time order of arrival.
pub struct SyntheticNode {
    name: String,
    flows: RwLock<Vec<Flow>>,
    tx: broadcast::Sender<(usize, Flow)>,
    started_ns: i64,
    /// GetFlows streams being answered.
    active: Arc<AtomicUsize>,
}

impl SyntheticNode {
    /// `follow_queue`: flows a follower may lag before it is told it lost some.
    pub fn new(name: &str, follow_queue: usize) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_owned(),
            flows: RwLock::new(Vec::new()),
            tx: broadcast::channel(follow_queue.max(16)).0,
            started_ns: now_ns(),
            active: Arc::new(AtomicUsize::new(0)),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Appends flows (their `node_name` is set to this node's).
    pub fn push(&self, flows: impl IntoIterator<Item = Flow>) {
        let mut g = self.flows.write().unwrap_or_else(|p| p.into_inner());
        for mut f in flows {
            f.node_name = self.name.clone();
            let seq = g.len();
            g.push(f.clone());
            let _ = self.tx.send((seq, f));
        }
    }

    pub fn len(&self) -> usize {
        self.flows.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every flow held.
    pub fn flows(&self) -> Vec<Flow> {
        self.flows.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// GetFlows streams currently being answered.
    pub fn active_streams(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }
}

/// A plausible flow of `node` at `time_ns`: pod `i % 7` talking TCP to pod `i % 5`.
pub fn flow(node: &str, time_ns: i64, i: u64) -> Flow {
    let pod = |side: &str, n: u64| Endpoint {
        id: 1000 + n as u32,
        identity: 40_000 + n as u32,
        namespace: "default".to_owned(),
        labels: vec![
            format!("k8s:app={side}-{n}"),
            "k8s:io.kubernetes.pod.namespace=default".to_owned(),
        ],
        pod_name: format!("{side}-{n}-7d9f8b6c5d-x2x4z"),
        workloads: vec![Workload {
            name: format!("{side}-{n}"),
            kind: "Deployment".to_owned(),
        }],
    };
    Flow {
        time: Some(ns_timestamp(time_ns)),
        verdict: if i.is_multiple_of(10) {
            Verdict::Dropped
        } else {
            Verdict::Forwarded
        } as i32,
        ip: Some(Ip {
            source: format!("10.200.{}.{}", i % 7, 2 + i % 200),
            destination: format!("10.200.{}.{}", i % 5, 2 + (i * 7) % 200),
            ip_version: IpVersion::IPv4 as i32,
            encrypted: false,
        }),
        l4: Some(Layer4 {
            protocol: Some(Protocol::Tcp(Tcp {
                source_port: 30_000 + (i % 30_000) as u32,
                destination_port: 8080,
                flags: None,
            })),
        }),
        source: Some(pod("client", i % 7)),
        destination: Some(pod("server", i % 5)),
        r#type: FlowType::L3L4 as i32,
        node_name: node.to_owned(),
        traffic_direction: TrafficDirection::Egress as i32,
        uuid: format!("{node}-{i}"),
        flow_id: i,
        ..Default::default()
    }
}

struct Query {
    number: u64,
    first: bool,
    follow: bool,
    since: Option<i64>,
    until: Option<i64>,
    filters: FlowFilters,
    mask: Option<FlowFieldMask>,
}

impl Query {
    fn parse(r: &GetFlowsRequest) -> Result<Self, Status> {
        // `number` needs no cap: the answer comes from a bounded ring, as on a node.
        let since = r.since.as_ref().map(timestamp_ns);
        let until = r.until.as_ref().map(timestamp_ns);
        if let (Some(s), Some(u)) = (since, until) {
            if s > u {
                return Err(Status::invalid_argument("since is after until"));
            }
        }
        Ok(Self {
            number: r.number,
            first: r.first,
            follow: r.follow,
            since,
            until,
            filters: FlowFilters::from_request(r)
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
            mask: FlowFieldMask::from_request(r)
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
        })
    }

    fn time(f: &Flow) -> i64 {
        f.time.as_ref().map_or(0, timestamp_ns)
    }

    fn in_time(&self, f: &Flow) -> bool {
        let t = Self::time(f);
        self.since.is_none_or(|s| t >= s) && self.until.is_none_or(|u| t <= u)
    }

    fn answer(&self, f: &Flow) -> Option<GetFlowsResponse> {
        if !self.in_time(f) || !self.filters.matches(f) {
            return None;
        }
        let time = f.time;
        let flow = match &self.mask {
            Some(m) => m.apply(f),
            None => f.clone(),
        };
        Some(GetFlowsResponse {
            node_name: f.node_name.clone(),
            time,
            response_types: Some(ResponseTypes::Flow(flow)),
        })
    }
}

struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The Observer API over a [`SyntheticNode`].
pub struct SyntheticObserver(pub Arc<SyntheticNode>);

type RespStream = tokio_stream::wrappers::ReceiverStream<Result<GetFlowsResponse, Status>>;
type Unsupported<T> = futures::stream::Empty<Result<T, Status>>;

#[tonic::async_trait]
impl Observer for SyntheticObserver {
    type GetFlowsStream = RespStream;
    type GetAgentEventsStream = Unsupported<GetAgentEventsResponse>;
    type GetDebugEventsStream = Unsupported<GetDebugEventsResponse>;

    async fn get_flows(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<RespStream>, Status> {
        let q = Query::parse(request.get_ref())?;
        let node = self.0.clone();
        let (tx, rx) = mpsc::channel(1024);
        node.active.fetch_add(1, Ordering::AcqRel);
        let guard = ActiveGuard(node.active.clone());
        tokio::spawn(async move {
            let _guard = guard;
            let mut live = q.follow.then(|| node.tx.subscribe());
            let snapshot: Vec<Flow> = node.flows.read().unwrap_or_else(|p| p.into_inner()).clone();
            let history = q.number > 0 || q.since.is_some() || !q.follow;
            if history {
                let limit = if q.number == 0 { u64::MAX } else { q.number };
                let picked: Vec<GetFlowsResponse> = if q.first {
                    snapshot
                        .iter()
                        .filter_map(|f| q.answer(f))
                        .take(limit as usize)
                        .collect()
                } else {
                    let mut v: Vec<_> = snapshot
                        .iter()
                        .rev()
                        .filter_map(|f| q.answer(f))
                        .take(limit as usize)
                        .collect();
                    v.reverse();
                    v
                };
                for r in picked {
                    if tx.send(Ok(r)).await.is_err() {
                        return;
                    }
                }
            }
            let Some(rx) = live.as_mut() else { return };
            let held = snapshot.len();
            loop {
                tokio::select! {
                    r = rx.recv() => match r {
                        Ok((seq, f)) => {
                            if seq < held {
                                continue;
                            }
                            if q.until.is_some_and(|u| Query::time(&f) > u) {
                                return;
                            }
                            if let Some(resp) = q.answer(&f) {
                                if tx.send(Ok(resp)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            let resp = GetFlowsResponse {
                                node_name: node.name.clone(),
                                time: Some(ns_timestamp(now_ns())),
                                response_types: Some(ResponseTypes::LostEvents(LostEvent {
                                    source: LostEventSource::HubbleRingBuffer as i32,
                                    num_events_lost: n,
                                    cpu: None,
                                })),
                            };
                            if tx.send(Ok(resp)).await.is_err() {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn get_agent_events(
        &self,
        _r: Request<GetAgentEventsRequest>,
    ) -> Result<Response<Self::GetAgentEventsStream>, Status> {
        Err(Status::unimplemented("no agent events"))
    }

    async fn get_debug_events(
        &self,
        _r: Request<GetDebugEventsRequest>,
    ) -> Result<Response<Self::GetDebugEventsStream>, Status> {
        Err(Status::unimplemented("no debug events"))
    }

    async fn get_nodes(
        &self,
        _r: Request<GetNodesRequest>,
    ) -> Result<Response<GetNodesResponse>, Status> {
        let n = self.0.len() as u64;
        Ok(Response::new(GetNodesResponse {
            nodes: vec![Node {
                name: self.0.name.clone(),
                version: "synthetic".to_owned(),
                state: NodeState::NodeConnected as i32,
                num_flows: n,
                seen_flows: n,
                max_flows: RING_CAPACITY,
                uptime_ns: (now_ns() - self.0.started_ns).max(0) as u64,
                ..Default::default()
            }],
        }))
    }

    async fn get_namespaces(
        &self,
        _r: Request<GetNamespacesRequest>,
    ) -> Result<Response<GetNamespacesResponse>, Status> {
        Ok(Response::new(GetNamespacesResponse {
            namespaces: vec![Namespace {
                cluster: String::new(),
                namespace: "default".to_owned(),
            }],
        }))
    }

    async fn server_status(
        &self,
        _r: Request<ServerStatusRequest>,
    ) -> Result<Response<ServerStatusResponse>, Status> {
        let n = self.0.len() as u64;
        Ok(Response::new(ServerStatusResponse {
            num_flows: n,
            max_flows: RING_CAPACITY,
            seen_flows: n,
            uptime_ns: (now_ns() - self.0.started_ns).max(0) as u64,
            version: "synthetic".to_owned(),
            ..Default::default()
        }))
    }
}

/// A synthetic node server running on its own runtime (its own threads), so it can be
/// killed like a crashed process: every connection drops at once.
pub struct NodeServer {
    pub address: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

/// How to serve a synthetic node.
#[derive(Clone, Default)]
pub struct ServeOptions {
    /// Also serve FlowBatches.
    pub batches: bool,
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// Also serve `peer.Peer` with this list.
    pub peers: Option<tokio::sync::watch::Receiver<Vec<crate::peer::PeerNode>>>,
    /// Worker threads of the server's runtime (default 1).
    pub threads: usize,
}

impl NodeServer {
    /// Serves `node` on `address` (port 0: any free port).
    pub fn start(
        node: Arc<SyntheticNode>,
        address: SocketAddr,
        opts: ServeOptions,
    ) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(opts.threads.max(1))
            .thread_name(format!("node-{}", node.name))
            .enable_all()
            .build()?;
        let listener = std::net::TcpListener::bind(address)?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let observer = Arc::new(SyntheticObserver(node));
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = opts.tls {
            builder = builder
                .tls_config(tls)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
        }
        let router = builder
            .add_service(ObserverServer::from_arc(observer.clone()))
            .add_optional_service(opts.batches.then(|| crate::batches::server(observer)))
            .add_optional_service(
                opts.peers
                    .map(|p| crate::peer::PeerService::new(p).into_server()),
            );
        runtime.spawn(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = router.serve_with_incoming(incoming).await;
        });
        Ok(Self {
            address,
            runtime: Some(runtime),
        })
    }

    /// Stops at once, dropping every connection (a crash, as far as peers can tell).
    pub fn kill(mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for NodeServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

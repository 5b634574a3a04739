//! A synthetic node: an in-memory flow ring served over the Observer API with the node
//! exporter's GetFlows semantics (last/first N, since/until, filters, field mask, follow
//! with lost-events records for lagging followers), and optionally FlowBatches. For the
//! relay's component tests, benchmarks and demos: real gRPC servers on real sockets, with
//! flows made up instead of captured.
//!
//! Flows are encoded once when pushed and shared (`Arc`) by every stream, so a node
//! costs little next to the relay it feeds on the same machine (benchmarks). FlowBatches
//! is served either as node exporters serve it, over the Observer
//! ([`crate::batches::server`], or [`crate::batches::watermarked_server`] with
//! [`ServeOptions::watermarks`]), or, with [`ServeOptions::encoded_batches`], straight
//! from the encoded flows. With [`ServeOptions::watermarks`], its batches carry the
//! watermarks its owner gives it ([`SyntheticNode::advance`]), as a node exporter's carry
//! its own.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, RwLock,
    },
    time::Duration,
};

use bytes::Bytes;
use futures::StreamExt;
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
use prost::Message;
use tokio::sync::{broadcast, mpsc};
use tonic::{Request, Response, Status};

use crate::{
    batches::{
        pace_watermarks, FlowSource, SourceItem, SourceStream, MAX_BATCH_FLOWS, MAX_MESSAGE_BYTES,
    },
    proto::batches::{
        flow_batches_server::{FlowBatches, FlowBatchesServer},
        FlowBatch,
    },
    wire::{now_ns, ns_timestamp, timestamp_ns},
};

/// The ring capacity a synthetic node reports (ServerStatus, GetNodes `max_flows`).
pub const RING_CAPACITY: u64 = 1_000_000;

/// A flow as a node holds it: decoded (filters) and encoded once (answers).
struct Stored {
    flow: Flow,
    encoded: Bytes,
    time_ns: i64,
}

/// What a node tells its followers, in order.
#[derive(Clone)]
enum Published {
    /// A new flow and its index.
    Flow(usize, Arc<Stored>),
    /// No flow pushed after this is older (ns).
    Watermark(i64),
}

/// A node's flows, in time order of arrival.
pub struct SyntheticNode {
    name: String,
    flows: RwLock<Vec<Arc<Stored>>>,
    /// Newest watermark given ([`SyntheticNode::advance`]).
    watermark: std::sync::Mutex<Option<i64>>,
    tx: broadcast::Sender<Published>,
    started_ns: i64,
    /// GetFlows streams being answered.
    active: Arc<AtomicUsize>,
    /// The next this many ServerStatus answers come [`Self::slow_status`] late.
    slow_answers: AtomicUsize,
    slow_status_ms: std::sync::atomic::AtomicU64,
}

impl SyntheticNode {
    /// `follow_queue`: flows a follower may lag before it is told it lost some.
    pub fn new(name: &str, follow_queue: usize) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_owned(),
            flows: RwLock::new(Vec::new()),
            watermark: std::sync::Mutex::new(None),
            tx: broadcast::channel(follow_queue.max(16)).0,
            started_ns: now_ns(),
            active: Arc::new(AtomicUsize::new(0)),
            slow_answers: AtomicUsize::new(0),
            slow_status_ms: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The next `answers` ServerStatus answers are `delay` late, as from a node busy
    /// serving large queries.
    pub fn slow_status(&self, answers: usize, delay: Duration) {
        self.slow_status_ms.store(
            u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.slow_answers.store(answers, Ordering::Relaxed);
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Appends flows (their `node_name` is set to this node's).
    pub fn push(&self, flows: impl IntoIterator<Item = Flow>) {
        let stored: Vec<Arc<Stored>> = flows
            .into_iter()
            .map(|mut f| {
                f.node_name.clone_from(&self.name);
                Arc::new(Stored {
                    time_ns: f.time.as_ref().map_or(0, timestamp_ns),
                    encoded: f.encode_to_vec().into(),
                    flow: f,
                })
            })
            .collect();
        let mut g = self.flows.write().unwrap_or_else(|p| p.into_inner());
        for f in stored {
            let seq = g.len();
            g.push(f.clone());
            let _ = self.tx.send(Published::Flow(seq, f));
        }
    }

    /// The node's owner promises to push no flow older than `watermark_ns` from now on;
    /// following FlowBatches streams served with [`ServeOptions::watermarks`] say so to
    /// their client. Watermarks only move forward (an older one is ignored).
    pub fn advance(&self, watermark_ns: i64) {
        let mut w = self.watermark.lock().unwrap_or_else(|p| p.into_inner());
        if w.is_some_and(|w| w >= watermark_ns) {
            return;
        }
        *w = Some(watermark_ns);
        let _ = self.tx.send(Published::Watermark(watermark_ns));
    }

    pub fn len(&self) -> usize {
        self.flows.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every flow held.
    pub fn flows(&self) -> Vec<Flow> {
        self.flows
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|s| s.flow.clone())
            .collect()
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

    fn wants(&self, f: &Flow) -> bool {
        self.in_time(f) && self.filters.matches(f)
    }

    fn response(&self, s: &Stored) -> GetFlowsResponse {
        let flow = match &self.mask {
            Some(m) => m.apply(&s.flow),
            None => s.flow.clone(),
        };
        GetFlowsResponse {
            node_name: s.flow.node_name.clone(),
            time: s.flow.time,
            response_types: Some(ResponseTypes::Flow(flow)),
        }
    }

    /// The flow as FlowBatches carries it: encoded (once, at push, unless masked).
    fn encoded(&self, s: &Stored) -> Bytes {
        match &self.mask {
            Some(m) => m.apply(&s.flow).encode_to_vec().into(),
            None => s.encoded.clone(),
        }
    }
}

/// What one GetFlows stream of a node yields, before it is shaped for its RPC.
enum Item {
    Flow(Arc<Stored>),
    /// A lagging follower missed this many flows.
    Lost(u64),
    /// The node's watermark (only on streams that asked for them).
    Watermark(i64),
}

/// Answers `q` from `node` into a channel: the history the query asks for, then (following)
/// live flows, with a lost-events item when the follower lags, and with `watermarks` the
/// node's watermarks in order among them.
fn answer(node: Arc<SyntheticNode>, q: Arc<Query>, watermarks: bool) -> mpsc::Receiver<Item> {
    let (tx, rx) = mpsc::channel(1024);
    node.active.fetch_add(1, Ordering::AcqRel);
    let guard = ActiveGuard(node.active.clone());
    tokio::spawn(async move {
        let _guard = guard;
        let mut live = q.follow.then(|| node.tx.subscribe());
        let snapshot: Vec<Arc<Stored>> =
            node.flows.read().unwrap_or_else(|p| p.into_inner()).clone();
        let history = q.number > 0 || q.since.is_some() || !q.follow;
        if history {
            let limit = if q.number == 0 { u64::MAX } else { q.number } as usize;
            let picked: Vec<Arc<Stored>> = if q.first {
                snapshot
                    .iter()
                    .filter(|s| q.wants(&s.flow))
                    .take(limit)
                    .cloned()
                    .collect()
            } else {
                let mut v: Vec<_> = snapshot
                    .iter()
                    .rev()
                    .filter(|s| q.wants(&s.flow))
                    .take(limit)
                    .cloned()
                    .collect();
                v.reverse();
                v
            };
            for s in picked {
                if tx.send(Item::Flow(s)).await.is_err() {
                    return;
                }
            }
        }
        let Some(rx) = live.as_mut() else { return };
        let held = snapshot.len();
        loop {
            tokio::select! {
                r = rx.recv() => match r {
                    Ok(Published::Watermark(w)) => {
                        // Superseded by the next one: never wait for the client for it.
                        if watermarks && tx.try_send(Item::Watermark(w)).is_err() && tx.is_closed() {
                            return;
                        }
                    }
                    Ok(Published::Flow(seq, s)) => {
                        if seq < held {
                            continue;
                        }
                        if q.until.is_some_and(|u| s.time_ns > u) {
                            return;
                        }
                        if q.wants(&s.flow) && tx.send(Item::Flow(s)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        if tx.send(Item::Lost(n)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tx.closed() => return,
            }
        }
    });
    rx
}

struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The Observer API over a [`SyntheticNode`].
pub struct SyntheticObserver(pub Arc<SyntheticNode>);

type RespStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<GetFlowsResponse, Status>> + Send>>;

fn lost_response(node: &str, n: u64) -> GetFlowsResponse {
    GetFlowsResponse {
        node_name: node.to_owned(),
        time: Some(ns_timestamp(now_ns())),
        response_types: Some(ResponseTypes::LostEvents(LostEvent {
            source: LostEventSource::HubbleRingBuffer as i32,
            num_events_lost: n,
            cpu: None,
        })),
    }
}

/// FlowBatches straight from a node's encoded flows: whatever is ready, up to
/// [`MAX_BATCH_FLOWS`], goes out as one batch, as [`crate::batches::server`] batches.
pub struct SyntheticBatches {
    pub node: Arc<SyntheticNode>,
    /// The node's watermarks on every batch and alone after this heartbeat (`None`: no
    /// watermarks).
    pub watermarks: Option<Duration>,
}

type BatchStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<FlowBatch, Status>> + Send>>;

#[tonic::async_trait]
impl FlowBatches for SyntheticBatches {
    type GetFlowBatchesStream = BatchStream;

    async fn get_flow_batches(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<BatchStream>, Status> {
        let q = Arc::new(Query::parse(request.get_ref())?);
        let node = self.node.clone();
        let name = node.name.clone();
        let answer = answer(node, q.clone(), self.watermarks.is_some());
        let items = tokio_stream::wrappers::ReceiverStream::new(answer);
        let batches = items.ready_chunks(MAX_BATCH_FLOWS).flat_map(move |chunk| {
            let mut out = Vec::new();
            let mut batch = FlowBatch {
                node_names: vec![name.clone()],
                ..Default::default()
            };
            let mut watermark = None;
            for item in chunk {
                match item {
                    Item::Flow(s) => {
                        batch.flows.push(q.encoded(&s));
                        batch.times_ns.push(s.time_ns);
                    }
                    Item::Lost(n) => {
                        // Events go before the batch's flows: end the batch first.
                        if !batch.flows.is_empty() {
                            let next = FlowBatch {
                                node_names: vec![name.clone()],
                                ..Default::default()
                            };
                            out.push(Ok(std::mem::replace(&mut batch, next)));
                        }
                        batch.events.push(lost_response(&name, n));
                    }
                    Item::Watermark(w) => watermark = Some(w),
                }
            }
            // The watermark holds after the chunk's last flow.
            batch.watermark_ns = watermark;
            out.push(Ok(batch));
            futures::stream::iter(out)
        });
        let heartbeat = self.watermarks.unwrap_or(Duration::MAX);
        Ok(Response::new(Box::pin(pace_watermarks(batches, heartbeat))))
    }
}
type Unsupported<T> = futures::stream::Empty<Result<T, Status>>;

impl SyntheticObserver {
    /// The answer to `request` as GetFlows yields it, with the node's watermarks if asked.
    fn items(&self, request: &GetFlowsRequest, watermarks: bool) -> Result<SourceStream, Status> {
        let q = Arc::new(Query::parse(request)?);
        let node = self.0.clone();
        let name = node.name.clone();
        let items =
            tokio_stream::wrappers::ReceiverStream::new(answer(node, q.clone(), watermarks));
        Ok(Box::pin(items.map(move |item| {
            Ok(match item {
                Item::Flow(s) => SourceItem::Response(q.response(&s)),
                Item::Lost(n) => SourceItem::Response(lost_response(&name, n)),
                Item::Watermark(w) => SourceItem::Watermark(w),
            })
        })))
    }
}

/// The node's answers with its watermarks, for FlowBatches served as node exporters serve
/// it ([`crate::batches::watermarked_server`]).
#[tonic::async_trait]
impl FlowSource for SyntheticObserver {
    async fn flow_items(&self, request: Request<GetFlowsRequest>) -> Result<SourceStream, Status> {
        self.items(request.get_ref(), true)
    }
}

#[tonic::async_trait]
impl Observer for SyntheticObserver {
    type GetFlowsStream = RespStream;
    type GetAgentEventsStream = Unsupported<GetAgentEventsResponse>;
    type GetDebugEventsStream = Unsupported<GetDebugEventsResponse>;

    async fn get_flows(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<RespStream>, Status> {
        // One flow per response, nothing else: the Hubble-compatible API has no watermarks.
        let items = self.items(request.get_ref(), false)?;
        Ok(Response::new(Box::pin(items.filter_map(|item| {
            futures::future::ready(match item {
                Ok(SourceItem::Response(r)) => Some(Ok(r)),
                Ok(SourceItem::Watermark(_)) => None,
                Err(e) => Some(Err(e)),
            })
        }))))
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
        let slow = self
            .0
            .slow_answers
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if slow {
            let ms = self.0.slow_status_ms.load(Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
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
    /// Serve FlowBatches from the encoded flows ([`SyntheticBatches`]) rather than over
    /// the Observer as node exporters do: cheaper, for benchmarks of the relay.
    pub encoded_batches: bool,
    /// FlowBatches carry the node's watermarks ([`SyntheticNode::advance`]) on every batch
    /// and alone after this heartbeat with nothing to send, as a node exporter's do.
    pub watermarks: Option<Duration>,
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
            .add_optional_service(
                (opts.batches && !opts.encoded_batches && opts.watermarks.is_none())
                    .then(|| crate::batches::server(observer.clone())),
            )
            .add_optional_service(
                opts.watermarks
                    .filter(|_| opts.batches && !opts.encoded_batches)
                    .map(|h| crate::batches::watermarked_server(observer.clone(), h)),
            )
            .add_optional_service((opts.batches && opts.encoded_batches).then(|| {
                FlowBatchesServer::new(SyntheticBatches {
                    node: observer.0.clone(),
                    watermarks: opts.watermarks,
                })
                .max_encoding_message_size(MAX_MESSAGE_BYTES)
            }))
            .add_optional_service(
                opts.peers
                    .map(|p| crate::peer::PeerService::new(p).into_server()),
            );
        runtime.spawn(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            // As node exporters: small messages (a watermark) go out at once.
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
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

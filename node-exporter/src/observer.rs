//! The Observer gRPC service (Hubble's `observer.Observer`) over the flow ring:
//! GetFlows (last/first N, since/until, whitelist/blacklist filters, field mask, follow),
//! ServerStatus and GetNodes. One place converts errors to `tonic::Status`.
//!
//! The same answers feed the Lumen-only FlowBatches RPC the relay reads
//! ([`lumen_relay::batches::watermarked_server`]); there a following stream also carries
//! the node's flow watermark (see `pipeline::drain_watermark`), in order with its flows.
//! GetFlows stays one flow per response, with nothing else, for stock Hubble clients.

use std::{collections::HashMap, pin::Pin, sync::Arc, time::Duration};

use futures::{Stream, StreamExt};
use lumen_proto::{
    flow::{Flow, LostEvent, LostEventSource},
    observer::{
        get_flows_response::ResponseTypes,
        observer_server::{Observer, ObserverServer},
        GetAgentEventsRequest, GetAgentEventsResponse, GetDebugEventsRequest,
        GetDebugEventsResponse, GetFlowsRequest, GetFlowsResponse, GetNamespacesRequest,
        GetNamespacesResponse, GetNodesRequest, GetNodesResponse, Node, ServerStatusRequest,
        ServerStatusResponse,
    },
    relay::NodeState as WireNodeState,
};
use lumen_relay::batches::{FlowSource, SourceItem, SourceStream};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::{
    clock,
    convert::{timestamp, to_flow, ConvertContext},
    store::{Published, StoredFlow},
    NodeState,
};

/// Flows per response channel slot before the server waits for the client.
const STREAM_QUEUE: usize = 1024;
/// Flows copied out of the ring per lock acquisition.
const CHUNK: usize = 4096;
/// Longest a one-shot request with `until` waits for the node's watermark to pass it
/// (it normally trails the clock by a heartbeat, 10 ms).
const UNTIL_WAIT: Duration = Duration::from_secs(1);

/// Why a request was refused; converted to a `Status` in exactly one place.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("invalid filter: {0}")]
    Filter(String),
    #[error("invalid field_mask: {0}")]
    FieldMask(String),
    #[error("since ({since}) is after until ({until})")]
    TimeRange { since: String, until: String },
    #[error("invalid timestamp {0}")]
    Timestamp(String),
}

impl From<RequestError> for Status {
    fn from(e: RequestError) -> Self {
        Status::invalid_argument(e.to_string())
    }
}

pub struct ObserverService {
    state: Arc<NodeState>,
}

impl ObserverService {
    pub fn new(state: Arc<NodeState>) -> Self {
        Self { state }
    }
}

/// Serve the Observer API on `listener` until `shutdown`, with the Lumen-only services
/// beside it: FlowBatches (for relays), the policy inspector, `peer.Peer` announcing
/// `peers` (the cluster's nodes), and gRPC reflection; over `tls` when given.
pub async fn serve(
    listener: tokio::net::TcpListener,
    svc: ObserverService,
    peers: tokio::sync::watch::Receiver<Vec<lumen_relay::peer::PeerNode>>,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    // Small messages (a watermark-only batch, one flow to a Hubble client) go out at once:
    // Nagle would hold them until the client's delayed ACK, tens of ms.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let inspector = crate::inspect::Inspector::server(svc.state.clone());
    let heartbeat = svc.state.config.watermark_heartbeat;
    let svc = Arc::new(svc);
    let mut builder =
        tonic::transport::Server::builder().http2_keepalive_interval(Some(Duration::from_secs(30)));
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let router = builder
        .add_service(inspector)
        .add_service(lumen_relay::peer::PeerService::new(peers).into_server())
        // Lumen-only batched stream for the relay (several flows per message, and the
        // node's watermark).
        .add_service(lumen_relay::batches::watermarked_server(
            svc.clone(),
            heartbeat,
        ))
        .add_service(ObserverServer::from_arc(svc).max_decoding_message_size(4 << 20));
    let router = lumen_relay::proto::with_reflection(
        router,
        &[
            "observer.Observer",
            "peer.Peer",
            "lumen.relay.v1.FlowBatches",
            "lumen.policy.v1.PolicyInspector",
        ],
    )?;
    router
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// Why the Observer API server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

fn ts_ns(ts: &prost_types::Timestamp) -> Result<i64, RequestError> {
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return Err(RequestError::Timestamp(format!(
            "{}s {}ns",
            ts.seconds, ts.nanos
        )));
    }
    ts.seconds
        .checked_mul(1_000_000_000)
        .and_then(|s| s.checked_add(i64::from(ts.nanos)))
        .ok_or_else(|| RequestError::Timestamp(format!("{}s {}ns", ts.seconds, ts.nanos)))
}

/// A validated GetFlows request.
struct Query {
    number: u64,
    first: bool,
    follow: bool,
    since: Option<i64>,
    until: Option<i64>,
    filter: lumen_proto::filter::FlowFilters,
    mask: Option<lumen_proto::field_mask::FlowFieldMask>,
}

impl Query {
    fn parse(req: GetFlowsRequest) -> Result<Self, RequestError> {
        // `number` needs no cap: a node answers from its bounded ring, and Hubble's
        // `--all` asks for u64::MAX.
        let since = req.since.as_ref().map(ts_ns).transpose()?;
        let until = req.until.as_ref().map(ts_ns).transpose()?;
        if let (Some(s), Some(u)) = (since, until) {
            if s > u {
                return Err(RequestError::TimeRange {
                    since: format!("{:?}", req.since),
                    until: format!("{:?}", req.until),
                });
            }
        }
        let filter = lumen_proto::filter::FlowFilters::compile(&req.whitelist, &req.blacklist)
            .map_err(|e| RequestError::Filter(e.to_string()))?;
        // `field_mask`, or `experimental.field_mask`, which stock Hubble CLIs send.
        let mask = lumen_proto::field_mask::FlowFieldMask::from_request(&req)
            .map_err(|e| RequestError::FieldMask(e.to_string()))?;
        Ok(Self {
            number: req.number,
            first: req.first,
            follow: req.follow,
            since,
            until,
            filter,
            mask,
        })
    }

    fn in_time(&self, f: &StoredFlow) -> bool {
        self.since.is_none_or(|s| f.time_ns >= s) && self.until.is_none_or(|u| f.time_ns <= u)
    }
}

struct Responder {
    state: Arc<NodeState>,
    ifnames: HashMap<u32, String>,
    compiled: Arc<lumen_policy::compile::CompiledPolicy>,
    policies: Arc<Vec<lumen_policy::Policy>>,
    tx: mpsc::Sender<Result<SourceItem, Status>>,
    /// Pass the ring's watermarks on (FlowBatches; never on GetFlows).
    watermarks: bool,
}

impl Responder {
    fn convert(&self, f: &StoredFlow) -> Flow {
        let names = &self.ifnames;
        let lookup = |i: u32| names.get(&i).cloned();
        to_flow(
            f,
            &ConvertContext {
                node_name: &self.state.config.node_name,
                interface_name: &lookup,
                compiled: &self.compiled,
                policies: &self.policies,
            },
        )
    }

    /// The flow if it passes the query's filters, masked.
    fn matching(&self, q: &Query, f: &StoredFlow) -> Option<Flow> {
        if !q.in_time(f) {
            return None;
        }
        let flow = self.convert(f);
        if !q.filter.matches(&flow) {
            return None;
        }
        Some(match &q.mask {
            Some(m) => m.apply(&flow),
            None => flow,
        })
    }

    async fn send_flow(&self, flow: Flow) -> bool {
        let time = flow.time;
        let resp = GetFlowsResponse {
            response_types: Some(ResponseTypes::Flow(flow)),
            node_name: self.state.config.node_name.clone(),
            time,
        };
        self.tx.send(Ok(SourceItem::Response(resp))).await.is_ok()
    }

    async fn send_lost(&self, source: LostEventSource, n: u64) -> bool {
        let resp = GetFlowsResponse {
            response_types: Some(ResponseTypes::LostEvents(LostEvent {
                source: source as i32,
                num_events_lost: n,
                cpu: None,
            })),
            node_name: self.state.config.node_name.clone(),
            time: Some(timestamp(clock::realtime_ns())),
        };
        self.tx.send(Ok(SourceItem::Response(resp))).await.is_ok()
    }

    /// Waits (at most [`UNTIL_WAIT`]) for the node's watermark to pass `target`: then
    /// every flow stamped up to `target` is in the ring, including those still in the
    /// datapath's ring buffer when the request came. Without watermarks (nothing
    /// publishes them, e.g. no datapath) it returns at once.
    async fn await_watermark(&self, target: i64) {
        let ring = &self.state.ring;
        let deadline = tokio::time::Instant::now() + UNTIL_WAIT;
        while let Some(w) = ring.watermark() {
            if w >= target || tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn run(self, q: Query) {
        let ring = self.state.ring.clone();
        // A one-shot answer up to `until` holds everything stamped up to then (or up to
        // now, for an `until` in the future): the relay compares and joins answers by time.
        if let (false, Some(until)) = (q.follow, q.until) {
            self.await_watermark(until.min(clock::realtime_ns())).await;
        }
        // Subscribe before reading history so nothing falls between the two.
        let mut live = q.follow.then(|| ring.subscribe());
        let mut last_seq: Option<u64> = None;
        let history = q.number > 0 || q.since.is_some() || !q.follow;
        if history {
            let limit = if q.number == 0 { u64::MAX } else { q.number };
            if q.first {
                let mut from = ring.first_seq();
                let mut sent = 0u64;
                'outer: loop {
                    let chunk = ring.range(from, CHUNK);
                    if chunk.is_empty() {
                        break;
                    }
                    for (seq, f) in &chunk {
                        from = seq + 1;
                        last_seq = Some(*seq);
                        if q.until.is_some_and(|u| f.time_ns > u) {
                            break 'outer;
                        }
                        if let Some(flow) = self.matching(&q, f) {
                            if !self.send_flow(flow).await {
                                return;
                            }
                            sent += 1;
                            if sent >= limit {
                                break 'outer;
                            }
                        }
                    }
                }
            } else {
                // Newest first until `limit` matches, then send them oldest first.
                let mut before = ring.next_seq();
                last_seq = before.checked_sub(1);
                let mut picked: Vec<Flow> = Vec::new();
                'scan: loop {
                    let chunk = ring.range_rev(before, CHUNK);
                    if chunk.is_empty() {
                        break;
                    }
                    for (seq, f) in &chunk {
                        before = *seq;
                        if q.since.is_some_and(|s| f.time_ns < s) {
                            break 'scan;
                        }
                        if let Some(flow) = self.matching(&q, f) {
                            picked.push(flow);
                            if picked.len() as u64 >= limit {
                                break 'scan;
                            }
                        }
                    }
                }
                for flow in picked.into_iter().rev() {
                    if !self.send_flow(flow).await {
                        return;
                    }
                }
            }
        } else {
            last_seq = ring.next_seq().checked_sub(1);
        }
        let Some(rx) = live.as_mut() else {
            return;
        };
        self.follow(&q, rx, last_seq).await;
    }

    async fn follow(
        &self,
        q: &Query,
        rx: &mut broadcast::Receiver<Published>,
        mut last_seq: Option<u64>,
    ) {
        let metrics = self.state.metrics.clone();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let mut kernel_lost = load(&metrics.kernel_lost);
        let mut queue_lost = load(&metrics.queue_lost);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                r = rx.recv() => match r {
                    Ok(Published::Watermark(w)) => {
                        // Every flow sent from now on is at least this new (the ring's
                        // promise, in order with its flows). A newer one supersedes it:
                        // never wait for the client for it.
                        if self.watermarks {
                            if let Err(mpsc::error::TrySendError::Closed(_)) =
                                self.tx.try_send(Ok(SourceItem::Watermark(w)))
                            {
                                return;
                            }
                        }
                    }
                    Ok(Published::Flow(seq, f)) => {
                        if last_seq.is_some_and(|l| seq <= l) {
                            continue;
                        }
                        last_seq = Some(seq);
                        if q.until.is_some_and(|u| f.time_ns > u) {
                            return;
                        }
                        if let Some(flow) = self.matching(q, &f) {
                            if !self.send_flow(flow).await {
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        metrics.count_follower_loss(n);
                        if !self.send_lost(LostEventSource::HubbleRingBuffer, n).await {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick() => {
                    // Events lost before they became flows reach followers as LostEvents.
                    let k = load(&metrics.kernel_lost);
                    if k > kernel_lost {
                        if !self.send_lost(LostEventSource::PerfEventRingBuffer, k - kernel_lost).await {
                            return;
                        }
                        kernel_lost = k;
                    }
                    let qn = load(&metrics.queue_lost);
                    if qn > queue_lost {
                        if !self.send_lost(LostEventSource::ObserverEventsQueue, qn - queue_lost).await {
                            return;
                        }
                        queue_lost = qn;
                    }
                    if self.tx.is_closed() {
                        return;
                    }
                }
            }
        }
    }
}

struct ClientGauge(Arc<crate::metrics::Metrics>);

impl Drop for ClientGauge {
    fn drop(&mut self) {
        self.0.grpc_clients.dec();
    }
}

impl ObserverService {
    /// Starts answering a GetFlows request; with `watermarks`, a following answer carries
    /// the ring's watermarks among the responses.
    fn answer(
        &self,
        request: GetFlowsRequest,
        watermarks: bool,
    ) -> Result<mpsc::Receiver<Result<SourceItem, Status>>, Status> {
        let q = Query::parse(request)?;
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let ifnames = self.state.interface_names();
        let responder = Responder {
            state: self.state.clone(),
            ifnames,
            compiled: self.state.compiled_policy(),
            policies: self.state.policies(),
            tx,
            watermarks,
        };
        self.state.metrics.grpc_clients.inc();
        let gauge = ClientGauge(self.state.metrics.clone());
        tokio::spawn(async move {
            responder.run(q).await;
            drop(gauge);
        });
        Ok(rx)
    }
}

/// The answers for FlowBatches: GetFlows' responses with the node's watermarks.
#[tonic::async_trait]
impl FlowSource for ObserverService {
    async fn flow_items(&self, request: Request<GetFlowsRequest>) -> Result<SourceStream, Status> {
        let rx = self.answer(request.into_inner(), true)?;
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

type GetFlowsStream = Pin<Box<dyn Stream<Item = Result<GetFlowsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Observer for ObserverService {
    type GetFlowsStream = GetFlowsStream;
    type GetAgentEventsStream = ReceiverStream<Result<GetAgentEventsResponse, Status>>;
    type GetDebugEventsStream = ReceiverStream<Result<GetDebugEventsResponse, Status>>;

    async fn get_flows(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowsStream>, Status> {
        // One flow per response and nothing else, as Hubble's API is: no watermarks.
        let rx = self.answer(request.into_inner(), false)?;
        let responses = ReceiverStream::new(rx).filter_map(|item| {
            futures::future::ready(match item {
                Ok(SourceItem::Response(r)) => Some(Ok(r)),
                Ok(SourceItem::Watermark(_)) => None,
                Err(e) => Some(Err(e)),
            })
        });
        Ok(Response::new(Box::pin(responses)))
    }

    async fn get_agent_events(
        &self,
        _request: Request<GetAgentEventsRequest>,
    ) -> Result<Response<Self::GetAgentEventsStream>, Status> {
        Err(Status::unimplemented("Lumen does not export agent events"))
    }

    async fn get_debug_events(
        &self,
        _request: Request<GetDebugEventsRequest>,
    ) -> Result<Response<Self::GetDebugEventsStream>, Status> {
        Err(Status::unimplemented("Lumen does not export debug events"))
    }

    async fn get_nodes(
        &self,
        _request: Request<GetNodesRequest>,
    ) -> Result<Response<GetNodesResponse>, Status> {
        let s = &self.state;
        Ok(Response::new(GetNodesResponse {
            nodes: vec![Node {
                name: s.config.node_name.clone(),
                version: crate::VERSION.to_owned(),
                address: s.config.listen_address.to_string(),
                state: WireNodeState::NodeConnected as i32,
                tls: None,
                uptime_ns: s.uptime_ns(),
                num_flows: s.ring.len() as u64,
                max_flows: s.ring.capacity() as u64,
                seen_flows: s.ring.seen(),
                state_reason: "serving".to_owned(),
                last_seen: Some(timestamp(clock::realtime_ns())),
            }],
        }))
    }

    async fn get_namespaces(
        &self,
        _request: Request<GetNamespacesRequest>,
    ) -> Result<Response<GetNamespacesResponse>, Status> {
        let snap = self.state.metadata.current();
        let mut names: Vec<String> = snap
            .index
            .endpoints()
            .iter()
            .filter_map(|e| e.namespace.clone())
            .collect();
        names.sort();
        names.dedup();
        Ok(Response::new(GetNamespacesResponse {
            namespaces: names
                .into_iter()
                .map(|namespace| lumen_proto::observer::Namespace {
                    cluster: String::new(),
                    namespace,
                })
                .collect(),
        }))
    }

    async fn server_status(
        &self,
        _request: Request<ServerStatusRequest>,
    ) -> Result<Response<ServerStatusResponse>, Status> {
        let s = &self.state;
        Ok(Response::new(s.server_status()))
    }
}

impl NodeState {
    pub fn compiled_policy(&self) -> Arc<lumen_policy::compile::CompiledPolicy> {
        self.compiled
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn policies(&self) -> Arc<Vec<lumen_policy::Policy>> {
        self.policies
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn uptime_ns(&self) -> u64 {
        (clock::realtime_ns() - self.started_ns).max(0) as u64
    }

    pub fn server_status(&self) -> ServerStatusResponse {
        let m = &self.metrics;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        ServerStatusResponse {
            num_flows: self.ring.len() as u64,
            max_flows: self.ring.capacity() as u64,
            seen_flows: self.ring.seen(),
            uptime_ns: self.uptime_ns(),
            version: crate::VERSION.to_owned(),
            flows_rate: self.ring.rate(clock::realtime_ns(), 60_000_000_000),
            lost_events: vec![
                lost(LostEventSource::PerfEventRingBuffer, load(&m.kernel_lost)),
                lost(LostEventSource::ObserverEventsQueue, load(&m.queue_lost)),
                lost(LostEventSource::HubbleRingBuffer, load(&m.follower_lost)),
            ],
            ..Default::default()
        }
    }
}

fn lost(source: LostEventSource, n: u64) -> LostEvent {
    LostEvent {
        source: source as i32,
        num_events_lost: n,
        cpu: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stock Hubble CLIs send their field mask in `experimental.field_mask`.
    #[test]
    fn the_experimental_field_mask_is_honoured() {
        #[allow(deprecated)]
        let req = GetFlowsRequest {
            experimental: Some(lumen_proto::observer::get_flows_request::Experimental {
                field_mask: Some(prost_types::FieldMask {
                    paths: vec!["time".into(), "verdict".into()],
                }),
            }),
            ..Default::default()
        };
        let q = Query::parse(req).expect("valid request");
        assert!(q.mask.is_some());

        #[allow(deprecated)]
        let bad = GetFlowsRequest {
            experimental: Some(lumen_proto::observer::get_flows_request::Experimental {
                field_mask: Some(prost_types::FieldMask {
                    paths: vec!["no_such_field".into()],
                }),
            }),
            ..Default::default()
        };
        assert!(matches!(Query::parse(bad), Err(RequestError::FieldMask(_))));
    }
}

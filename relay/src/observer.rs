//! The relay's API: Hubble's `observer.Observer` over every node (GetFlows merged in time
//! order, ServerStatus summed, GetNodes with each node's state, GetNamespaces united) and
//! the Lumen-only FlowBatches with the same merged stream in batches (relays of relays).
//!
//! GetFlows is routed to a handler whose responses are [`RawResponse`]s (flows stay
//! encoded end to end); every other Observer method goes to the generated server.
//! Requests are validated in one place ([`FlowQuery::parse`]) and errors become a
//! `tonic::Status` there.

use std::{
    convert::Infallible,
    sync::{Arc, OnceLock},
    task::Poll,
    time::Duration,
};

use futures::{future::join_all, StreamExt};
use lumen_proto::observer::{
    observer_client::ObserverClient,
    observer_server::{Observer, ObserverServer},
    GetAgentEventsRequest, GetAgentEventsResponse, GetDebugEventsRequest, GetDebugEventsResponse,
    GetFlowsRequest, GetFlowsResponse, GetNamespacesRequest, GetNamespacesResponse,
    GetNodesRequest, GetNodesResponse, Namespace, Node as WireNode, ServerStatusRequest,
    ServerStatusResponse, Tls,
};
use lumen_proto::{
    flow::{LostEvent, LostEventSource},
    relay::NodeState as WireNodeState,
};
use tonic::{
    codegen::{http, Body, BoxFuture, Service, StdError},
    server::NamedService,
    Request, Response, Status,
};

use crate::{
    batches::{to_flow_batch, MAX_MESSAGE_BYTES},
    fanout::{self, Api, FanoutSettings},
    history_join::{self, HistoryView, ResponseStream},
    metrics::Metrics,
    pool::{ConnState, NodePool},
    proto::batches::{
        flow_batches_server::{FlowBatches, FlowBatchesServer},
        FlowBatch,
    },
    queue::{queue, QueueReceiver},
    request::FlowQuery,
    sinks::SinkReport,
    wire::{now_ns, RawResponse},
};

/// Version reported in ServerStatus.
pub const VERSION: &str = concat!("lumen-relay/", env!("CARGO_PKG_VERSION"));

/// Largest request the relay decodes (filters included).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// Shared by the relay's services.
pub struct Relay {
    pub pool: Arc<NodePool>,
    pub settings: Arc<FanoutSettings>,
    pub metrics: Arc<Metrics>,
    pub max_number: u64,
    pub max_clients: usize,
    pub request_timeout: Duration,
    /// The relay's flow history, once its sink runs (answers the past of since/until).
    pub history: OnceLock<HistoryView>,
    /// The sinks' state for ServerStatus, once they run.
    pub sinks: OnceLock<SinkReport>,
    /// Becomes true when the relay shuts down: streams still open end with UNAVAILABLE
    /// saying so, rather than being cut when the process exits.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

impl Relay {
    /// Validates `request` (INVALID_ARGUMENT naming what is wrong).
    pub fn check(&self, request: GetFlowsRequest) -> Result<FlowQuery, Status> {
        let capacity = self
            .pool
            .nodes()
            .iter()
            .filter_map(|n| n.status().server_status.map(|s| s.max_flows))
            .sum();
        Ok(FlowQuery::parse(
            request,
            self.max_number,
            capacity,
            now_ns(),
        )?)
    }

    /// GetFlows as the Observer API answers it: from history for the past of a time
    /// range when the relay keeps history, from the nodes otherwise.
    pub fn flows(self: &Arc<Self>, request: GetFlowsRequest) -> Result<ResponseStream, Status> {
        if let Some(view) = self.history.get() {
            if let Some(s) = history_join::joined(self, view, &request)? {
                return Ok(until_stopping(s, self.stopping.clone()));
            }
        }
        let s = self.start_flows(request, Api::Observer)?.into_responses();
        Ok(until_stopping(s, self.stopping.clone()))
    }

    /// The nodes' answer to `request` as responses; a refused request becomes the
    /// stream's only item.
    pub fn live(&self, request: GetFlowsRequest) -> ResponseStream {
        match self.start_flows(request, Api::Observer) {
            Ok(rx) => rx.into_responses().boxed(),
            Err(status) => futures::stream::once(async move { Err(status) }).boxed(),
        }
    }

    /// Validates `request` and starts its fan-out; the receiver yields merged batches.
    pub fn start_flows(&self, request: GetFlowsRequest, api: Api) -> Result<QueueReceiver, Status> {
        let query = self.check(request)?;
        if self.metrics.clients.get() >= self.max_clients as i64 {
            return Err(Status::resource_exhausted(format!(
                "the relay already serves {} GetFlows streams, its maximum",
                self.max_clients
            )));
        }
        let (tx, rx) = queue(self.settings.client_queue_flows);
        tokio::spawn(fanout::run(
            self.pool.clone(),
            query,
            self.settings.clone(),
            self.metrics.clone(),
            tx,
            api,
        ));
        Ok(rx)
    }

    async fn each_connected<T, F, Fut>(&self, call: F) -> Vec<(String, Result<T, String>)>
    where
        F: Fn(ObserverClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let nodes: Vec<_> = self
            .pool
            .nodes()
            .into_iter()
            .filter(|n| n.status().state == ConnState::Connected)
            .collect();
        let calls = nodes.iter().map(|n| {
            let fut = call(ObserverClient::new(n.channel()));
            let timeout = self.request_timeout;
            async move {
                match tokio::time::timeout(timeout, fut).await {
                    Ok(Ok(v)) => Ok(v),
                    Ok(Err(s)) => Err(crate::pool::describe_status(&s)),
                    Err(_) => Err(format!("no answer within {timeout:?}")),
                }
            }
        });
        let results = join_all(calls).await;
        nodes.iter().map(|n| n.name()).zip(results).collect()
    }

    pub async fn server_status(&self) -> ServerStatusResponse {
        let results = self
            .each_connected(|mut c| async move {
                c.server_status(ServerStatusRequest {})
                    .await
                    .map(Response::into_inner)
            })
            .await;
        let mut out = ServerStatusResponse {
            version: VERSION.to_owned(),
            ..Default::default()
        };
        let mut connected = 0u32;
        let mut unavailable: Vec<String> = Vec::new();
        for (name, r) in results {
            match r {
                Ok(s) => {
                    connected += 1;
                    out.num_flows += s.num_flows;
                    out.max_flows += s.max_flows;
                    out.seen_flows += s.seen_flows;
                    out.uptime_ns = out.uptime_ns.max(s.uptime_ns);
                    out.flows_rate += s.flows_rate;
                    for l in s.lost_events {
                        add_lost(&mut out.lost_events, l.source, l.num_events_lost);
                    }
                }
                Err(_) => unavailable.push(name),
            }
        }
        for n in self.pool.nodes() {
            if n.status().state != ConnState::Connected {
                unavailable.push(n.name());
            }
        }
        // The relay's own losses (slow clients, late flows dropped) count as queue losses.
        let own = self.metrics.discarded_total();
        add_lost(
            &mut out.lost_events,
            LostEventSource::ObserverEventsQueue as i32,
            own,
        );
        unavailable.sort();
        if let Some(sinks) = self.sinks.get() {
            out.sinks = sinks.status();
        }
        out.num_connected_nodes = Some(connected);
        out.num_unavailable_nodes = Some(unavailable.len() as u32);
        out.unavailable_nodes = unavailable;
        out
    }

    pub fn nodes(&self) -> GetNodesResponse {
        let mut nodes: Vec<WireNode> = self
            .pool
            .nodes()
            .iter()
            .map(|n| {
                let s = n.status();
                let ss = s.server_status.clone().unwrap_or_default();
                WireNode {
                    name: n.name(),
                    version: s.version.clone(),
                    address: n.address().to_owned(),
                    state: match s.state {
                        ConnState::Connected => WireNodeState::NodeConnected,
                        ConnState::Unavailable { .. } => WireNodeState::NodeUnavailable,
                        ConnState::Connecting => WireNodeState::UnknownNodeState,
                    } as i32,
                    tls: Some(Tls {
                        enabled: n.tls_server_name().is_some(),
                        server_name: n.tls_server_name().unwrap_or_default().to_owned(),
                    }),
                    uptime_ns: ss.uptime_ns,
                    num_flows: ss.num_flows,
                    max_flows: ss.max_flows,
                    seen_flows: ss.seen_flows,
                    state_reason: match &s.state {
                        ConnState::Connected => "connected".to_owned(),
                        ConnState::Connecting => "connecting".to_owned(),
                        ConnState::Unavailable { reason } => reason.clone(),
                    },
                    last_seen: s.last_seen.and_then(|t| {
                        let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
                        Some(prost_types::Timestamp {
                            seconds: d.as_secs() as i64,
                            nanos: d.subsec_nanos() as i32,
                        })
                    }),
                }
            })
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        GetNodesResponse { nodes }
    }

    pub async fn namespaces(&self) -> GetNamespacesResponse {
        let results = self
            .each_connected(|mut c| async move {
                c.get_namespaces(GetNamespacesRequest {})
                    .await
                    .map(Response::into_inner)
            })
            .await;
        let mut all: Vec<Namespace> = results
            .into_iter()
            .filter_map(|(_, r)| r.ok())
            .flat_map(|r| r.namespaces)
            .collect();
        all.sort_by(|a, b| (&a.cluster, &a.namespace).cmp(&(&b.cluster, &b.namespace)));
        all.dedup();
        GetNamespacesResponse { namespaces: all }
    }
}

fn add_lost(list: &mut Vec<LostEvent>, source: i32, n: u64) {
    match list.iter_mut().find(|l| l.source == source) {
        Some(l) => l.num_events_lost += n,
        None => list.push(LostEvent {
            source,
            num_events_lost: n,
            cpu: None,
        }),
    }
}

/// The Observer methods other than GetFlows.
pub struct RelayObserver(pub Arc<Relay>);

type Unsupported<T> = futures::stream::Empty<Result<T, Status>>;

/// `s` until the relay stops; then one UNAVAILABLE ("lumen-relay is shutting down") and
/// the end, so clients learn why their stream ended.
fn until_stopping<T: Send + 'static>(
    s: impl futures::Stream<Item = Result<T, Status>> + Send + 'static,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) -> futures::stream::BoxStream<'static, Result<T, Status>> {
    UntilStopping {
        inner: s.boxed(),
        stopped: Some(Box::pin(async move {
            let _ = stopping.wait_for(|v| *v).await;
        })),
    }
    .boxed()
}

/// See [`until_stopping`]. The stop future is registered once and re-polled per item (an
/// atomic version check while the relay runs).
struct UntilStopping<T> {
    inner: futures::stream::BoxStream<'static, Result<T, Status>>,
    /// None once the stop was reported.
    stopped: Option<futures::future::BoxFuture<'static, ()>>,
}

impl<T> futures::Stream for UntilStopping<T> {
    type Item = Result<T, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Self::Item>> {
        let Some(stopped) = self.stopped.as_mut() else {
            return Poll::Ready(None);
        };
        if stopped.as_mut().poll(cx).is_ready() {
            self.stopped = None;
            return Poll::Ready(Some(Err(Status::unavailable(
                "lumen-relay is shutting down",
            ))));
        }
        match self.inner.poll_next_unpin(cx) {
            Poll::Ready(None) => {
                self.stopped = None;
                Poll::Ready(None)
            }
            other => other,
        }
    }
}

#[tonic::async_trait]
impl Observer for RelayObserver {
    type GetFlowsStream = futures::stream::BoxStream<'static, Result<GetFlowsResponse, Status>>;
    type GetAgentEventsStream = Unsupported<GetAgentEventsResponse>;
    type GetDebugEventsStream = Unsupported<GetDebugEventsResponse>;

    /// Only reached when this type is served on its own (tests); the relay's server
    /// routes GetFlows to the raw handler.
    async fn get_flows(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowsStream>, Status> {
        let s = self.0.flows(request.into_inner())?.map(|r| {
            r.and_then(|raw| {
                raw.to_response()
                    .map_err(|e| Status::internal(format!("undecodable flow: {e}")))
            })
        });
        Ok(Response::new(s.boxed()))
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
        Ok(Response::new(self.0.nodes()))
    }

    async fn get_namespaces(
        &self,
        _request: Request<GetNamespacesRequest>,
    ) -> Result<Response<GetNamespacesResponse>, Status> {
        Ok(Response::new(self.0.namespaces().await))
    }

    async fn server_status(
        &self,
        _request: Request<ServerStatusRequest>,
    ) -> Result<Response<ServerStatusResponse>, Status> {
        Ok(Response::new(self.0.server_status().await))
    }
}

/// `observer.Observer` as the relay serves it (GetFlows with encoded flows passed through).
#[derive(Clone)]
pub struct RelayObserverServer {
    relay: Arc<Relay>,
    inner: ObserverServer<RelayObserver>,
}

impl RelayObserverServer {
    pub fn new(relay: Arc<Relay>) -> Self {
        Self {
            inner: ObserverServer::new(RelayObserver(relay.clone()))
                .max_decoding_message_size(MAX_REQUEST_BYTES),
            relay,
        }
    }
}

impl NamedService for RelayObserverServer {
    const NAME: &'static str = "observer.Observer";
}

struct GetFlowsSvc(Arc<Relay>);

impl tonic::server::ServerStreamingService<GetFlowsRequest> for GetFlowsSvc {
    type Response = RawResponse;
    type ResponseStream = ResponseStream;
    type Future = futures::future::Ready<Result<Response<ResponseStream>, Status>>;

    fn call(&mut self, request: Request<GetFlowsRequest>) -> Self::Future {
        futures::future::ready(self.0.flows(request.into_inner()).map(Response::new))
    }
}

impl<B> Service<http::Request<B>> for RelayObserverServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() == "/observer.Observer/GetFlows" {
            let relay = self.relay.clone();
            return Box::pin(async move {
                let codec = tonic_prost::ProstCodec::<RawResponse, GetFlowsRequest>::default();
                let mut grpc = tonic::server::Grpc::new(codec).apply_max_message_size_config(
                    Some(MAX_REQUEST_BYTES),
                    Some(MAX_MESSAGE_BYTES),
                );
                Ok(grpc.server_streaming(GetFlowsSvc(relay), req).await)
            });
        }
        self.inner.call(req)
    }
}

/// FlowBatches as the relay serves it: the merged stream, in batches.
pub struct RelayBatches(pub Arc<Relay>);

#[tonic::async_trait]
impl FlowBatches for RelayBatches {
    type GetFlowBatchesStream = futures::stream::BoxStream<'static, Result<FlowBatch, Status>>;

    async fn get_flow_batches(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowBatchesStream>, Status> {
        let rx = self.0.start_flows(request.into_inner(), Api::Batches)?;
        Ok(Response::new(rx.map(|b| Ok(to_flow_batch(b))).boxed()))
    }
}

pub fn batches_server(relay: Arc<Relay>) -> FlowBatchesServer<RelayBatches> {
    FlowBatchesServer::new(RelayBatches(relay))
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

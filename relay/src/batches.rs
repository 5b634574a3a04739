//! The Lumen-only batched RPC (`lumen.relay.v1.FlowBatches/GetFlowBatches`): flows travel
//! already encoded, many per gRPC message, between servers Lumen controls (node exporter
//! → relay, relay → relay) while the Hubble-compatible GetFlows stays one flow per
//! response for stock clients.
//!
//! - [`FlowBatchesService`] serves it on top of any `observer.Observer` implementation: it
//!   runs the implementation's own GetFlows and batches what it yields, so a node exporter
//!   gets the batched RPC by mounting one more service:
//!
//!   ```ignore
//!   let observer = Arc::new(ObserverService::new(state));
//!   Server::builder()
//!       .add_service(ObserverServer::from_arc(observer.clone()))
//!       .add_service(lumen_relay::batches::server(observer))
//!   ```
//!
//! - [`open_node_stream`] is the relay's side: the batched RPC when the node serves it,
//!   per-flow GetFlows when it answers UNIMPLEMENTED (remembered per node).

use std::{collections::HashMap, pin::Pin, sync::Arc};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use lumen_proto::observer::{
    get_flows_response::ResponseTypes, observer_server::Observer, GetFlowsRequest, GetFlowsResponse,
};
use prost::Message;
use tonic::{codec::Streaming, Request, Response, Status};

use crate::{
    pool::{batch_support, Node},
    proto::batches::{
        flow_batches_client::FlowBatchesClient,
        flow_batches_server::{FlowBatches, FlowBatchesServer},
        FlowBatch,
    },
    wire::{now_ns, timestamp_ns, Payload, RawResponse},
};

/// Most flows per batch.
pub const MAX_BATCH_FLOWS: usize = 1024;
/// Largest encoded message a relay accepts from a node (a full batch of large flows).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Serves FlowBatches from an Observer implementation's GetFlows.
pub struct FlowBatchesService<O> {
    inner: Arc<O>,
}

impl<O> FlowBatchesService<O> {
    pub fn new(inner: Arc<O>) -> Self {
        Self { inner }
    }
}

/// A tower service for `Server::add_service` serving FlowBatches over `observer`.
pub fn server<O: Observer>(observer: Arc<O>) -> FlowBatchesServer<FlowBatchesService<O>> {
    FlowBatchesServer::new(FlowBatchesService::new(observer))
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

type BatchStream = Pin<Box<dyn Stream<Item = Result<FlowBatch, Status>> + Send + 'static>>;

/// Batches consecutive responses: whatever the inner stream has ready, up to
/// [`MAX_BATCH_FLOWS`], goes out as one message (never waiting to fill a batch).
pub fn batch_responses<S>(
    responses: S,
) -> impl Stream<Item = Result<FlowBatch, Status>> + Send + 'static
where
    S: Stream<Item = Result<GetFlowsResponse, Status>> + Send + 'static,
{
    responses
        .ready_chunks(MAX_BATCH_FLOWS)
        .map(|chunk| {
            let mut batch = FlowBatch::default();
            let mut names: HashMap<String, u32> = HashMap::new();
            let mut node_index = Vec::new();
            let mut err = None;
            for item in chunk {
                let resp = match item {
                    Ok(r) => r,
                    Err(e) => {
                        err = Some(e);
                        break;
                    }
                };
                let idx = match names.get(&resp.node_name) {
                    Some(i) => *i,
                    None => {
                        let i = batch.node_names.len() as u32;
                        names.insert(resp.node_name.clone(), i);
                        batch.node_names.push(resp.node_name.clone());
                        i
                    }
                };
                match &resp.response_types {
                    Some(ResponseTypes::Flow(f)) => {
                        let time = resp
                            .time
                            .as_ref()
                            .or(f.time.as_ref())
                            .map_or_else(now_ns, timestamp_ns);
                        batch.flows.push(Bytes::from(f.encode_to_vec()));
                        batch.times_ns.push(time);
                        node_index.push(idx);
                    }
                    _ => batch.events.push(resp),
                }
            }
            if batch.node_names.len() > 1 {
                batch.node_index = node_index;
            }
            // What came before an error still goes out, then the error ends the stream.
            let mut out = Vec::with_capacity(2);
            if !(batch.flows.is_empty() && batch.events.is_empty()) {
                out.push(Ok(batch));
            }
            if let Some(e) = err {
                out.push(Err(e));
            }
            futures::stream::iter(out)
        })
        .flatten()
}

#[tonic::async_trait]
impl<O: Observer> FlowBatches for FlowBatchesService<O> {
    type GetFlowBatchesStream = BatchStream;

    async fn get_flow_batches(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowBatchesStream>, Status> {
        let inner = self.inner.get_flows(request).await?.into_inner();
        Ok(Response::new(Box::pin(batch_responses(inner))))
    }
}

/// The responses of a batch, with their node names shared.
pub fn unbatch(
    batch: FlowBatch,
    names_cache: &mut Vec<Arc<str>>,
    events: &mut Vec<RawResponse>,
) -> Vec<RawResponse> {
    names_cache.clear();
    for n in &batch.node_names {
        names_cache.push(Arc::from(n.as_str()));
    }
    let empty: Arc<str> = Arc::from("");
    let name = |i: usize| -> Arc<str> {
        let idx = batch.node_index.get(i).copied().unwrap_or(0) as usize;
        names_cache
            .get(idx)
            .cloned()
            .unwrap_or_else(|| empty.clone())
    };
    let mut out = Vec::with_capacity(batch.flows.len());
    for (i, f) in batch.flows.into_iter().enumerate() {
        let time = batch.times_ns.get(i).copied().unwrap_or_else(now_ns);
        out.push(RawResponse::flow(f, name(i), time));
    }
    for ev in &batch.events {
        let n = names_cache
            .iter()
            .find(|n| ***n == *ev.node_name)
            .cloned()
            .unwrap_or_else(|| Arc::from(ev.node_name.as_str()));
        events.push(RawResponse::from_response(ev, n));
    }
    out
}

/// A merged batch as one FlowBatch message.
pub fn to_flow_batch(responses: Vec<RawResponse>) -> FlowBatch {
    let mut batch = FlowBatch::default();
    let mut names: Vec<Arc<str>> = Vec::new();
    let mut node_index = Vec::with_capacity(responses.len());
    for r in responses {
        let idx = match names
            .iter()
            .position(|n| Arc::ptr_eq(n, &r.node_name) || *n == r.node_name)
        {
            Some(i) => i,
            None => {
                names.push(r.node_name.clone());
                names.len() - 1
            }
        } as u32;
        match r.payload {
            Payload::Flow(b) => {
                batch.flows.push(b);
                batch.times_ns.push(r.time_ns.unwrap_or_default());
                node_index.push(idx);
            }
            _ => {
                let resp = RawResponse { ..r };
                if let Ok(decoded) = resp.to_response() {
                    batch.events.push(decoded);
                }
            }
        }
    }
    batch.node_names = names.iter().map(|n| n.to_string()).collect();
    if batch.node_names.len() > 1 {
        batch.node_index = node_index;
    }
    batch
}

/// What a node stream yields: flows (oldest first, with times) and other events.
pub struct NodeChunk {
    pub flows: Vec<RawResponse>,
    pub events: Vec<RawResponse>,
}

/// A node's answer to one request, batched or per flow.
pub enum NodeStream {
    Batched(Streaming<FlowBatch>, Vec<Arc<str>>),
    PerFlow(
        futures::stream::ReadyChunks<Streaming<RawResponse>>,
        Option<Status>,
    ),
}

impl NodeStream {
    /// The next chunk (`Ok(None)`: the node ended the stream).
    pub async fn next(&mut self) -> Result<Option<NodeChunk>, Status> {
        match self {
            NodeStream::Batched(s, names) => {
                let Some(batch) = s.message().await? else {
                    return Ok(None);
                };
                let mut events = Vec::new();
                let flows = unbatch(batch, names, &mut events);
                Ok(Some(NodeChunk { flows, events }))
            }
            NodeStream::PerFlow(s, pending) => {
                if let Some(e) = pending.take() {
                    return Err(e);
                }
                let Some(items) = s.next().await else {
                    return Ok(None);
                };
                let mut flows = Vec::with_capacity(items.len());
                let mut events = Vec::new();
                let mut err = None;
                for item in items {
                    match item {
                        Ok(mut r) => {
                            if r.is_flow() {
                                if r.time_ns.is_none() {
                                    r.time_ns = Some(r.event_time_ns().unwrap_or_else(now_ns));
                                }
                                flows.push(r);
                            } else {
                                events.push(r);
                            }
                        }
                        Err(e) => {
                            err = Some(e);
                            break;
                        }
                    }
                }
                match err {
                    Some(e) if flows.is_empty() && events.is_empty() => Err(e),
                    // Deliver what came first; the next call reports the error.
                    Some(e) => {
                        *pending = Some(e);
                        Ok(Some(NodeChunk { flows, events }))
                    }
                    None => Ok(Some(NodeChunk { flows, events })),
                }
            }
        }
    }
}

/// Opens `request` on `node`: FlowBatches when enabled and the node serves it, else
/// per-flow GetFlows.
pub async fn open_node_stream(
    node: &Node,
    request: GetFlowsRequest,
    use_batches: bool,
) -> Result<NodeStream, Status> {
    if use_batches && node.batch_support() != batch_support::NO {
        let mut client =
            FlowBatchesClient::new(node.channel()).max_decoding_message_size(MAX_MESSAGE_BYTES);
        match client.get_flow_batches(request.clone()).await {
            Ok(resp) => {
                node.set_batch_support(batch_support::YES);
                return Ok(NodeStream::Batched(resp.into_inner(), Vec::new()));
            }
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                tracing::info!(node = %node.name(), "node does not serve FlowBatches; using per-flow GetFlows");
                node.set_batch_support(batch_support::NO);
            }
            Err(s) => return Err(s),
        }
    }
    let s = get_flows_raw(node.channel(), request).await?;
    Ok(NodeStream::PerFlow(s.ready_chunks(MAX_BATCH_FLOWS), None))
}

/// Observer GetFlows, decoding responses as [`RawResponse`] (flows stay encoded).
pub async fn get_flows_raw(
    channel: tonic::transport::Channel,
    request: GetFlowsRequest,
) -> Result<Streaming<RawResponse>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("node not ready: {e}")))?;
    let codec = tonic_prost::ProstCodec::<GetFlowsRequest, RawResponse>::default();
    let path = http::uri::PathAndQuery::from_static("/observer.Observer/GetFlows");
    let resp = grpc
        .server_streaming(Request::new(request), path, codec)
        .await?;
    Ok(resp.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ns_timestamp;
    use lumen_proto::flow::{Flow, LostEvent};

    fn resp(node: &str, t: i64) -> GetFlowsResponse {
        GetFlowsResponse {
            response_types: Some(ResponseTypes::Flow(Flow {
                time: Some(ns_timestamp(t)),
                node_name: node.into(),
                ..Default::default()
            })),
            node_name: node.into(),
            time: Some(ns_timestamp(t)),
        }
    }

    #[tokio::test]
    async fn batches_carry_the_same_responses() {
        let lost = GetFlowsResponse {
            response_types: Some(ResponseTypes::LostEvents(LostEvent {
                num_events_lost: 3,
                ..Default::default()
            })),
            node_name: "a".into(),
            time: None,
        };
        let input = vec![
            Ok(resp("a", 1)),
            Ok(resp("a", 2)),
            Ok(lost),
            Ok(resp("a", 3)),
        ];
        let batches: Vec<FlowBatch> = batch_responses(futures::stream::iter(input))
            .map(|b| b.expect("ok"))
            .collect()
            .await;
        assert_eq!(batches.len(), 1, "everything was ready: one batch");
        let b = batches.into_iter().next().expect("one");
        assert_eq!(b.times_ns, vec![1, 2, 3]);
        assert_eq!(b.node_names, vec!["a".to_string()]);
        assert!(b.node_index.is_empty());
        assert_eq!(b.events.len(), 1);
        let mut names = Vec::new();
        let mut events = Vec::new();
        let flows = unbatch(b, &mut names, &mut events);
        assert_eq!(flows.len(), 3);
        assert_eq!(flows[2].to_response().expect("decodes"), resp("a", 3));
        assert_eq!(events.len(), 1);
    }

    #[test]
    fn merged_batches_name_each_flow_s_node() {
        let a: Arc<str> = Arc::from("a");
        let b: Arc<str> = Arc::from("b");
        let raw = vec![
            RawResponse::from_response(&resp("a", 1), a.clone()),
            RawResponse::from_response(&resp("b", 2), b),
            RawResponse::from_response(&resp("a", 3), a),
        ];
        let batch = to_flow_batch(raw.clone());
        assert_eq!(batch.node_names, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(batch.node_index, vec![0, 1, 0]);
        let mut names = Vec::new();
        let mut events = Vec::new();
        assert_eq!(unbatch(batch, &mut names, &mut events), raw);
    }
}

//! The Lumen-only batched RPC (`lumen.relay.v1.FlowBatches/GetFlowBatches`): flows travel
//! already encoded, many per gRPC message, between servers Lumen controls (node exporter
//! → relay, relay → relay) while the Hubble-compatible GetFlows stays one flow per
//! response for stock clients.
//!
//! - [`FlowBatchesService`] serves it on top of any `observer.Observer` implementation: it
//!   runs the implementation's own GetFlows and batches what it yields, so a server gets
//!   the batched RPC by mounting one more service:
//!
//!   ```ignore
//!   let observer = Arc::new(ObserverService::new(state));
//!   Server::builder()
//!       .add_service(ObserverServer::from_arc(observer.clone()))
//!       .add_service(lumen_relay::batches::server(observer))
//!   ```
//!
//!   A server that can promise how far its stream has come (the node exporter) implements
//!   [`FlowSource`] instead and mounts [`watermarked_server`]: its watermarks travel on
//!   every batch (`FlowBatch.watermark_ns`), and a following stream with nothing to send
//!   for a heartbeat sends a batch with only the watermark, so the relay's merge need not
//!   wait for a quiet node (see [`batch_items`]).
//!
//! - [`open_node_stream`] is the relay's side: the batched RPC when the node serves it,
//!   per-flow GetFlows when it answers UNIMPLEMENTED (remembered per node).

use std::{collections::HashMap, pin::Pin, sync::Arc, time::Duration};

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

/// One item of a GetFlows answer as the batched RPC carries it.
#[derive(Debug, Clone, PartialEq)]
// Nearly every item is a response: boxing it would cost an allocation per flow.
#[allow(clippy::large_enum_variant)]
pub enum SourceItem {
    Response(GetFlowsResponse),
    /// The source's watermark (ns since the Unix epoch): no flow after this item is older.
    /// Watermarks of one stream never move backwards.
    Watermark(i64),
}

/// A GetFlows answer with the source's watermarks among the responses.
pub type SourceStream = Pin<Box<dyn Stream<Item = Result<SourceItem, Status>> + Send + 'static>>;

/// What the batched RPC serves: GetFlows answers, with watermarks where the source can
/// promise them.
#[tonic::async_trait]
pub trait FlowSource: Send + Sync + 'static {
    /// Answers `request` with GetFlows semantics; [`SourceItem::Watermark`]s may come
    /// between the responses.
    async fn flow_items(&self, request: Request<GetFlowsRequest>) -> Result<SourceStream, Status>;
}

/// Any Observer implementation as a source without watermarks.
pub struct ObserverSource<O>(pub Arc<O>);

#[tonic::async_trait]
impl<O: Observer> FlowSource for ObserverSource<O> {
    async fn flow_items(&self, request: Request<GetFlowsRequest>) -> Result<SourceStream, Status> {
        let responses = self.0.get_flows(request).await?.into_inner();
        Ok(Box::pin(responses.map(|r| r.map(SourceItem::Response))))
    }
}

/// Serves FlowBatches from a [`FlowSource`].
pub struct FlowBatchesService<S> {
    source: Arc<S>,
    heartbeat: Duration,
}

impl<S> FlowBatchesService<S> {
    /// `heartbeat`: how long a stream with a newer watermark than it last sent may send
    /// nothing before it sends a batch with only the watermark.
    pub fn new(source: Arc<S>, heartbeat: Duration) -> Self {
        Self { source, heartbeat }
    }
}

/// A tower service for `Server::add_service` serving FlowBatches over `observer`, without
/// watermarks.
pub fn server<O: Observer>(
    observer: Arc<O>,
) -> FlowBatchesServer<FlowBatchesService<ObserverSource<O>>> {
    // Without watermarks there is no heartbeat to send.
    watermarked_server(Arc::new(ObserverSource(observer)), Duration::MAX)
}

/// A tower service for `Server::add_service` serving FlowBatches over `source`, with its
/// watermarks: on every batch, and alone after `heartbeat` with nothing else to send.
pub fn watermarked_server<S: FlowSource>(
    source: Arc<S>,
    heartbeat: Duration,
) -> FlowBatchesServer<FlowBatchesService<S>> {
    FlowBatchesServer::new(FlowBatchesService::new(source, heartbeat))
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

type BatchStream = Pin<Box<dyn Stream<Item = Result<FlowBatch, Status>> + Send + 'static>>;

/// The batch of one chunk of consecutive items, the newest watermark among them, and the
/// error that ended the chunk if one did.
fn batch_of(chunk: Vec<Result<SourceItem, Status>>) -> (FlowBatch, Option<i64>, Option<Status>) {
    let mut batch = FlowBatch::default();
    let mut names: HashMap<String, u32> = HashMap::new();
    let mut node_index = Vec::new();
    let mut watermark = None;
    let mut err = None;
    for item in chunk {
        let resp = match item {
            Ok(SourceItem::Response(r)) => r,
            Ok(SourceItem::Watermark(w)) => {
                watermark = Some(watermark.map_or(w, |m: i64| m.max(w)));
                continue;
            }
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
    (batch, watermark, err)
}

/// Batches consecutive items: whatever the source has ready, up to [`MAX_BATCH_FLOWS`],
/// goes out as one message (never waiting to fill a batch), with the source's watermarks
/// paced by [`pace_watermarks`].
pub fn batch_items<S>(
    items: S,
    heartbeat: Duration,
) -> impl Stream<Item = Result<FlowBatch, Status>> + Send + 'static
where
    S: Stream<Item = Result<SourceItem, Status>> + Send + 'static,
{
    let batches = Box::pin(items)
        .ready_chunks(MAX_BATCH_FLOWS)
        .flat_map(|chunk| {
            let (mut batch, watermark, err) = batch_of(chunk);
            batch.watermark_ns = watermark;
            // What came before an error still goes out, then the error ends the stream.
            futures::stream::iter(std::iter::once(Ok(batch)).chain(err.map(Err)))
        });
    pace_watermarks(batches, heartbeat)
}

/// The batches of a stream as they go on the wire. An input batch's `watermark_ns` is the
/// source's newest watermark among (or before) its items, or `None`; each output batch
/// carries the newest watermark given so far (a watermark stays true for everything after
/// it, so a later batch may carry it). Input batches with neither flows nor events are
/// news only when their watermark moved past the last one sent; then, once nothing was
/// sent for `heartbeat`, a batch with only the watermark goes out: a quiet following
/// stream keeps saying how far it has come, at most once per heartbeat. The first error
/// ends the stream.
pub fn pace_watermarks<S>(
    batches: S,
    heartbeat: Duration,
) -> impl Stream<Item = Result<FlowBatch, Status>> + Send + 'static
where
    S: Stream<Item = Result<FlowBatch, Status>> + Send + 'static,
{
    struct State<S> {
        batches: Pin<Box<S>>,
        heartbeat: Duration,
        /// Newest watermark from the source, and newest sent.
        known: Option<i64>,
        sent: Option<i64>,
        last_out: tokio::time::Instant,
        ended: bool,
    }
    impl<S> State<S> {
        fn send(&mut self, mut batch: FlowBatch) -> Result<FlowBatch, Status> {
            batch.watermark_ns = self.known;
            self.sent = self.known;
            self.last_out = tokio::time::Instant::now();
            Ok(batch)
        }
        /// When a batch with only the watermark is due (`None`: none is owed).
        fn heartbeat_due(&self) -> Option<tokio::time::Instant> {
            (self.known > self.sent).then(|| {
                self.last_out
                    .checked_add(self.heartbeat)
                    .unwrap_or_else(|| self.last_out + Duration::from_secs(86_400 * 365))
            })
        }
    }
    let state = State {
        batches: Box::pin(batches),
        heartbeat,
        known: None,
        sent: None,
        last_out: tokio::time::Instant::now(),
        ended: false,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            if st.ended {
                return None;
            }
            let next = match st.heartbeat_due() {
                Some(due) => match tokio::time::timeout_at(due, st.batches.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        let b = st.send(FlowBatch::default());
                        return Some((b, st));
                    }
                },
                None => st.batches.next().await,
            };
            let batch = match next {
                Some(Ok(b)) => b,
                Some(Err(e)) => {
                    st.ended = true;
                    return Some((Err(e), st));
                }
                None => return None,
            };
            if batch.watermark_ns > st.known {
                st.known = batch.watermark_ns;
            }
            let news = !(batch.flows.is_empty() && batch.events.is_empty());
            if news
                || st
                    .heartbeat_due()
                    .is_some_and(|d| d <= tokio::time::Instant::now())
            {
                let b = st.send(batch);
                return Some((b, st));
            }
        }
    })
}

#[tonic::async_trait]
impl<S: FlowSource> FlowBatches for FlowBatchesService<S> {
    type GetFlowBatchesStream = BatchStream;

    async fn get_flow_batches(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowBatchesStream>, Status> {
        let items = self.source.flow_items(request).await?;
        Ok(Response::new(Box::pin(batch_items(items, self.heartbeat))))
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
    /// The node's watermark after these flows (FlowBatches from a node that promises one).
    pub watermark: Option<i64>,
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
                let watermark = batch.watermark_ns;
                let flows = unbatch(batch, names, &mut events);
                Ok(Some(NodeChunk {
                    flows,
                    events,
                    watermark,
                }))
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
                        Ok(Some(NodeChunk {
                            flows,
                            events,
                            watermark: None,
                        }))
                    }
                    None => Ok(Some(NodeChunk {
                        flows,
                        events,
                        watermark: None,
                    })),
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
        let items = futures::stream::iter(input).map(|r| r.map(SourceItem::Response));
        let batches: Vec<FlowBatch> = batch_items(items, Duration::from_millis(10))
            .map(|b| b.expect("ok"))
            .collect()
            .await;
        assert_eq!(batches.len(), 1, "everything was ready: one batch");
        let b = batches.into_iter().next().expect("one");
        assert_eq!(b.times_ns, vec![1, 2, 3]);
        assert_eq!(b.node_names, vec!["a".to_string()]);
        assert!(b.node_index.is_empty());
        assert_eq!(b.events.len(), 1);
        assert_eq!(b.watermark_ns, None, "a plain Observer promises nothing");
        let mut names = Vec::new();
        let mut events = Vec::new();
        let flows = unbatch(b, &mut names, &mut events);
        assert_eq!(flows.len(), 3);
        assert_eq!(flows[2].to_response().expect("decodes"), resp("a", 3));
        assert_eq!(events.len(), 1);
    }

    #[tokio::test]
    async fn watermarks_ride_on_batches_and_alone_after_a_heartbeat() {
        let heartbeat = Duration::from_millis(40);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mut batches = Box::pin(batch_items(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            heartbeat,
        ));
        let item = |i: SourceItem| Ok::<_, Status>(i);
        async fn next<S: Stream<Item = Result<FlowBatch, Status>> + Unpin>(s: &mut S) -> FlowBatch {
            tokio::time::timeout(Duration::from_secs(5), s.next())
                .await
                .expect("a batch")
                .expect("stream open")
                .expect("ok")
        }
        // Flows and the watermark after them: one batch carrying both.
        for i in [
            SourceItem::Response(resp("a", 1)),
            SourceItem::Response(resp("a", 2)),
            SourceItem::Watermark(5),
        ] {
            tx.send(item(i)).await.expect("open");
        }
        let b = next(&mut batches).await;
        assert_eq!((b.times_ns.clone(), b.watermark_ns), (vec![1, 2], Some(5)));
        // A newer watermark right after a batch waits for the heartbeat, and goes out alone.
        let sent = tokio::time::Instant::now();
        tx.send(item(SourceItem::Watermark(7))).await.expect("open");
        let b = next(&mut batches).await;
        assert!(sent.elapsed() >= heartbeat * 3 / 4, "{:?}", sent.elapsed());
        assert!(b.flows.is_empty() && b.events.is_empty());
        assert_eq!(b.watermark_ns, Some(7));
        // After a quiet heartbeat, a new watermark goes out at once.
        tokio::time::sleep(heartbeat * 2).await;
        let sent = tokio::time::Instant::now();
        tx.send(item(SourceItem::Watermark(9))).await.expect("open");
        let b = next(&mut batches).await;
        assert!(sent.elapsed() < heartbeat, "{:?}", sent.elapsed());
        assert_eq!(b.watermark_ns, Some(9));
        // The same watermark again is not news: nothing is sent for it.
        tx.send(item(SourceItem::Watermark(9))).await.expect("open");
        let quiet = tokio::time::timeout(heartbeat * 3, futures::StreamExt::next(&mut batches));
        assert!(quiet.await.is_err(), "no batch without anything new");
        // Flows carry the newest watermark given so far.
        tx.send(item(SourceItem::Response(resp("a", 12))))
            .await
            .expect("open");
        let b = next(&mut batches).await;
        assert_eq!((b.times_ns.clone(), b.watermark_ns), (vec![12], Some(9)));
        // An error ends the stream after what came before it.
        tx.send(Err(Status::internal("gone"))).await.expect("open");
        let end = futures::StreamExt::next(&mut batches).await;
        assert!(matches!(end, Some(Err(_))));
        drop(tx);
        assert!(futures::StreamExt::next(&mut batches).await.is_none());
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

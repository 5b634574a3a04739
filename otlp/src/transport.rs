//! How requests reach the collector: one connector (TCP, optionally rustls)
//! under both a tonic channel (gRPC) and a hyper client (HTTP/protobuf),
//! shared by the logs pipeline and the SDK's metric exporter.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::uri::PathAndQuery;
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceResponse;
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::config::{ConfigError, OtlpConfig, Protocol, Validated};
use crate::encode::LogsRequest;
use crate::tls;

const LOGS_PATH: &str = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";
/// Largest response body read (the OTLP responses are tiny).
const MAX_RESPONSE: usize = 1 << 20;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Opens a TCP connection to the configured collector, with TLS if the
/// endpoint is `https://`. The URI the client passes is ignored: there is one
/// collector per exporter.
#[derive(Clone)]
pub(crate) struct Connector {
    host: Arc<str>,
    port: u16,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    connect_timeout: Duration,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
            let tcp = tokio::time::timeout(
                this.connect_timeout,
                TcpStream::connect((&*this.host, this.port)),
            )
            .await
            .map_err(|_| timed_out())??;
            tcp.set_nodelay(true)?;
            let stream = match &this.tls {
                None => Stream::Plain(tcp),
                Some((connector, name)) => {
                    let tls = tokio::time::timeout(
                        this.connect_timeout,
                        connector.connect(name.clone(), tcp),
                    )
                    .await
                    .map_err(|_| timed_out())??;
                    Stream::Tls(Box::new(tls))
                }
            };
            Ok(TokioIo::new(stream))
        })
    }
}

/// A plain or TLS connection.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

pub(crate) type HttpClient = Client<Connector, Full<Bytes>>;

/// Why an export attempt failed.
#[derive(Debug, Clone)]
pub(crate) struct SendError {
    /// Worth trying again (collector unreachable, overloaded, restarting).
    pub retryable: bool,
    pub message: String,
    /// The collector's Retry-After, when it sent one.
    pub retry_after: Option<Duration>,
}

impl SendError {
    fn retryable(message: String) -> Self {
        Self {
            retryable: true,
            message,
            retry_after: None,
        }
    }
}

/// The transport of one exporter.
#[derive(Clone)]
pub(crate) enum Transport {
    Grpc {
        channel: Channel,
        metadata: MetadataMap,
    },
    Http(Arc<HttpTransport>),
}

/// OTLP/HTTP client and signal URLs.
pub(crate) struct HttpTransport {
    pub client: HttpClient,
    pub logs_uri: Uri,
    pub metrics_uri: Uri,
    pub headers: HeaderMap,
}

impl Transport {
    /// Builds the transport; connects lazily, so a collector that is down at
    /// start-up is not an error. Must run inside a Tokio runtime.
    pub(crate) fn new(cfg: &OtlpConfig, v: &Validated) -> Result<Self, ConfigError> {
        let ep = &v.endpoint;
        let alpn: &[u8] = match cfg.protocol {
            Protocol::Grpc => b"h2",
            Protocol::HttpProtobuf => b"http/1.1",
        };
        let tls = if ep.tls {
            let config = tls::client_config(&cfg.tls, alpn)?;
            let name =
                tls::server_name(&ep.host).map_err(|reason| ConfigError::InvalidEndpoint {
                    endpoint: ep.display.clone(),
                    reason,
                })?;
            Some((TlsConnector::from(config), name))
        } else {
            None
        };
        let connector = Connector {
            host: ep.host.as_str().into(),
            port: ep.port,
            tls,
            connect_timeout: cfg.timeout,
        };
        let mut headers = HeaderMap::new();
        for (k, v) in &v.headers {
            headers.append(k.clone(), v.clone());
        }
        Ok(match cfg.protocol {
            Protocol::Grpc => {
                let channel = tonic::transport::Endpoint::from(ep.grpc_uri.clone())
                    // Collector restarts are the common outage: find out fast.
                    .http2_keep_alive_interval(Duration::from_secs(30))
                    .keep_alive_timeout(cfg.timeout)
                    .connect_with_connector_lazy(connector);
                Transport::Grpc {
                    channel,
                    metadata: MetadataMap::from_headers(headers),
                }
            }
            Protocol::HttpProtobuf => Transport::Http(Arc::new(HttpTransport {
                client: Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(60))
                    .build(connector),
                logs_uri: ep.http_logs_uri.clone(),
                metrics_uri: ep.http_metrics_uri.clone(),
                headers,
            })),
        })
    }

    /// Sends one encoded `ExportLogsServiceRequest`; on success returns how
    /// many records the collector said it rejected (partial success).
    pub(crate) async fn export_logs(
        &self,
        req: &LogsRequest,
        timeout: Duration,
    ) -> Result<u64, SendError> {
        let attempt = async {
            match self {
                Transport::Grpc { channel, metadata } => {
                    grpc_export(channel.clone(), metadata.clone(), req.clone()).await
                }
                Transport::Http(h) => {
                    http_export(&h.client, &h.logs_uri, &h.headers, req.to_bytes()).await
                }
            }
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(SendError::retryable(format!(
                "no answer within {}",
                humantime::format_duration(timeout)
            ))),
        }
    }
}

async fn grpc_export(
    channel: Channel,
    metadata: MetadataMap,
    body: LogsRequest,
) -> Result<u64, SendError> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| SendError::retryable(format!("connection not ready: {e}")))?;
    let mut req = tonic::Request::new(body);
    *req.metadata_mut() = metadata;
    match grpc
        .unary(req, PathAndQuery::from_static(LOGS_PATH), RawCodec)
        .await
    {
        Ok(resp) => Ok(resp
            .into_inner()
            .partial_success
            .map_or(0, |p| p.rejected_log_records.max(0) as u64)),
        Err(status) => Err(SendError {
            retryable: grpc_retryable(status.code()),
            message: status_message(&status),
            retry_after: None,
        }),
    }
}

/// The OTLP spec's retryable gRPC codes.
fn grpc_retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Cancelled
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::OutOfRange
            | Code::Unavailable
            | Code::DataLoss
    )
}

fn status_message(s: &Status) -> String {
    let mut m = format!("gRPC {:?}: {}", s.code(), s.message());
    let mut src = std::error::Error::source(s);
    while let Some(e) = src {
        let text = e.to_string();
        // tonic repeats its sources in its messages.
        if !m.contains(&text) {
            m.push_str(": ");
            m.push_str(&text);
        }
        src = e.source();
    }
    m
}

async fn http_export(
    client: &HttpClient,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<u64, SendError> {
    let mut req = Request::post(uri.clone())
        .body(Full::new(body))
        .map_err(|e| SendError {
            retryable: false,
            message: format!("cannot build request: {e}"),
            retry_after: None,
        })?;
    req.headers_mut().extend(headers.clone());
    req.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-protobuf"),
    );
    let resp = client
        .request(req)
        .await
        .map_err(|e| SendError::retryable(format!("HTTP request failed: {}", chain(&e))))?;
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let body = Limited::new(resp.into_body(), MAX_RESPONSE)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if status.is_success() {
        let rejected = ExportLogsServiceResponse::decode(body)
            .ok()
            .and_then(|r| r.partial_success)
            .map_or(0, |p| p.rejected_log_records.max(0) as u64);
        return Ok(rejected);
    }
    Err(SendError {
        retryable: http_retryable(status),
        message: format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)]).trim()
        ),
        retry_after,
    })
}

/// The OTLP spec's retryable HTTP statuses.
fn http_retryable(s: StatusCode) -> bool {
    matches!(s.as_u16(), 429 | 502 | 503 | 504)
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut m = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !m.contains(&text) {
            m.push_str(": ");
            m.push_str(&text);
        }
        src = s.source();
    }
    m
}

/// Writes the already encoded records into tonic's buffer in one pass and
/// decodes the logs response.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

#[derive(Debug, Clone, Copy, Default)]
struct RawEncoder;

#[derive(Debug, Clone, Copy, Default)]
struct ResponseDecoder;

impl Codec for RawCodec {
    type Encode = LogsRequest;
    type Decode = ExportLogsServiceResponse;
    type Encoder = RawEncoder;
    type Decoder = ResponseDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> ResponseDecoder {
        ResponseDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = LogsRequest;
    type Error = Status;

    fn encode(&mut self, item: LogsRequest, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.envelope.write_request(&item.records, dst);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        // Batches are large: start big rather than doubling up to them.
        BufferSettings::new(256 * 1024, 32 * 1024)
    }
}

impl Decoder for ResponseDecoder {
    type Item = ExportLogsServiceResponse;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        let len = src.remaining();
        ExportLogsServiceResponse::decode(src.copy_to_bytes(len))
            .map(Some)
            .map_err(|e| Status::internal(format!("bad ExportLogsServiceResponse: {e}")))
    }
}

/// `opentelemetry_http::HttpClient` over our hyper client, for the SDK's
/// metric exporter. The SDK's periodic reader runs on its own thread outside
/// Tokio, so each request runs as a task on the exporter's runtime.
#[derive(Clone)]
pub(crate) struct OtelHttpClient {
    pub client: HttpClient,
    pub runtime: Handle,
    pub timeout: Duration,
}

impl std::fmt::Debug for OtelHttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OtelHttpClient")
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OtelHttpClient {
    async fn send_bytes(
        &self,
        request: Request<Bytes>,
    ) -> Result<Response<Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        let timeout = self.timeout;
        let task = self.runtime.spawn(async move {
            let resp = tokio::time::timeout(timeout, client.request(request.map(Full::new)))
                .await
                .map_err(|_| -> BoxError { "OTLP HTTP request timed out".into() })?
                .map_err(|e| -> BoxError { chain(&e).into() })?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| -> BoxError { e.to_string().into() })?
                .to_bytes();
            Ok::<_, BoxError>(Response::from_parts(parts, body))
        });
        task.await
            .map_err(|e| -> BoxError { e.to_string().into() })?
    }
}

/// Polls a future with the runtime entered, so Tokio timers and tasks work
/// from the SDK's reader thread.
pub(crate) struct InRuntime<F> {
    pub runtime: Handle,
    pub fut: Pin<Box<F>>,
}

impl<F: Future> Future for InRuntime<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let _entered = this.runtime.enter();
        this.fut.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_classes_follow_the_spec() {
        assert!(grpc_retryable(Code::Unavailable));
        assert!(grpc_retryable(Code::ResourceExhausted));
        assert!(!grpc_retryable(Code::InvalidArgument));
        assert!(!grpc_retryable(Code::Unauthenticated));
        assert!(http_retryable(StatusCode::SERVICE_UNAVAILABLE));
        assert!(http_retryable(StatusCode::TOO_MANY_REQUESTS));
        assert!(!http_retryable(StatusCode::BAD_REQUEST));
        assert!(!http_retryable(StatusCode::UNAUTHORIZED));
    }
}

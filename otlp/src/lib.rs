//! OTLP export of Lumen flows to any OpenTelemetry collector: flow metrics
//! (on by default) and one log record per flow (opt-in), over gRPC or
//! HTTP/protobuf.
//!
//! The embedding program (the relay) starts one [`OtlpExporter`] from its
//! [`OtlpConfig`], hands each flow to [`FlowRecorder::record`] and calls
//! [`OtlpExporter::shutdown`] when it stops. `record` never blocks and never
//! waits on the network:
//!
//! - **metrics**: the flow is counted in a pre-aggregated table (one lock,
//!   one hash lookup). The OpenTelemetry SDK's periodic reader reads the table
//!   through observable counters every `export_interval` and pushes cumulative
//!   totals with `opentelemetry-otlp`; a failed push is made good by the next.
//! - **logs**: flows pass the allow/deny FlowFilters and per-connection
//!   sampling, are encoded as OTLP LogRecords in the caller and queued in a
//!   bounded queue (full: the new record is dropped and counted). The
//!   `otlp_logs` task batches the queue and exports with retry and backoff.
//!
//! The exporter's own counters are served as Prometheus metrics
//! ([`OtlpExporter::register_metrics`]) and as an [`OtlpStatus`] snapshot.
//! docs/otlp.md lists every exported name.

mod attrs;
pub mod config;
mod encode;
mod logs;
mod metrics;
mod stats;
mod tls;
mod transport;

use std::sync::Arc;
use std::time::Duration;

use lumen_proto::flow::{Flow, LostEvent, LostEventSource};
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{
    Instrument, PeriodicReader, SdkMeterProvider, Stream, Temporality,
};
use opentelemetry_sdk::Resource;
use prometheus_client::registry::Registry;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use config::{
    ConfigError, FilterSpec, LogsConfig, MetricsConfig, OtlpConfig, Protocol, ResourceConfig,
    RetryConfig, TlsConfig,
};
pub use stats::{
    names as metric_names, DiscardedCounts, LogsStatus, MetricsStatus, OtlpStatus, SignalStatus,
};

use crate::logs::LogsInput;
use crate::metrics::{FlowMetrics, Instruments};
use crate::stats::Stats;
use crate::transport::{InRuntime, OtelHttpClient, Transport};

/// The exporter could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A setting is wrong; the message names it.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The SDK's OTLP metric exporter refused the settings.
    #[error("cannot build the OTLP metric exporter: {0}")]
    MetricExporter(String),
    /// `start` was called outside a Tokio runtime.
    #[error("the OTLP exporter must be started inside a Tokio runtime")]
    NoRuntime,
}

/// The running exporter. Dropping it without [`shutdown`](Self::shutdown)
/// stops the logs task at once (queued records are counted as `shutdown`)
/// and flushes metrics in the background.
pub struct OtlpExporter {
    recorder: FlowRecorder,
    provider: Option<SdkMeterProvider>,
    _instruments: Option<Instruments>,
    logs_task: Option<JoinHandle<()>>,
    shutdown: watch::Sender<Option<Instant>>,
}

/// The cheap, cloneable handle the relay calls for every flow.
#[derive(Clone)]
pub struct FlowRecorder {
    inner: Arc<Inner>,
}

struct Inner {
    stats: Arc<Stats>,
    metrics: Option<Arc<FlowMetrics>>,
    logs: Option<LogsInput>,
    endpoint: String,
    protocol: Protocol,
}

impl FlowRecorder {
    /// Counts `flow` in the metrics and, when logs are on and it passes the
    /// filters and sampling, queues its log record. `node` is the name of the
    /// node that observed it (empty: the flow's own `node_name`).
    pub fn record(&self, flow: &Flow, node: &str) {
        let i = &*self.inner;
        i.stats.flows.inc();
        if let Some(m) = &i.metrics {
            m.record(flow, node);
        }
        if let Some(l) = &i.logs {
            l.offer(flow, node, &i.stats);
        }
    }

    /// Adds `count` events lost at `stage` (e.g. `relay_merge_queue`) on
    /// `node` to the `lumen.lost_events` metric.
    pub fn record_lost(&self, stage: &str, node: &str, count: u64) {
        if let Some(m) = &self.inner.metrics {
            m.record_lost(stage, node, count);
        }
    }

    /// Adds a node's `LostEvent` notification to `lumen.lost_events`.
    pub fn record_lost_event(&self, lost: &LostEvent, node: &str) {
        self.record_lost(lost_stage(lost.source), node, lost.num_events_lost);
    }

    /// Counters and health for `lumen status`.
    pub fn status(&self) -> OtlpStatus {
        let i = &*self.inner;
        i.stats.status(
            &i.endpoint,
            i.protocol,
            i.metrics.is_some(),
            i.logs.is_some(),
            i.logs.as_ref().map_or(0, LogsInput::queue_length),
        )
    }
}

/// `lumen.stage` of a node's lost-event source.
pub fn lost_stage(source: i32) -> &'static str {
    match LostEventSource::try_from(source) {
        Ok(LostEventSource::PerfEventRingBuffer) => "bpf_ring_buffer",
        Ok(LostEventSource::ObserverEventsQueue) => "node_events_queue",
        Ok(LostEventSource::HubbleRingBuffer) => "node_flow_ring",
        _ => "unknown",
    }
}

impl OtlpExporter {
    /// Checks `config` and starts exporting. Connections are made lazily: a
    /// collector that is down now is retried, not an error. `instance` names
    /// this exporter (`service.instance.id`) unless the config does.
    pub fn start(config: &OtlpConfig, instance: &str) -> Result<Self, StartError> {
        let runtime = Handle::try_current().map_err(|_| StartError::NoRuntime)?;
        let v = config.check()?;
        let transport = Transport::new(config, &v)?;
        let stats = Arc::new(Stats::new());
        let resource = resource_attributes(config, instance);
        let (shutdown, shutdown_rx) = watch::channel(None);

        let (logs, logs_task) = if config.logs.enabled {
            let (input, task) = logs::pipeline(
                config,
                v.filters.clone(),
                transport.clone(),
                encode::LogsEnvelope::new(&resource),
                Arc::clone(&stats),
                shutdown_rx,
            );
            (Some(input), Some(tokio::spawn(task.run())))
        } else {
            (None, None)
        };

        let (provider, metrics, instruments) = if config.metrics.enabled {
            let exporter = CountingExporter {
                inner: metric_exporter(config, &transport, &runtime)?,
                stats: Arc::clone(&stats),
                runtime,
                // The SDK's exporter has no per-attempt timeout of its own.
                timeout: config.timeout,
            };
            let reader = PeriodicReader::builder(exporter)
                .with_interval(config.export_interval)
                .build();
            let limit = config.metrics.max_series + 16;
            let provider = SdkMeterProvider::builder()
                .with_resource(
                    Resource::builder_empty()
                        .with_attributes(
                            resource
                                .iter()
                                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
                        )
                        .build(),
                )
                .with_reader(reader)
                .with_view(move |i: &Instrument| {
                    (i.name() == attrs::METRIC_FLOWS || i.name() == attrs::METRIC_HANDSHAKE_RTT)
                        .then(|| Stream::builder().with_cardinality_limit(limit).build().ok())
                        .flatten()
                })
                .build();
            let meter = provider.meter_with_scope(
                InstrumentationScope::builder(attrs::SCOPE_NAME)
                    .with_version(env!("CARGO_PKG_VERSION"))
                    .build(),
            );
            let (m, i) = metrics::instruments(
                &meter,
                config.metrics.max_series,
                Arc::clone(&stats),
                logs.is_some(),
            );
            (Some(provider), Some(m), Some(i))
        } else {
            (None, None, None)
        };

        tracing::info!(
            endpoint = %v.endpoint.display,
            protocol = %config.protocol,
            metrics = config.metrics.enabled,
            logs = config.logs.enabled,
            "OTLP export started"
        );
        Ok(Self {
            recorder: FlowRecorder {
                inner: Arc::new(Inner {
                    stats,
                    metrics,
                    logs,
                    endpoint: v.endpoint.display.clone(),
                    protocol: config.protocol,
                }),
            },
            provider,
            _instruments: instruments,
            logs_task,
            shutdown,
        })
    }

    /// A handle for the flow path; clone it freely.
    pub fn recorder(&self) -> FlowRecorder {
        self.recorder.clone()
    }

    /// Same as `self.recorder().record(flow, node)`.
    pub fn record(&self, flow: &Flow, node: &str) {
        self.recorder.record(flow, node);
    }

    /// Counters and health for `lumen status`.
    pub fn status(&self) -> OtlpStatus {
        self.recorder.status()
    }

    /// Registers the exporter's own counters (names in [`metric_names`]) in
    /// the relay's Prometheus registry, at its root (names carry `lumen_`).
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.recorder.inner.stats.register(registry);
    }

    /// Pushes metrics now instead of at the next interval. Blocks while the
    /// export runs: call it from a blocking context.
    pub fn flush_metrics_blocking(&self) -> Result<(), String> {
        match &self.provider {
            Some(p) => p.force_flush().map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    /// Stops exporting: queued log records are sent until `grace` runs out
    /// (the rest are counted as `shutdown`), then metrics are pushed one last
    /// time. Returns the final counters.
    pub async fn shutdown(mut self, grace: Duration) -> OtlpStatus {
        let deadline = Instant::now() + grace;
        let _ = self.shutdown.send(Some(deadline));
        if let Some(mut task) = self.logs_task.take() {
            // The task stops at the deadline; a margin for the last request.
            if tokio::time::timeout_at(deadline + Duration::from_millis(250), &mut task)
                .await
                .is_err()
            {
                task.abort();
                let left = self
                    .recorder
                    .inner
                    .logs
                    .as_ref()
                    .map_or(0, LogsInput::queue_length);
                self.recorder
                    .inner
                    .stats
                    .discard(stats::Discard::Shutdown, left as u64);
            }
        }
        if let Some(provider) = self.provider.take() {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_secs(1));
            let done =
                tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(left)).await;
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "final OTLP metrics push failed"),
                Err(e) => tracing::warn!(error = %e, "final OTLP metrics push panicked"),
            }
        }
        self.status()
    }
}

impl Drop for OtlpExporter {
    fn drop(&mut self) {
        let _ = self.shutdown.send(Some(Instant::now()));
        if let Some(p) = self.provider.take() {
            // The SDK flushes on shutdown and blocks doing it; never on a
            // runtime thread.
            std::thread::spawn(move || {
                let _ = p.shutdown();
            });
        }
    }
}

fn resource_attributes(config: &OtlpConfig, instance: &str) -> Vec<(String, String)> {
    let r = &config.resource;
    let mut out = vec![
        (attrs::SERVICE_NAME.to_string(), r.service_name.clone()),
        (
            attrs::SERVICE_VERSION.to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
    ];
    let instance = r.instance.as_deref().unwrap_or(instance);
    if !instance.is_empty() {
        out.push((attrs::SERVICE_INSTANCE_ID.to_string(), instance.to_string()));
    }
    if let Some(c) = r.cluster.as_deref().filter(|c| !c.is_empty()) {
        out.push((attrs::K8S_CLUSTER_NAME.to_string(), c.to_string()));
    }
    for (k, v) in &r.attributes {
        match out.iter_mut().find(|(ok, _)| ok == k) {
            Some(slot) => slot.1 = v.clone(),
            None => out.push((k.clone(), v.clone())),
        }
    }
    out
}

fn metric_exporter(
    config: &OtlpConfig,
    transport: &Transport,
    runtime: &Handle,
) -> Result<opentelemetry_otlp::MetricExporter, StartError> {
    // No retry inside one push: the totals are cumulative, so the next
    // interval's push makes up for a failed one, and a retrying push would
    // hold up the SDK's reader thread.
    let retry = opentelemetry_otlp::RetryPolicy::disabled();
    let built = match transport {
        Transport::Grpc { channel, metadata } => opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_channel(channel.clone())
            .with_metadata(metadata.clone())
            .with_timeout(config.timeout)
            .with_retry_policy(retry)
            .build(),
        Transport::Http(http) => opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(http.metrics_uri.to_string())
            .with_http_client(OtelHttpClient {
                client: http.client.clone(),
                runtime: runtime.clone(),
                timeout: config.timeout,
            })
            .with_headers(
                http.headers
                    .iter()
                    .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_string())))
                    .collect(),
            )
            .with_timeout(config.timeout)
            .with_retry_policy(retry)
            .build(),
    };
    built.map_err(|e| StartError::MetricExporter(e.to_string()))
}

/// Counts metric pushes for the status and runs them on the exporter's
/// runtime with a time limit.
struct CountingExporter<E> {
    inner: E,
    stats: Arc<Stats>,
    runtime: Handle,
    timeout: Duration,
}

impl<E: PushMetricExporter> PushMetricExporter for CountingExporter<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let timeout = self.timeout;
        let attempt = async {
            match tokio::time::timeout(timeout, self.inner.export(metrics)).await {
                Ok(r) => r,
                Err(_) => Err(OTelSdkError::Timeout(timeout)),
            }
        };
        let result = InRuntime {
            runtime: self.runtime.clone(),
            fut: Box::pin(attempt),
        }
        .await;
        match &result {
            Ok(()) => self.stats.metrics.success(),
            Err(e) => self.stats.metrics.failure(&e.to_string()),
        }
        result
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

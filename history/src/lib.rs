//! Lumen's flow history in ClickHouse: schema and migrations, a batching writer with a disk
//! spool that loses nothing across outages and inserts nothing twice, and a history reader
//! with `GetFlows` filter semantics.
//!
//! How the relay uses it:
//!
//! ```no_run
//! # async fn relay(flows: Vec<lumen_proto::flow::Flow>) -> Result<(), lumen_history::HistoryError> {
//! use lumen_history::{History, HistoryConfig, HistoryMetrics, HistoryQuery};
//! let mut registry = prometheus_client::registry::Registry::default();
//! let metrics = HistoryMetrics::default();
//! metrics.register(&mut registry);
//! let history = History::start(&HistoryConfig::default(), metrics).await?; // migrates
//! history.writer().submit(flows).await.ok(); // or try_submit, counting refusals
//! let past = history
//!     .reader()
//!     .flows(&HistoryQuery { limit: Some(100), ..Default::default() }, |_| true)
//!     .await?;
//! # let _ = past;
//! history.shutdown(std::time::Duration::from_secs(5)).await;
//! # Ok(()) }
//! ```
//!
//! Modules: [`schema`] (every table, column and DDL, both flavors), [`migrate`] (versioned,
//! idempotent, locked migrations), [`writer`] (batcher → spool → inserter), [`spool`]
//! (checksummed segment files), [`reader`] (history queries), [`queries`] (every shipped
//! query), [`retention`] (partition drops on the compatible schema), [`metrics`].

pub mod config;
pub mod error;
pub mod metrics;
pub mod migrate;
pub mod queries;
pub mod reader;
pub mod retention;
pub mod row;
pub(crate) mod rowbinary;
pub mod schema;
pub mod spool;
pub mod writer;

use std::time::Duration;

use tokio::task::JoinHandle;
use tracing::{info_span, warn, Instrument};

pub use config::HistoryConfig;
pub use error::HistoryError;
pub use metrics::HistoryMetrics;
pub use migrate::SchemaInfo;
pub use reader::{HistoryQuery, HistoryReader};
pub use rowbinary::DecodeError;
pub use writer::{HistoryWriter, Refused, ShutdownReport, WriterStatus};

/// Writer, reader and retention for one database, started together.
pub struct History {
    schema: SchemaInfo,
    writer: HistoryWriter,
    reader: HistoryReader,
    retention: Option<JoinHandle<()>>,
}

impl History {
    /// Migrates (when `cfg.migrate`), checks the schema version, replays the spool and
    /// starts writing. When ClickHouse cannot be reached but a previous run recorded the
    /// schema in the spool directory, starts anyway and spools; the schema is brought up to
    /// date when ClickHouse answers. Otherwise fails.
    pub async fn start(cfg: &HistoryConfig, metrics: HistoryMetrics) -> Result<Self, HistoryError> {
        cfg.validate()?;
        let client = migrate::client(&cfg.clickhouse);
        let found = if cfg.migrate {
            migrate::migrate(&client, cfg).await
        } else {
            migrate::inspect(&client, cfg).await
        };
        let (schema, confirmed) = match found {
            Ok(info) => {
                migrate::require_current(&info)?;
                migrate::save_schema_hint(&cfg.spool.dir, &info);
                (info, true)
            }
            Err(e) if e.is_unreachable() => {
                let Some((flavor, version)) =
                    migrate::load_schema_hint(&cfg.spool.dir, &cfg.clickhouse.database)
                else {
                    return Err(e);
                };
                warn!(error = %e, flavor = flavor.as_str(), "ClickHouse unreachable at start; spooling until it answers");
                let info = SchemaInfo {
                    database: cfg.clickhouse.database.clone(),
                    flavor,
                    version,
                    server_version: String::new(),
                };
                (info, false)
            }
            Err(e) => return Err(e),
        };
        let writer =
            HistoryWriter::start_with(cfg, schema.flavor, confirmed, metrics.clone()).await?;
        let reader = HistoryReader::new(cfg, &schema);
        let retention = (schema.flavor == schema::Flavor::Compat).then(|| {
            let cfg = cfg.clone();
            tokio::spawn(
                async move {
                    let mut tick = tokio::time::interval(cfg.retention_interval);
                    loop {
                        tick.tick().await;
                        if let Err(e) = retention::drop_expired(&client, &cfg, &metrics).await {
                            warn!(error = %e, "dropping expired history partitions failed");
                        }
                    }
                }
                .instrument(info_span!("history_retention")),
            )
        });
        Ok(Self {
            schema,
            writer,
            reader,
            retention,
        })
    }

    pub fn schema(&self) -> &SchemaInfo {
        &self.schema
    }

    pub fn writer(&self) -> &HistoryWriter {
        &self.writer
    }

    pub fn reader(&self) -> &HistoryReader {
        &self.reader
    }

    /// Time (ns) of the newest flow history already has — in ClickHouse or in the spool
    /// from an earlier run — looking back to `since_ns`. A relay restarting resumes after
    /// it, so flows its nodes still hold from while it was away are not missing from
    /// history, and none is stored twice. `None` when nothing that recent is stored or
    /// ClickHouse cannot be asked (then only the spool counts).
    pub async fn newest_taken_ns(&self, since_ns: i64) -> Option<i64> {
        let stored = match self.reader.newest_ns(since_ns).await {
            Ok(t) => t,
            Err(e) => {
                warn!(error = %e, "cannot ask ClickHouse for the newest stored flow");
                None
            }
        };
        let spooled = self.writer.spooled_max_time_ns().filter(|t| *t >= since_ns);
        stored.max(spooled)
    }

    /// Stops the writer (see [`HistoryWriter::shutdown`]) and the retention task.
    pub async fn shutdown(&self, grace: Duration) -> ShutdownReport {
        if let Some(r) = &self.retention {
            r.abort();
        }
        self.writer.shutdown(grace).await
    }
}

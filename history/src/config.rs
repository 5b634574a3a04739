//! The `history` section of the relay's configuration.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::HistoryError;
use crate::schema::{valid_database_name, Retention};

/// Which schema flavor to install on a fresh database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SchemaChoice {
    /// Modern on ClickHouse 23.8+, compatible on older servers. An existing database keeps
    /// the flavor recorded in its migrations table.
    #[default]
    Auto,
    Modern,
    Compat,
}

/// Connection to ClickHouse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClickHouseConfig {
    /// HTTP interface, e.g. `http://127.0.0.1:8123`.
    pub url: String,
    pub database: String,
    pub user: Option<String>,
    pub password: Option<String>,
    /// Limit on one insert or query round trip.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8123".into(),
            database: "lumen".into(),
            user: None,
            password: None,
            // Generous for a 100k-row insert with materialized views on a busy server, short
            // enough that a hung connection is noticed and the batch spooled and retried.
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// When an open batch is sealed and sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    pub max_rows: usize,
    pub max_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            // ClickHouse's guidance: large batches (10k-100k rows, at least 1k) and about one
            // insert per second per table, so parts merge away instead of piling up.
            max_rows: 100_000,
            // Caps memory per batch; ~250 bytes per flow row makes 100k rows ~25 MB.
            max_bytes: 32 << 20,
            max_delay: Duration::from_secs(1),
        }
    }
}

/// The disk spool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    /// Bound on the bytes of pending batches; when reached, the writer applies backpressure.
    pub max_bytes: u64,
    /// fsync each segment before acknowledging it (off only for benchmarks or tmpfs).
    pub fsync: bool,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/var/lib/lumen/history-spool"),
            // 1 GiB holds ~4M flows: over an hour of a busy relay at 1k flows/s.
            max_bytes: 1 << 30,
            fsync: true,
        }
    }
}

/// Insert retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Attempts for an unrecognised error before the batch is dead-lettered. Transient
    /// errors (ClickHouse away) are retried for as long as it takes.
    pub unknown_error_attempts: u32,
    /// Attempts for an error that says the data or schema is wrong before the batch is
    /// dead-lettered. More than one: a server shutting down answers inserts with such
    /// errors (tables detaching, request bodies cut), which do not repeat once it is back.
    pub permanent_error_attempts: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(200),
            // Reconnects within seconds of ClickHouse returning, without hammering it meanwhile.
            max_backoff: Duration::from_secs(10),
            unknown_error_attempts: 5,
            permanent_error_attempts: 3,
        }
    }
}

/// The `history` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    pub clickhouse: ClickHouseConfig,
    /// Apply migrations at start (otherwise the schema must already be current).
    pub migrate: bool,
    pub schema: SchemaChoice,
    pub retention: Retention,
    /// How often the writer drops expired partitions (compatible schema only).
    #[serde(with = "humantime_serde")]
    pub retention_interval: Duration,
    pub batch: BatchConfig,
    pub spool: SpoolConfig,
    pub retry: RetryConfig,
    /// Submissions (each a `Vec<Flow>`) queued in front of the batcher.
    pub queue_capacity: usize,
    /// Connections without an event for this long are forgotten by the delta tracker.
    #[serde(with = "humantime_serde")]
    pub connection_idle: Duration,
    /// Bound on connections the delta tracker remembers.
    pub max_tracked_connections: usize,
    /// How long to wait for the migration lock before breaking it.
    #[serde(with = "humantime_serde")]
    pub migration_lock_timeout: Duration,
    /// How far back a starting relay looks for the newest flow history already has, to
    /// resume after it: flows the nodes still hold from while the relay was away (a
    /// restart, a crash) are then stored too. 0 disables resuming (history starts with
    /// the relay's start).
    #[serde(with = "humantime_serde")]
    pub resume_window: Duration,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            clickhouse: ClickHouseConfig::default(),
            migrate: true,
            schema: SchemaChoice::Auto,
            retention: Retention::default(),
            retention_interval: Duration::from_secs(3600),
            batch: BatchConfig::default(),
            spool: SpoolConfig::default(),
            retry: RetryConfig::default(),
            // Small: the spool is the buffer; this only smooths bursts between batches.
            queue_capacity: 1024,
            // Longer than the datapath's update interval for long-lived flows.
            connection_idle: Duration::from_secs(15 * 60),
            max_tracked_connections: 1_000_000,
            // Node rings hold minutes to hours of flows; older gaps cannot be filled.
            resume_window: Duration::from_secs(3600),
            // Migrations are a handful of DDL statements; a lock older than this is stale.
            migration_lock_timeout: Duration::from_secs(60),
        }
    }
}

impl HistoryConfig {
    /// Checks values a typo could make nonsensical.
    pub fn validate(&self) -> Result<(), HistoryError> {
        let bad = |field, reason: &str| {
            Err(HistoryError::Config {
                field,
                reason: reason.to_owned(),
            })
        };
        if !valid_database_name(&self.clickhouse.database) {
            return bad("clickhouse.database", "use letters, digits and '_' only");
        }
        if !self.clickhouse.url.starts_with("http://")
            && !self.clickhouse.url.starts_with("https://")
        {
            return bad("clickhouse.url", "must start with http:// or https://");
        }
        if self.batch.max_rows == 0 || self.batch.max_rows > 1_000_000 {
            // One insert must stay one block (max_insert_block_size) for the landed check.
            return bad("batch.max_rows", "must be between 1 and 1000000");
        }
        if self.batch.max_delay.is_zero() {
            return bad("batch.max_delay", "must be positive");
        }
        if self.queue_capacity == 0 {
            return bad("queue_capacity", "must be positive");
        }
        if self.spool.max_bytes < self.batch.max_bytes as u64 {
            return bad(
                "spool.max_bytes",
                "must hold at least one batch (batch.max_bytes)",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_unknown_fields_are_rejected() {
        HistoryConfig::default()
            .validate()
            .expect("defaults are valid");
        let err = serde_json::from_str::<HistoryConfig>(r#"{"batch": {"max_rowz": 5}}"#)
            .expect_err("typo rejected");
        assert!(err.to_string().contains("max_rowz"), "{err}");
        let c: HistoryConfig = serde_json::from_str(
            r#"{"batch": {"max_delay": "250ms"}, "retention": {"flows_days": 3}}"#,
        )
        .expect("parses");
        assert_eq!(c.batch.max_delay, Duration::from_millis(250));
        assert_eq!(c.retention.flows_days, 3);
        assert_eq!(c.retention.flows_1m_days, 90);
    }

    #[test]
    fn bad_database_names_are_refused() {
        let mut c = HistoryConfig::default();
        c.clickhouse.database = "x; DROP TABLE y".into();
        assert!(c.validate().is_err());
    }
}

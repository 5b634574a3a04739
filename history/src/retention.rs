//! Retention for the compatible schema: drop day partitions older than each table's limit.
//!
//! The modern schema uses TTL (set by the migrations); 18.16 has no TTL, so the writer runs
//! this every `retention_interval`. Partitions are `toYYYYMMDD(time)` in the server's time
//! zone, so a table keeps between `days` and `days + 1` days of data.

use clickhouse::Client;
use tracing::{info, warn};

use crate::config::HistoryConfig;
use crate::error::HistoryError;
use crate::metrics::HistoryMetrics;
use crate::queries;

/// Drops expired partitions of every table with a retention; returns `(table, partition)`s.
pub async fn drop_expired(
    client: &Client,
    cfg: &HistoryConfig,
    metrics: &HistoryMetrics,
) -> Result<Vec<(&'static str, u32)>, HistoryError> {
    let db = &cfg.clickhouse.database;
    let mut dropped = Vec::new();
    for (table, _, days) in cfg.retention.tables() {
        if days == 0 {
            continue;
        }
        let parts: Vec<String> = queries::expired_partitions(db, table, days)
            .to_query(client)
            .fetch_all()
            .await
            .map_err(HistoryError::ch("listing expired partitions"))?;
        for p in parts {
            // A YYYYMMDD number from system.parts; parsed, so nothing but digits is spliced.
            let Ok(day) = p.parse::<u32>() else {
                warn!(table, partition = %p, "unexpected partition value; not dropping it");
                continue;
            };
            client
                .query(&format!("ALTER TABLE {db}.{table} DROP PARTITION {day}"))
                .execute()
                .await
                .map_err(HistoryError::ch("dropping an expired partition"))?;
            info!(table, day, days, "dropped expired history partition");
            metrics.partitions_dropped.inc();
            dropped.push((table, day));
        }
    }
    Ok(dropped)
}

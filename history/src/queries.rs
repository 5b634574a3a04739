//! Every query Lumen ships against the history tables, per flavor, with `?` placeholders
//! bound client-side by the `clickhouse` crate (values are escaped, never spliced).
//!
//! The dashboard queries answer the questions the issue names: drops between two times by
//! workload pair and reason, traffic by workload pair, handshake latency quantiles. Tests run
//! each of them (rendered with sample values) on the real 18.16 server (compat) and on chDB
//! (modern).

use crate::schema::{tables, Flavor};

/// A query with `?` placeholders and the values to bind.
#[derive(Debug, Clone, PartialEq)]
pub struct SqlQuery {
    pub sql: String,
    pub binds: Vec<BindValue>,
}

/// A value bound to a `?`.
#[derive(Debug, Clone, PartialEq)]
pub enum BindValue {
    Str(String),
    U64(u64),
    I64(i64),
}

impl SqlQuery {
    pub fn new(sql: impl Into<String>) -> Self {
        Self {
            sql: sql.into(),
            binds: Vec::new(),
        }
    }

    #[must_use]
    pub fn bind(mut self, v: BindValue) -> Self {
        self.binds.push(v);
        self
    }

    /// A `clickhouse` query with the values bound.
    pub fn to_query(&self, client: &clickhouse::Client) -> clickhouse::query::Query {
        let mut q = client.query(&self.sql);
        for b in &self.binds {
            q = match b {
                BindValue::Str(s) => q.bind(s.as_str()),
                BindValue::U64(v) => q.bind(*v),
                BindValue::I64(v) => q.bind(*v),
            };
        }
        q
    }

    /// The SQL with values bound and escaped exactly as sent to the server.
    pub fn render(&self) -> String {
        self.to_query(&clickhouse::Client::default())
            .sql_display()
            .to_string()
    }
}

/// Nanoseconds since the epoch as the flavor's `time` expression bound to a `?`.
pub fn time_param(flavor: Flavor) -> &'static str {
    match flavor {
        Flavor::Modern => "fromUnixTimestamp64Nano(toInt64(?))",
        // 18.16 has no sub-second time type; compare whole seconds, then time_ns.
        Flavor::Compat => "toDateTime(intDiv(toInt64(?), 1000000000))",
    }
}

/// `time` of a `flows` row as Int64 nanoseconds.
pub fn time_ns_expr(flavor: Flavor) -> &'static str {
    match flavor {
        Flavor::Modern => "toUnixTimestamp64Nano(time)",
        Flavor::Compat => "toInt64(toUInt32(time)) * 1000000000 + time_ns",
    }
}

/// Condition `min_ns <= time <= max_ns` on `flows`, two placeholders: min, max.
pub fn time_range(flavor: Flavor) -> String {
    match flavor {
        Flavor::Modern => format!(
            "time >= {p} AND time <= {p}",
            p = time_param(Flavor::Modern)
        ),
        // Whole-second bounds prune by partition and key; the exact bound uses time_ns.
        Flavor::Compat => format!(
            "time >= {p} AND time <= {p}",
            p = time_param(Flavor::Compat)
        ),
    }
}

/// Rows of one batch in `flows` (landed check). Binds: min_ns, max_ns, batch_id.
pub fn batch_rows(flavor: Flavor, db: &str, min_ns: i64, max_ns: i64, batch_id: u64) -> SqlQuery {
    SqlQuery::new(format!(
        "SELECT count() FROM {db}.{f} WHERE {range} AND batch_id = ?",
        f = tables::FLOWS,
        range = time_range(flavor)
    ))
    .bind(BindValue::I64(min_ns))
    .bind(BindValue::I64(max_ns))
    .bind(BindValue::U64(batch_id))
}

/// Time (Int64 ns) of the newest flow in `flows` at or after a lower bound, 0 when there
/// is none; the bound keeps the scan to recent partitions. Binds: since_ns, twice (whole
/// seconds on `time` for the index, then exact nanoseconds).
pub fn newest_flow(flavor: Flavor, db: &str, since_ns: i64) -> SqlQuery {
    SqlQuery::new(format!(
        "SELECT toInt64(max({t})) FROM {db}.{f} WHERE time >= {p} AND {t} >= ?",
        t = time_ns_expr(flavor),
        f = tables::FLOWS,
        p = time_param(flavor)
    ))
    .bind(BindValue::I64(since_ns))
    .bind(BindValue::I64(since_ns))
}

/// Identity of the rows of one batch in `flows` (to re-send only missing rows after a
/// partial insert). Binds as [`batch_rows`].
pub fn batch_row_keys(
    flavor: Flavor,
    db: &str,
    min_ns: i64,
    max_ns: i64,
    batch_id: u64,
) -> SqlQuery {
    SqlQuery::new(format!(
        "SELECT {t} AS t, node, flow_id, event_kind FROM {db}.{f} WHERE {range} AND batch_id = ?",
        t = time_ns_expr(flavor),
        f = tables::FLOWS,
        range = time_range(flavor)
    ))
    .bind(BindValue::I64(min_ns))
    .bind(BindValue::I64(max_ns))
    .bind(BindValue::U64(batch_id))
}

/// Day partitions of a table older than `days` (compat retention). Binds: db, table, days.
pub fn expired_partitions(db: &str, table: &str, days: u32) -> SqlQuery {
    SqlQuery::new(
        "SELECT DISTINCT partition FROM system.parts \
         WHERE database = ? AND table = ? AND active \
         AND toUInt32(partition) < toYYYYMMDD(today() - ?) ORDER BY partition",
    )
    .bind(BindValue::Str(db.to_owned()))
    .bind(BindValue::Str(table.to_owned()))
    .bind(BindValue::U64(u64::from(days)))
}

/// Whether a table exists. Binds: db, table.
pub fn table_exists(db: &str, table: &str) -> SqlQuery {
    SqlQuery::new("SELECT count() FROM system.tables WHERE database = ? AND name = ?")
        .bind(BindValue::Str(db.to_owned()))
        .bind(BindValue::Str(table.to_owned()))
}

/// Whether a column exists. Binds: db, table, column.
pub fn column_exists(db: &str, table: &str, column: &str) -> SqlQuery {
    SqlQuery::new(
        "SELECT count() FROM system.columns WHERE database = ? AND table = ? AND name = ?",
    )
    .bind(BindValue::Str(db.to_owned()))
    .bind(BindValue::Str(table.to_owned()))
    .bind(BindValue::Str(column.to_owned()))
}

/// A table's engine with its settings and TTL. Binds: db, table.
pub fn engine_full(db: &str, table: &str) -> SqlQuery {
    SqlQuery::new("SELECT engine_full FROM system.tables WHERE database = ? AND name = ?")
        .bind(BindValue::Str(db.to_owned()))
        .bind(BindValue::Str(table.to_owned()))
}

/// Applied migrations, oldest first.
pub fn applied_migrations(db: &str) -> SqlQuery {
    SqlQuery::new(format!(
        "SELECT version, flavor FROM {db}.{} ORDER BY version",
        tables::MIGRATIONS
    ))
}

/// Records an applied migration. Binds: version, name, flavor, owner.
pub fn record_migration(db: &str, version: u32, name: &str, flavor: &str, owner: &str) -> SqlQuery {
    SqlQuery::new(format!(
        "INSERT INTO {db}.{} (version, name, flavor, applied_at, applied_by) VALUES (?, ?, ?, now(), ?)",
        tables::MIGRATIONS
    ))
    .bind(BindValue::U64(u64::from(version)))
    .bind(BindValue::Str(name.to_owned()))
    .bind(BindValue::Str(flavor.to_owned()))
    .bind(BindValue::Str(owner.to_owned()))
}

/// Drops between two times by workload pair and reason, from the rollup.
/// Binds: from_ns, to_ns.
pub fn drops_by_workload(db: &str, from_ns: i64, to_ns: i64) -> SqlQuery {
    SqlQuery::new(format!(
        "SELECT src_namespace, src_workload, dst_namespace, dst_workload, drop_reason, \
         sum(drops) AS drops, sum(packets) AS packets \
         FROM {db}.{t} \
         WHERE minute >= toStartOfMinute(toDateTime(intDiv(toInt64(?), 1000000000))) \
         AND minute <= toDateTime(intDiv(toInt64(?), 1000000000)) \
         GROUP BY src_namespace, src_workload, dst_namespace, dst_workload, drop_reason \
         ORDER BY drops DESC, src_namespace, src_workload, dst_namespace, dst_workload, drop_reason",
        t = tables::DROPS_1M
    ))
    .bind(BindValue::I64(from_ns))
    .bind(BindValue::I64(to_ns))
}

/// Flow events, connections and bytes per minute by workload pair and verdict.
/// Binds: from_ns, to_ns.
pub fn traffic_by_workload(db: &str, from_ns: i64, to_ns: i64) -> SqlQuery {
    SqlQuery::new(format!(
        "SELECT minute, src_namespace, src_workload, dst_namespace, dst_workload, verdict, \
         sum(events) AS events, sum(connections) AS connections, sum(packets) AS packets, \
         sum(bytes) AS bytes \
         FROM {db}.{t} \
         WHERE minute >= toStartOfMinute(toDateTime(intDiv(toInt64(?), 1000000000))) \
         AND minute <= toDateTime(intDiv(toInt64(?), 1000000000)) \
         GROUP BY minute, src_namespace, src_workload, dst_namespace, dst_workload, verdict \
         ORDER BY minute, src_namespace, src_workload, dst_namespace, dst_workload, verdict",
        t = tables::FLOWS_1M
    ))
    .bind(BindValue::I64(from_ns))
    .bind(BindValue::I64(to_ns))
}

/// TCP handshake RTT p50/p90/p99 (ns) per minute by client and server workload.
/// Binds: from_ns, to_ns.
pub fn handshake_latency(db: &str, from_ns: i64, to_ns: i64) -> SqlQuery {
    SqlQuery::new(format!(
        "SELECT minute, client_namespace, client_workload, server_namespace, server_workload, \
         quantilesTDigestMerge(0.5, 0.9, 0.99)(handshake_rtt) AS rtt_ns, \
         countMerge(samples) AS samples \
         FROM {db}.{t} \
         WHERE minute >= toStartOfMinute(toDateTime(intDiv(toInt64(?), 1000000000))) \
         AND minute <= toDateTime(intDiv(toInt64(?), 1000000000)) \
         GROUP BY minute, client_namespace, client_workload, server_namespace, server_workload \
         ORDER BY minute, client_namespace, client_workload, server_namespace, server_workload",
        t = tables::LATENCY_1M
    ))
    .bind(BindValue::I64(from_ns))
    .bind(BindValue::I64(to_ns))
}

/// The dashboard queries with sample bounds, by name (for docs and the chDB test).
pub fn dashboard_queries(db: &str, from_ns: i64, to_ns: i64) -> Vec<(&'static str, SqlQuery)> {
    vec![
        ("drops_by_workload", drops_by_workload(db, from_ns, to_ns)),
        (
            "traffic_by_workload",
            traffic_by_workload(db, from_ns, to_ns),
        ),
        ("handshake_latency", handshake_latency(db, from_ns, to_ns)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_escaped_not_spliced() {
        let q = expired_partitions("lumen", "flows' OR 1=1 --", 14);
        let sql = q.render();
        assert!(sql.contains(r"'flows\' OR 1=1 --'"), "{sql}");
        assert!(!q.sql.contains("flows'"));
    }

    #[test]
    fn batch_check_binds_three_values() {
        let q = batch_rows(Flavor::Compat, "lumen", 1, 2, 3);
        assert_eq!(q.sql.matches('?').count(), 3);
        assert!(q.render().ends_with("batch_id = 3"), "{}", q.render());
    }
}

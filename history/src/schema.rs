//! Every table, view and column of Lumen's ClickHouse schema, for both flavors, in one place.
//!
//! Two flavors of the same schema:
//! - [`Flavor::Modern`] (ClickHouse 23.8+): `DateTime64(9)`, `IPv6`, `LowCardinality`, column
//!   codecs, TTL retention, and insert deduplication by token (`non_replicated_deduplication_window`).
//! - [`Flavor::Compat`] (older servers such as Debian's 18.16): `DateTime` plus a `UInt32`
//!   nanosecond column, `FixedString(16)` addresses, plain `String`s, no TTL (the writer drops
//!   expired day partitions instead, see [`crate::retention`]).
//!
//! Column values are the same in both flavors and use Hubble's numbering: `verdict`
//! (`flow.Verdict`), `drop_reason` (`flow.DropReason`), `direction` (`flow.TrafficDirection`),
//! `event_kind` (`flow.LumenEventKind`), `ip_version` (`flow.IPVersion`), `protocol` (IP protocol
//! number: 6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, 132 SCTP, 0 none), `tcp_flags` (wire bits: FIN 1, SYN
//! 2, RST 4, PSH 8, ACK 16, URG 32, ECE 64, CWR 128, NS 256), `reply` (0 unknown, 1 no, 2 yes).
//! For ICMP, `src_port` holds the type and `dst_port` the code. Addresses are IPv6, IPv4 mapped
//! (`::ffff:a.b.c.d`). Policies are `kind/namespace/name` strings.
//!
//! `delta_packets`/`delta_bytes` are what the connection moved since its previous event at the
//! same observation point (computed by the writer from the cumulative counters); the rollups sum
//! them, so bytes per minute are not inflated by the cumulative counters of repeated events.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Schema version this build writes and reads. Migrations up to it are applied at start.
pub const LATEST_VERSION: u32 = 2;

/// Table names (unqualified; every statement qualifies them with the configured database).
pub mod tables {
    /// Raw flow events.
    pub const FLOWS: &str = "flows";
    /// Flow events, connections, packets and bytes per minute by workload pair, verdict, direction.
    pub const FLOWS_1M: &str = "flows_1m";
    /// Drops per minute by reason and workload pair.
    pub const DROPS_1M: &str = "drops_1m";
    /// TCP handshake RTT quantile states per minute by client and server workload and port.
    pub const LATENCY_1M: &str = "latency_1m";
    /// Applied migrations.
    pub const MIGRATIONS: &str = "lumen_schema_migrations";
    /// Exists while a process applies migrations.
    pub const LOCK: &str = "lumen_schema_lock";
}

/// Which DDL dialect a database uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flavor {
    /// ClickHouse 23.8+.
    Modern,
    /// Older servers (tested on 18.16).
    Compat,
}

impl Flavor {
    /// Name stored in the migrations table.
    pub fn as_str(self) -> &'static str {
        match self {
            Flavor::Modern => "modern",
            Flavor::Compat => "compat",
        }
    }

    /// Parses [`Flavor::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "modern" => Some(Flavor::Modern),
            "compat" => Some(Flavor::Compat),
            _ => None,
        }
    }

    /// The flavor a fresh install on a server of this version gets (`version()` output).
    pub fn for_server_version(version: &str) -> Self {
        let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let major = parts.next().unwrap_or(0);
        let minor = parts.next().unwrap_or(0);
        if (major, minor) >= (23, 8) {
            Flavor::Modern
        } else {
            Flavor::Compat
        }
    }
}

/// What a RowBinary payload holds: the flavor's time columns and the columns of a schema
/// version. Stored in every spool segment so a batch spooled before an upgrade still inserts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub flavor: Flavor,
    pub version: u32,
}

impl Layout {
    /// The layout this build produces for a flavor.
    pub fn latest(flavor: Flavor) -> Self {
        Self {
            flavor,
            version: LATEST_VERSION,
        }
    }

    /// Column names in RowBinary order, comma separated (for `INSERT INTO flows (...)`
    /// and `SELECT ...`).
    pub fn column_list(&self) -> String {
        let mut out = String::new();
        for c in FLOW_COLUMNS.iter().filter(|c| c.since <= self.version) {
            if !out.is_empty() {
                out.push_str(", ");
            }
            if c.name == "time" && self.flavor == Flavor::Compat {
                out.push_str("time, time_ns");
            } else {
                out.push_str(c.name);
            }
        }
        out
    }
}

impl Layout {
    /// `name Type, ...` of the payload columns, e.g. for ClickHouse's `file()` table function.
    pub fn structure(&self) -> String {
        let mut out = Vec::new();
        for c in FLOW_COLUMNS.iter().filter(|c| c.since <= self.version) {
            match (self.flavor, c.name) {
                (Flavor::Compat, "time") => {
                    out.push("time DateTime".to_owned());
                    out.push("time_ns UInt32".to_owned());
                }
                (Flavor::Compat, n) => out.push(format!("{n} {}", c.compat)),
                (Flavor::Modern, n) => {
                    let ty = c.modern.split(" CODEC").next().unwrap_or(c.modern);
                    out.push(format!("{n} {ty}"));
                }
            }
        }
        out.join(", ")
    }
}

/// One column of `flows`.
struct Column {
    name: &'static str,
    modern: &'static str,
    compat: &'static str,
    /// Schema version that added it.
    since: u32,
}

const fn col(name: &'static str, modern: &'static str, compat: &'static str, since: u32) -> Column {
    Column {
        name,
        modern,
        compat,
        since,
    }
}

const LC: &str = "LowCardinality(String)";
const LC_ARR: &str = "Array(LowCardinality(String))";

/// The columns of `flows`, in RowBinary order. New columns go at the end with the version
/// that adds them, so older layouts are prefixes of newer ones.
const FLOW_COLUMNS: &[Column] = &[
    col("time", "DateTime64(9) CODEC(Delta, ZSTD(1))", "DateTime", 1),
    col("node", LC, "String", 1),
    col("batch_id", "UInt64 CODEC(ZSTD(1))", "UInt64", 1),
    col("flow_id", "UInt64 CODEC(ZSTD(1))", "UInt64", 1),
    col("event_kind", "UInt8", "UInt8", 1),
    col("verdict", "UInt8", "UInt8", 1),
    col("drop_reason", "UInt16", "UInt16", 1),
    col("ip_version", "UInt8", "UInt8", 1),
    col("src_ip", "IPv6 CODEC(ZSTD(1))", "FixedString(16)", 1),
    col("dst_ip", "IPv6 CODEC(ZSTD(1))", "FixedString(16)", 1),
    col("protocol", "UInt8", "UInt8", 1),
    col("src_port", "UInt16 CODEC(ZSTD(1))", "UInt16", 1),
    col("dst_port", "UInt16 CODEC(ZSTD(1))", "UInt16", 1),
    col("tcp_flags", "UInt16", "UInt16", 1),
    col("direction", "UInt8", "UInt8", 1),
    col("reply", "UInt8", "UInt8", 1),
    col("src_identity", "UInt32 CODEC(ZSTD(1))", "UInt32", 1),
    col("dst_identity", "UInt32 CODEC(ZSTD(1))", "UInt32", 1),
    col("src_namespace", LC, "String", 1),
    col("src_pod", LC, "String", 1),
    col("src_workload", LC, "String", 1),
    col("src_workload_kind", LC, "String", 1),
    col("dst_namespace", LC, "String", 1),
    col("dst_pod", LC, "String", 1),
    col("dst_workload", LC, "String", 1),
    col("dst_workload_kind", LC, "String", 1),
    col("src_labels", LC_ARR, "Array(String)", 1),
    col("dst_labels", LC_ARR, "Array(String)", 1),
    col("src_names", LC_ARR, "Array(String)", 1),
    col("dst_names", LC_ARR, "Array(String)", 1),
    col("src_service", LC, "String", 1),
    col("dst_service", LC, "String", 1),
    col("egress_allowed_by", LC_ARR, "Array(String)", 1),
    col("ingress_allowed_by", LC_ARR, "Array(String)", 1),
    col("egress_denied_by", LC_ARR, "Array(String)", 1),
    col("ingress_denied_by", LC_ARR, "Array(String)", 1),
    col("orig_packets", "UInt64 CODEC(T64, ZSTD(1))", "UInt64", 1),
    col("orig_bytes", "UInt64 CODEC(T64, ZSTD(1))", "UInt64", 1),
    col("reply_packets", "UInt64 CODEC(T64, ZSTD(1))", "UInt64", 1),
    col("reply_bytes", "UInt64 CODEC(T64, ZSTD(1))", "UInt64", 1),
    col("delta_packets", "UInt64 CODEC(T64, ZSTD(1))", "UInt64", 1),
    col("delta_bytes", "UInt64 CODEC(T64, ZSTD(1))", "UInt64", 1),
    col(
        "handshake_rtt_ns",
        "UInt64 CODEC(T64, ZSTD(1))",
        "UInt64",
        1,
    ),
    col(
        "flow_duration_ns",
        "UInt64 CODEC(T64, ZSTD(1))",
        "UInt64",
        1,
    ),
    col("event_type", "Int32", "Int32", 1),
    col("event_sub_type", "Int32", "Int32", 1),
    col("observation_point", "UInt8", "UInt8", 1),
    col("trace_id", "String CODEC(ZSTD(1))", "String", 1),
    col("uuid", "String CODEC(ZSTD(1))", "String", 1),
    // Version 2: Lumen fields 5006 and 5007.
    col("tcp_flags_seen", "UInt16", "UInt16", 2),
    col("packet_length", "UInt32 CODEC(T64, ZSTD(1))", "UInt32", 2),
];

/// Retention in days per table; 0 keeps data forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    pub flows_days: u32,
    pub flows_1m_days: u32,
    pub drops_1m_days: u32,
    pub latency_1m_days: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            // Raw flows are large and answer "what happened last night": two weeks.
            flows_days: 14,
            // Rollups are small and feed dashboards over months.
            flows_1m_days: 90,
            drops_1m_days: 90,
            latency_1m_days: 90,
        }
    }
}

impl Retention {
    /// `(table, time column, days)` for every table with retention.
    pub fn tables(&self) -> [(&'static str, &'static str, u32); 4] {
        [
            (tables::FLOWS, "time", self.flows_days),
            (tables::FLOWS_1M, "minute", self.flows_1m_days),
            (tables::DROPS_1M, "minute", self.drops_1m_days),
            (tables::LATENCY_1M, "minute", self.latency_1m_days),
        ]
    }
}

/// Validates a database name (it is spliced into DDL, so only `[A-Za-z0-9_]` is accepted).
pub fn valid_database_name(db: &str) -> bool {
    !db.is_empty()
        && db.len() <= 64
        && db.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !db.starts_with(|c: char| c.is_ascii_digit())
}

/// One idempotent migration step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A statement that is safe to repeat (`CREATE ... IF NOT EXISTS`).
    Sql(String),
    /// Adds a column unless it exists (18.16 has no `ADD COLUMN IF NOT EXISTS`).
    AddColumn {
        table: &'static str,
        column: &'static str,
        sql: String,
    },
}

/// A versioned migration.
#[derive(Debug, Clone)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub steps: Vec<Step>,
}

/// The TTL clause of a table for a retention, e.g. `TTL toDateTime(time) + INTERVAL 14 DAY`.
pub fn ttl_clause(time_col: &str, days: u32) -> Option<String> {
    (days > 0).then(|| format!("TTL toDateTime({time_col}) + INTERVAL {days} DAY"))
}

/// All migrations, in order, as DDL for `flavor` in database `db`.
pub fn migrations(flavor: Flavor, db: &str, retention: &Retention) -> Vec<Migration> {
    vec![
        Migration {
            version: 1,
            name: "flows and per-minute rollups",
            steps: v1(flavor, db, retention),
        },
        Migration {
            version: 2,
            name: "tcp_flags_seen and packet_length",
            steps: FLOW_COLUMNS
                .iter()
                .filter(|c| c.since == 2)
                .map(|c| Step::AddColumn {
                    table: tables::FLOWS,
                    column: c.name,
                    sql: match flavor {
                        Flavor::Modern => format!(
                            "ALTER TABLE {db}.{t} ADD COLUMN IF NOT EXISTS {n} {ty}",
                            t = tables::FLOWS,
                            n = c.name,
                            ty = c.modern
                        ),
                        Flavor::Compat => format!(
                            "ALTER TABLE {db}.{t} ADD COLUMN {n} {ty}",
                            t = tables::FLOWS,
                            n = c.name,
                            ty = c.compat
                        ),
                    },
                })
                .collect(),
        },
    ]
}

/// `CREATE TABLE flows` with the columns of schema version `version`.
pub fn create_flows(flavor: Flavor, db: &str, retention: &Retention, version: u32) -> String {
    let mut cols = String::new();
    for c in FLOW_COLUMNS.iter().filter(|c| c.since <= version) {
        match (flavor, c.name) {
            (Flavor::Compat, "time") => cols.push_str("    time DateTime,\n    time_ns UInt32,\n"),
            (Flavor::Modern, _) => {
                let _ = writeln!(cols, "    {} {},", c.name, c.modern);
            }
            (Flavor::Compat, _) => {
                let _ = writeln!(cols, "    {} {},", c.name, c.compat);
            }
        }
    }
    let cols = cols.trim_end().trim_end_matches(',');
    let t = tables::FLOWS;
    match flavor {
        Flavor::Modern => format!(
            "CREATE TABLE IF NOT EXISTS {db}.{t} (\n{cols}\n) ENGINE = MergeTree\n\
             PARTITION BY toYYYYMMDD(time)\n\
             ORDER BY (verdict, src_namespace, src_workload, dst_namespace, dst_workload, time)\n\
             {ttl}\
             SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1, \
             non_replicated_deduplication_window = 10000",
            ttl = ttl_line("time", retention.flows_days),
        ),
        Flavor::Compat => format!(
            "CREATE TABLE IF NOT EXISTS {db}.{t} (\n{cols}\n) ENGINE = MergeTree\n\
             PARTITION BY toYYYYMMDD(time)\n\
             ORDER BY (verdict, src_namespace, src_workload, dst_namespace, dst_workload, time, time_ns)\n\
             SETTINGS index_granularity = 8192"
        ),
    }
}

fn ttl_line(time_col: &str, days: u32) -> String {
    ttl_clause(time_col, days)
        .map(|t| t + "\n")
        .unwrap_or_default()
}

fn v1(flavor: Flavor, db: &str, r: &Retention) -> Vec<Step> {
    let (lc, settings) = match flavor {
        Flavor::Modern => (
            LC,
            "SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1, \
             non_replicated_deduplication_window = 10000",
        ),
        Flavor::Compat => ("String", "SETTINGS index_granularity = 8192"),
    };
    let ttl = |days| match flavor {
        Flavor::Modern => ttl_line("minute", days),
        Flavor::Compat => String::new(),
    };
    let pair =
        format!("src_namespace {lc}, src_workload {lc}, dst_namespace {lc}, dst_workload {lc}");
    let (f, f1, d1, l1) = (
        tables::FLOWS,
        tables::FLOWS_1M,
        tables::DROPS_1M,
        tables::LATENCY_1M,
    );
    let flows_1m = format!(
        "CREATE TABLE IF NOT EXISTS {db}.{f1} (\n    minute DateTime, {pair},\n    \
         verdict UInt8, direction UInt8,\n    \
         events UInt64, connections UInt64, packets UInt64, bytes UInt64\n\
         ) ENGINE = SummingMergeTree((events, connections, packets, bytes))\n\
         PARTITION BY toYYYYMMDD(minute)\n\
         ORDER BY (minute, src_namespace, src_workload, dst_namespace, dst_workload, verdict, direction)\n\
         {ttl}{settings}",
        ttl = ttl(r.flows_1m_days)
    );
    let drops_1m = format!(
        "CREATE TABLE IF NOT EXISTS {db}.{d1} (\n    minute DateTime, drop_reason UInt16, {pair},\n    \
         drops UInt64, packets UInt64\n\
         ) ENGINE = SummingMergeTree((drops, packets))\n\
         PARTITION BY toYYYYMMDD(minute)\n\
         ORDER BY (minute, drop_reason, src_namespace, src_workload, dst_namespace, dst_workload)\n\
         {ttl}{settings}",
        ttl = ttl(r.drops_1m_days)
    );
    let latency_1m = format!(
        "CREATE TABLE IF NOT EXISTS {db}.{l1} (\n    minute DateTime, \
         client_namespace {lc}, client_workload {lc}, server_namespace {lc}, server_workload {lc}, \
         server_port UInt16,\n    \
         handshake_rtt AggregateFunction(quantilesTDigest(0.5, 0.9, 0.99), UInt64),\n    \
         samples AggregateFunction(count)\n\
         ) ENGINE = AggregatingMergeTree\n\
         PARTITION BY toYYYYMMDD(minute)\n\
         ORDER BY (minute, client_namespace, client_workload, server_namespace, server_workload, server_port)\n\
         {ttl}{settings}",
        ttl = ttl(r.latency_1m_days)
    );
    let keys = "src_namespace, src_workload, dst_namespace, dst_workload";
    vec![
        Step::Sql(create_flows(flavor, db, r, 1)),
        Step::Sql(flows_1m),
        Step::Sql(drops_1m),
        Step::Sql(latency_1m),
        Step::Sql(format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{f1}_mv TO {db}.{f1} AS\n\
             SELECT toStartOfMinute(time) AS minute, {keys}, verdict, direction,\n    \
             count() AS events, countIf(event_kind = 1) AS connections,\n    \
             sum(delta_packets) AS packets, sum(delta_bytes) AS bytes\n\
             FROM {db}.{f}\nGROUP BY minute, {keys}, verdict, direction"
        )),
        Step::Sql(format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{d1}_mv TO {db}.{d1} AS\n\
             SELECT toStartOfMinute(time) AS minute, drop_reason, {keys},\n    \
             count() AS drops, sum(delta_packets) AS packets\n\
             FROM {db}.{f}\nWHERE verdict = 2\nGROUP BY minute, drop_reason, {keys}"
        )),
        // One RTT sample per connection and observation point: the SYN-ACK event. The
        // SYN-ACK travels server to client, so its source is the server.
        Step::Sql(format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{l1}_mv TO {db}.{l1} AS\n\
             SELECT toStartOfMinute(time) AS minute,\n    \
             dst_namespace AS client_namespace, dst_workload AS client_workload,\n    \
             src_namespace AS server_namespace, src_workload AS server_workload,\n    \
             src_port AS server_port,\n    \
             quantilesTDigestState(0.5, 0.9, 0.99)(handshake_rtt_ns) AS handshake_rtt,\n    \
             countState() AS samples\n\
             FROM {db}.{f}\n\
             WHERE handshake_rtt_ns > 0 AND protocol = 6 AND bitAnd(tcp_flags, 18) = 18\n\
             GROUP BY minute, client_namespace, client_workload, server_namespace, server_workload, server_port"
        )),
    ]
}

/// `CREATE TABLE` for the migrations table.
pub fn create_migrations_table(db: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {db}.{t} (version UInt32, name String, flavor String, \
         applied_at DateTime, applied_by String) ENGINE = MergeTree ORDER BY version",
        t = tables::MIGRATIONS
    )
}

/// `CREATE TABLE` for the migration lock (without `IF NOT EXISTS`: creating it is the lock).
pub fn create_lock_table(db: &str) -> String {
    format!(
        "CREATE TABLE {db}.{t} (owner String) ENGINE = TinyLog",
        t = tables::LOCK
    )
}

/// The statements that set a modern table's TTL to `days` (0 removes it).
pub fn modify_ttl(db: &str, table: &str, time_col: &str, days: u32) -> String {
    match ttl_clause(time_col, days) {
        Some(ttl) => format!("ALTER TABLE {db}.{table} MODIFY {ttl}"),
        None => format!("ALTER TABLE {db}.{table} REMOVE TTL"),
    }
}

/// Whether a table's `engine_full` already has the TTL for `days`.
pub fn engine_has_ttl(engine_full: &str, days: u32) -> bool {
    match days {
        0 => !engine_full.contains(" TTL "),
        d => engine_full.contains(&format!("toIntervalDay({d})")),
    }
}

/// Every DDL statement of the latest schema for a flavor, in order (for docs and chDB tests).
pub fn all_ddl(flavor: Flavor, db: &str, retention: &Retention) -> Vec<String> {
    let mut out = vec![
        format!("CREATE DATABASE IF NOT EXISTS {db}"),
        create_migrations_table(db),
    ];
    for m in migrations(flavor, db, retention) {
        for s in m.steps {
            out.push(match s {
                Step::Sql(sql) | Step::AddColumn { sql, .. } => sql,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions_pick_flavors() {
        assert_eq!(Flavor::for_server_version("18.16.1"), Flavor::Compat);
        assert_eq!(Flavor::for_server_version("23.3.1.1"), Flavor::Compat);
        assert_eq!(Flavor::for_server_version("23.8.2.7"), Flavor::Modern);
        assert_eq!(Flavor::for_server_version("26.9.2.1"), Flavor::Modern);
        assert_eq!(Flavor::for_server_version("garbage"), Flavor::Compat);
    }

    #[test]
    fn layouts_are_prefixes_and_compat_splits_time() {
        let v1 = Layout {
            flavor: Flavor::Modern,
            version: 1,
        }
        .column_list();
        let v2 = Layout::latest(Flavor::Modern).column_list();
        assert!(v2.starts_with(&v1));
        assert!(v2.ends_with("tcp_flags_seen, packet_length"));
        assert!(Layout::latest(Flavor::Compat)
            .column_list()
            .starts_with("time, time_ns, node"));
    }

    #[test]
    fn ddl_differs_by_flavor() {
        let r = Retention::default();
        let modern = all_ddl(Flavor::Modern, "lumen", &r).join("\n");
        let compat = all_ddl(Flavor::Compat, "lumen", &r).join("\n");
        assert!(
            modern.contains("DateTime64(9)")
                && modern.contains("TTL toDateTime(time) + INTERVAL 14 DAY")
        );
        assert!(
            !compat.contains("LowCardinality")
                && !compat.contains("TTL")
                && !compat.contains("CODEC")
        );
        assert!(compat.contains("time_ns UInt32") && compat.contains("FixedString(16)"));
    }

    #[test]
    fn ttl_detection() {
        let e = "MergeTree PARTITION BY toYYYYMMDD(t) ORDER BY (a, t) TTL toDateTime(t) + toIntervalDay(14) SETTINGS x = 1";
        assert!(engine_has_ttl(e, 14));
        assert!(!engine_has_ttl(e, 7));
        assert!(!engine_has_ttl(e, 0));
        assert!(engine_has_ttl("MergeTree ORDER BY a SETTINGS x = 1", 0));
    }

    #[test]
    fn database_names() {
        assert!(valid_database_name("lumen_test_1"));
        assert!(!valid_database_name("lumen; DROP"));
        assert!(!valid_database_name(""));
        assert!(!valid_database_name("1abc"));
    }
}

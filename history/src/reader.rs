//! Reading flows back: `GetFlows` semantics over a time range of `flows`.
//!
//! The relay answers `lumen observe --since/--until` from here, then joins the live stream.
//! Filters are pushed down to ClickHouse as parameterized SQL (every value bound, never
//! spliced) wherever the stored columns allow it exactly; where they do not (label selectors,
//! FQDN patterns, uuids, services without a namespace) the SQL is a superset and the
//! caller's matcher — the relay's compiled `GetFlows` filters — decides on each flow read
//! back. A blacklist filter is pushed down only when its SQL is exact. So results are exactly
//! what the matcher accepts among stored flows, and limits count matching flows only.
//!
//! Time bounds: `since` inclusive, `until` exclusive, so `[since, T)` from history and
//! `[T, ...)` from the live buffer meet without a gap or an overlap.

use std::net::IpAddr;
use std::sync::Arc;

use clickhouse::Client;
use ipnet::IpNet;
use lumen_proto::flow::{Flow, FlowFilter, TcpFlags};
use lumen_proto::observer::GetFlowsRequest;
use tokio::sync::mpsc;

use crate::error::HistoryError;
use crate::migrate::SchemaInfo;
use crate::queries::{time_ns_expr, time_param, BindValue, SqlQuery};
use crate::row::{tcp_flag_bits, FlowRow};
use crate::rowbinary::{Dec, DecodeError};
use crate::schema::{tables, Flavor, Layout};

/// A history query.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistoryQuery {
    /// Inclusive lower bound, ns since the epoch.
    pub since_ns: Option<i64>,
    /// Exclusive upper bound, ns since the epoch.
    pub until_ns: Option<i64>,
    pub whitelist: Vec<FlowFilter>,
    pub blacklist: Vec<FlowFilter>,
    /// At most this many flows: the last ones, or the first ones if `first`.
    pub limit: Option<u64>,
    pub first: bool,
}

impl HistoryQuery {
    /// The history part of a `GetFlowsRequest` (`number` 0 means no limit).
    pub fn from_request(req: &GetFlowsRequest) -> Self {
        let ns = |t: &prost_types::Timestamp| {
            t.seconds.saturating_mul(1_000_000_000) + i64::from(t.nanos)
        };
        Self {
            since_ns: req.since.as_ref().map(ns),
            until_ns: req.until.as_ref().map(ns),
            whitelist: req.whitelist.clone(),
            blacklist: req.blacklist.clone(),
            limit: (req.number > 0).then_some(req.number),
            first: req.first,
        }
    }
}

/// A SQL fragment with its bound values, and whether it is exact for stored flows.
#[derive(Debug, Clone)]
struct Cond {
    sql: String,
    binds: Vec<BindValue>,
    exact: bool,
}

impl Cond {
    fn exact(sql: impl Into<String>, binds: Vec<BindValue>) -> Self {
        Self {
            sql: sql.into(),
            binds,
            exact: true,
        }
    }
    fn relaxed() -> Self {
        Self {
            sql: "1".into(),
            binds: vec![],
            exact: false,
        }
    }
    fn never() -> Self {
        Self::exact("0", vec![])
    }
    fn join(parts: Vec<Cond>, op: &str, empty: &str) -> Cond {
        if parts.is_empty() {
            return Cond::exact(empty, vec![]);
        }
        let exact = parts.iter().all(|p| p.exact);
        let mut binds = Vec::new();
        let sql = parts
            .into_iter()
            .map(|p| {
                binds.extend(p.binds);
                format!("({})", p.sql)
            })
            .collect::<Vec<_>>()
            .join(op);
        Cond { sql, binds, exact }
    }
    fn and(parts: Vec<Cond>) -> Cond {
        Self::join(parts, " AND ", "1")
    }
    fn or(parts: Vec<Cond>) -> Cond {
        Self::join(parts, " OR ", "0")
    }
    fn inexact(mut self) -> Cond {
        self.exact = false;
        self
    }
}

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

fn int_in(col: &str, vals: impl IntoIterator<Item = i64>) -> Cond {
    let binds: Vec<BindValue> = vals.into_iter().map(BindValue::I64).collect();
    Cond::exact(format!("{col} IN ({})", placeholders(binds.len())), binds)
}

fn str_in(col: &str, vals: &[String]) -> Cond {
    let binds = vals.iter().map(|v| BindValue::Str(v.clone())).collect();
    Cond::exact(format!("{col} IN ({})", placeholders(vals.len())), binds)
}

fn ip_literal(flavor: Flavor, ip: IpAddr) -> (String, BindValue) {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    match flavor {
        Flavor::Modern => ("toIPv6(?)".into(), BindValue::Str(v6.to_string())),
        Flavor::Compat => {
            let hex: String = v6.octets().iter().map(|b| format!("{b:02X}")).collect();
            ("unhex(?)".into(), BindValue::Str(hex))
        }
    }
}

fn ip_cond(flavor: Flavor, col: &str, values: &[String]) -> Cond {
    let mut alts = Vec::new();
    for v in values {
        let c = if v.contains('/') {
            let Ok(net) = v.parse::<IpNet>() else {
                return Cond::relaxed();
            };
            let net = net.trunc();
            let (lo, lo_b) = ip_literal(flavor, net.network());
            let (hi, hi_b) = ip_literal(flavor, net.broadcast());
            let ver = if matches!(net, IpNet::V4(_)) { 1 } else { 2 };
            Cond::exact(
                format!("ip_version = {ver} AND {col} >= {lo} AND {col} <= {hi}"),
                vec![lo_b, hi_b],
            )
        } else {
            let Ok(ip) = v.parse::<IpAddr>() else {
                return Cond::relaxed();
            };
            let (lit, b) = ip_literal(flavor, ip);
            let ver = if ip.is_ipv4() { 1 } else { 2 };
            Cond::exact(format!("ip_version = {ver} AND {col} = {lit}"), vec![b])
        };
        alts.push(c);
    }
    Cond::or(alts)
}

/// `[namespace/]name-prefix`, as GetFlows parses pod and service filters.
fn split_pod(v: &str) -> Option<(Option<&str>, &str)> {
    match v.split_once('/') {
        Some(("", _)) => None,
        Some((_, pod)) if pod.contains('/') => None,
        Some((ns, pod)) => Some((Some(ns), pod)),
        None if v.is_empty() => None,
        None => Some((None, v)),
    }
}

fn pod_cond(side: &str, values: &[String]) -> Cond {
    let mut alts = Vec::new();
    for v in values {
        let Some((ns, prefix)) = split_pod(v) else {
            return Cond::relaxed();
        };
        alts.push(match ns {
            Some(ns) => Cond::exact(
                format!("{side}_namespace = ? AND startsWith({side}_pod, ?)"),
                vec![BindValue::Str(ns.into()), BindValue::Str(prefix.into())],
            ),
            None => Cond::exact(
                format!("{side}_pod != '' AND startsWith({side}_pod, ?)"),
                vec![BindValue::Str(prefix.into())],
            ),
        });
    }
    Cond::or(alts)
}

fn service_cond(side: &str, values: &[String]) -> Cond {
    let mut alts = Vec::new();
    for v in values {
        let Some((ns, prefix)) = split_pod(v) else {
            return Cond::relaxed();
        };
        alts.push(match ns {
            // Stored as `namespace/name`; a namespace has no '/'.
            Some(ns) => Cond::exact(
                format!("startsWith({side}_service, ?)"),
                vec![BindValue::Str(format!("{ns}/{prefix}"))],
            ),
            None => Cond::exact(format!("{side}_service != ''"), vec![]).inexact(),
        });
    }
    Cond::or(alts)
}

fn workload_cond(side: &str, values: &[lumen_proto::flow::Workload]) -> Cond {
    let alts = values
        .iter()
        .map(|w| {
            let mut parts = vec![Cond::exact(
                format!("{side}_workload != '' OR {side}_workload_kind != ''"),
                vec![],
            )];
            if !w.name.is_empty() {
                parts.push(Cond::exact(
                    format!("{side}_workload = ?"),
                    vec![BindValue::Str(w.name.clone())],
                ));
            }
            if !w.kind.is_empty() {
                parts.push(Cond::exact(
                    format!("lower({side}_workload_kind) = lower(?)"),
                    vec![BindValue::Str(w.kind.clone())],
                ));
            }
            Cond::and(parts)
        })
        .collect();
    Cond::or(alts)
}

/// Translates a node-name pattern (`node-*`, `cluster/node-*`, `cluster/`) to a regex over
/// `cluster/node` (a name without a cluster is in cluster `default`).
fn node_regex(pattern: &str) -> Option<String> {
    let part = |p: &str| -> Option<String> {
        let mut re = String::new();
        for c in p.chars() {
            match c {
                '*' => re.push_str("[^/]*"),
                'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' => re.push(c),
                '.' => re.push_str("\\."),
                _ => return None,
            }
        }
        Some(re)
    };
    if pattern.is_empty() {
        return None;
    }
    let (cluster, node) = match pattern.split_once('/') {
        Some((c, n)) => {
            if c.is_empty() || n.contains('/') {
                return None;
            }
            (
                part(c)?,
                if n.is_empty() {
                    "[^/]*".to_owned()
                } else {
                    part(n)?
                },
            )
        }
        None => ("[^/]*".to_owned(), part(pattern)?),
    };
    Some(format!("^{cluster}/{node}$"))
}

fn filter_cond(flavor: Flavor, f: &FlowFilter) -> Cond {
    let mut c = Vec::new();
    if !f.uuid.is_empty() {
        c.push(Cond::relaxed());
    }
    if !f.source_ip.is_empty() {
        c.push(ip_cond(flavor, "src_ip", &f.source_ip));
    }
    if !f.destination_ip.is_empty() {
        c.push(ip_cond(flavor, "dst_ip", &f.destination_ip));
    }
    if !f.source_pod.is_empty() {
        c.push(pod_cond("src", &f.source_pod));
    }
    if !f.destination_pod.is_empty() {
        c.push(pod_cond("dst", &f.destination_pod));
    }
    if !f.source_service.is_empty() {
        c.push(service_cond("src", &f.source_service));
    }
    if !f.destination_service.is_empty() {
        c.push(service_cond("dst", &f.destination_service));
    }
    if !f.source_fqdn.is_empty() {
        c.push(Cond::exact("notEmpty(src_names)", vec![]).inexact());
    }
    if !f.destination_fqdn.is_empty() {
        c.push(Cond::exact("notEmpty(dst_names)", vec![]).inexact());
    }
    if !f.source_label.is_empty() || !f.destination_label.is_empty() {
        c.push(Cond::relaxed());
    }
    if !f.source_workload.is_empty() {
        c.push(workload_cond("src", &f.source_workload));
    }
    if !f.destination_workload.is_empty() {
        c.push(workload_cond("dst", &f.destination_workload));
    }
    for (col, ids) in [
        ("src_identity", &f.source_identity),
        ("dst_identity", &f.destination_identity),
    ] {
        if !ids.is_empty() {
            let cond = int_in(col, ids.iter().map(|v| i64::from(*v)));
            // Identity 0 with nothing else stored reads back as no endpoint at all.
            c.push(if ids.contains(&0) {
                cond.inexact()
            } else {
                cond
            });
        }
    }
    for (col, ports) in [
        ("src_port", &f.source_port),
        ("dst_port", &f.destination_port),
    ] {
        if !ports.is_empty() {
            let Ok(ps) = ports
                .iter()
                .map(|p| p.parse::<u16>())
                .collect::<Result<Vec<_>, _>>()
            else {
                c.push(Cond::relaxed());
                continue;
            };
            let mut cond = int_in(col, ps.into_iter().map(i64::from));
            cond.sql = format!("protocol IN (6, 17, 132) AND {}", cond.sql);
            c.push(cond);
        }
    }
    if !f.traffic_direction.is_empty() {
        c.push(int_in(
            "direction",
            f.traffic_direction.iter().map(|v| i64::from(*v)),
        ));
    }
    if !f.verdict.is_empty() {
        c.push(int_in("verdict", f.verdict.iter().map(|v| i64::from(*v))));
    }
    if !f.event_type.is_empty() {
        let alts = f
            .event_type
            .iter()
            .map(|e| {
                // A policy verdict is a record's role (`is_policy_verdict`), not its stored
                // type: left to the matcher.
                if e.r#type == lumen_proto::event_type::POLICY_VERDICT && !e.match_sub_type {
                    return Cond::relaxed();
                }
                let mut cond = if e.match_sub_type {
                    Cond::exact(
                        "event_type = ? AND event_sub_type = ?",
                        vec![
                            BindValue::I64(i64::from(e.r#type)),
                            BindValue::I64(i64::from(e.sub_type)),
                        ],
                    )
                } else {
                    Cond::exact("event_type = ?", vec![BindValue::I64(i64::from(e.r#type))])
                };
                if e.r#type < 0 {
                    cond = cond.inexact();
                }
                cond
            })
            .collect();
        c.push(Cond::or(alts));
    }
    // History keeps no L7 records: these never match a stored flow.
    if !f.http_status_code.is_empty()
        || !f.http_method.is_empty()
        || !f.http_path.is_empty()
        || !f.dns_query.is_empty()
    {
        c.push(Cond::never());
    }
    if !f.drop_reason_desc.is_empty() {
        // Hubble's rule: a dropped flow with one of the reasons.
        let mut cond = int_in(
            "drop_reason",
            f.drop_reason_desc.iter().map(|v| i64::from(*v)),
        );
        cond.sql = format!("verdict = 2 AND {}", cond.sql);
        c.push(cond);
    }
    // History stores no interface: an interface filter matches no stored flow.
    if !f.interface.is_empty() {
        c.push(Cond::never());
    }
    // Lumen sees no encryption marks: every flow reads back unencrypted.
    if !f.encrypted.is_empty() && !f.encrypted.contains(&false) {
        c.push(Cond::never());
    }
    if !f.protocol.is_empty() {
        let mut nums = Vec::new();
        let mut known = true;
        for p in &f.protocol {
            match p.to_ascii_lowercase().as_str() {
                "tcp" => nums.push(6),
                "udp" => nums.push(17),
                "sctp" => nums.push(132),
                "icmp" => nums.extend([1, 58]),
                "icmpv4" => nums.push(1),
                "icmpv6" => nums.push(58),
                "http" | "dns" | "kafka" => {}
                _ => known = false,
            }
        }
        c.push(match (known, nums.is_empty()) {
            (false, _) => Cond::relaxed(),
            (true, true) => Cond::never(),
            (true, false) => int_in("protocol", nums),
        });
    }
    if !f.reply.is_empty() {
        c.push(int_in(
            "reply",
            f.reply.iter().map(|r| if *r { 2 } else { 1 }),
        ));
    }
    if !f.tcp_flags.is_empty() {
        let alts = f
            .tcp_flags
            .iter()
            .map(|fl: &TcpFlags| {
                let mask = i64::from(tcp_flag_bits(fl));
                Cond::exact(
                    "protocol = 6 AND bitAnd(tcp_flags, ?) = ?",
                    vec![BindValue::I64(mask), BindValue::I64(mask)],
                )
            })
            .collect();
        c.push(Cond::or(alts));
    }
    if !f.node_name.is_empty() {
        let mut alts = Vec::new();
        for p in &f.node_name {
            match node_regex(p) {
                Some(re) => alts.push(Cond::exact(
                    "match(if(position(node, '/') > 0, node, concat('default/', node)), ?)",
                    vec![BindValue::Str(re)],
                )),
                None => alts.push(Cond::relaxed()),
            }
        }
        c.push(Cond::or(alts));
    }
    if !f.ip_version.is_empty() {
        let cond = int_in("ip_version", f.ip_version.iter().map(|v| i64::from(*v)));
        c.push(if f.ip_version.contains(&0) {
            cond.inexact()
        } else {
            cond
        });
    }
    if !f.trace_id.is_empty() {
        let cond = str_in("trace_id", &f.trace_id);
        c.push(if f.trace_id.iter().any(String::is_empty) {
            cond.inexact()
        } else {
            cond
        });
    }
    Cond::and(c)
}

/// The WHERE clause for whitelist and blacklist, and whether it is exact.
fn filters_cond(flavor: Flavor, whitelist: &[FlowFilter], blacklist: &[FlowFilter]) -> Cond {
    let mut parts = Vec::new();
    if !whitelist.is_empty() {
        parts.push(Cond::or(
            whitelist.iter().map(|f| filter_cond(flavor, f)).collect(),
        ));
    }
    for f in blacklist {
        let c = filter_cond(flavor, f);
        if c.exact {
            parts.push(Cond::exact(format!("NOT ({})", c.sql), c.binds));
        } else {
            parts.push(Cond::relaxed());
        }
    }
    Cond::and(parts)
}

/// Reads flows from history.
#[derive(Clone)]
pub struct HistoryReader {
    client: Client,
    database: String,
    layout: Layout,
}

impl HistoryReader {
    /// A reader for a database at the current schema version.
    pub fn new(cfg: &crate::config::HistoryConfig, schema: &SchemaInfo) -> Self {
        Self {
            client: crate::migrate::client(&cfg.clickhouse),
            database: cfg.clickhouse.database.clone(),
            layout: Layout::latest(schema.flavor),
        }
    }

    /// The SELECT for `q` (rows in RowBinary in the current layout), and whether its filter
    /// is exact (no matcher needed).
    pub fn sql(&self, q: &HistoryQuery) -> (SqlQuery, bool) {
        let flavor = self.layout.flavor;
        let mut conds = Vec::new();
        let t = time_ns_expr(flavor);
        if let Some(s) = q.since_ns {
            conds.push(Cond::exact(
                format!("time >= {}", time_param(flavor)),
                vec![BindValue::I64(s)],
            ));
            if flavor == Flavor::Compat {
                conds.push(Cond::exact(format!("{t} >= ?"), vec![BindValue::I64(s)]));
            }
        }
        if let Some(u) = q.until_ns {
            match flavor {
                Flavor::Modern => conds.push(Cond::exact(
                    format!("time < {}", time_param(flavor)),
                    vec![BindValue::I64(u)],
                )),
                Flavor::Compat => {
                    conds.push(Cond::exact(
                        format!("time <= {}", time_param(flavor)),
                        vec![BindValue::I64(u)],
                    ));
                    conds.push(Cond::exact(format!("{t} < ?"), vec![BindValue::I64(u)]));
                }
            }
        }
        let filter = filters_cond(flavor, &q.whitelist, &q.blacklist);
        let exact = filter.exact;
        conds.push(filter);
        let cond = Cond::and(conds);
        let desc = q.limit.is_some() && !q.first;
        let dir = if desc { "DESC" } else { "ASC" };
        let order = match flavor {
            Flavor::Modern => format!("time {dir}, node {dir}, flow_id {dir}, event_kind {dir}"),
            Flavor::Compat => {
                format!("time {dir}, time_ns {dir}, node {dir}, flow_id {dir}, event_kind {dir}")
            }
        };
        let limit = match (exact, q.limit) {
            (true, Some(n)) => format!(" LIMIT {n}"),
            _ => String::new(),
        };
        let mut sql = SqlQuery::new(format!(
            "SELECT {cols} FROM {db}.{f} WHERE {w} ORDER BY {order}{limit}",
            cols = self.layout.column_list(),
            db = self.database,
            f = tables::FLOWS,
            w = cond.sql,
        ));
        sql.binds = cond.binds;
        (sql, exact)
    }

    /// Streams the flows of `q` that `matches` accepts, in time order. The relay passes its
    /// compiled `GetFlows` filters as `matches`; dropping the receiver stops the query.
    pub fn stream(
        &self,
        q: &HistoryQuery,
        matches: Arc<dyn Fn(&Flow) -> bool + Send + Sync>,
    ) -> mpsc::Receiver<Result<Flow, HistoryError>> {
        let (tx, rx) = mpsc::channel(256);
        let (sql, _) = self.sql(q);
        let query = sql.to_query(&self.client);
        let layout = self.layout;
        let limit = q.limit;
        let desc = q.limit.is_some() && !q.first;
        tokio::spawn(async move {
            let mut tail: Vec<Flow> = Vec::new();
            let mut sent: u64 = 0;
            let mut reader = match RowReader::new(query, layout) {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            'read: loop {
                let rows = match reader.next_rows().await {
                    Ok(Some(rows)) => rows,
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                for row in rows {
                    let flow = row.to_flow();
                    if !matches(&flow) {
                        continue;
                    }
                    sent += 1;
                    if desc {
                        tail.push(flow);
                    } else if tx.send(Ok(flow)).await.is_err() {
                        return;
                    }
                    if limit.is_some_and(|l| sent >= l) {
                        break 'read;
                    }
                }
            }
            // Last-N queries read newest first; hand them out oldest first.
            for f in tail.into_iter().rev() {
                if tx.send(Ok(f)).await.is_err() {
                    return;
                }
            }
        });
        rx
    }

    /// Whether ClickHouse answers (a trivial query).
    pub async fn ping(&self) -> Result<(), HistoryError> {
        self.client
            .query("SELECT 1")
            .fetch_one::<u8>()
            .await
            .map_err(HistoryError::ch("asking ClickHouse"))?;
        Ok(())
    }

    /// Time (ns) of the newest stored flow at or after `since_ns`, if any.
    pub async fn newest_ns(&self, since_ns: i64) -> Result<Option<i64>, HistoryError> {
        let n: i64 = crate::queries::newest_flow(self.layout.flavor, &self.database, since_ns)
            .to_query(&self.client)
            .fetch_one()
            .await
            .map_err(HistoryError::ch("finding the newest stored flow"))?;
        Ok((n > 0).then_some(n))
    }

    /// Collects [`HistoryReader::stream`].
    pub async fn flows(
        &self,
        q: &HistoryQuery,
        matches: impl Fn(&Flow) -> bool + Send + Sync + 'static,
    ) -> Result<Vec<Flow>, HistoryError> {
        let mut rx = self.stream(q, Arc::new(matches));
        let mut out = Vec::new();
        while let Some(r) = rx.recv().await {
            out.push(r?);
        }
        Ok(out)
    }
}

/// Decodes a RowBinary response chunk by chunk (rows may straddle chunks).
struct RowReader {
    cursor: clickhouse::query::BytesCursor,
    layout: Layout,
    pending: Vec<u8>,
}

impl RowReader {
    fn new(query: clickhouse::query::Query, layout: Layout) -> Result<Self, HistoryError> {
        Ok(Self {
            cursor: query
                .fetch_bytes("RowBinary")
                .map_err(HistoryError::ch("querying history"))?,
            layout,
            pending: Vec::new(),
        })
    }

    /// The complete rows of the next chunk(s); `None` at the end.
    async fn next_rows(&mut self) -> Result<Option<Vec<FlowRow>>, HistoryError> {
        loop {
            let Some(chunk) = self
                .cursor
                .next()
                .await
                .map_err(HistoryError::ch("reading history rows"))?
            else {
                return if self.pending.is_empty() {
                    Ok(None)
                } else {
                    Err(DecodeError::Truncated.into())
                };
            };
            self.pending.extend_from_slice(&chunk);
            let mut d = Dec::new(&self.pending);
            let mut consumed = 0;
            let mut rows = Vec::new();
            while !d.is_empty() {
                match FlowRow::decode(&mut d, self.layout) {
                    Ok(row) => {
                        consumed = d.pos();
                        rows.push(row);
                    }
                    Err(DecodeError::Truncated) => break,
                    Err(e) => return Err(e.into()),
                }
            }
            self.pending.drain(..consumed);
            if !rows.is_empty() {
                return Ok(Some(rows));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lumen_proto::flow::{EventTypeFilter, Workload};

    fn sql_of(f: FlowFilter) -> (String, bool) {
        let c = filters_cond(Flavor::Compat, &[f], &[]);
        (c.sql, c.exact)
    }

    #[test]
    fn node_patterns() {
        assert_eq!(node_regex("node-*").as_deref(), Some("^[^/]*/node-[^/]*$"));
        assert_eq!(node_regex("kind/").as_deref(), Some("^kind/[^/]*$"));
        assert_eq!(node_regex("a.b/c").as_deref(), Some("^a\\.b/c$"));
        assert_eq!(node_regex("a/b/c"), None);
        assert_eq!(node_regex("x$"), None);
    }

    #[test]
    fn exact_and_relaxed_filters() {
        let (sql, exact) = sql_of(FlowFilter {
            verdict: vec![2],
            source_pod: vec!["shop/web-".into()],
            destination_port: vec!["8080".into()],
            ..Default::default()
        });
        assert!(exact, "{sql}");
        assert!(
            sql.contains("verdict IN (?)") && sql.contains("startsWith(src_pod, ?)"),
            "{sql}"
        );
        let (_, exact) = sql_of(FlowFilter {
            source_label: vec!["k8s:app=web".into()],
            ..Default::default()
        });
        assert!(!exact);
        let (sql, exact) = sql_of(FlowFilter {
            http_method: vec!["GET".into()],
            ..Default::default()
        });
        assert!(exact && sql == "(((0)))", "{sql}");
    }

    #[test]
    fn only_exact_blacklists_are_pushed_down() {
        let bl_exact = FlowFilter {
            verdict: vec![1],
            ..Default::default()
        };
        let bl_label = FlowFilter {
            source_label: vec!["app=x".into()],
            ..Default::default()
        };
        let c = filters_cond(Flavor::Modern, &[], &[bl_exact, bl_label]);
        assert!(c.sql.contains("NOT (") && !c.exact);
        assert_eq!(c.sql.matches("NOT (").count(), 1);
    }

    #[test]
    fn binds_match_placeholders() {
        let f = FlowFilter {
            source_ip: vec!["10.0.0.0/8".into(), "fd00::1".into()],
            destination_workload: vec![Workload {
                name: "db".into(),
                kind: "statefulset".into(),
            }],
            event_type: vec![EventTypeFilter {
                r#type: 1,
                match_sub_type: true,
                sub_type: 133,
            }],
            tcp_flags: vec![TcpFlags {
                syn: true,
                ..Default::default()
            }],
            node_name: vec!["kind/node-*".into()],
            ..Default::default()
        };
        for flavor in [Flavor::Modern, Flavor::Compat] {
            let c = filters_cond(flavor, std::slice::from_ref(&f), std::slice::from_ref(&f));
            assert_eq!(c.sql.matches('?').count(), c.binds.len(), "{}", c.sql);
        }
    }
}

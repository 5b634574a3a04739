//! The modern schema and every shipped query, executed on chDB (ClickHouse 26.x).

mod common;

use std::process::Command;

use common::{chdb_available, chdb_script, flows, now_ns, reader_cases, MIN_NS};
use lumen_history::queries::{self, SqlQuery};
use lumen_history::row::{Delta, FlowRow};
use lumen_history::schema::{self, tables, Flavor, Layout, Retention};
use lumen_history::{HistoryConfig, HistoryReader, SchemaInfo};
use lumen_proto::filter::FlowFilters;
use lumen_proto::flow::{Flow, Verdict};
use serde_json::{json, Value};

const DB: &str = "lumen";

fn q(name: &str, sql: String) -> Value {
    json!({"name": name, "sql": sql})
}

fn count_of(sql: &SqlQuery) -> String {
    format!("SELECT count() FROM ({})", sql.render())
}

fn num(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.parse().expect("number"),
        v => v.as_u64().expect("number"),
    }
}

#[test]
fn modern_ddl_and_every_shipped_query_run_on_chdb() {
    if let Err(why) = chdb_available() {
        eprintln!(
            "SKIPPED: chDB is not importable ({why}); install it with `pip install chdb` \
             (cargo xtask setup does) to run the modern-schema checks"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let n = 20_000;
    let start = (now_ns() / MIN_NS - 10) * MIN_NS;
    let generated = flows(7, n, start, 5 * MIN_NS);
    let layout = Layout::latest(Flavor::Modern);
    let batch_id = 4242u64;
    let mut payload = Vec::new();
    let mut tracker =
        lumen_history::row::DeltaTracker::new(std::time::Duration::from_secs(900), 1 << 20);
    for f in &generated {
        FlowRow::from_flow(f, batch_id, tracker.delta(f)).encode(layout, &mut payload);
    }
    let rows_file = dir.path().join("rows.bin");
    std::fs::write(&rows_file, &payload).expect("rows file");
    let (min_ns, max_ns) = (start, start + 5 * MIN_NS);

    let retention = Retention::default();
    let ddl = schema::all_ddl(Flavor::Modern, DB, &retention);
    // The writer's insert (token = batch id), run twice: the second must be deduplicated.
    let insert = format!(
        "INSERT INTO {DB}.{f} ({cols}) SELECT * FROM file('{path}', 'RowBinary', '{structure}') \
         SETTINGS insert_deduplication_token = '{batch_id}', deduplicate_blocks_in_dependent_materialized_views = 1",
        f = tables::FLOWS,
        cols = layout.column_list(),
        path = rows_file.display(),
        structure = layout.structure(),
    );
    let mut cfg = HistoryConfig::default();
    cfg.clickhouse.database = DB.into();
    let reader = HistoryReader::new(
        &cfg,
        &SchemaInfo {
            database: DB.into(),
            flavor: Flavor::Modern,
            version: schema::LATEST_VERSION,
            server_version: "26".into(),
        },
    );
    let mut queries_json = vec![
        q(
            "count",
            format!("SELECT count(), uniqExact(node, flow_id, time, event_kind) FROM {DB}.flows"),
        ),
        q(
            "rollup_events",
            format!("SELECT sum(events), sum(connections), sum(bytes) FROM {DB}.flows_1m"),
        ),
        q(
            "flows_events",
            format!("SELECT count(), countIf(event_kind = 1), sum(delta_bytes) FROM {DB}.flows"),
        ),
        q(
            "rollup_drops",
            format!("SELECT sum(drops) FROM {DB}.drops_1m"),
        ),
        q(
            "rollup_latency",
            format!("SELECT countMerge(samples) FROM {DB}.latency_1m"),
        ),
        q(
            "batch_rows",
            queries::batch_rows(Flavor::Modern, DB, min_ns, max_ns, batch_id).render(),
        ),
        q(
            "batch_row_keys",
            count_of(&queries::batch_row_keys(
                Flavor::Modern,
                DB,
                min_ns,
                max_ns,
                batch_id,
            )),
        ),
        q(
            "newest_flow",
            queries::newest_flow(Flavor::Modern, DB, start).render(),
        ),
        q(
            "newest_flow_none",
            queries::newest_flow(Flavor::Modern, DB, start + 1_000 * MIN_NS).render(),
        ),
        q(
            "expired_partitions",
            queries::expired_partitions(DB, tables::FLOWS, 7).render(),
        ),
        q(
            "table_exists",
            queries::table_exists(DB, tables::FLOWS).render(),
        ),
        q(
            "column_exists",
            queries::column_exists(DB, tables::FLOWS, "packet_length").render(),
        ),
        q(
            "applied_migrations",
            queries::applied_migrations(DB).render(),
        ),
        q(
            "engine_full",
            queries::engine_full(DB, tables::FLOWS).render(),
        ),
    ];
    for (name, dq) in queries::dashboard_queries(DB, start, start + 10 * MIN_NS) {
        queries_json.push(q(name, dq.render()));
    }
    let cases = reader_cases(start);
    for (name, hq) in &cases {
        let (sql, _) = reader.sql(hq);
        queries_json.push(q(&format!("reader: {name}"), count_of(&sql)));
    }
    let lock = schema::create_lock_table(DB);
    let statements = vec![
        queries::record_migration(DB, 1, "flows and per-minute rollups", "modern", "chdb test")
            .render(),
        queries::record_migration(
            DB,
            2,
            "tcp_flags_seen and packet_length",
            "modern",
            "chdb test",
        )
        .render(),
        lock,
        format!("DROP TABLE IF EXISTS {DB}.{}", tables::LOCK),
        schema::modify_ttl(DB, tables::FLOWS_1M, "minute", 30),
        schema::modify_ttl(DB, tables::DROPS_1M, "minute", 0),
    ];
    let spec = json!({
        "ddl": ddl,
        "insert": [insert],
        "insert_repeat": 2,
        "statements": statements,
        "queries": queries_json,
        "optimize": [format!("{DB}.flows")],
        "measure": [format!("{DB}.flows")],
    });
    let spec_path = dir.path().join("spec.json");
    std::fs::write(&spec_path, spec.to_string()).expect("spec");
    let out = Command::new("python3")
        .arg(chdb_script())
        .arg(&spec_path)
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "chDB check failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let res: Value = serde_json::from_str(stdout.trim()).expect("JSON from the chDB script");
    let version = res["version"].as_str().expect("version");
    assert_eq!(
        Flavor::for_server_version(version),
        Flavor::Modern,
        "chDB {version}"
    );
    let get = |name: &str| res["queries"][name].clone();

    // The insert ran twice with the same token: deduplicated, in flows and in the rollups.
    assert_eq!(
        num(&get("count")[0][0]),
        n as u64,
        "rows after a repeated insert"
    );
    assert_eq!(num(&get("count")[0][1]), n as u64);
    let fe = &get("flows_events")[0];
    let re = &get("rollup_events")[0];
    assert_eq!(
        (num(&re[0]), num(&re[1]), num(&re[2])),
        (num(&fe[0]), num(&fe[1]), num(&fe[2])),
        "flows_1m agrees with flows"
    );
    let drops = generated
        .iter()
        .filter(|f| f.verdict == Verdict::Dropped as i32)
        .count() as u64;
    assert_eq!(num(&get("rollup_drops")[0][0]), drops);
    let synacks = generated
        .iter()
        .filter(|f| f.handshake_rtt.is_some() && f.is_reply == Some(true))
        .count() as u64;
    assert_eq!(num(&get("rollup_latency")[0][0]), synacks);
    assert_eq!(
        num(&get("batch_rows")[0][0]),
        n as u64,
        "landed check sees the batch"
    );
    assert_eq!(num(&get("batch_row_keys")[0][0]), n as u64);
    let newest = generated
        .iter()
        .map(lumen_history::row::flow_time_ns)
        .max()
        .expect("flows");
    assert_eq!(
        num(&get("newest_flow")[0][0]),
        newest as u64,
        "newest stored flow"
    );
    assert_eq!(num(&get("newest_flow_none")[0][0]), 0, "none that recent");
    assert_eq!(num(&get("table_exists")[0][0]), 1);
    assert_eq!(num(&get("column_exists")[0][0]), 1);
    assert_eq!(get("applied_migrations").as_array().map(Vec::len), Some(2));
    let engine = get("engine_full")[0][0]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        schema::engine_has_ttl(&engine, retention.flows_days),
        "{engine}"
    );
    let dsum: u64 = get("drops_by_workload")
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| num(&r[5]))
        .sum();
    assert_eq!(dsum, drops, "drops dashboard");
    assert!(!get("traffic_by_workload")
        .as_array()
        .expect("rows")
        .is_empty());
    assert!(!get("handshake_latency")
        .as_array()
        .expect("rows")
        .is_empty());

    // Reader queries: exactly the flows GetFlows' filters accept (a superset where a
    // matcher finishes the job).
    let stored: Vec<Flow> = generated
        .iter()
        .map(|f| FlowRow::from_flow(f, 0, Delta::default()).to_flow())
        .collect();
    for (name, hq) in &cases {
        let filters = FlowFilters::compile(&hq.whitelist, &hq.blacklist).expect("filters");
        let matching = stored
            .iter()
            .filter(|f| {
                let t = f.time.unwrap_or_default();
                let ns = t.seconds * 1_000_000_000 + i64::from(t.nanos);
                hq.since_ns.is_none_or(|s| ns >= s)
                    && hq.until_ns.is_none_or(|u| ns < u)
                    && filters.matches(f)
            })
            .count() as u64;
        let (_, exact) = reader.sql(hq);
        let expected = hq.limit.map_or(matching, |l| l.min(matching));
        let got = num(&get(&format!("reader: {name}"))[0][0]);
        if exact {
            assert_eq!(got, expected, "reader: {name}");
        } else {
            assert!(
                got >= matching,
                "reader: {name}: SQL must be a superset ({got} < {matching})"
            );
        }
    }
    let m = &res["measure"][format!("{DB}.flows")];
    eprintln!(
        "modern schema on chDB {version}: {} rows, {} bytes on disk ({:.1} bytes/flow), {} compressed",
        m["rows"], m["bytes_on_disk"],
        num(&m["bytes_on_disk"]) as f64 / num(&m["rows"]) as f64,
        m["compressed"]
    );
}

//! Prints the history writer's figures: insert throughput against a raw `clickhouse-client`
//! insert of the same rows in the same run, and bytes per flow on disk after merges
//! (compatible schema on the real 18.16 server, modern schema on chDB).
//!
//! `cargo bench -p lumen-history` (`LUMEN_BENCH_FLOWS=N` to change the row count).

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{chdb_available, chdb_script, config, flows, now_ns, ClickHouse};
use lumen_history::row::{DeltaTracker, FlowRow};
use lumen_history::schema::{self, tables, Flavor, Layout, Retention};
use lumen_history::{migrate, History, HistoryMetrics};
use lumen_proto::flow::Flow;
use serde_json::{json, Value};

const MIN_NS: i64 = 60_000_000_000;

fn encode(flows: &[Flow], layout: Layout) -> Vec<u8> {
    let mut t = DeltaTracker::new(Duration::from_secs(900), 1 << 22);
    let mut out = Vec::with_capacity(flows.len() * 200);
    for f in flows {
        FlowRow::from_flow(f, 1, t.delta(f)).encode(layout, &mut out);
    }
    out
}

fn raw_insert(ch: &ClickHouse, db: &str, payload: &[u8], layout: Layout) -> Duration {
    let started = Instant::now();
    let mut child = Command::new("clickhouse-client")
        .arg(format!("--port={}", ch.tcp_port()))
        .arg("--query")
        .arg(format!(
            "INSERT INTO {db}.flows ({}) FORMAT RowBinary",
            layout.column_list()
        ))
        .stdin(Stdio::piped())
        .spawn()
        .expect("clickhouse-client");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(payload).expect("write rows");
    }
    assert!(child.wait().expect("wait").success(), "raw insert failed");
    started.elapsed()
}

fn on_disk(ch: &ClickHouse, db: &str) -> (u64, u64) {
    ch.client(&format!("OPTIMIZE TABLE {db}.flows FINAL"));
    let out = ch.client(&format!(
        "SELECT sum(rows), sum(bytes_on_disk) FROM system.parts WHERE database = '{db}' AND table = 'flows' AND active"
    ));
    let mut it = out
        .split_whitespace()
        .map(|v| v.parse::<u64>().expect("number"));
    (it.next().expect("rows"), it.next().expect("bytes"))
}

fn main() {
    let n: usize = std::env::var("LUMEN_BENCH_FLOWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let start = (now_ns() / MIN_NS - 30) * MIN_NS;
    let all: Vec<Flow> = (0..(n / 10_000).max(1) as u32)
        .flat_map(|c| {
            flows(
                c,
                n.min(10_000),
                start + i64::from(c) * MIN_NS / 10,
                MIN_NS / 10,
            )
        })
        .collect();
    let n = all.len();
    let compat = Layout::latest(Flavor::Compat);
    let payload = encode(&all, compat);
    println!(
        "lumen-history bench: {n} flows, {:.0} bytes/flow as RowBinary",
        payload.len() as f64 / n as f64
    );

    let ch = ClickHouse::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let spool = tempfile::tempdir().expect("tempdir");
    let mut raw_rates = Vec::new();
    let mut writer_rates = Vec::new();
    for round in 0..2 {
        // Raw: clickhouse-client piping the same rows, pre-encoded.
        let raw_db = format!("bench_raw_{round}");
        let cfg = config(&ch, &raw_db, spool.path());
        rt.block_on(migrate::migrate(&migrate::client(&cfg.clickhouse), &cfg))
            .expect("migrate raw");
        let t = raw_insert(&ch, &raw_db, &payload, compat);
        raw_rates.push(n as f64 / t.as_secs_f64());

        // Writer: Flow values in, through batcher, fsynced spool and inserter, until drained.
        let db = format!("bench_writer_{round}");
        let spool_dir = spool.path().join(&db);
        let mut cfg = config(&ch, &db, &spool_dir);
        cfg.batch = lumen_history::config::BatchConfig::default();
        let t = rt.block_on(async {
            let h = History::start(&cfg, HistoryMetrics::default())
                .await
                .expect("start");
            let started = Instant::now();
            for c in all.chunks(1000) {
                h.writer().submit(c.to_vec()).await.expect("submit");
            }
            assert!(h.writer().drain(Duration::from_secs(600)).await, "drained");
            let t = started.elapsed();
            h.shutdown(Duration::from_secs(5)).await;
            t
        });
        writer_rates.push(n as f64 / t.as_secs_f64());
        let rows = ch.number(&format!("SELECT count() FROM {db}.flows"));
        assert_eq!(rows, n as u64, "writer inserted every flow once");
        println!(
            "round {round}: raw clickhouse-client {:.0} flows/s, writer {:.0} flows/s, ratio {:.2}",
            raw_rates[round],
            writer_rates[round],
            writer_rates[round] / raw_rates[round]
        );
    }
    let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    println!(
        "insert throughput (best of 2): writer {:.0} flows/s vs raw {:.0} flows/s = {:.0}% (goal >= 80%)",
        best(&writer_rates),
        best(&raw_rates),
        100.0 * best(&writer_rates) / best(&raw_rates)
    );
    let (rows, bytes) = on_disk(&ch, "bench_writer_0");
    println!(
        "compatible schema on ClickHouse 18.16 after OPTIMIZE FINAL: {rows} rows, {bytes} bytes on disk = {:.1} bytes/flow",
        bytes as f64 / rows as f64
    );
    drop(ch);

    // Modern schema on chDB.
    if let Err(why) = chdb_available() {
        println!(
            "modern schema bytes/flow: SKIPPED, chDB not importable ({why}); pip install chdb"
        );
        return;
    }
    let modern = Layout::latest(Flavor::Modern);
    let dir = tempfile::tempdir().expect("tempdir");
    let rows_file = dir.path().join("rows.bin");
    std::fs::write(&rows_file, encode(&all, modern)).expect("rows file");
    let spec = json!({
        "ddl": schema::all_ddl(Flavor::Modern, "lumen", &Retention::default()),
        "insert": [format!(
            "INSERT INTO lumen.{f} ({cols}) SELECT * FROM file('{p}', 'RowBinary', '{s}')",
            f = tables::FLOWS, cols = modern.column_list(), p = rows_file.display(), s = modern.structure()
        )],
        "optimize": ["lumen.flows"],
        "measure": ["lumen.flows"],
    });
    let spec_path = dir.path().join("spec.json");
    std::fs::write(&spec_path, spec.to_string()).expect("spec");
    let out = Command::new("python3")
        .arg(chdb_script())
        .arg(&spec_path)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let res: Value = serde_json::from_slice(&out.stdout).expect("json");
    let m = &res["measure"]["lumen.flows"];
    let rows = m["rows"].as_u64().unwrap_or(0);
    let bytes = m["bytes_on_disk"].as_u64().unwrap_or(0);
    println!(
        "modern schema on chDB {} after OPTIMIZE FINAL: {rows} rows, {bytes} bytes on disk = {:.1} bytes/flow (goal <= 20)",
        res["version"].as_str().unwrap_or("?"),
        bytes as f64 / rows.max(1) as f64
    );
    let cols: Vec<String> = m["columns"]
        .as_array()
        .map(|c| {
            c.iter()
                .take(8)
                .map(|c| {
                    format!(
                        "{} {:.2}",
                        c[0].as_str().unwrap_or("?"),
                        c[1].as_u64().unwrap_or(0) as f64 / rows.max(1) as f64
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    println!("  largest columns (bytes/flow): {}", cols.join(", "));
}

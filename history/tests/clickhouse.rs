//! Integration tests against a real ClickHouse 18.16 server started by the harness.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{
    assert_rollups_agree, config, flows, metrics, now_ns, reader_cases, ClickHouse, MIN_NS,
};
use lumen_history::row::{Delta, FlowRow};
use lumen_history::schema::{Flavor, Layout};
use lumen_history::spool::{Batch, Spool};
use lumen_history::{migrate, retention, History};
use lumen_proto::filter::FlowFilters;
use lumen_proto::flow::{Flow, Verdict};

fn block<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

async fn submit_all(h: &History, flows: &[Flow], chunk: usize) {
    for c in flows.chunks(chunk) {
        h.writer().submit(c.to_vec()).await.expect("submitted");
    }
}

/// Every flow is in `flows` exactly once.
fn assert_exactly_once(ch: &ClickHouse, db: &str, expected: u64) {
    let count = ch.number(&format!("SELECT count() FROM {db}.flows"));
    let distinct = ch.number(&format!(
        "SELECT uniqExact(node, flow_id, time, time_ns, event_kind) FROM {db}.flows"
    ));
    assert_eq!(count, expected, "rows in flows");
    assert_eq!(
        distinct, expected,
        "distinct flow events (a lower number means duplicates)"
    );
}

/// Rollups agree with `flows`, except for rows acknowledged by a landed check (their view
/// rows may be missing on 18.16 when the server died between table and views): then each
/// rollup total may fall short of `flows` by at most `landed_rows`, never exceed it.
fn assert_rollups_agree_within(ch: &ClickHouse, db: &str, landed_rows: u64) {
    if landed_rows == 0 {
        return assert_rollups_agree(ch, db);
    }
    let flows = ch.number(&format!("SELECT count() FROM {db}.flows"));
    for (what, sql) in [
        ("flows_1m", format!("SELECT sum(events) FROM {db}.flows_1m")),
        (
            "drops_1m",
            format!(
                "SELECT sum(drops) + {} FROM {db}.drops_1m",
                flows - ch.number(&format!("SELECT countIf(verdict = 2) FROM {db}.flows"))
            ),
        ),
    ] {
        let rolled = ch.number(&sql);
        assert!(
            rolled <= flows && flows - rolled <= landed_rows,
            "{what}: {rolled} vs {flows} flows, {landed_rows} landed rows"
        );
    }
    eprintln!(
        "rollup gap after the crash: {} of at most {landed_rows} rows",
        flows - ch.number(&format!("SELECT sum(events) FROM {db}.flows_1m"))
    );
}

/// What history keeps of a flow (the oracle's view).
fn stored(f: &Flow) -> Flow {
    FlowRow::from_flow(f, 0, Delta::default()).to_flow()
}

fn key(f: &Flow) -> (i64, i32, String, u64, i32) {
    let t = f.time.unwrap_or_default();
    (
        t.seconds,
        t.nanos,
        f.node_name.clone(),
        f.flow_id,
        f.lumen_event_kind,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_every_flow_once_rollups_agree_and_reader_filters_like_get_flows() {
    let ch = ClickHouse::start();
    let spool = tempfile::tempdir().expect("tempdir");
    let cfg = config(&ch, "lumen", spool.path());
    let m = metrics();
    let h = History::start(&cfg, m.clone())
        .await
        .expect("history starts");
    assert_eq!(
        h.schema().flavor,
        Flavor::Compat,
        "18.16 gets the compatible schema"
    );
    assert_eq!(h.schema().version, lumen_history::schema::LATEST_VERSION);

    let n = 60_000;
    let start = (now_ns() / MIN_NS - 10) * MIN_NS;
    let generated = flows(1, n, start, 5 * MIN_NS);
    submit_all(&h, &generated, 1000).await;
    assert!(
        h.writer().drain(Duration::from_secs(60)).await,
        "writer drained"
    );
    assert_exactly_once(&ch, "lumen", n as u64);
    assert_eq!(m.rows_written.get(), n as u64);
    assert!(m.batches_written.get() >= 1);
    assert_rollups_agree(&ch, "lumen");
    // Where a restarting relay resumes: the newest stored flow, to the nanosecond.
    let newest = generated
        .iter()
        .map(lumen_history::row::flow_time_ns)
        .max()
        .expect("flows");
    assert_eq!(h.newest_taken_ns(start).await, Some(newest));
    assert_eq!(h.newest_taken_ns(newest + 1).await, None);

    // Rollup totals against the generator's own numbers.
    let drops = generated
        .iter()
        .filter(|f| f.verdict == Verdict::Dropped as i32)
        .count() as u64;
    let conns = generated.iter().filter(|f| f.lumen_event_kind == 1).count() as u64;
    let mut last_bytes: BTreeMap<u64, u64> = BTreeMap::new();
    for f in &generated {
        let c = f.counters.unwrap_or_default();
        last_bytes.insert(f.flow_id, c.orig_bytes + c.reply_bytes);
    }
    let bytes: u64 = last_bytes.values().sum();
    assert_eq!(ch.number("SELECT sum(drops) FROM lumen.drops_1m"), drops);
    assert_eq!(
        ch.number("SELECT sum(connections) FROM lumen.flows_1m"),
        conns
    );
    assert_eq!(
        ch.number("SELECT sum(bytes) FROM lumen.flows_1m"),
        bytes,
        "bytes counted once per connection"
    );
    let synacks = generated
        .iter()
        .filter(|f| f.handshake_rtt.is_some() && f.is_reply == Some(true))
        .count() as u64;
    assert_eq!(
        ch.number("SELECT countMerge(samples) FROM lumen.latency_1m"),
        synacks
    );

    // Dashboard queries run and agree with the generator.
    for (name, q) in lumen_history::queries::dashboard_queries("lumen", start, start + 10 * MIN_NS)
    {
        let out = ch.client(&q.render());
        assert!(!out.trim().is_empty(), "{name} returned nothing");
    }
    let by_reason = ch.client(
        &lumen_history::queries::drops_by_workload("lumen", start, start + 10 * MIN_NS).render(),
    );
    let total: u64 = by_reason
        .lines()
        .map(|l| {
            l.split('\t')
                .nth(5)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(total, drops);

    // The reader: same results as GetFlows' own filters over what history keeps.
    let oracle: Vec<Flow> = {
        let mut v: Vec<Flow> = generated.iter().map(stored).collect();
        v.sort_by_key(key);
        v
    };
    let cases = reader_cases(start);
    for (name, q) in cases {
        let filters = FlowFilters::compile(&q.whitelist, &q.blacklist).expect("valid filters");
        let in_time = |f: &&Flow| {
            let t = f.time.unwrap_or_default();
            let ns = t.seconds * 1_000_000_000 + i64::from(t.nanos);
            q.since_ns.is_none_or(|s| ns >= s) && q.until_ns.is_none_or(|u| ns < u)
        };
        let mut expected: Vec<&Flow> = oracle
            .iter()
            .filter(in_time)
            .filter(|f| filters.matches(f))
            .collect();
        if let Some(l) = q.limit {
            let l = l as usize;
            if q.first {
                expected.truncate(l);
            } else {
                expected = expected.split_off(expected.len().saturating_sub(l));
            }
        }
        let f2 = filters.clone();
        let got = h
            .reader()
            .flows(&q, move |f| f2.matches(f))
            .await
            .expect("history query");
        let got_keys: Vec<_> = got.iter().map(key).collect();
        let want_keys: Vec<_> = expected.iter().map(|f| key(f)).collect();
        assert_eq!(got_keys.len(), want_keys.len(), "{name}: count");
        assert_eq!(got_keys, want_keys, "{name}");
        if let (Some(g), Some(w)) = (got.first(), expected.first()) {
            assert_eq!(g, *w, "{name}: a flow reads back as stored");
        }
    }
    h.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_outage_under_load_loses_and_duplicates_nothing() {
    let mut ch = ClickHouse::start();
    let spool = tempfile::tempdir().expect("tempdir");
    let cfg = config(&ch, "lumen", spool.path());
    let m = metrics();
    let h = Arc::new(
        History::start(&cfg, m.clone())
            .await
            .expect("history starts"),
    );
    let start = (now_ns() / MIN_NS - 5) * MIN_NS;
    let mut total = 0u64;

    // Phase 1: graceful stop; phase 2: SIGKILL (an insert may die half way).
    for (phase, kill) in [(1u32, false), (2u32, true)] {
        // Load until told to stop: 500 flows every 25 ms (20k flows/s).
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let producer = {
            let (h, done) = (h.clone(), done.clone());
            tokio::spawn(async move {
                let mut c = 0u32;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let fl = flows(
                        phase * 10_000 + c,
                        500,
                        start + i64::from(c) * 10_000_000,
                        10_000_000,
                    );
                    h.writer().submit(fl).await.expect("submitted");
                    c += 1;
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                u64::from(c) * 500
            })
        };
        tokio::time::sleep(Duration::from_millis(400)).await;
        block(|| if kill { ch.kill() } else { ch.stop() });
        // Keep ClickHouse away until the writer has spooled several batches.
        let mut waited = 0;
        let spooling = |s: &lumen_history::WriterStatus| s.spool_batches >= 3 && !s.clickhouse_ok;
        while !spooling(&h.writer().status()) && waited < 400 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            waited += 1;
        }
        let during = h.writer().status();
        assert!(
            spooling(&during),
            "batches spooled during the outage: {during:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        block(|| ch.restart());
        tokio::time::sleep(Duration::from_millis(500)).await;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        total += producer.await.expect("producer");
        assert!(
            h.writer().drain(Duration::from_secs(60)).await,
            "spool drained after the outage"
        );
        assert_eq!(h.writer().status().spool_batches, 0);
        assert_exactly_once(&ch, "lumen", total);
        assert_rollups_agree_within(&ch, "lumen", m.landed_rows.get());
    }
    let transient = m
        .insert_errors
        .get_or_create(&lumen_history::metrics::ClassLabels { class: "transient" })
        .get();
    assert!(transient > 0, "the outage was noticed");
    assert_eq!(m.dead_letter_batches.get(), 0);
    // A batch whose insert landed but whose answer was lost is acknowledged by the landed
    // check, not counted as written again.
    assert!(m.rows_written.get() <= total);
    h.shutdown(Duration::from_secs(5)).await;
}

/// The child half of `kill_9_writer_while_spooling`: submits chunks and prints each one
/// once `flush` has made it durable, until killed.
#[test]
fn child_writer_process() {
    let Ok(url) = std::env::var("LUMEN_HISTORY_CHILD_URL") else {
        return;
    };
    let spool = std::env::var("LUMEN_HISTORY_CHILD_SPOOL").expect("spool");
    let offset: u32 = std::env::var("LUMEN_HISTORY_CHILD_OFFSET")
        .expect("offset")
        .parse()
        .expect("number");
    let start: i64 = std::env::var("LUMEN_HISTORY_CHILD_START")
        .expect("start")
        .parse()
        .expect("number");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut cfg = lumen_history::HistoryConfig::default();
        cfg.clickhouse.url = url;
        cfg.clickhouse.request_timeout = Duration::from_secs(5);
        cfg.spool.dir = spool.into();
        cfg.batch.max_delay = Duration::from_millis(100);
        cfg.retry.max_backoff = Duration::from_millis(300);
        let m = metrics();
        let h = History::start(&cfg, m.clone())
            .await
            .expect("child history starts");
        for c in offset.. {
            h.writer()
                .submit(flows(c, CHILD_CHUNK, start, 1_000_000_000))
                .await
                .expect("submit");
            h.writer().flush().await.expect("flush");
            println!("acked {c} landed {}", m.landed_rows.get());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

const CHILD_CHUNK: usize = 200;

fn run_child_until(
    url: &str,
    spool: &std::path::Path,
    offset: u32,
    start: i64,
    acks: u32,
    mid: impl FnOnce(),
) -> (u32, u64) {
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "child_writer_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("LUMEN_HISTORY_CHILD_URL", url)
        .env("LUMEN_HISTORY_CHILD_SPOOL", spool)
        .env("LUMEN_HISTORY_CHILD_OFFSET", offset.to_string())
        .env("LUMEN_HISTORY_CHILD_START", start.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("child writer");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut last = None;
    let mut landed = 0;
    let mut mid = Some(mid);
    let mut seen = 0;
    let parse = |line: &str, last: &mut Option<u32>, landed: &mut u64| -> bool {
        let Some(rest) = line.strip_prefix("acked ") else {
            return false;
        };
        let mut it = rest.split(" landed ");
        *last = it.next().and_then(|n| n.parse::<u32>().ok());
        *landed = it
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .expect("landed rows");
        true
    };
    let mut after_mid = 0;
    while let Some(Ok(line)) = lines.next() {
        if parse(&line, &mut last, &mut landed) {
            seen += 1;
            if seen == 3 {
                if let Some(f) = mid.take() {
                    f();
                    // Acks printed while `mid` ran are still in the pipe: skip past them.
                    after_mid = 0;
                }
            }
            after_mid += 1;
            if mid.is_none() && after_mid >= acks {
                break;
            }
        }
    }
    // kill -9 while it is spooling, then read what it acknowledged before dying.
    child.kill().expect("kill -9");
    let _ = child.wait();
    for line in lines.map_while(Result::ok) {
        parse(&line, &mut last, &mut landed);
    }
    (last.expect("the child acknowledged chunks"), landed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_writer_while_spooling_then_restart_loses_and_duplicates_nothing() {
    let mut ch = ClickHouse::start();
    let spool = tempfile::tempdir().expect("tempdir");
    let start = (now_ns() / MIN_NS - 3) * MIN_NS;
    // Child 1 starts with ClickHouse up, which then stops; killed while spooling.
    let url = ch.url();
    let (last1, landed1) =
        block(|| run_child_until(&url, spool.path(), 0, start, 15, || ch.stop()));
    assert!(!ch.is_running());
    let spooled = std::fs::read_dir(spool.path())
        .expect("spool")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        })
        .count();
    assert!(
        spooled > 0,
        "batches were spooled while ClickHouse was down"
    );
    // Child 2 starts while ClickHouse is still down (from the schema recorded in the spool).
    let (last2, landed2) = block(|| run_child_until(&url, spool.path(), 1000, start, 8, || ()));
    block(|| ch.restart());
    let cfg = config(&ch, "lumen", spool.path());
    let m = metrics();
    let h = History::start(&cfg, m.clone()).await.expect("restart");
    assert!(
        h.writer().drain(Duration::from_secs(60)).await,
        "spool drained"
    );
    // Nothing set aside: a server stopping answers inserts with errors that look
    // permanent, which must be retried, not dead-lettered.
    let dead: Vec<String> = std::fs::read_dir(spool.path().join("dead"))
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".txt"))
                .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                .collect()
        })
        .unwrap_or_default();
    assert!(dead.is_empty(), "dead-lettered during the outage: {dead:?}");

    let per_chunk: BTreeMap<u64, u64> = ch
        .client("SELECT intDiv(flow_id, 4294967296) AS c, count() FROM lumen.flows GROUP BY c ORDER BY c")
        .lines()
        .map(|l| {
            let mut it = l.split('\t').map(|v| v.parse::<u64>().expect("number"));
            (it.next().expect("chunk"), it.next().expect("count"))
        })
        .collect();
    for c in (0..=last1).chain(1000..=last2) {
        assert_eq!(
            per_chunk.get(&u64::from(c)),
            Some(&(CHILD_CHUNK as u64)),
            "acknowledged chunk {c} is complete"
        );
    }
    for (c, n) in &per_chunk {
        assert!(
            *n == CHILD_CHUNK as u64,
            "chunk {c} has {n} rows: partial or duplicated"
        );
    }
    let total: u64 = per_chunk.values().sum();
    assert_exactly_once(&ch, "lumen", total);
    assert_rollups_agree_within(&ch, "lumen", landed1 + landed2 + m.landed_rows.get());
    assert!(
        m.replayed_batches.get() > 0,
        "batches replayed from disk after the restart"
    );
    h.shutdown(Duration::from_secs(5)).await;
}

fn batch_of(flows: &[Flow], id: u64, layout: Layout) -> Batch {
    let mut payload = Vec::new();
    for f in flows {
        FlowRow::from_flow(f, id, Delta::default()).encode(layout, &mut payload);
    }
    let t = |f: &Flow| {
        f.time
            .map(|t| t.seconds * 1_000_000_000 + i64::from(t.nanos))
            .unwrap_or(0)
    };
    Batch {
        batch_id: id,
        layout,
        rows: flows.len() as u32,
        min_time_ns: flows.iter().map(t).min().unwrap_or(0),
        max_time_ns: flows.iter().map(t).max().unwrap_or(0),
        payload: payload.into(),
    }
}

async fn insert_raw(ch: &ClickHouse, db: &str, b: &Batch) {
    let client = clickhouse::Client::default()
        .with_url(ch.url())
        .with_validation(false);
    let mut ins = client.insert_formatted_with(format!(
        "INSERT INTO {db}.flows ({}) FORMAT RowBinary",
        b.layout.column_list()
    ));
    ins.send(b.payload.clone()).await.expect("send");
    ins.end().await.expect("insert");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_landed_before_a_crash_is_not_inserted_again() {
    let ch = ClickHouse::start();
    let spool = tempfile::tempdir().expect("tempdir");
    let cfg = config(&ch, "lumen", spool.path());
    migrate::migrate(&migrate::client(&cfg.clickhouse), &cfg)
        .await
        .expect("migrate");
    let start = (now_ns() / MIN_NS - 2) * MIN_NS;
    let layout = Layout::latest(Flavor::Compat);
    let landed = batch_of(&flows(1, 300, start, MIN_NS), 111, layout);
    let not_sent = batch_of(&flows(2, 200, start, MIN_NS), 222, layout);
    {
        let (s, _) = Spool::open(spool.path(), 1 << 30, true).expect("spool");
        s.try_append(&landed).expect("io").expect("fits");
        s.try_append(&not_sent).expect("io").expect("fits");
    }
    // The previous process's insert of the first batch reached ClickHouse; then it died.
    insert_raw(&ch, "lumen", &landed).await;
    let m = metrics();
    let h = History::start(&cfg, m.clone()).await.expect("start");
    assert!(h.writer().drain(Duration::from_secs(30)).await);
    assert_exactly_once(&ch, "lumen", 500);
    let landed_checks = |r| {
        m.landed_checks
            .get_or_create(&lumen_history::metrics::ResultLabels { result: r })
            .get()
    };
    assert_eq!(landed_checks("landed"), 1);
    assert_eq!(
        landed_checks("absent"),
        1,
        "checks stop at the first batch that had not landed"
    );
    assert_eq!(m.rows_written.get(), 200);
    h.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_segment_is_reported_and_skipped_without_losing_the_others() {
    let ch = ClickHouse::start();
    let spool = tempfile::tempdir().expect("tempdir");
    let cfg = config(&ch, "lumen", spool.path());
    migrate::migrate(&migrate::client(&cfg.clickhouse), &cfg)
        .await
        .expect("migrate");
    let start = (now_ns() / MIN_NS - 2) * MIN_NS;
    let layout = Layout::latest(Flavor::Compat);
    let seqs: Vec<u64> = {
        let (s, _) = Spool::open(spool.path(), 1 << 30, true).expect("spool");
        (1..=3u32)
            .map(|c| {
                s.try_append(&batch_of(
                    &flows(c, 100 * c as usize, start, MIN_NS),
                    u64::from(c),
                    layout,
                ))
                .expect("io")
                .expect("fits")
            })
            .collect()
    };
    let middle = spool.path().join(format!("{:020}.seg", seqs[1]));
    let mut bytes = std::fs::read(&middle).expect("segment");
    let at = bytes.len() - 10;
    bytes[at] ^= 0x40;
    std::fs::write(&middle, bytes).expect("corrupt it");
    std::fs::write(spool.path().join("00000000000000000099.seg.tmp"), b"torn").expect("torn tmp");
    let m = metrics();
    let h = History::start(&cfg, m.clone()).await.expect("start");
    assert!(h.writer().drain(Duration::from_secs(30)).await);
    assert_exactly_once(&ch, "lumen", 100 + 300);
    assert_eq!(
        ch.number("SELECT countIf(intDiv(flow_id, 4294967296) = 2) FROM lumen.flows"),
        0
    );
    assert_eq!(m.corrupt_segments.get(), 1);
    assert!(
        spool
            .path()
            .join("corrupt")
            .join(format!("{:020}.seg", seqs[1]))
            .exists(),
        "kept for inspection"
    );
    assert!(!spool.path().join("00000000000000000099.seg.tmp").exists());
    h.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_schema_error_dead_letters_the_batch_and_it_can_be_requeued() {
    let ch = ClickHouse::start();
    let spool = tempfile::tempdir().expect("tempdir");
    let cfg = config(&ch, "lumen", spool.path());
    let m = metrics();
    let h = History::start(&cfg, m.clone()).await.expect("start");
    ch.client("ALTER TABLE lumen.flows DROP COLUMN packet_length");
    let start = (now_ns() / MIN_NS - 2) * MIN_NS;
    h.writer()
        .submit(flows(1, 100, start, MIN_NS))
        .await
        .expect("submit");
    h.writer().flush().await.expect("flush");
    let mut waited = 0;
    while m.dead_letter_batches.get() == 0 && waited < 200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    assert_eq!(
        m.dead_letter_batches.get(),
        1,
        "dead-lettered, not retried forever"
    );
    assert_eq!(m.dead_letter_rows.get(), 100);
    let dead: Vec<String> = std::fs::read_dir(spool.path().join("dead"))
        .expect("dead dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    let note = dead
        .iter()
        .find(|n| n.ends_with(".error.txt"))
        .expect("error note");
    let text = std::fs::read_to_string(spool.path().join("dead").join(note)).expect("note");
    assert!(
        text.contains("packet_length") || text.contains("Code: 16"),
        "{text}"
    );
    assert!(dead.iter().any(|n| n.ends_with(".seg")));
    assert_eq!(h.writer().status().spool_batches, 0);
    assert_eq!(ch.number("SELECT count() FROM lumen.flows"), 0);
    // After the schema is fixed, the dead letters go back in.
    ch.client("ALTER TABLE lumen.flows ADD COLUMN packet_length UInt32");
    assert_eq!(h.writer().requeue_dead_letters().await.expect("requeue"), 1);
    assert!(h.writer().drain(Duration::from_secs(30)).await);
    assert_exactly_once(&ch, "lumen", 100);
    h.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_fresh_rerun_concurrent_stale_lock_and_upgrade() {
    let ch = ClickHouse::start();
    let spool = tempfile::tempdir().expect("tempdir");
    let objects = |db: &str| {
        ch.number(&format!(
            "SELECT count() FROM system.tables WHERE database = '{db}'"
        ))
    };

    // Fresh, then again.
    let cfg = config(&ch, "m_fresh", spool.path());
    let client = migrate::client(&cfg.clickhouse);
    let info = migrate::migrate(&client, &cfg).await.expect("fresh");
    assert_eq!((info.flavor, info.version), (Flavor::Compat, 2));
    assert_eq!(
        objects("m_fresh"),
        8,
        "flows, 3 rollups, 3 views, migrations"
    );
    let again = migrate::migrate(&client, &cfg).await.expect("re-run");
    assert_eq!(again.version, 2);
    assert_eq!(
        ch.number("SELECT count() FROM m_fresh.lumen_schema_migrations"),
        2,
        "nothing re-applied"
    );
    assert_eq!(objects("m_fresh"), 8, "no lock left behind");

    // Four relays at once.
    let cfg = config(&ch, "m_concurrent", spool.path());
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let cfg = cfg.clone();
            tokio::spawn(
                async move { migrate::migrate(&migrate::client(&cfg.clickhouse), &cfg).await },
            )
        })
        .collect();
    for r in runs {
        assert_eq!(
            r.await.expect("task").expect("concurrent migrate").version,
            2
        );
    }
    assert_eq!(
        ch.number("SELECT count() FROM m_concurrent.lumen_schema_migrations"),
        2
    );
    assert_eq!(objects("m_concurrent"), 8);

    // A lock left by a crashed relay is broken after the timeout.
    let mut cfg = config(&ch, "m_stale", spool.path());
    cfg.migration_lock_timeout = Duration::from_secs(1);
    ch.client("CREATE DATABASE m_stale");
    ch.client("CREATE TABLE m_stale.lumen_schema_lock (owner String) ENGINE = TinyLog");
    assert_eq!(
        migrate::migrate(&migrate::client(&cfg.clickhouse), &cfg)
            .await
            .expect("stale lock")
            .version,
        2
    );

    // Upgrade from version 1 with data and a version-1 batch still in the spool.
    let up_spool = tempfile::tempdir().expect("tempdir");
    let cfg = config(&ch, "m_upgrade", up_spool.path());
    let client = migrate::client(&cfg.clickhouse);
    assert_eq!(
        migrate::migrate_to(&client, &cfg, 1)
            .await
            .expect("v1")
            .version,
        1
    );
    assert_eq!(ch.number("SELECT count() FROM system.columns WHERE database = 'm_upgrade' AND table = 'flows' AND name = 'packet_length'"), 0);
    let start = (now_ns() / MIN_NS - 2) * MIN_NS;
    let v1 = Layout {
        flavor: Flavor::Compat,
        version: 1,
    };
    insert_raw(
        &ch,
        "m_upgrade",
        &batch_of(&flows(1, 100, start, MIN_NS), 1, v1),
    )
    .await;
    {
        let (s, _) = Spool::open(up_spool.path(), 1 << 30, true).expect("spool");
        s.try_append(&batch_of(&flows(2, 50, start, MIN_NS), 2, v1))
            .expect("io")
            .expect("fits");
    }
    let h = History::start(&cfg, metrics())
        .await
        .expect("upgrade and start");
    assert_eq!(h.schema().version, 2);
    h.writer()
        .submit(flows(3, 30, start, MIN_NS))
        .await
        .expect("submit");
    assert!(h.writer().drain(Duration::from_secs(30)).await);
    assert_exactly_once(&ch, "m_upgrade", 180);
    assert_eq!(
        ch.number("SELECT countIf(packet_length = 74) FROM m_upgrade.flows"),
        30,
        "new rows have the new column"
    );
    assert_eq!(
        ch.number("SELECT countIf(packet_length = 0) FROM m_upgrade.flows"),
        150,
        "old rows read the default"
    );
    assert_rollups_agree(&ch, "m_upgrade");
    h.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compat_retention_drops_expired_day_partitions() {
    let ch = ClickHouse::start();
    let spool = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(&ch, "lumen", spool.path());
    cfg.retention.flows_days = 7;
    let m = metrics();
    let h = History::start(&cfg, m.clone()).await.expect("start");
    let day = 86_400 * 1_000_000_000i64;
    let now = now_ns();
    h.writer()
        .submit(flows(1, 100, now - 30 * day, MIN_NS))
        .await
        .expect("old");
    h.writer()
        .submit(flows(2, 100, now - 60_000_000_000, MIN_NS))
        .await
        .expect("recent");
    assert!(h.writer().drain(Duration::from_secs(30)).await);
    assert_eq!(ch.number("SELECT count() FROM lumen.flows"), 200);
    let client = migrate::client(&cfg.clickhouse);
    let dropped = retention::drop_expired(&client, &cfg, &m)
        .await
        .expect("retention");
    assert!(
        dropped.iter().all(|(t, _)| *t == "flows"),
        "rollups keep 90 days: {dropped:?}"
    );
    assert!(!dropped.is_empty());
    assert_eq!(
        ch.number("SELECT count() FROM lumen.flows"),
        100,
        "only the recent day is left"
    );
    assert_eq!(
        ch.number("SELECT sum(events) FROM lumen.flows_1m"),
        200,
        "rollups have their own retention"
    );
    assert_eq!(m.partitions_dropped.get(), dropped.len() as u64);
    h.shutdown(Duration::from_secs(5)).await;
}

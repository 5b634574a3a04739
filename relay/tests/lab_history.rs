//! End to end into the sinks: lab traffic seen by a real node exporter, fanned in by the
//! relay, written by the relay's history sink to a real ClickHouse server the test starts
//! (every flow the relay received is in `flows` exactly once) and exported as OTLP log
//! records to an independent receiver (Python, built from the published
//! opentelemetry-proto package): one record per relayed flow.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../history/tests/common/mod.rs"]
mod history_common;

use std::{
    collections::HashSet,
    net::{IpAddr, TcpListener},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use lumen_lab::Lab;
use lumen_proto::observer::{
    get_flows_response::ResponseTypes, observer_client::ObserverClient, GetFlowsRequest,
    ServerStatusRequest,
};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The independent OTLP receiver of otlp/tests (writes what it decodes as JSON lines).
struct Receiver {
    child: std::process::Child,
    grpc_port: u16,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Receiver {
    fn start() -> Receiver {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("received.jsonl");
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../otlp/tests/otlp_receiver.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg("--out")
            .arg(&out)
            .args(["--grpc-port", "0", "--http-port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 OTLP receiver");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.starts_with("READY "),
            "OTLP receiver did not start: {line:?}"
        );
        let grpc_port = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("grpc="))
            .and_then(|p| p.parse().ok())
            .expect("grpc port");
        Receiver {
            child,
            grpc_port,
            out,
            _dir: dir,
        }
    }

    /// Flow ids of the log records received so far.
    fn logged_flow_ids(&self) -> Vec<u64> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["signal"] == "log")
            // OTLP integers are int64: ids above 2^63 arrive as their two's complement.
            .filter_map(|v| {
                let id = &v["attributes"]["lumen.flow.id"];
                id.as_u64().or_else(|| id.as_i64().map(|i| i as u64))
            })
            .collect()
    }
}

impl Receiver {
    /// The newest point of each attribute set of metric `name`.
    fn latest_points(&self, name: &str) -> std::collections::BTreeMap<String, serde_json::Value> {
        let mut out = std::collections::BTreeMap::new();
        for v in std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["signal"] == "metric" && v["name"] == name)
        {
            out.insert(v["attributes"].to_string(), v);
        }
        out
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A workspace binary next to this test's, built (debug, as this test) if missing.
fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_BIN_EXE_lumen-relay"))
        .parent()
        .unwrap()
        .to_path_buf();
    let path = dir.join(bin);
    if !path.exists() {
        let ok = Command::new(env!("CARGO"))
            .args(["build", "-p", package, "--bin", bin])
            .status()
            .unwrap()
            .success();
        assert!(ok, "building {bin}");
    }
    path
}

fn timestamp(ns: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    }
}

fn rfc3339(ns: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_nanos(ns as u64);
    humantime::format_rfc3339_nanos(t).to_string()
}

fn parse_rfc3339(s: &str) -> i64 {
    let t = humantime::parse_rfc3339(s).unwrap_or_else(|e| panic!("time {s:?}: {e}"));
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64
}

/// The flow events in `db.flows`, as (flow id, time ns): the compatible schema keeps
/// whole seconds plus the nanoseconds within the second.
fn stored_flows(ch: &history_common::ClickHouse, db: &str) -> HashSet<(u64, i64)> {
    ch.client(&format!(
        "SELECT flow_id, toUInt32(time), time_ns FROM {db}.flows FORMAT TabSeparated"
    ))
    .lines()
    .filter_map(|l| {
        let mut it = l.split('\t');
        let id: u64 = it.next()?.parse().ok()?;
        let secs: i64 = it.next()?.parse().ok()?;
        let ns: i64 = it.next()?.parse().ok()?;
        Some((id, secs * 1_000_000_000 + ns))
    })
    .collect()
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Flows the relay serves from the nodes' rings with a time at or after `since` ns
/// (flow id and time identify a flow event).
async fn served_since(relay: &str, since: i64) -> HashSet<(u64, i64)> {
    let mut c = ObserverClient::connect(relay.to_owned()).await.unwrap();
    let mut s = c
        .get_flows(GetFlowsRequest {
            number: u64::MAX,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = HashSet::new();
    while let Some(r) = s.message().await.unwrap() {
        if let Some(ResponseTypes::Flow(f)) = r.response_types {
            let t = f.time.unwrap_or_default();
            let ns = t.seconds * 1_000_000_000 + i64::from(t.nanos);
            if ns >= since {
                out.insert((f.flow_id, ns));
            }
        }
    }
    out
}

#[test]
fn every_relayed_flow_is_in_clickhouse_exactly_once() {
    if !lumen_lab::require_privileges("every_relayed_flow_is_in_clickhouse_exactly_once") {
        return;
    }
    let ch = history_common::ClickHouse::start();
    let spool = tempfile::tempdir().unwrap();
    let mut lab = Lab::new("relay-history").expect("lab");
    let client = lab.add_pod("client").expect("pod");
    let server = lab.add_pod("server").expect("pod");
    let http = server.http_server(8080).expect("http");
    let node = NodeExporter::start(&lab);
    let node_addr = node.address.clone();

    let receiver = Receiver::start();
    let mut otlp: lumen_otlp::OtlpConfig = serde_yaml::from_str(&format!(
        "endpoint: http://127.0.0.1:{}\nexport_interval: 300ms\nlogs:\n  enabled: true\n  batch_timeout: 50ms\n",
        receiver.grpc_port
    ))
    .expect("otlp config");
    otlp.resource.cluster = Some("lab".into());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let config = lumen_relay::config::Config {
        otlp: Some(otlp),
        listen_address: "127.0.0.1:0".parse().unwrap(),
        metrics_address: None,
        nodes: vec![format!("hist-node={node_addr}")],
        history: Some(history_common::config(&ch, "lumen_e2e", spool.path())),
        ..Default::default()
    };
    let relay_start = lumen_relay::wire::now_ns();
    let handle = rt
        .block_on(lumen_relay::start(config))
        .expect("relay with history");
    let relay = format!("http://{}", handle.address);
    std::thread::sleep(Duration::from_millis(800));

    let traffic = |gets: usize| {
        for _ in 0..gets {
            client
                .http_get(IpAddr::V4(server.ipv4), 8080, "/")
                .expect("http");
        }
        client
            .udp_send(IpAddr::V4(server.ipv4), 5353, b"x")
            .expect("udp");
        client.ping(IpAddr::V6(server.ipv6), 2).expect("ping6");
    };
    traffic(5);
    std::thread::sleep(Duration::from_millis(800));

    // Once history holds the first part, a client asks for everything since the relay
    // started and follows: the past comes from ClickHouse, the rest from the node.
    let first_part = rt.block_on(served_since(&relay, relay_start));
    wait_for("history to hold the first part", || {
        ch.number("SELECT count() FROM lumen_e2e.flows") as usize >= first_part.len()
    });
    let part_end = first_part.iter().map(|(_, ns)| *ns).max().unwrap() + 1;
    let (joined_tx, joined_rx) = std::sync::mpsc::channel::<(u64, i64)>();
    let follower = {
        let relay = relay.clone();
        rt.spawn(async move {
            let mut c = ObserverClient::connect(relay).await.unwrap();
            let mut s = c
                .get_flows(GetFlowsRequest {
                    since: Some(timestamp(relay_start)),
                    follow: true,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            while let Ok(Some(r)) = s.message().await {
                if let Some(ResponseTypes::Flow(f)) = r.response_types {
                    let t = f.time.unwrap_or_default();
                    let ns = t.seconds * 1_000_000_000 + i64::from(t.nanos);
                    if joined_tx.send((f.flow_id, ns)).is_err() {
                        return;
                    }
                }
            }
        })
    };
    // `lumen observe --since/--until` over the first part only: answered from history.
    let out = Command::new(workspace_bin("lumen", "lumen"))
        .args([
            "observe",
            "--server",
            &handle.address.to_string(),
            "--since",
            &rfc3339(relay_start),
            "--until",
            &rfc3339(part_end),
            "-o",
            "json",
        ])
        .output()
        .expect("lumen observe");
    assert!(
        out.status.success(),
        "lumen observe --since/--until: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let from_cli: Vec<(u64, i64)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            let f = &v["flow"];
            let id = f["flow_id"]
                .as_u64()
                .or_else(|| f["flow_id"].as_str()?.parse().ok())?;
            Some((id, parse_rfc3339(f["time"].as_str()?)))
        })
        .collect();
    assert_eq!(
        from_cli.iter().copied().collect::<HashSet<_>>(),
        first_part,
        "lumen observe --since/--until from history = what the relay served then"
    );
    assert_eq!(from_cli.len(), first_part.len(), "no flow twice");
    assert!(
        handle.metrics.history_flows_served.get() >= first_part.len() as u64,
        "the past part was read from ClickHouse"
    );

    traffic(3);
    std::thread::sleep(Duration::from_millis(800));
    // No more traffic: the pods (and their interfaces) go away.
    drop(http);
    lab.remove_pod("client").expect("remove");
    lab.remove_pod("server").expect("remove");
    std::thread::sleep(Duration::from_millis(1500));

    // Everything the relay serves (the whole ring) ...
    let served = rt.block_on(served_since(&relay, relay_start));
    assert!(
        served.len() >= 10 && served.len() > first_part.len(),
        "the relay served {} flows",
        served.len()
    );
    // ... was followed from history into the live stream without a gap or a duplicate.
    let newest = served.iter().map(|(_, ns)| *ns).max().unwrap();
    let mut joined: Vec<(u64, i64)> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !served.iter().all(|f| joined.contains(f)) && std::time::Instant::now() < deadline {
        if let Ok(f) = joined_rx.recv_timeout(Duration::from_millis(100)) {
            joined.push(f);
        }
    }
    follower.abort();
    let joined_upto: Vec<(u64, i64)> = joined.iter().copied().filter(|f| f.1 <= newest).collect();
    let joined_set: HashSet<(u64, i64)> = joined_upto.iter().copied().collect();
    assert_eq!(
        joined_upto.len(),
        joined_set.len(),
        "a flow sent twice at the seam"
    );
    assert_eq!(joined_set, served, "history + live = what the relay served");
    assert!(
        joined.windows(2).all(|w| w[0].1 <= w[1].1),
        "joined stream in time order"
    );
    // ... is in ClickHouse exactly once after the relay flushes on shutdown.
    // `lumen status` shows both sinks, healthy, with what they took and lost.
    wait_for("the sinks to take every served flow", || {
        let out = Command::new(workspace_bin("lumen", "lumen"))
            .args(["status", "--server", &handle.address.to_string()])
            .output()
            .expect("lumen status");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "lumen status: {text}");
        assert!(text.contains("History (http://"), "{text}");
        assert!(
            text.contains("OTLP Export (grpc http://127.0.0.1:"),
            "{text}"
        );
        assert!(!text.contains("Failing"), "{text}");
        text.matches(&format!("  Flows: {}, ", served.len()))
            .count()
            == 2
            && text.matches("  Dropped: 0\n").count() == 2
    });
    rt.block_on(handle.shutdown());
    let rows = ch.number("SELECT count() FROM lumen_e2e.flows");
    let distinct = ch.number(
        "SELECT count() FROM (SELECT DISTINCT node, flow_id, time, time_ns FROM lumen_e2e.flows)",
    );
    assert_eq!(rows, distinct, "no flow stored twice");
    assert_eq!(
        rows as usize,
        served.len(),
        "every relayed flow stored: {rows} rows vs {} served",
        served.len()
    );
    // (Flow events are identified by connection id and time; the compatible schema keeps
    // whole seconds plus the nanoseconds within the second.)
    let stored = stored_flows(&ch, "lumen_e2e");
    let missing: Vec<_> = served.difference(&stored).take(3).collect();
    assert!(
        missing.is_empty(),
        "flows missing in ClickHouse, e.g. {missing:?}"
    );
    // The OTLP receiver got one log record per relayed flow.
    let logged: Vec<u64> = receiver.logged_flow_ids();
    let logged_set: HashSet<u64> = logged.iter().copied().collect();
    let served_ids: HashSet<u64> = served.iter().map(|(id, _)| *id).collect();
    assert!(
        served_ids.is_subset(&logged_set),
        "flows missing in OTLP logs: {:?}",
        served_ids
            .difference(&logged_set)
            .take(3)
            .collect::<Vec<_>>()
    );
    assert!(
        logged.len() >= served.len(),
        "{} log records for {} flows",
        logged.len(),
        served.len()
    );
    // The rollups agree with `flows`, key by key.
    history_common::assert_rollups_agree(&ch, "lumen_e2e");
    // The OTLP metrics count the same flows as ClickHouse stored (the sinks see one stream),
    // by verdict too.
    let forwarded = ch.number("SELECT countIf(verdict = 1) FROM lumen_e2e.flows");
    let points = receiver.latest_points("lumen.flows");
    let total: u64 = points.values().filter_map(|p| p["value"].as_u64()).sum();
    let total_forwarded: u64 = points
        .values()
        .filter(|p| p["attributes"]["lumen.verdict"] == "FORWARDED")
        .filter_map(|p| p["value"].as_u64())
        .sum();
    assert_eq!(total, rows, "lumen.flows total = flows stored");
    assert_eq!(total_forwarded, forwarded, "lumen.flows FORWARDED");
}

/// A real node exporter on the lab's host-side interfaces (SIGTERM on drop).
struct NodeExporter {
    child: std::process::Child,
    address: String,
}

impl NodeExporter {
    fn start(lab: &Lab) -> NodeExporter {
        let address = format!("127.0.0.1:{}", free_port());
        let child = Command::new(workspace_bin("lumen-node-exporter", "lumen-node-exporter"))
            .args([
                "--node-name",
                "hist-node",
                "--listen-address",
                &address,
                "--metrics-address",
                "",
                "--interface",
                &format!("lmh{}*", lab.id()),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("exporter");
        wait_for("the node exporter to listen", || {
            std::net::TcpStream::connect(&address).is_ok()
        });
        // Attached once its interfaces are found.
        std::thread::sleep(Duration::from_millis(700));
        NodeExporter { child, address }
    }
}

impl Drop for NodeExporter {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// A `lumen-relay` process with a config file (so it can be killed and restarted).
struct RelayProcess {
    child: std::process::Child,
    address: String,
}

impl RelayProcess {
    fn start(config: &std::path::Path, address: &str) -> RelayProcess {
        let child = Command::new(env!("CARGO_BIN_EXE_lumen-relay"))
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("lumen-relay");
        wait_for("the relay to listen", || {
            std::net::TcpStream::connect(address).is_ok()
        });
        RelayProcess {
            child,
            address: address.to_owned(),
        }
    }

    fn signal(&mut self, signal: &str) {
        let _ = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_relay_killed_and_restarted_leaves_no_gap_in_history() {
    if !lumen_lab::require_privileges("a_relay_killed_and_restarted_leaves_no_gap_in_history") {
        return;
    }
    let mut ch = history_common::ClickHouse::start();
    let spool = tempfile::tempdir().unwrap();
    let mut lab = Lab::new("relay-resume").expect("lab");
    let client = lab.add_pod("client").expect("pod");
    let server = lab.add_pod("server").expect("pod");
    let http = server.http_server(8080).expect("http");
    let node = NodeExporter::start(&lab);
    let traffic = |gets: usize| {
        for _ in 0..gets {
            client
                .http_get(IpAddr::V4(server.ipv4), 8080, "/")
                .expect("http");
        }
        client
            .udp_send(IpAddr::V4(server.ipv4), 5353, b"x")
            .expect("udp");
    };

    let address = format!("127.0.0.1:{}", free_port());
    let history = history_common::config(&ch, "lumen_resume", spool.path());
    let config = serde_yaml::to_string(&serde_yaml::Value::Mapping(
        [
            ("listen_address", serde_yaml::Value::from(address.clone())),
            ("metrics_address", serde_yaml::Value::Null),
            (
                "nodes",
                serde_yaml::Value::from(vec![format!("hist-node={}", node.address)]),
            ),
            ("history", serde_yaml::to_value(&history).unwrap()),
        ]
        .into_iter()
        .map(|(k, v)| (serde_yaml::Value::from(k), v))
        .collect(),
    ))
    .unwrap();
    let config_file = spool.path().join("relay.yaml");
    std::fs::write(&config_file, config).unwrap();

    let first_start = lumen_relay::wire::now_ns();
    let mut relay = RelayProcess::start(&config_file, &address);
    std::thread::sleep(Duration::from_millis(800));
    traffic(3);
    wait_for("history to have flows", || {
        ch.number("SELECT count() FROM lumen_resume.flows") > 0
    });
    traffic(2);
    // Killed with flows in memory; traffic goes on while it is away.
    relay.signal("-KILL");
    traffic(3);
    std::thread::sleep(Duration::from_millis(500));
    let mut relay = RelayProcess::start(&config_file, &relay.address);
    std::thread::sleep(Duration::from_millis(800));
    traffic(2);
    std::thread::sleep(Duration::from_millis(1500));

    // ClickHouse down: a --since query is still answered, by the nodes alone, after a
    // record saying history is unavailable.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let relay_url = format!("http://{}", relay.address);
    ch.stop();
    let (status, flows) = rt.block_on(async {
        let mut c = ObserverClient::connect(relay_url.clone()).await.unwrap();
        let mut s = c
            .get_flows(GetFlowsRequest {
                since: Some(timestamp(first_start)),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let (mut status, mut flows) = (Vec::new(), 0);
        while let Some(r) = s.message().await.unwrap() {
            match r.response_types {
                Some(ResponseTypes::NodeStatus(n)) => status.push(n.message),
                Some(ResponseTypes::Flow(_)) => flows += 1,
                _ => {}
            }
        }
        (status, flows)
    });
    assert!(
        status
            .iter()
            .any(|m| m.contains("flow history is unavailable")),
        "{status:?}"
    );
    assert!(flows > 0, "the nodes answered");
    ch.restart();
    // Whatever was spooled meanwhile is inserted.
    wait_for("history to drain its spool", || {
        let s = rt.block_on(async {
            let mut c = ObserverClient::connect(relay_url.clone()).await.unwrap();
            c.server_status(ServerStatusRequest {})
                .await
                .unwrap()
                .into_inner()
        });
        s.sinks
            .iter()
            .any(|k| k.name == "history" && k.healthy && k.queued == 0)
    });
    drop(http);
    lab.remove_pod("client").expect("remove");
    lab.remove_pod("server").expect("remove");
    std::thread::sleep(Duration::from_millis(1500));
    // Graceful stop: the relay flushes what it took.
    relay.signal("-TERM");

    // Everything the node saw since history's first flow is in history exactly once:
    // before the kill, while the relay was away, and after.
    let first_stored = ch.number(
        "SELECT toInt64(min(toInt64(toUInt32(time)) * 1000000000 + time_ns)) FROM lumen_resume.flows",
    ) as i64;
    assert!(first_stored >= first_start, "history starts with the relay");
    let expected = rt.block_on(served_since(
        &format!("http://{}", node.address),
        first_stored,
    ));
    let rows = ch.number("SELECT count() FROM lumen_resume.flows");
    let distinct = ch.number(
        "SELECT count() FROM (SELECT DISTINCT node, flow_id, time, time_ns FROM lumen_resume.flows)",
    );
    assert_eq!(rows, distinct, "no flow stored twice");
    let stored = stored_flows(&ch, "lumen_resume");
    let missing: Vec<_> = expected.difference(&stored).take(3).collect();
    assert!(
        missing.is_empty(),
        "{} of {} flows missing in history after the relay restarted, e.g. {missing:?}",
        expected.difference(&stored).count(),
        expected.len()
    );
    assert_eq!(rows as usize, expected.len(), "nothing else stored");
    history_common::assert_rollups_agree(&ch, "lumen_resume");
}

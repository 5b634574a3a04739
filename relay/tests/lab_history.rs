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

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn exporter_bin() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_BIN_EXE_lumen-relay"))
        .parent()
        .unwrap()
        .to_path_buf();
    let bin = dir.join("lumen-node-exporter");
    if !bin.exists() {
        let ok = Command::new(env!("CARGO"))
            .args([
                "build",
                "-p",
                "lumen-node-exporter",
                "--bin",
                "lumen-node-exporter",
            ])
            .status()
            .unwrap()
            .success();
        assert!(ok, "building lumen-node-exporter");
    }
    bin
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
    let node_addr = format!("127.0.0.1:{}", free_port());
    let mut exporter = Command::new(exporter_bin())
        .args([
            "--node-name",
            "hist-node",
            "--listen-address",
            &node_addr,
            "--metrics-address",
            "",
            "--interface",
            &format!("lmh{}*", lab.id()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("exporter");
    for _ in 0..200 {
        if std::net::TcpStream::connect(&node_addr).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(700));

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

    for _ in 0..5 {
        client
            .http_get(IpAddr::V4(server.ipv4), 8080, "/")
            .expect("http");
    }
    client
        .udp_send(IpAddr::V4(server.ipv4), 5353, b"x")
        .expect("udp");
    client.ping(IpAddr::V6(server.ipv6), 2).expect("ping6");
    std::thread::sleep(Duration::from_millis(800));
    // No more traffic: the pods (and their interfaces) go away.
    drop(http);
    lab.remove_pod("client").expect("remove");
    lab.remove_pod("server").expect("remove");
    std::thread::sleep(Duration::from_millis(1500));

    // Everything the relay serves (the whole ring) ...
    let served: HashSet<(u64, i64)> = rt.block_on(async {
        let mut c = ObserverClient::connect(relay.clone()).await.unwrap();
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
                // What the relay received since it started (the node's ring is older).
                if ns >= relay_start {
                    out.insert((f.flow_id, ns));
                }
            }
        }
        out
    });
    assert!(
        served.len() >= 10,
        "the relay served {} flows",
        served.len()
    );
    // ... is in ClickHouse exactly once after the relay flushes on shutdown.
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
    let stored: HashSet<(u64, i64)> = ch
        .client("SELECT flow_id, toUInt32(time), time_ns FROM lumen_e2e.flows FORMAT TabSeparated")
        .lines()
        .filter_map(|l| {
            let mut it = l.split('\t');
            let id: u64 = it.next()?.parse().ok()?;
            let secs: i64 = it.next()?.parse().ok()?;
            let ns: i64 = it.next()?.parse().ok()?;
            Some((id, secs * 1_000_000_000 + ns))
        })
        .collect();
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
    let _ = Command::new("kill")
        .args(["-TERM", &exporter.id().to_string()])
        .status();
    let _ = exporter.wait();
}

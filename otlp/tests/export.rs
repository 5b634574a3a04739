//! End-to-end export to an independent OTLP receiver (Python, built from the
//! published opentelemetry-proto package): what it decodes must agree with
//! the flows the test sent, computed here from the flows themselves.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use common::*;
use lumen_otlp::{LogsConfig, OtlpConfig, OtlpExporter, Protocol, RetryConfig};
use lumen_proto::flow::{DropReason, Flow, FlowFilter, Verdict};
use serde_json::{json, Value};

fn base_config(endpoint: String, protocol: Protocol) -> OtlpConfig {
    let mut c = OtlpConfig {
        endpoint: Some(endpoint),
        protocol,
        export_interval: Duration::from_millis(300),
        timeout: Duration::from_secs(3),
        ..Default::default()
    };
    c.resource.instance = Some("relay-test".into());
    c.resource.cluster = Some("lab".into());
    c.headers
        .insert("authorization".into(), "Bearer s3cret".into());
    c.logs = LogsConfig {
        enabled: true,
        max_batch_size: 100,
        batch_timeout: Duration::from_millis(50),
        ..Default::default()
    };
    c
}

/// Expected `lumen.flows` totals, keyed like the receiver's attributes.
fn expected_flow_counts(flows: &[(Flow, &str)]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for (f, node) in flows {
        let (src, dst) = pair(f);
        let mut a = json!({
            "k8s.node.name": node,
            "lumen.source.namespace": "shop",
            "lumen.source.workload": src,
            "lumen.destination.namespace": "shop",
            "lumen.destination.workload": dst,
            "lumen.verdict": Verdict::try_from(f.verdict).unwrap().as_str_name(),
            "lumen.traffic_direction": direction(f),
        });
        if f.verdict == Verdict::Dropped as i32 {
            a["lumen.drop_reason"] = json!(DropReason::try_from(f.drop_reason_desc)
                .unwrap()
                .as_str_name());
        }
        *m.entry(a.to_string()).or_insert(0) += 1;
    }
    m
}

/// Checks one received log record against the flow it came from.
fn check_log(rec: &Value, f: &Flow, node: &str) {
    let a = &rec["attributes"];
    let (sport, dport, transport) = ports(f);
    let ip = f.ip.as_ref().unwrap();
    let (src, dst) = pair(f);
    let id = f.flow_id;
    assert_eq!(a["network.transport"], transport, "flow {id}");
    assert_eq!(a["network.type"], "ipv4", "flow {id}");
    assert_eq!(a["source.address"], ip.source.as_str(), "flow {id}");
    assert_eq!(a["source.port"], sport, "flow {id}");
    assert_eq!(
        a["destination.address"],
        ip.destination.as_str(),
        "flow {id}"
    );
    assert_eq!(a["destination.port"], dport, "flow {id}");
    assert_eq!(a["k8s.node.name"], node, "flow {id}");
    let local = if direction(f) == "ingress" {
        &f.destination
    } else {
        &f.source
    };
    let local = local.as_ref().unwrap();
    assert_eq!(
        a["k8s.namespace.name"],
        local.namespace.as_str(),
        "flow {id}"
    );
    assert_eq!(a["k8s.pod.name"], local.pod_name.as_str(), "flow {id}");
    assert_eq!(
        a["k8s.deployment.name"],
        local.workloads[0].name.as_str(),
        "flow {id}"
    );
    assert_eq!(a["lumen.source.workload"], src.as_str(), "flow {id}");
    assert_eq!(a["lumen.destination.workload"], dst.as_str(), "flow {id}");
    assert_eq!(
        a["lumen.source.labels"],
        json!(f.source.as_ref().unwrap().labels),
        "flow {id}"
    );
    assert_eq!(
        a["lumen.verdict"],
        Verdict::try_from(f.verdict).unwrap().as_str_name(),
        "flow {id}"
    );
    assert_eq!(a["lumen.traffic_direction"], direction(f), "flow {id}");
    if f.verdict == Verdict::Dropped as i32 {
        assert_eq!(
            a["lumen.drop_reason"],
            DropReason::try_from(f.drop_reason_desc)
                .unwrap()
                .as_str_name(),
            "flow {id}"
        );
        assert_eq!(rec["severity_text"], "WARN");
    } else {
        assert!(a.get("lumen.drop_reason").is_none(), "flow {id}");
        assert_eq!(rec["severity_text"], "INFO");
    }
    match &f.handshake_rtt {
        Some(d) => {
            let want = d.nanos as f64 / 1e9;
            let got = a["lumen.tcp.handshake.rtt"].as_f64().unwrap();
            assert!((got - want).abs() < 1e-12, "flow {id}: rtt {got} != {want}");
        }
        None => assert!(a.get("lumen.tcp.handshake.rtt").is_none()),
    }
    let t = f.time.as_ref().unwrap();
    assert_eq!(
        rec["time_unix_nano"],
        t.seconds as u64 * 1_000_000_000,
        "flow {id}"
    );
    assert_eq!(rec["event_name"], "lumen.flow");
    assert!(a.get("__duplicate_keys__").is_none(), "flow {id}: {a}");
}

fn log_ids(lines: &[Value]) -> Vec<u64> {
    of_signal(lines, "log")
        .iter()
        .map(|r| r["attributes"]["lumen.flow.id"].as_u64().unwrap())
        .collect()
}

fn check_resource(res: &Value) {
    assert_eq!(res["service.name"], "lumen-relay", "{res}");
    assert_eq!(res["service.instance.id"], "relay-test", "{res}");
    assert_eq!(res["k8s.cluster.name"], "lab", "{res}");
}

async fn metrics_and_logs_agree(protocol: Protocol) {
    let rx = Receiver::start(&ReceiverOpts::default());
    let endpoint = match protocol {
        Protocol::Grpc => format!("http://127.0.0.1:{}", rx.grpc_port),
        Protocol::HttpProtobuf => format!("http://127.0.0.1:{}", rx.http_port),
    };
    let cfg = base_config(endpoint, protocol);
    let exporter = OtlpExporter::start(&cfg, "ignored").expect("starts");
    let rec = exporter.recorder();
    let flows = flows(1, 600);
    for (f, node) in &flows {
        rec.record(f, node);
    }
    rec.record_lost("relay_merge_queue", "node-b", 7);
    wait_until("all log records exported", Duration::from_secs(30), || {
        exporter.status().logs.unwrap().exported == flows.len() as u64
    })
    .await;
    let status = exporter.shutdown(Duration::from_secs(5)).await;
    let logs = status.logs.unwrap();
    assert_eq!(logs.discarded.total(), 0, "{logs:?}");
    assert_eq!(logs.enqueued, 600);
    let metrics = status.metrics.unwrap();
    assert!(metrics.export.requests_ok > 0, "{metrics:?}");

    let lines = rx.lines();
    // Logs: one record per flow, attributes matching the flow.
    let received = of_signal(&lines, "log");
    assert_eq!(received.len(), flows.len());
    let by_id: HashMap<u64, (&Flow, &str)> =
        flows.iter().map(|(f, n)| (f.flow_id, (f, *n))).collect();
    for r in &received {
        let id = r["attributes"]["lumen.flow.id"].as_u64().unwrap();
        let (f, node) = by_id[&id];
        check_log(r, f, node);
        check_resource(&r["resource"]);
    }
    assert_eq!(
        log_ids(&lines).into_iter().collect::<BTreeSet<_>>().len(),
        600
    );

    // Metrics: cumulative flow counts per label set equal the flows sent.
    let points = latest_points(&lines, "lumen.flows");
    let got: BTreeMap<String, u64> = points
        .iter()
        .map(|(k, v)| {
            assert_eq!(v["type"], "sum");
            assert_eq!(v["monotonic"], true);
            assert_eq!(v["temporality"], 2, "cumulative");
            check_resource(&v["resource"]);
            (k.clone(), v["value"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(got, expected_flow_counts(&flows));

    // Histogram: one observation per flow with an RTT, same total.
    let rtts: Vec<f64> = flows
        .iter()
        .filter_map(|(f, _)| f.handshake_rtt.as_ref().map(|d| d.nanos as f64 / 1e9))
        .collect();
    let hist = latest_points(&lines, "lumen.tcp.handshake.rtt");
    let count: u64 = hist.values().map(|p| p["count"].as_u64().unwrap()).sum();
    let sum: f64 = hist.values().map(|p| p["sum"].as_f64().unwrap()).sum();
    assert_eq!(count, rtts.len() as u64);
    assert!((sum - rtts.iter().sum::<f64>()).abs() < 1e-9, "{sum}");
    for p in hist.values() {
        assert_eq!(p["unit"], "s");
        assert_eq!(p["explicit_bounds"].as_array().unwrap().len(), 16, "{p}");
        let buckets: u64 = p["bucket_counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap())
            .sum();
        assert_eq!(buckets, p["count"].as_u64().unwrap());
    }

    // Lost events by stage and node.
    let lost = latest_points(&lines, "lumen.lost_events");
    let lost: Vec<_> = lost.values().collect();
    assert_eq!(lost.len(), 1);
    assert_eq!(lost[0]["attributes"]["lumen.stage"], "relay_merge_queue");
    assert_eq!(lost[0]["attributes"]["k8s.node.name"], "node-b");
    assert_eq!(lost[0]["value"], 7);

    // Every request carried the configured header.
    let requests = of_signal(&lines, "request");
    assert!(requests.iter().any(|r| r["kind"] == "metrics"));
    for r in requests {
        assert_eq!(r["headers"]["authorization"], "Bearer s3cret", "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_metrics_and_logs_agree_with_the_flows() {
    metrics_and_logs_agree(Protocol::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_protobuf_metrics_and_logs_agree_with_the_flows() {
    metrics_and_logs_agree(Protocol::HttpProtobuf).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_and_sampling_choose_the_logged_flows() {
    let rx = Receiver::start(&ReceiverOpts::default());
    let mut cfg = base_config(format!("http://127.0.0.1:{}", rx.grpc_port), Protocol::Grpc);
    cfg.metrics.enabled = false;
    // Only drops, but not those to the cache.
    cfg.logs.allow_list = vec![lumen_otlp::FilterSpec(FlowFilter {
        verdict: vec![Verdict::Dropped as i32],
        ..Default::default()
    })];
    cfg.logs.deny_list =
        vec![serde_json::from_value(json!({"destination_label": ["k8s:app=cache"]})).unwrap()];
    cfg.logs.sampling_ratio = 0.5;
    let exporter = OtlpExporter::start(&cfg, "relay").expect("starts");
    // Three events per connection: sampling must keep or skip them together.
    let flows = flows(1, 2000);
    for round in 0..3 {
        for (f, node) in &flows {
            let mut f = f.clone();
            f.time.as_mut().unwrap().nanos = round;
            exporter.record(&f, node);
        }
    }
    let wanted: Vec<&Flow> = flows
        .iter()
        .map(|(f, _)| f)
        .filter(|f| f.verdict == Verdict::Dropped as i32 && pair(f).1 != "cache")
        .collect();
    let st = exporter.status().logs.unwrap();
    assert_eq!(st.filtered_out, 3 * (2000 - wanted.len() as u64));
    wait_until("sampled records exported", Duration::from_secs(30), || {
        let l = exporter.status().logs.unwrap();
        l.exported == l.enqueued
    })
    .await;
    let status = exporter.shutdown(Duration::from_secs(5)).await;
    assert!(status.metrics.is_none());
    let lines = rx.lines();
    let mut per_id: BTreeMap<u64, usize> = BTreeMap::new();
    for id in log_ids(&lines) {
        *per_id.entry(id).or_default() += 1;
    }
    let allowed: BTreeSet<u64> = wanted.iter().map(|f| f.flow_id).collect();
    assert!(
        per_id.keys().all(|id| allowed.contains(id)),
        "a filtered flow was exported"
    );
    assert!(
        per_id.values().all(|n| *n == 3),
        "sampling split a connection: {per_id:?}"
    );
    let share = per_id.len() as f64 / allowed.len() as f64;
    assert!(
        (0.35..0.65).contains(&share),
        "kept {share} of connections at ratio 0.5"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_down_then_up_recovers_and_counts_what_it_dropped() {
    // Find a free port, then leave it closed: the collector is down.
    let mut first = Receiver::start(&ReceiverOpts::default());
    let port = first.grpc_port;
    let out = first.out.clone();
    first.stop();

    let mut cfg = base_config(format!("http://127.0.0.1:{port}"), Protocol::Grpc);
    cfg.logs.queue_capacity = 200;
    cfg.logs.max_batch_size = 50;
    cfg.retry = RetryConfig {
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        max_elapsed: Duration::from_secs(120),
    };
    cfg.timeout = Duration::from_secs(1);
    let exporter =
        OtlpExporter::start(&cfg, "relay").expect("a down collector is not a start-up error");
    let rec = exporter.recorder();
    let down = flows(1, 1000);
    for (f, node) in &down {
        rec.record(f, node);
    }
    // The caller was never blocked; the queue overflowed and counted it.
    let st = exporter.status();
    let logs = st.logs.clone().unwrap();
    assert!(logs.discarded.queue_full >= 1000 - 200 - 50, "{logs:?}");
    wait_until("export failures noticed", Duration::from_secs(10), || {
        let s = exporter.status();
        !s.logs.unwrap().export.healthy && s.metrics.unwrap().export.requests_failed > 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(exporter.status().logs.unwrap().exported, 0);

    // The collector comes back on the same port.
    let rx = Receiver::start(&ReceiverOpts {
        grpc_port: port,
        out: Some(out.clone()),
        ..Default::default()
    });
    wait_until("queued records delivered", Duration::from_secs(30), || {
        let l = exporter.status().logs.unwrap();
        l.queue_length == 0 && l.exported + l.discarded.total() == 1000
    })
    .await;
    let up = flows(1001, 100);
    for (f, node) in &up {
        rec.record(f, node);
    }
    wait_until("new records delivered", Duration::from_secs(30), || {
        let l = exporter.status().logs.unwrap();
        l.exported + l.discarded.total() == 1100
    })
    .await;
    let status = exporter.shutdown(Duration::from_secs(5)).await;
    let logs = status.logs.unwrap();
    assert!(logs.export.healthy, "{logs:?}");
    assert!(logs.export.retries > 0, "{logs:?}");

    let lines = rx.lines();
    let ids = log_ids(&lines);
    let unique: BTreeSet<u64> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "duplicates delivered");
    // What the receiver misses is exactly what was counted as dropped.
    assert_eq!(1100 - ids.len() as u64, logs.discarded.total(), "{logs:?}");
    assert_eq!(
        logs.discarded.total(),
        logs.discarded.queue_full,
        "{logs:?}"
    );
    assert!(
        (1001..=1100).all(|id| unique.contains(&id)),
        "flows after recovery missing"
    );
    // Metrics lost nothing: cumulative totals cover the outage.
    let total: u64 = latest_points(&lines, "lumen.flows")
        .values()
        .map(|p| p["value"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 1100);
    let metrics = status.metrics.unwrap();
    assert!(
        metrics.export.healthy && metrics.export.requests_failed > 0,
        "{metrics:?}"
    );
    // The exporter's own drop counter reached the collector too.
    let discarded = latest_points(&lines, "lumen.otlp.log_records.discarded");
    let queue_full = discarded
        .values()
        .find(|p| p["attributes"]["lumen.reason"] == "queue_full")
        .map(|p| p["value"].as_u64().unwrap());
    assert_eq!(queue_full, Some(logs.discarded.queue_full));
}

/// A test CA and a certificate it signed for localhost/127.0.0.1, made with
/// the openssl command: (ca.pem, cert.pem, key.pem).
fn make_certs(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let p = |n: &str| dir.join(n);
    std::fs::write(
        p("leaf.ext"),
        "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let steps: [Vec<&str>; 3] = [
        [
            &["req", "-x509"][..],
            &ec,
            &[
                "-days",
                "1",
                "-subj",
                "/CN=Lumen test CA",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
            ],
        ]
        .concat(),
        [
            &["req"][..],
            &ec,
            &[
                "-subj",
                "/CN=localhost",
                "-keyout",
                "key.pem",
                "-out",
                "leaf.csr",
            ],
        ]
        .concat(),
        vec![
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "leaf.ext",
            "-out",
            "cert.pem",
        ],
    ];
    for args in steps {
        let out = std::process::Command::new("openssl")
            .args(&args)
            .current_dir(dir)
            .output()
            .expect("the TLS test needs the openssl command (Debian package openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (p("ca.pem"), p("cert.pem"), p("key.pem"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_ca_file_and_with_verification_off() {
    require_python();
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_certs(dir.path());
    let rx = Receiver::start(&ReceiverOpts {
        tls: Some((cert, key)),
        ..Default::default()
    });

    // gRPC, certificate checked against the CA file.
    let mut cfg = base_config(
        format!("https://localhost:{}", rx.grpc_port),
        Protocol::Grpc,
    );
    cfg.tls.ca_file = Some(ca);
    let exporter = OtlpExporter::start(&cfg, "relay").expect("starts");
    for (f, node) in flows(1, 10) {
        exporter.record(&f, node);
    }
    wait_until("TLS gRPC export", Duration::from_secs(20), || {
        exporter.status().logs.unwrap().exported == 10
    })
    .await;
    exporter.shutdown(Duration::from_secs(2)).await;

    // HTTP, no certificate check.
    let mut cfg = base_config(
        format!("https://127.0.0.1:{}", rx.http_port),
        Protocol::HttpProtobuf,
    );
    cfg.tls.insecure_skip_verify = true;
    let exporter = OtlpExporter::start(&cfg, "relay").expect("starts");
    for (f, node) in flows(11, 10) {
        exporter.record(&f, node);
    }
    wait_until("TLS HTTP export", Duration::from_secs(20), || {
        exporter.status().logs.unwrap().exported == 10
    })
    .await;
    exporter.shutdown(Duration::from_secs(2)).await;

    // Without the CA the handshake fails: nothing is exported.
    let cfg = base_config(
        format!("https://localhost:{}", rx.grpc_port),
        Protocol::Grpc,
    );
    if let Ok(exporter) = OtlpExporter::start(&cfg, "relay") {
        exporter.record(&flows(21, 1)[0].0, "n");
        wait_until("TLS failure noticed", Duration::from_secs(20), || {
            exporter.status().logs.unwrap().export.requests_failed > 0
        })
        .await;
        let st = exporter.status().logs.unwrap();
        assert_eq!(st.exported, 0);
        assert!(st.export.last_error.is_some());
    }
    let ids: BTreeSet<u64> = log_ids(&rx.lines()).into_iter().collect();
    assert_eq!(ids, (1..=20).collect());
}

#[tokio::test]
async fn invalid_config_is_a_clear_start_up_error() {
    let start = |yaml: &str| -> String {
        let cfg: OtlpConfig = match serde_yaml::from_str(yaml) {
            Ok(c) => c,
            Err(e) => return e.to_string(),
        };
        match OtlpExporter::start(&cfg, "relay") {
            Ok(_) => panic!("{yaml:?} was accepted"),
            Err(e) => e.to_string(),
        }
    };
    let e = start("endpoint: otel-collector:4317");
    assert!(
        e.contains("invalid OTLP endpoint \"otel-collector:4317\""),
        "{e}"
    );
    let e = start("endpoint: \"http://otel collector:4317\"");
    assert!(
        e.contains("invalid OTLP endpoint") && e.contains("not a URL"),
        "{e}"
    );
    let e = start("protocol: http/json");
    assert!(
        e.contains("unknown variant `http/json`") && e.contains("`grpc`"),
        "{e}"
    );
    let e = start("endpoint: https://c:4317\ntls: { ca_file: /nonexistent/ca.pem }");
    assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    let e = start("logs: { enabled: true, allow_list: [ { source_ip: [\"not-an-ip\"] } ] }");
    assert!(
        e.contains("logs.allow_list[0]") && e.contains("not-an-ip"),
        "{e}"
    );
    // Outside a runtime.
    let e = std::thread::spawn(|| {
        OtlpExporter::start(&OtlpConfig::default(), "r")
            .err()
            .map(|e| e.to_string())
    })
    .join()
    .unwrap();
    assert_eq!(
        e.as_deref(),
        Some("the OTLP exporter must be started inside a Tokio runtime")
    );
}

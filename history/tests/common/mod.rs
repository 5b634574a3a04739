//! Test harness: a private ClickHouse server, a cluster-like flow generator, chDB runner.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lumen_history::{HistoryConfig, HistoryMetrics, HistoryQuery};
use lumen_proto::flow::{
    layer4::Protocol, CiliumEventType, Endpoint, Flow, FlowCounters, FlowFilter, IcmPv4, Ip,
    Layer4, LumenEventKind, Policy, Tcp, TcpFlags, Udp, Verdict, Workload,
};

/// One minute in nanoseconds.
pub const MIN_NS: i64 = 60_000_000_000;

const SERVER: &str = "clickhouse-server";
const CONFIG: &str = "/etc/clickhouse-server/config.xml";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A ClickHouse server on loopback with its own data directory; stopped on drop.
pub struct ClickHouse {
    dir: tempfile::TempDir,
    pub http_port: u16,
    tcp_port: u16,
    interserver_port: u16,
    child: Option<Child>,
}

impl ClickHouse {
    /// Starts a server, panicking with the install command if ClickHouse is missing.
    pub fn start() -> Self {
        if Command::new(SERVER)
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
            || !Path::new(CONFIG).exists()
        {
            panic!(
                "{SERVER} not found: these tests need a real ClickHouse server. \
                 Install it with `apt-get install -y clickhouse-server clickhouse-client` \
                 (or `cargo xtask setup`)."
            );
        }
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("data/tmp")).expect("mkdir");
        let mut s = Self {
            dir,
            http_port: free_port(),
            tcp_port: free_port(),
            interserver_port: free_port(),
            child: None,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let d = self.dir.path().join("data");
        let log = std::fs::File::create(self.dir.path().join("stdout.log")).expect("log file");
        let child = Command::new(SERVER)
            .arg(format!("--config-file={CONFIG}"))
            .arg("--")
            .arg(format!("--path={}/", d.display()))
            .arg(format!("--tmp_path={}/tmp/", d.display()))
            .arg(format!("--http_port={}", self.http_port))
            .arg(format!("--tcp_port={}", self.tcp_port))
            .arg(format!("--interserver_http_port={}", self.interserver_port))
            .arg("--listen_host=127.0.0.1")
            .arg(format!("--logger.log={}/server.log", d.display()))
            .arg(format!("--logger.errorlog={}/server.err.log", d.display()))
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("start clickhouse-server");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.ping() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let log =
                    std::fs::read_to_string(self.dir.path().join("stdout.log")).unwrap_or_default();
                panic!("clickhouse-server exited with {status}: {log}");
            }
            assert!(
                Instant::now() < deadline,
                "clickhouse-server did not answer within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.http_port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /ping HTTP/1.0\r\n\r\n").is_err() {
            return false;
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.contains("Ok.")
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn tcp_port(&self) -> u16 {
        self.tcp_port
    }

    /// Stops the server gracefully (SIGTERM) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let started = Instant::now();
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.wait();
            eprintln!("clickhouse-server stopped in {:?}", started.elapsed());
        }
    }

    /// Kills the server (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same ports and data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Runs SQL with `clickhouse-client`, returning stdout.
    pub fn client(&self, sql: &str) -> String {
        let out = Command::new("clickhouse-client")
            .arg(format!("--port={}", self.tcp_port))
            .arg("--query")
            .arg(sql)
            .output()
            .expect("clickhouse-client");
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The first number `sql` returns.
    pub fn number(&self, sql: &str) -> u64 {
        let s = self.client(sql);
        s.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{sql} returned {s:?}"))
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A config for a test: this server, a database, a spool directory, short delays.
pub fn config(ch: &ClickHouse, db: &str, spool: &Path) -> HistoryConfig {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut cfg = HistoryConfig::default();
    cfg.clickhouse.url = ch.url();
    cfg.clickhouse.database = db.to_owned();
    cfg.clickhouse.request_timeout = Duration::from_secs(10);
    cfg.spool.dir = spool.to_owned();
    cfg.batch.max_delay = Duration::from_millis(200);
    cfg.retry.initial_backoff = Duration::from_millis(50);
    cfg.retry.max_backoff = Duration::from_millis(500);
    cfg.migration_lock_timeout = Duration::from_secs(20);
    cfg
}

pub fn metrics() -> HistoryMetrics {
    HistoryMetrics::default()
}

// ---- flow generator ----

pub const NAMESPACES: &[&str] = &["shop", "payments", "monitoring", "kube-system"];
pub const WORKLOADS: &[&str] = &["web", "api", "db"];
pub const NODES: &[&str] = &["lumen/node-1", "lumen/node-2", "lumen/node-3"];
const SERVER_PORTS: &[u32] = &[80, 8080, 5432];

fn endpoint(ns: usize, wl: usize, pod: usize) -> (Endpoint, String) {
    let ns_name = NAMESPACES[ns];
    let wl_name = WORKLOADS[wl];
    let ep = Endpoint {
        identity: 10_000 + (ns * 10 + wl) as u32,
        namespace: ns_name.into(),
        pod_name: format!("{wl_name}-{pod}"),
        labels: vec![
            format!("k8s:app={wl_name}"),
            format!("k8s:io.kubernetes.pod.namespace={ns_name}"),
        ],
        workloads: vec![Workload {
            name: wl_name.into(),
            kind: if wl == 2 {
                "StatefulSet".into()
            } else {
                "Deployment".into()
            },
        }],
        ..Default::default()
    };
    (ep, format!("10.{}.{}.{}", ns + 1, wl + 1, pod + 10))
}

fn ts(ns: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    }
}

fn dur(ns: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: ns / 1_000_000_000,
        nanos: (ns % 1_000_000_000) as i32,
    }
}

/// `n` flow events of chunk `chunk`, deterministic, spread over `[start_ns, start_ns + span_ns)`.
///
/// Connections between workloads of a small cluster: TCP (SYN, SYN-ACK with the handshake
/// RTT, updates, close), UDP, ICMP, and 5% policy drops. Every event's `flow_id` is
/// `chunk << 32 | connection`, so a test can count rows per chunk.
pub fn flows(chunk: u32, n: usize, start_ns: i64, span_ns: i64) -> Vec<Flow> {
    let mut rng = fastrand::Rng::with_seed(0x5eed ^ u64::from(chunk) << 20);
    let mut out = Vec::with_capacity(n);
    let mut conn: u64 = 0;
    while out.len() < n {
        conn += 1;
        let flow_id = (u64::from(chunk) << 32) | conn;
        let node = NODES[rng.usize(..NODES.len())];
        let (sns, swl) = (rng.usize(..NAMESPACES.len()), rng.usize(..2));
        let (dns, dwl) = if rng.f32() < 0.7 {
            (sns, swl + 1)
        } else {
            (rng.usize(..NAMESPACES.len()), 2)
        };
        let (src, sip) = endpoint(sns, swl, rng.usize(..3));
        let (dst, dip) = endpoint(dns, dwl, rng.usize(..3));
        let sport = rng.u32(32768..61000);
        let dport = SERVER_PORTS[dwl];
        let t0 = start_ns + (out.len() as i64 * span_ns) / n as i64;
        let kind = rng.u32(..100);
        let base = Flow {
            node_name: node.into(),
            flow_id,
            ip: Some(Ip {
                source: sip.clone(),
                destination: dip.clone(),
                ip_version: 1,
                encrypted: false,
            }),
            source: Some(src.clone()),
            destination: Some(dst.clone()),
            r#type: 1,
            traffic_direction: 2,
            trace_observation_point: 5,
            event_type: Some(CiliumEventType {
                r#type: 4,
                sub_type: 3,
            }),
            is_reply: Some(false),
            egress_allowed_by: vec![Policy {
                name: format!("allow-{}", WORKLOADS[dwl]),
                namespace: NAMESPACES[dns].into(),
                kind: "NetworkPolicy".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let mk = |t: i64, ev: LumenEventKind, l4: Protocol, c: (u64, u64, u64, u64)| {
            let mut f = base.clone();
            f.time = Some(ts(t));
            f.lumen_event_kind = ev as i32;
            f.l4 = Some(Layer4 { protocol: Some(l4) });
            f.counters = Some(FlowCounters {
                orig_packets: c.0,
                orig_bytes: c.1,
                reply_packets: c.2,
                reply_bytes: c.3,
            });
            f.flow_duration = Some(dur(t - t0));
            f.first_seen = Some(ts(t0));
            f.packet_length = 74;
            f.uuid = format!("{flow_id:016x}-{t:x}");
            f
        };
        let tcp = |flags: TcpFlags, reply: bool| {
            Protocol::Tcp(if reply {
                Tcp {
                    source_port: dport,
                    destination_port: sport,
                    flags: Some(flags),
                }
            } else {
                Tcp {
                    source_port: sport,
                    destination_port: dport,
                    flags: Some(flags),
                }
            })
        };
        if kind < 5 {
            // Policy drop of a SYN.
            let mut f = mk(
                t0,
                LumenEventKind::FlowDrop,
                tcp(
                    TcpFlags {
                        syn: true,
                        ..Default::default()
                    },
                    false,
                ),
                (1, 74, 0, 0),
            );
            f.verdict = Verdict::Dropped as i32;
            f.drop_reason_desc = if kind < 3 { 133 } else { 181 };
            f.event_type = Some(CiliumEventType {
                r#type: 1,
                sub_type: f.drop_reason_desc,
            });
            f.egress_allowed_by.clear();
            f.egress_denied_by = vec![Policy {
                name: "deny-all".into(),
                namespace: NAMESPACES[dns].into(),
                kind: "NetworkPolicy".into(),
                ..Default::default()
            }];
            out.push(f);
        } else if kind < 15 {
            let mut f = mk(
                t0,
                LumenEventKind::FlowNew,
                Protocol::Udp(Udp {
                    source_port: sport,
                    destination_port: 53,
                }),
                (1, 80, 0, 0),
            );
            f.verdict = Verdict::Forwarded as i32;
            out.push(f);
        } else if kind < 18 {
            let mut f = mk(
                t0,
                LumenEventKind::FlowNew,
                Protocol::IcmPv4(IcmPv4 { r#type: 8, code: 0 }),
                (1, 98, 0, 0),
            );
            f.verdict = Verdict::Forwarded as i32;
            out.push(f);
        } else {
            let rtt = i64::from(rng.u32(20_000..400_000));
            let mut syn = mk(
                t0,
                LumenEventKind::FlowNew,
                tcp(
                    TcpFlags {
                        syn: true,
                        ..Default::default()
                    },
                    false,
                ),
                (1, 74, 0, 0),
            );
            syn.verdict = Verdict::Forwarded as i32;
            out.push(syn);
            let t1 = t0 + rtt;
            let mut synack = mk(
                t1,
                LumenEventKind::FlowTcpFlags,
                tcp(
                    TcpFlags {
                        syn: true,
                        ack: true,
                        ..Default::default()
                    },
                    true,
                ),
                (1, 74, 1, 74),
            );
            synack.verdict = Verdict::Forwarded as i32;
            synack.is_reply = Some(true);
            synack.source = Some(dst.clone());
            synack.destination = Some(src.clone());
            synack.ip = Some(Ip {
                source: dip.clone(),
                destination: sip.clone(),
                ip_version: 1,
                encrypted: false,
            });
            synack.handshake_rtt = Some(dur(rtt));
            synack.traffic_direction = 2;
            out.push(synack);
            let (mut p, mut b) = (2u64, 140u64);
            let updates = rng.usize(0..3);
            for u in 0..updates {
                p += u64::from(rng.u32(1..50));
                b += u64::from(rng.u32(100..60_000));
                let mut up = mk(
                    t1 + (u as i64 + 1) * 1_000_000,
                    LumenEventKind::FlowUpdate,
                    tcp(
                        TcpFlags {
                            ack: true,
                            psh: true,
                            ..Default::default()
                        },
                        false,
                    ),
                    (p, b, p, b * 3),
                );
                up.verdict = Verdict::Forwarded as i32;
                up.handshake_rtt = Some(dur(rtt));
                out.push(up);
            }
            let mut fin = mk(
                t1 + 10_000_000,
                LumenEventKind::FlowClose,
                tcp(
                    TcpFlags {
                        fin: true,
                        ack: true,
                        ..Default::default()
                    },
                    false,
                ),
                (p + 2, b + 132, p + 2, b * 3 + 66),
            );
            fin.verdict = Verdict::Forwarded as i32;
            fin.handshake_rtt = Some(dur(rtt));
            out.push(fin);
        }
    }
    out.truncate(n);
    out
}

/// Nanoseconds since the epoch now.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

// ---- chDB ----

/// The chDB check script beside this file.
pub fn chdb_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/chdb_check.py")
}

/// Whether `python3 -c 'import chdb'` works; the reason when not.
pub fn chdb_available() -> Result<(), String> {
    match Command::new("python3")
        .arg("-c")
        .arg("import chdb")
        .output()
    {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_owned()),
        Err(e) => Err(format!("python3: {e}")),
    }
}

/// The rollups hold exactly what `flows` says, key by key.
pub fn assert_rollups_agree(ch: &ClickHouse, db: &str) {
    let pair = "src_namespace, src_workload, dst_namespace, dst_workload";
    let from_flows = ch.client(&format!(
        "SELECT toStartOfMinute(time) AS m, {pair}, verdict, direction, count(), countIf(event_kind = 1), \
         sum(delta_packets), sum(delta_bytes) FROM {db}.flows GROUP BY m, {pair}, verdict, direction \
         ORDER BY m, {pair}, verdict, direction"
    ));
    let rollup = ch.client(&format!(
        "SELECT minute, {pair}, verdict, direction, sum(events), sum(connections), sum(packets), sum(bytes) \
         FROM {db}.flows_1m GROUP BY minute, {pair}, verdict, direction ORDER BY minute, {pair}, verdict, direction"
    ));
    assert!(!rollup.is_empty());
    assert_eq!(from_flows, rollup, "flows_1m disagrees with flows");
    let from_flows = ch.client(&format!(
        "SELECT toStartOfMinute(time) AS m, drop_reason, {pair}, count(), sum(delta_packets) FROM {db}.flows \
         WHERE verdict = 2 GROUP BY m, drop_reason, {pair} ORDER BY m, drop_reason, {pair}"
    ));
    let rollup = ch.client(&format!(
        "SELECT minute, drop_reason, {pair}, sum(drops), sum(packets) FROM {db}.drops_1m \
         GROUP BY minute, drop_reason, {pair} ORDER BY minute, drop_reason, {pair}"
    ));
    assert_eq!(from_flows, rollup, "drops_1m disagrees with flows");
    let from_flows = ch.client(&format!(
        "SELECT toStartOfMinute(time) AS m, dst_workload, src_workload, count(), \
         arrayMap(x -> toUInt64(x), quantilesTDigest(0.5, 0.99)(handshake_rtt_ns)) FROM {db}.flows \
         WHERE handshake_rtt_ns > 0 AND protocol = 6 AND bitAnd(tcp_flags, 18) = 18 \
         GROUP BY m, dst_workload, src_workload ORDER BY m, dst_workload, src_workload"
    ));
    let rollup = ch.client(&format!(
        "SELECT minute, client_workload, server_workload, countMerge(samples), \
         arrayMap(x -> toUInt64(x), quantilesTDigestMerge(0.5, 0.99)(handshake_rtt)) FROM {db}.latency_1m \
         GROUP BY minute, client_workload, server_workload ORDER BY minute, client_workload, server_workload"
    ));
    // Sample counts must agree exactly; t-digest quantiles merged from partial states may
    // differ slightly from a single pass, so compare the counts column.
    let counts = |s: &str| {
        s.lines()
            .map(|l| l.split('\t').take(4).collect::<Vec<_>>().join("\t"))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        counts(&from_flows),
        counts(&rollup),
        "latency_1m samples disagree with flows"
    );
}

/// `GetFlows`-shaped history queries over [`flows`]' data starting at `start`: every
/// filter kind the reader pushes down (or leaves to the matcher), limits and time windows.
/// Checked against an oracle on 18.16 (`clickhouse.rs`) and on chDB (`chdb.rs`).
pub fn reader_cases(start: i64) -> Vec<(&'static str, HistoryQuery)> {
    let wl = |name: &str| Workload {
        name: name.into(),
        kind: String::new(),
    };
    vec![
        (
            "drops",
            HistoryQuery {
                whitelist: vec![FlowFilter {
                    verdict: vec![Verdict::Dropped as i32],
                    ..Default::default()
                }],
                ..Default::default()
            },
        ),
        (
            "pod prefix",
            HistoryQuery {
                whitelist: vec![FlowFilter {
                    source_pod: vec!["shop/web".into()],
                    ..Default::default()
                }],
                ..Default::default()
            },
        ),
        (
            "label selector (not pushed down)",
            HistoryQuery {
                whitelist: vec![FlowFilter {
                    destination_label: vec!["k8s:app=db".into()],
                    ..Default::default()
                }],
                ..Default::default()
            },
        ),
        (
            "cidr + port",
            HistoryQuery {
                whitelist: vec![FlowFilter {
                    destination_ip: vec!["10.2.0.0/16".into()],
                    destination_port: vec!["5432".into()],
                    ..Default::default()
                }],
                ..Default::default()
            },
        ),
        (
            "node glob, two whitelist filters",
            HistoryQuery {
                whitelist: vec![
                    FlowFilter {
                        node_name: vec!["lumen/node-1".into()],
                        protocol: vec!["udp".into()],
                        ..Default::default()
                    },
                    FlowFilter {
                        tcp_flags: vec![TcpFlags {
                            syn: true,
                            ack: true,
                            ..Default::default()
                        }],
                        reply: vec![true],
                        ..Default::default()
                    },
                ],
                ..Default::default()
            },
        ),
        (
            "workload, blacklist namespace and label",
            HistoryQuery {
                whitelist: vec![FlowFilter {
                    destination_workload: vec![wl("db")],
                    ..Default::default()
                }],
                blacklist: vec![
                    FlowFilter {
                        source_pod: vec!["monitoring/".into()],
                        ..Default::default()
                    },
                    FlowFilter {
                        source_label: vec!["app=api".into()],
                        ..Default::default()
                    },
                ],
                ..Default::default()
            },
        ),
        (
            "http never matches history",
            HistoryQuery {
                whitelist: vec![FlowFilter {
                    http_method: vec!["GET".into()],
                    ..Default::default()
                }],
                ..Default::default()
            },
        ),
        (
            "time window",
            HistoryQuery {
                since_ns: Some(start + MIN_NS),
                until_ns: Some(start + 2 * MIN_NS),
                ..Default::default()
            },
        ),
        (
            "last 25 drops",
            HistoryQuery {
                whitelist: vec![FlowFilter {
                    verdict: vec![2],
                    ..Default::default()
                }],
                limit: Some(25),
                ..Default::default()
            },
        ),
        (
            "first 7 with a label",
            HistoryQuery {
                whitelist: vec![FlowFilter {
                    source_label: vec!["k8s:app=web".into()],
                    ..Default::default()
                }],
                limit: Some(7),
                first: true,
                ..Default::default()
            },
        ),
        ("all", HistoryQuery::default()),
        (
            "policy verdicts (left to the matcher)",
            HistoryQuery {
                whitelist: vec![FlowFilter {
                    event_type: vec![lumen_proto::flow::EventTypeFilter {
                        r#type: lumen_proto::event_type::POLICY_VERDICT,
                        match_sub_type: false,
                        sub_type: 0,
                    }],
                    ..Default::default()
                }],
                limit: Some(15),
                ..Default::default()
            },
        ),
        (
            "dropped with a reason",
            HistoryQuery {
                whitelist: vec![FlowFilter {
                    drop_reason_desc: vec![133],
                    ..Default::default()
                }],
                ..Default::default()
            },
        ),
        (
            "blacklist an interface (history keeps none), last 10",
            HistoryQuery {
                blacklist: vec![FlowFilter {
                    interface: vec![lumen_proto::flow::NetworkInterface {
                        index: 7,
                        name: "lxc1".into(),
                    }],
                    ..Default::default()
                }],
                limit: Some(10),
                ..Default::default()
            },
        ),
        (
            "unencrypted, or encrypted (never)",
            HistoryQuery {
                whitelist: vec![
                    FlowFilter {
                        encrypted: vec![false],
                        verdict: vec![1],
                        ..Default::default()
                    },
                    FlowFilter {
                        encrypted: vec![true],
                        ..Default::default()
                    },
                ],
                ..Default::default()
            },
        ),
        (
            "pod and port",
            HistoryQuery {
                whitelist: vec![FlowFilter {
                    source_pod: vec!["shop/web".into()],
                    destination_port: vec!["8080".into()],
                    ..Default::default()
                }],
                ..Default::default()
            },
        ),
        (
            "cidr",
            HistoryQuery {
                whitelist: vec![FlowFilter {
                    destination_ip: vec!["10.2.0.0/16".into()],
                    ..Default::default()
                }],
                ..Default::default()
            },
        ),
        (
            "exact ip",
            HistoryQuery {
                whitelist: vec![FlowFilter {
                    source_ip: vec!["10.1.1.10".into()],
                    ..Default::default()
                }],
                ..Default::default()
            },
        ),
        (
            "node glob",
            HistoryQuery {
                whitelist: vec![FlowFilter {
                    node_name: vec!["lumen/node-*".into()],
                    ip_version: vec![1],
                    ..Default::default()
                }],
                ..Default::default()
            },
        ),
        (
            "workload blacklist",
            HistoryQuery {
                whitelist: vec![FlowFilter {
                    destination_workload: vec![lumen_proto::flow::Workload {
                        name: "db".into(),
                        kind: "statefulset".into(),
                    }],
                    ..Default::default()
                }],
                blacklist: vec![FlowFilter {
                    reply: vec![true],
                    ..Default::default()
                }],
                ..Default::default()
            },
        ),
        (
            "label (superset)",
            HistoryQuery {
                whitelist: vec![FlowFilter {
                    source_label: vec!["k8s:app=web".into()],
                    ..Default::default()
                }],
                ..Default::default()
            },
        ),
        (
            "window and last 10",
            HistoryQuery {
                since_ns: Some(start + MIN_NS),
                until_ns: Some(start + 2 * MIN_NS),
                limit: Some(10),
                ..Default::default()
            },
        ),
        (
            "first 3 udp",
            HistoryQuery {
                whitelist: vec![FlowFilter {
                    protocol: vec!["udp".into()],
                    ..Default::default()
                }],
                limit: Some(3),
                first: true,
                ..Default::default()
            },
        ),
    ]
}

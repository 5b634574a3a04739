//! Test harness: the independent Python OTLP receiver (otlp_receiver.py) as a
//! child process, and a deterministic flow generator.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lumen_proto::flow::{
    layer4::Protocol as L4, DropReason, Endpoint, Flow, Ip, IpVersion, Layer4, Tcp,
    TrafficDirection, Udp, Verdict, Workload,
};
use serde_json::Value;

pub const PIP_HINT: &str = "the OTLP tests need Python 3 with grpcio and opentelemetry-proto: \
     `pip install grpcio==1.85.1 opentelemetry-proto==1.45.2` (cargo xtask setup does this)";

/// Options for one receiver process.
#[derive(Default, Clone)]
pub struct ReceiverOpts {
    pub grpc_port: u16,
    pub http_port: u16,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub discard: bool,
    /// Append to this file instead of a fresh one (a restarted receiver).
    pub out: Option<PathBuf>,
}

/// A running receiver; killed on drop.
pub struct Receiver {
    child: Child,
    pub grpc_port: u16,
    pub http_port: u16,
    pub out: PathBuf,
    _dir: tempfile::TempDir,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/otlp_receiver.py")
}

/// Panics with the install hint when the receiver's modules are missing.
pub fn require_python() {
    let ok = Command::new("python3")
        .args([
            "-c",
            "import grpc, opentelemetry.proto.collector.logs.v1.logs_service_pb2_grpc",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "{PIP_HINT}");
}

impl Receiver {
    pub fn start(opts: &ReceiverOpts) -> Receiver {
        require_python();
        let dir = tempfile::tempdir().expect("tempdir");
        let out = opts
            .out
            .clone()
            .unwrap_or_else(|| dir.path().join("received.jsonl"));
        let stderr = dir.path().join("stderr.txt");
        let mut cmd = Command::new("python3");
        cmd.arg(script())
            .arg("--out")
            .arg(&out)
            .arg("--grpc-port")
            .arg(opts.grpc_port.to_string())
            .arg("--http-port")
            .arg(opts.http_port.to_string());
        if let Some((cert, key)) = &opts.tls {
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
        if opts.discard {
            cmd.arg("--discard");
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn python3");
        let mut line = String::new();
        let n = BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read receiver stdout");
        if n == 0 || !line.starts_with("READY ") {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "OTLP receiver did not start: {}\n{PIP_HINT}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
        let port = |key: &str| -> u16 {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|p| p.parse::<i32>().ok())
                .map_or(0, |p| p.max(0) as u16)
        };
        Receiver {
            grpc_port: port("grpc="),
            http_port: port("http="),
            child,
            out,
            _dir: dir,
        }
    }

    /// Everything received so far.
    pub fn lines(&self) -> Vec<Value> {
        read_lines(&self.out)
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn read_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("receiver wrote JSON"))
        .collect()
}

pub fn of_signal<'a>(lines: &'a [Value], signal: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["signal"] == signal).collect()
}

/// The last value of every (metric, attribute set): cumulative totals.
pub fn latest_points<'a>(lines: &'a [Value], name: &str) -> BTreeMap<String, &'a Value> {
    let mut out = BTreeMap::new();
    for l in lines
        .iter()
        .filter(|l| l["signal"] == "metric" && l["name"] == name)
    {
        out.insert(l["attributes"].to_string(), l);
    }
    out
}

/// Polls `f` every 25 ms until it holds; panics naming `what` after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
pub const WORKLOADS: [&str; 4] = ["frontend", "api", "worker", "cache"];

/// A deterministic mix of flows: 3 nodes, 4 workloads, forwarded and dropped
/// (two reasons), both directions, TCP (some with a handshake RTT) and UDP.
/// Flow ids are `first_id..first_id + n`.
pub fn flows(first_id: u64, n: usize) -> Vec<(Flow, &'static str)> {
    (0..n)
        .map(|i| {
            let id = first_id + i as u64;
            let k = id as usize;
            let src = WORKLOADS[k % 4];
            let dst = WORKLOADS[(k / 4 + 1 + k % 4) % 4];
            let dropped = k.is_multiple_of(5);
            let ep = |w: &str, pod: usize| Endpoint {
                identity: 1000 + WORKLOADS.iter().position(|x| *x == w).unwrap_or(0) as u32,
                namespace: "shop".into(),
                labels: vec![format!("k8s:app={w}")],
                pod_name: format!("{w}-{pod}"),
                workloads: vec![Workload {
                    name: w.into(),
                    kind: "Deployment".into(),
                }],
                ..Default::default()
            };
            let tcp = k % 3 != 2;
            let sport = 30000 + (k % 20000) as u32;
            let dport = if tcp { 8080 } else { 53 };
            Flow {
                time: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000 + id as i64,
                    nanos: 0,
                }),
                verdict: (if dropped {
                    Verdict::Dropped
                } else {
                    Verdict::Forwarded
                }) as i32,
                drop_reason_desc: if dropped {
                    (if k.is_multiple_of(2) {
                        DropReason::PolicyDenied
                    } else {
                        DropReason::CtMapInsertionFailed
                    }) as i32
                } else {
                    0
                },
                ip: Some(Ip {
                    source: format!("10.1.{}.{}", k % 4, 1 + k % 200),
                    destination: format!("10.2.{}.{}", k % 3, 1 + k % 100),
                    ip_version: IpVersion::IPv4 as i32,
                    encrypted: false,
                }),
                l4: Some(Layer4 {
                    protocol: Some(if tcp {
                        L4::Tcp(Tcp {
                            source_port: sport,
                            destination_port: dport,
                            flags: None,
                        })
                    } else {
                        L4::Udp(Udp {
                            source_port: sport,
                            destination_port: dport,
                        })
                    }),
                }),
                source: Some(ep(src, k % 7)),
                destination: Some(ep(dst, k % 5)),
                traffic_direction: (if k.is_multiple_of(2) {
                    TrafficDirection::Egress
                } else {
                    TrafficDirection::Ingress
                }) as i32,
                handshake_rtt: (tcp && k.is_multiple_of(7)).then(|| prost_types::Duration {
                    seconds: 0,
                    nanos: ((k % 50 + 1) * 100_000) as i32,
                }),
                flow_id: id,
                ..Default::default()
            }
        })
        .zip((0..n).map(|i| NODES[(first_id as usize + i) % 3]))
        .collect()
}

/// Source and destination workload names of a generated flow.
pub fn pair(f: &Flow) -> (String, String) {
    let w = |e: &Option<Endpoint>| e.as_ref().unwrap().workloads[0].name.clone();
    (w(&f.source), w(&f.destination))
}

pub fn direction(f: &Flow) -> &'static str {
    match TrafficDirection::try_from(f.traffic_direction) {
        Ok(TrafficDirection::Ingress) => "ingress",
        Ok(TrafficDirection::Egress) => "egress",
        _ => "unknown",
    }
}

pub fn ports(f: &Flow) -> (u32, u32, &'static str) {
    match f.l4.as_ref().unwrap().protocol.as_ref().unwrap() {
        L4::Tcp(t) => (t.source_port, t.destination_port, "tcp"),
        L4::Udp(u) => (u.source_port, u.destination_port, "udp"),
        _ => (0, 0, "other"),
    }
}

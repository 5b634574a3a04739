//! CPU cost of OTLP export, printed (never asserted): the metrics path and
//! the per-flow logs path at a fixed flow rate, next to the same loop with no
//! export, plus the per-call cost of `record` on the caller's thread.
//!
//! Flows go to the independent Python receiver (tests/otlp_receiver.py) in
//! `--discard` mode, a separate process, so its CPU is not counted; process
//! CPU time (all threads: caller, Tokio workers, the SDK's reader thread)
//! comes from /proc/self/stat.
//!
//! `cargo bench -p lumen-otlp --bench export` (LUMEN_BENCH_SECS=N per run,
//! default 3; LUMEN_BENCH_RATE=flows per second, default 100000).

#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use prost::Message;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lumen_otlp::{FlowRecorder, LogsConfig, MetricsConfig, OtlpConfig, OtlpExporter, Protocol};
use lumen_proto::flow::{
    layer4::Protocol as L4, DropReason, Endpoint, Flow, FlowCounters, Ip, IpVersion, Layer4,
    Policy, Tcp, TcpFlags, TrafficDirection, Verdict, Workload,
};

/// CPU time (user + system) from a /proc stat file: the whole process
/// (`self`) or the calling thread (`thread-self`).
fn cpu(of: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{of}/stat")).unwrap();
    // Fields after the command name (which is in parentheses).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

fn cpu_time() -> Duration {
    cpu("self")
}

/// A realistic mix: 3 nodes, 40 workloads in 4 namespaces, labels, policies,
/// counters; 10 % drops; TCP with flags, some with a handshake RTT.
fn flows(n: usize) -> Vec<(Flow, String)> {
    (0..n)
        .map(|k| {
            let w = |i: usize| format!("svc-{}", i % 40);
            let ep = |i: usize| Endpoint {
                id: 100 + i as u32,
                identity: 20000 + (i % 40) as u32,
                namespace: format!("team-{}", i % 4),
                labels: vec![
                    format!("k8s:app={}", w(i)),
                    format!("k8s:io.kubernetes.pod.namespace=team-{}", i % 4),
                    "k8s:tier=backend".to_string(),
                ],
                pod_name: format!("{}-7d9c5b-{:05}", w(i), i % 1000),
                workloads: vec![Workload {
                    name: w(i),
                    kind: "Deployment".into(),
                }],
            };
            let dropped = k % 10 == 0;
            let policy = Policy {
                name: format!("allow-{}", w(k / 3)),
                namespace: format!("team-{}", k % 4),
                ..Default::default()
            };
            let flow = Flow {
                time: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000 + k as i64,
                    nanos: 1234,
                }),
                verdict: (if dropped {
                    Verdict::Dropped
                } else {
                    Verdict::Forwarded
                }) as i32,
                drop_reason_desc: if dropped {
                    DropReason::PolicyDenied as i32
                } else {
                    0
                },
                ip: Some(Ip {
                    source: format!("10.{}.{}.{}", k % 4, (k / 7) % 250, k % 250),
                    destination: format!("10.{}.{}.{}", 4 + k % 4, (k / 11) % 250, (k / 3) % 250),
                    ip_version: IpVersion::IPv4 as i32,
                    encrypted: false,
                }),
                l4: Some(Layer4 {
                    protocol: Some(L4::Tcp(Tcp {
                        source_port: 32768 + (k % 28000) as u32,
                        destination_port: 8080,
                        flags: Some(TcpFlags {
                            ack: true,
                            psh: k % 2 == 0,
                            ..Default::default()
                        }),
                    })),
                }),
                source: Some(ep(k)),
                destination: Some(ep(k / 3 + 1)),
                traffic_direction: TrafficDirection::Egress as i32,
                node_name: format!("node-{}", k % 3),
                egress_allowed_by: if dropped {
                    vec![]
                } else {
                    vec![policy.clone()]
                },
                egress_denied_by: if dropped { vec![policy] } else { vec![] },
                lumen_event_kind: 3,
                counters: Some(FlowCounters {
                    orig_packets: k as u64 % 1000,
                    orig_bytes: k as u64 * 1400 % 1_000_000,
                    reply_packets: k as u64 % 900,
                    reply_bytes: k as u64 * 1300 % 1_000_000,
                }),
                handshake_rtt: (k % 8 == 0).then_some(prost_types::Duration {
                    seconds: 0,
                    nanos: 200_000 + (k % 100) as i32 * 1000,
                }),
                flow_duration: Some(prost_types::Duration {
                    seconds: (k % 60) as i64,
                    nanos: 5,
                }),
                flow_id: k as u64 + 1,
                uuid: format!("{:032x}", k * 2_654_435_761),
                ..Default::default()
            };
            let node = flow.node_name.clone();
            (flow, node)
        })
        .collect()
}

struct Sink(Child, u16);

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sink() -> Option<Sink> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/otlp_receiver.py");
    let mut child = Command::new("python3")
        .args([script, "--discard", "--http-port", "-1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take()?)
        .read_line(&mut line)
        .ok()?;
    let port = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))?
        .parse()
        .ok()?;
    Some(Sink(child, port))
}

/// Feeds `rate` flows/s for `secs` in 1 ms ticks, each decoded from its
/// protobuf bytes first as the relay does when a node sends it; returns the
/// flows sent and the CPU time of the calling thread (the caller's share).
fn paced(
    flows: &[(Vec<u8>, String)],
    rate: u64,
    secs: u64,
    mut f: impl FnMut(&Flow, &str),
) -> (u64, Duration) {
    let per_tick = (rate / 1000).max(1) as usize;
    let start = Instant::now();
    let (mut sent, mut i) = (0u64, 0usize);
    let thread0 = cpu("thread-self");
    for tick in 0..secs * 1000 {
        for _ in 0..per_tick {
            let (bytes, node) = &flows[i % flows.len()];
            let flow = Flow::decode(bytes.as_slice()).unwrap();
            f(&flow, node);
            i += 1;
        }
        sent += per_tick as u64;
        let next = start + Duration::from_millis(tick + 1);
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
    }
    (sent, cpu("thread-self") - thread0)
}

fn config(port: u16, metrics: bool, logs: bool) -> OtlpConfig {
    OtlpConfig {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        protocol: Protocol::Grpc,
        export_interval: Duration::from_secs(1),
        metrics: MetricsConfig {
            enabled: metrics,
            ..Default::default()
        },
        logs: LogsConfig {
            enabled: logs,
            queue_capacity: 200_000,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Waits until every queued log record is exported or counted as dropped.
fn drain(rec: &FlowRecorder) {
    let limit = Instant::now() + Duration::from_secs(60);
    while Instant::now() < limit {
        let l = rec.status().logs.unwrap();
        if l.exported + l.discarded.total() >= l.enqueued {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn pct(cpu: Duration, wall: Duration) -> f64 {
    100.0 * cpu.as_secs_f64() / wall.as_secs_f64()
}

fn main() {
    // `cargo test --all-targets` runs bench targets without `--bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let secs: u64 = std::env::var("LUMEN_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let rate: u64 = std::env::var("LUMEN_BENCH_RATE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    // LUMEN_BENCH_ONLY=metrics|logs runs one part (for profiling).
    let only = std::env::var("LUMEN_BENCH_ONLY").unwrap_or_default();
    let run = |part: &str| only.is_empty() || only == part;
    let Some(sink) = sink() else {
        println!(
            "otlp bench skipped: the receiver needs Python 3 with grpcio and opentelemetry-proto \
             (pip install grpcio==1.85.1 opentelemetry-proto==1.45.2)"
        );
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    // A working set that fits in the L3 cache, like flows the relay has
    // just decoded; 50 k distinct flows would make every record a cache miss.
    let flows: Vec<(Vec<u8>, String)> = flows(2048)
        .into_iter()
        .map(|(f, n)| (f.encode_to_vec(), n))
        .collect();
    println!(
        "otlp export bench: {rate} flows/s for {secs} s per run, {} CPUs, receiver: Python gRPC (discard), separate process",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // Baseline: the same paced loop, no export.
    let (c0, t0) = (cpu_time(), Instant::now());
    let (base_sent, base_thread) = paced(&flows, rate, secs, |f, n| {
        black_box((f, n));
    });
    let base_caller = base_thread.as_secs_f64() / base_sent as f64;
    let (base_cpu, base_wall) = (cpu_time() - c0, t0.elapsed());
    println!(
        "  baseline (decode each flow, no export) {:6.2} % of a core",
        pct(base_cpu, base_wall)
    );

    let base_pct = pct(base_cpu, base_wall);

    // Metrics path (the default).
    if run("metrics") {
        let exp = OtlpExporter::start(&config(sink.1, true, false), "bench").unwrap();
        let rec = exp.recorder();
        let (c0, t0) = (cpu_time(), Instant::now());
        let (sent, busy) = paced(&flows, rate, secs, |f, n| rec.record(f, n));
        let (cpu, wall) = (cpu_time() - c0, t0.elapsed());
        let m = rec.status().metrics.unwrap();
        rt.block_on(exp.shutdown(Duration::from_secs(5)));
        println!(
            "  metrics path                           {:6.2} % of a core: +{:.2} % over baseline (goal <= 5 % at 100k flows/s)",
            pct(cpu, wall),
            pct(cpu, wall) - base_pct
        );
        println!(
            "    record() {:.0} ns/flow on the caller's thread; {} series, {} pushes ok, {} failed",
            (busy.as_secs_f64() / sent as f64 - base_caller) * 1e9,
            m.series,
            m.export.requests_ok,
            m.export.requests_failed
        );
    }

    // Logs path (logs only, every flow exported).
    if run("logs") {
        let exp = OtlpExporter::start(&config(sink.1, false, true), "bench").unwrap();
        let rec = exp.recorder();
        let (c0, t0) = (cpu_time(), Instant::now());
        let (sent, busy) = paced(&flows, rate, secs, |f, n| rec.record(f, n));
        drain(&rec);
        let (cpu, wall) = (cpu_time() - c0, t0.elapsed());
        let l = rec.status().logs.unwrap();
        rt.block_on(exp.shutdown(Duration::from_secs(5)));
        let extra = cpu.as_secs_f64()
            - base_cpu.as_secs_f64() * wall.as_secs_f64() / base_wall.as_secs_f64();
        println!(
            "  logs path                              {:6.2} % of a core => {:.0} flows/s per core (goal >= 330k)",
            pct(cpu, wall),
            sent as f64 / extra.max(1e-9),
        );
        println!(
            "    record() {:.0} ns/flow on the caller's thread, batching and sending {:.0} ns/flow; {sent} sent, {} exported, {} dropped",
            (busy.as_secs_f64() / sent as f64 - base_caller) * 1e9,
            (extra - busy.as_secs_f64() + base_caller * sent as f64) * 1e9 / sent as f64,
            l.exported,
            l.discarded.total()
        );
    }
}

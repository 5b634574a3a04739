//! Relay benchmarks; they print figures and assert nothing about time.
//!
//! 1. merge core: N in-memory node streams through [`Merge`] on one thread (flows/s/core);
//! 2. relay end to end over loopback: N synthetic node servers → relay (its own 1-thread
//!    runtime, CPU time measured from its threads) → one client, batched (FlowBatches on
//!    both hops) vs per-flow (GetFlows on both hops) vs mixed (batched from nodes,
//!    per-flow to a stock client): flows per relay CPU-second;
//! 3. added latency of the relay at a given rate (follow mode). One client follows every
//!    node directly *and* the relay at the same time; a flow's added latency is when it
//!    came through the relay − when the same flow came from its node directly (the moment
//!    it was available to the relay), so what the node, the pusher and a busy machine add
//!    to both paths cancels out. Also printed: flow time → client through the relay and
//!    directly. With every node busy and with quiet nodes (connected, sending nothing),
//!    side by side: watermarks `off` (nodes report none, `sort_idle_watermarks` off: a
//!    quiet node costs the sort window), `inferred` (nodes report none, the relay infers
//!    idle nodes' watermarks, the default for stock Hubble nodes) and `exact` (nodes report
//!    their watermark on every batch and alone every heartbeat, as node exporters do; it
//!    advances as a node exporter's does with its defaults: every 10 ms drain, to 4 ms
//!    before the drain, see [`NODE_DRAIN`] and [`NODE_WATERMARK_LAG`]).
//!
//! `cargo bench -p lumen-relay --bench merge` (env `RELAY_BENCH_FLOWS`, `RELAY_BENCH_RATE`,
//! `RELAY_BENCH_SECS` change the sizes; `RELAY_BENCH_ONLY=latency` or `=throughput` runs
//! one part). Nodes serve FlowBatches over their Observer, as node exporters do, in the
//! throughput runs, and straight from their encoded flows (cheaper, so the latency runs
//! measure the relay rather than a machine the nodes saturate) in the latency runs;
//! `RELAY_BENCH_NODES=observer` or `=encoded` picks one for both.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::StreamExt;
use lumen_proto::observer::GetFlowsRequest;
use lumen_relay::{
    batches::{get_flows_raw, unbatch},
    config::Config,
    merge::Merge,
    proto::batches::flow_batches_client::FlowBatchesClient,
    synthetic::{flow, NodeServer, ServeOptions, SyntheticNode},
    wire::{now_ns, RawResponse},
};
use prost::Message;
use tonic::transport::Channel;

/// How often an exact node's watermark moves (the node exporter drains its ring at least
/// every `watermark_heartbeat`, 10 ms)...
const NODE_DRAIN: Duration = Duration::from_millis(10);
/// ...and how far behind the drain it stays (2 × its `max_event_delay`).
const NODE_WATERMARK_LAG: Duration = Duration::from_millis(4);
/// An exact node's heartbeat (the node exporter's `watermark_heartbeat`).
const NODE_HEARTBEAT: Duration = Duration::from_millis(10);

/// Where a quiet node's watermark comes from in a latency run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Watermarks {
    /// Nowhere: the quiet node costs the sort window.
    Off,
    /// The relay's inference (`sort_idle_watermarks`).
    Inferred,
    /// The nodes' own reports.
    Exact,
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU seconds used so far by this process' threads whose name starts with `prefix`.
fn thread_cpu_seconds(prefix: &str) -> f64 {
    let tick = 100.0; // USER_HZ
    let mut total = 0u64;
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return f64::NAN;
    };
    for e in dir.flatten() {
        let p = e.path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        if !comm.trim_end().starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
        // Fields after the `(comm)`: state is field 3; utime 14, stime 15.
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ut: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
        let st: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        total += ut + st;
    }
    total as f64 / tick
}

fn merge_core(nodes: usize, per_node: usize) {
    let names: Vec<Arc<str>> = (0..nodes)
        .map(|i| Arc::from(format!("node-{i}").as_str()))
        .collect();
    let sample: Bytes = flow("node-0", 0, 1).encode_to_vec().into();
    let batch = 256;
    // Pre-build batches: node k has times k, k+N, k+2N, ...
    let mut inputs: Vec<Vec<Vec<RawResponse>>> = (0..nodes)
        .map(|k| {
            (0..per_node)
                .step_by(batch)
                .map(|start| {
                    (start..(start + batch).min(per_node))
                        .map(|i| {
                            RawResponse::flow(
                                sample.clone(),
                                names[k].clone(),
                                (i * nodes + k) as i64,
                            )
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    for v in &mut inputs {
        v.reverse();
    }
    let mut m = Merge::new(None, 1 << 20);
    for _ in 0..nodes {
        m.add_slot();
    }
    let mut out = Vec::with_capacity(4096);
    let mut late = Vec::new();
    let mut total = 0usize;
    let t = Instant::now();
    loop {
        let mut any = false;
        for (k, inp) in inputs.iter_mut().enumerate() {
            if m.wants_input(k) {
                match inp.pop() {
                    Some(b) => {
                        m.push(k, b, 0, &mut late);
                        any = true;
                    }
                    None => m.set_live(k, false),
                }
            }
        }
        m.pop_ready(0, &mut out);
        total += out.len();
        out.clear();
        if !any && m.is_finished() {
            break;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(total, nodes * per_node);
    println!(
        "merge core   {nodes:>2} nodes: {:>6.2} M flows/s on one core ({total} flows in {secs:.3} s)",
        total as f64 / secs / 1e6
    );
}

struct Cluster {
    nodes: Vec<NodeServer>,
    relay_rt: tokio::runtime::Runtime,
    relay: Option<lumen_relay::RelayHandle>,
}

impl Cluster {
    fn start(
        n: usize,
        per_node: usize,
        node_batches: bool,
        relay_batches: bool,
        live: bool,
        window: Duration,
        watermarks: Watermarks,
    ) -> (Cluster, Vec<Arc<SyntheticNode>>) {
        let mut servers = Vec::new();
        let mut specs = Vec::new();
        let mut synth = Vec::new();
        let base = now_ns() - 60_000_000_000;
        for k in 0..n {
            let name = format!("node-{k}");
            let node = SyntheticNode::new(&name, 1 << 16);
            if !live {
                node.push(
                    (0..per_node).map(|i| flow(&name, base + (i * n + k) as i64 * 1000, i as u64)),
                );
            }
            let s = NodeServer::start(
                node.clone(),
                "127.0.0.1:0".parse().unwrap(),
                ServeOptions {
                    batches: node_batches,
                    encoded_batches: match std::env::var("RELAY_BENCH_NODES").as_deref() {
                        Ok("observer") => false,
                        Ok("encoded") => true,
                        // Latency runs: the nodes share the machine with the relay.
                        _ => live,
                    },
                    threads: 1,
                    watermarks: (watermarks == Watermarks::Exact).then_some(NODE_HEARTBEAT),
                    ..Default::default()
                },
            )
            .unwrap();
            specs.push(format!("{name}={}", s.address));
            servers.push(s);
            synth.push(node);
        }
        let relay_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("relay-bench")
            .enable_all()
            .build()
            .unwrap();
        let config = Config {
            listen_address: "127.0.0.1:0".parse().unwrap(),
            metrics_address: None,
            nodes: specs,
            batches: relay_batches,
            max_number: u64::MAX,
            client_queue_flows: 1 << 16,
            sort_window: window,
            sort_idle_watermarks: watermarks != Watermarks::Off,
            ..Config::default()
        };
        let relay = relay_rt.block_on(async {
            let r = lumen_relay::start(config).await.unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while r
                .pool
                .nodes()
                .iter()
                .any(|n| n.status().state != lumen_relay::pool::ConnState::Connected)
            {
                assert!(Instant::now() < deadline, "nodes did not connect");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            r
        });
        (
            Cluster {
                nodes: servers,
                relay_rt,
                relay: Some(relay),
            },
            synth,
        )
    }

    fn address(&self) -> SocketAddr {
        self.relay.as_ref().unwrap().address
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(r) = self.relay.take() {
            self.relay_rt.block_on(r.shutdown());
        }
        self.nodes.clear();
    }
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Batched,
    PerFlow,
    /// Batched from nodes, one flow per response to a stock client.
    Mixed,
}

fn end_to_end(client_rt: &tokio::runtime::Runtime, n: usize, per_node: usize, mode: Mode) {
    let (node_b, relay_b) = match mode {
        Mode::Batched | Mode::Mixed => (true, true),
        Mode::PerFlow => (false, false),
    };
    let (cluster, _nodes) = Cluster::start(
        n,
        per_node,
        node_b,
        relay_b,
        false,
        Duration::from_millis(200),
        Watermarks::Inferred,
    );
    let addr = cluster.address();
    let cpu0 = thread_cpu_seconds("relay-bench");
    let t = Instant::now();
    let (count, sorted) = client_rt.block_on(async move {
        let ch = channel(addr).await;
        let mut count = 0usize;
        let mut last = i64::MIN;
        let mut sorted = true;
        match mode {
            Mode::Batched => {
                let mut c = FlowBatchesClient::new(ch).max_decoding_message_size(64 << 20);
                let mut s = c
                    .get_flow_batches(GetFlowsRequest::default())
                    .await
                    .unwrap()
                    .into_inner();
                let (mut names, mut ev) = (Vec::new(), Vec::new());
                while let Some(b) = s.message().await.unwrap() {
                    for r in unbatch(b, &mut names, &mut ev) {
                        let t = r.time_ns.unwrap_or_default();
                        sorted &= t >= last;
                        last = t;
                        count += 1;
                    }
                }
            }
            Mode::PerFlow | Mode::Mixed => {
                let mut s = get_flows_raw(ch, GetFlowsRequest::default()).await.unwrap();
                while let Some(r) = s.next().await {
                    let r = r.unwrap();
                    if r.is_flow() {
                        let t = r.time_ns.unwrap_or_default();
                        sorted &= t >= last;
                        last = t;
                        count += 1;
                    }
                }
            }
        }
        (count, sorted)
    });
    let wall = t.elapsed().as_secs_f64();
    let cpu = thread_cpu_seconds("relay-bench") - cpu0;
    assert_eq!(count, n * per_node, "every flow arrived");
    assert!(sorted, "in time order");
    println!(
        "relay e2e    {n:>2} nodes {:<8}: {:>6.2} M flows per relay CPU-second ({count} flows, relay CPU {cpu:.2} s, wall {wall:.2} s = {:.2} M flows/s)",
        format!("{mode:?}"),
        count as f64 / cpu / 1e6,
        count as f64 / wall / 1e6
    );
    drop(cluster);
}

fn percentile(sorted: &[i64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1e6
}

/// What one latency run measures.
#[derive(Clone, Copy)]
struct LatencyRun {
    nodes: usize,
    quiet: usize,
    rate: usize,
    seconds: f64,
    window: Duration,
    watermarks: Watermarks,
}

/// Flows pushed at `rate`/s in total across the busy nodes, each stamped with the wall
/// clock when pushed (strictly increasing per node, so (node, time) names a flow). The
/// client follows the relay and every node directly; see the module doc.
fn latency(client_rt: &tokio::runtime::Runtime, run: LatencyRun) {
    let LatencyRun {
        nodes: n,
        quiet,
        rate,
        seconds,
        window,
        watermarks,
    } = run;
    let (cluster, nodes) = Cluster::start(n, 0, true, true, true, window, watermarks);
    let relay_addr = cluster.address();
    let node_addrs: Vec<SocketAddr> = cluster.nodes.iter().map(|s| s.address).collect();
    let names: Vec<Arc<str>> = nodes.iter().map(|n| Arc::from(n.name())).collect();
    let busy: Vec<Arc<SyntheticNode>> = nodes[..n - quiet].to_vec();
    let all_nodes = nodes.clone();
    // The first second warms up (the relay learns the nodes' transit times); flows of it
    // are delivered but not counted in the figures.
    let warmup = seconds.min(1.0);
    let total = (rate as f64 * (seconds + warmup)) as usize;
    let measure_from = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(i64::MAX));
    let measure_from_pusher = measure_from.clone();
    let cpu = || {
        (
            thread_cpu_seconds("relay-bench"),
            thread_cpu_seconds("bench-client"),
            thread_cpu_seconds("node-"),
        )
    };
    let cpu0 = cpu();
    // (node, flow time, receive time), through the relay and directly.
    type Seen = Vec<(usize, i64, i64)>;
    let (via_relay, direct, pushed): (Seen, Seen, usize) = client_rt.block_on(async move {
        let follow = GetFlowsRequest {
            follow: true,
            ..Default::default()
        };
        // Through the relay as a stock client reads it (one flow per response); from the
        // nodes as the relay reads them (FlowBatches), which also keeps the client's own
        // cost low. Items: (through the relay, flows).
        let mut streams = Vec::new();
        let relay = get_flows_raw(channel(relay_addr).await, follow.clone())
            .await
            .unwrap();
        streams.push(
            relay
                .ready_chunks(1024)
                .map(|rs| {
                    (
                        true,
                        rs.into_iter().filter_map(Result::ok).collect::<Vec<_>>(),
                    )
                })
                .boxed(),
        );
        for a in node_addrs {
            let mut c =
                FlowBatchesClient::new(channel(a).await).max_decoding_message_size(64 << 20);
            let batches = c
                .get_flow_batches(follow.clone())
                .await
                .unwrap()
                .into_inner();
            let (mut names, mut ev) = (Vec::new(), Vec::new());
            streams.push(
                batches
                    .map(move |b| {
                        (
                            false,
                            b.map_or_else(|_| Vec::new(), |b| unbatch(b, &mut names, &mut ev)),
                        )
                    })
                    .boxed(),
            );
        }
        let mut s = futures::stream::select_all(streams);
        // Let every node stream open before pushing.
        tokio::time::sleep(Duration::from_millis(500)).await;
        measure_from_pusher.store(
            now_ns() + (warmup * 1e9) as i64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let pusher = std::thread::Builder::new()
            .name("bench-pusher".to_owned())
            .spawn(move || {
                let tick = Duration::from_millis(1);
                let per_tick = (rate / 1000).max(1);
                let start = Instant::now();
                let mut last = vec![0i64; busy.len()];
                let mut sent = 0usize;
                let mut i = 0u64;
                let mut rr = 0usize;
                // Exact nodes: each drain, every node (busy or quiet) promises what a node
                // exporter would. Sound here: flows are stamped after it, with the clock.
                let mut drained = Instant::now();
                let mut drain = |force: bool| {
                    if watermarks == Watermarks::Exact && (force || drained.elapsed() >= NODE_DRAIN)
                    {
                        drained = Instant::now();
                        let w = now_ns() - NODE_WATERMARK_LAG.as_nanos() as i64;
                        for node in &all_nodes {
                            node.advance(w);
                        }
                    }
                };
                while sent < total {
                    drain(false);
                    let due = ((start.elapsed().as_secs_f64() * rate as f64) as usize).min(total);
                    while sent < due {
                        let k = rr % busy.len();
                        rr += 1;
                        let chunk = per_tick.min(due - sent).div_ceil(busy.len()).max(1);
                        let chunk = chunk.min(total - sent);
                        let t0 = now_ns().max(last[k] + 1);
                        last[k] = t0 + chunk as i64 - 1;
                        let name = busy[k].name().to_owned();
                        busy[k].push((0..chunk).map(|j| flow(&name, t0 + j as i64, i + j as u64)));
                        i += chunk as u64;
                        sent += chunk;
                    }
                    std::thread::sleep(tick);
                }
                // Running nodes keep draining after the last flow.
                let end = Instant::now() + Duration::from_millis(500);
                while Instant::now() < end {
                    drain(false);
                    std::thread::sleep(tick);
                }
                drain(true);
                sent
            });
        let mut via_relay = Vec::with_capacity(total);
        let mut direct = Vec::with_capacity(total);
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs_f64(seconds + warmup + 10.0);
        while via_relay.len() < total || direct.len() < total {
            match tokio::time::timeout_at(deadline, s.next()).await {
                Ok(Some((relay, rs))) => {
                    let now = now_ns();
                    let seen = if relay { &mut via_relay } else { &mut direct };
                    for r in rs.iter().filter(|r| r.is_flow()) {
                        let node = names
                            .iter()
                            .position(|n| *n == r.node_name)
                            .unwrap_or(usize::MAX);
                        seen.push((node, r.time_ns.unwrap_or_default(), now));
                    }
                }
                _ => break,
            }
        }
        let pushed = pusher.unwrap().join().unwrap();
        (via_relay, direct, pushed)
    });
    let cpu1 = cpu();
    let from = measure_from.load(std::sync::atomic::Ordering::Relaxed);
    let via_relay: Vec<_> = via_relay.into_iter().filter(|e| e.1 >= from).collect();
    let direct: Vec<_> = direct.into_iter().filter(|e| e.1 >= from).collect();
    let when_direct: std::collections::HashMap<(usize, i64), i64> =
        direct.iter().map(|&(n, t, r)| ((n, t), r)).collect();
    let mut added: Vec<i64> = via_relay
        .iter()
        .filter_map(|&(n, t, r)| when_direct.get(&(n, t)).map(|d| r - d))
        .collect();
    let mut e2e_relay: Vec<i64> = via_relay.iter().map(|&(_, t, r)| r - t).collect();
    let mut e2e_direct: Vec<i64> = direct.iter().map(|&(_, t, r)| r - t).collect();
    for v in [&mut added, &mut e2e_relay, &mut e2e_direct] {
        v.sort_unstable();
    }
    let relay = cluster.relay.as_ref().unwrap();
    println!(
        "latency      {n:>2} nodes ({quiet} quiet) at {:>4} k flows/s, window {window:?}, watermarks {:<8}: \
         added p50 {:>6.2} ms, p99 {:>6.2} ms, max {:>6.2} ms | flow→client via relay p50 {:.2} p99 {:.2} ms, \
         direct p50 {:.2} p99 {:.2} ms | {} flows measured of {pushed} pushed (warm-up {warmup} s), {} late, {} window-released | CPU s relay {:.2} client {:.2} nodes {:.2}",
        rate / 1000,
        format!("{watermarks:?}").to_lowercase(),
        percentile(&added, 0.50),
        percentile(&added, 0.99),
        percentile(&added, 1.0),
        percentile(&e2e_relay, 0.50),
        percentile(&e2e_relay, 0.99),
        percentile(&e2e_direct, 0.50),
        percentile(&e2e_direct, 0.99),
        via_relay.len(),
        relay.metrics.late_flows.get(),
        relay.metrics.window_released.get(),
        cpu1.0 - cpu0.0,
        cpu1.1 - cpu0.1,
        cpu1.2 - cpu0.2,
    );
    drop(cluster);
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs us with no such flag:
    // keep that run tiny.
    let quick = !std::env::args().any(|a| a == "--bench");
    let per_node = env_usize("RELAY_BENCH_FLOWS", if quick { 2_000 } else { 200_000 });
    let rate = env_usize("RELAY_BENCH_RATE", if quick { 5_000 } else { 100_000 });
    let secs = env_usize("RELAY_BENCH_SECS", if quick { 1 } else { 5 }) as f64;
    let only = std::env::var("RELAY_BENCH_ONLY").unwrap_or_default();
    println!(
        "lumen-relay benchmarks ({} CPUs)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench-client")
        .enable_all()
        .build()
        .unwrap();
    if only.is_empty() || only == "throughput" {
        for n in [3, 10] {
            merge_core(n, if quick { 10_000 } else { 1_000_000 });
        }
        for mode in [Mode::Batched, Mode::Mixed, Mode::PerFlow] {
            end_to_end(&client_rt, 3, per_node, mode);
        }
    }
    if only.is_empty() || only == "latency" {
        let window = Duration::from_millis(200);
        for (nodes, quiet) in [(3, 0), (3, 1), (10, 0), (10, 3)] {
            for watermarks in [Watermarks::Off, Watermarks::Inferred, Watermarks::Exact] {
                latency(
                    &client_rt,
                    LatencyRun {
                        nodes,
                        quiet,
                        rate,
                        seconds: secs,
                        window,
                        watermarks,
                    },
                );
            }
        }
    }
}

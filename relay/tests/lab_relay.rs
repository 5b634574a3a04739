//! Privileged end-to-end tests of the relay: three "nodes", each a lab (network namespaces
//! on a bridge) watched by its own real `lumen-node-exporter` process (real eBPF datapath,
//! in the root namespace on that lab's pod interfaces, its own --listen-address and
//! --node-name), the real `lumen-relay` binary fanning them in, real traffic, and the real
//! `lumen` CLI and gRPC clients reading. Answers are checked against each node's own answer
//! for the same request.
//!
//! Run single-threaded by the lab runner; without root they print why they were skipped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::Write,
    net::{IpAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use lumen_lab::{Lab, Pod};
use lumen_proto::{
    flow::Flow,
    observer::{
        get_flows_response::ResponseTypes, observer_client::ObserverClient, GetFlowsRequest,
        GetFlowsResponse, ServerStatusRequest,
    },
    relay::NodeState,
};
use lumen_relay::wire::{now_ns, ns_timestamp, timestamp_ns};
use tonic::transport::Channel;

static LAB_LOCK: Mutex<()> = Mutex::new(());

/// Lab tests share the kernel: one at a time; labs of earlier runs that died are removed.
fn lab_lock() -> MutexGuard<'static, ()> {
    let g = LAB_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(e) = Lab::cleanup_stale("relay-") {
        eprintln!("cleaning up stale labs: {e:#}");
    }
    g
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn target_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lumen-relay"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Path of a workspace binary, built (debug profile, as this test) if needed.
fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    let path = target_dir().join(bin);
    if !built.iter().any(|b| b == bin) {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", package, "--bin", bin])
            .status()
            .expect("cargo build");
        assert!(status.success(), "building {bin} failed");
        built.push(bin.to_owned());
    }
    path
}

fn kill_child(child: &mut Child, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A running process with its stderr in a file.
struct Proc {
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(bin: &PathBuf, args: &[String], log: PathBuf) -> Proc {
        let child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        Proc {
            child: Some(child),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_listening(&mut self, addr: &str, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(addr).is_ok() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("{what} exited early ({status}): {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{what} did not listen on {addr}: {}", self.log());
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn kill(&mut self, signal: &str) {
        if let Some(mut c) = self.child.take() {
            kill_child(&mut c, signal);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill("-TERM");
    }
}

/// One "node": a lab with a client and a server pod, and its node exporter.
struct Node {
    name: String,
    lab: Lab,
    client: Pod,
    server: Pod,
    _http: lumen_lab::Background,
    exporter: Option<Proc>,
    address: String,
    extra: Vec<String>,
    dir: tempfile::TempDir,
}

impl Node {
    fn new(name: &str, extra: &[&str]) -> Node {
        let mut lab = Lab::new(&format!("relay-{name}")).expect("lab");
        let server = lab.add_pod("server").expect("server pod");
        let client = lab.add_pod("client").expect("client pod");
        let http = server.http_server(8080).expect("http server");
        let mut n = Node {
            name: name.to_owned(),
            lab,
            client,
            server,
            _http: http,
            exporter: None,
            address: format!("127.0.0.1:{}", free_port()),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            dir: tempfile::tempdir().unwrap(),
        };
        n.start_exporter();
        n
    }

    fn start_exporter(&mut self) {
        let bin = workspace_bin("lumen-node-exporter", "lumen-node-exporter");
        let mut args = vec![
            "--node-name".to_owned(),
            self.name.clone(),
            "--listen-address".to_owned(),
            self.address.clone(),
            "--metrics-address".to_owned(),
            String::new(),
            "--interface".to_owned(),
            format!("lmh{}*", self.lab.id()),
        ];
        args.extend(self.extra.iter().cloned());
        let log = self.dir.path().join(format!("exporter-{}.log", now_ns()));
        let mut p = Proc::spawn(&bin, &args, log);
        p.wait_listening(&self.address, &format!("node exporter {}", self.name));
        // Attachments follow interfaces within a reconcile round.
        std::thread::sleep(Duration::from_millis(700));
        self.exporter = Some(p);
    }

    fn kill_exporter(&mut self) {
        if let Some(mut p) = self.exporter.take() {
            p.kill("-KILL");
        }
    }

    /// Pod-to-pod HTTP and ping inside this node's lab.
    fn traffic(&self, requests: usize) {
        let ip: IpAddr = self.server.ipv4.into();
        for _ in 0..requests {
            let body = self.client.http_get(ip, 8080, "/").expect("http get");
            assert_eq!(body, self.server.http_index_body());
        }
        self.client.ping(ip, 2).expect("ping");
    }
}

struct Relay {
    proc: Proc,
    address: String,
    args: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Relay {
    fn start(nodes: &[&Node], extra: &[&str]) -> Relay {
        Self::start_at(&format!("127.0.0.1:{}", free_port()), nodes, extra)
    }

    fn start_at(address: &str, nodes: &[&Node], extra: &[&str]) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec![
            "--listen-address".to_owned(),
            address.to_owned(),
            "--metrics-address".to_owned(),
            String::new(),
        ];
        for n in nodes {
            args.push("--node".to_owned());
            args.push(format!("{}={}", n.name, n.address));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(address, args, dir)
    }

    fn spawn(address: &str, args: Vec<String>, dir: tempfile::TempDir) -> Relay {
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_lumen-relay"));
        let mut proc = Proc::spawn(
            &bin,
            &args,
            dir.path().join(format!("relay-{}.log", now_ns())),
        );
        proc.wait_listening(address, "lumen-relay");
        Relay {
            proc,
            address: address.to_owned(),
            args,
            _dir: dir,
        }
    }

    fn restart(self) -> Relay {
        let Relay {
            mut proc,
            address,
            args,
            _dir,
        } = self;
        proc.kill("-TERM");
        Self::spawn(&address, args, _dir)
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.pid()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

fn lumen(args: &[&str]) -> Output {
    Command::new(workspace_bin("lumen", "lumen"))
        .args(args)
        .output()
        .expect("running lumen")
}

async fn client(addr: &str) -> ObserverClient<Channel> {
    let ch = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    ObserverClient::new(ch).max_decoding_message_size(64 << 20)
}

async fn get_all(addr: &str, req: GetFlowsRequest) -> Vec<GetFlowsResponse> {
    let mut c = client(addr).await;
    let mut s = c.get_flows(req).await.expect("GetFlows").into_inner();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(r) = s.message().await.expect("stream") {
            out.push(r);
        }
    })
    .await
    .expect("answer complete");
    out
}

fn flows(rs: &[GetFlowsResponse]) -> Vec<Flow> {
    rs.iter()
        .filter_map(|r| match &r.response_types {
            Some(ResponseTypes::Flow(f)) => Some(f.clone()),
            _ => None,
        })
        .collect()
}

fn count_flows(rs: &[GetFlowsResponse]) -> usize {
    rs.iter()
        .filter(|r| matches!(r.response_types, Some(ResponseTypes::Flow(_))))
        .count()
}

/// The relay's answer is in time order and holds each flow of each node once.
fn assert_time_ordered_once(via_relay: &[Flow]) {
    for w in via_relay.windows(2) {
        assert!(
            time_of(&w[0]) <= time_of(&w[1]),
            "relay answer out of time order"
        );
    }
    let mut seen = HashSet::new();
    for f in via_relay {
        assert!(
            seen.insert((f.node_name.clone(), f.uuid.clone())),
            "flow {} of {} twice",
            f.uuid,
            f.node_name
        );
    }
}

fn time_of(f: &Flow) -> i64 {
    f.time.as_ref().map(timestamp_ns).unwrap_or_default()
}

async fn read_until(
    s: &mut tonic::codec::Streaming<GetFlowsResponse>,
    sink: &mut Vec<GetFlowsResponse>,
    limit: Duration,
    mut done: impl FnMut(&[GetFlowsResponse]) -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while !done(sink) {
        match tokio::time::timeout_at(deadline, s.message()).await {
            Ok(Ok(Some(r))) => sink.push(r),
            Ok(Ok(None)) => return done(sink),
            Ok(Err(e)) => panic!("stream failed: {e}"),
            Err(_) => return false,
        }
    }
    true
}

fn has_status(rs: &[GetFlowsResponse], state: NodeState, node: &str) -> bool {
    rs.iter().any(|r| match &r.response_types {
        Some(ResponseTypes::NodeStatus(s)) => {
            s.state_change == state as i32 && s.node_names.iter().any(|n| n == node)
        }
        _ => false,
    })
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn three_nodes_every_flow_once_in_time_order() {
    lumen_lab::require_privileges!("three_nodes_every_flow_once_in_time_order");
    let _g = lab_lock();
    let nodes: Vec<Node> = ["node-1", "node-2", "node-3"]
        .iter()
        .map(|n| Node::new(n, &[]))
        .collect();
    let relay = Relay::start(&nodes.iter().collect::<Vec<_>>(), &[]);
    let since = now_ns();
    for n in &nodes {
        n.traffic(3);
    }
    std::thread::sleep(Duration::from_millis(1500));
    let until = now_ns();
    let req = GetFlowsRequest {
        since: Some(ns_timestamp(since)),
        until: Some(ns_timestamp(until)),
        ..Default::default()
    };
    rt().block_on(async {
        let via_relay = flows(&get_all(&relay.address, req.clone()).await);
        assert!(!via_relay.is_empty());
        assert_time_ordered_once(&via_relay);
        let mut by_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for f in &via_relay {
            by_node
                .entry(f.node_name.clone())
                .or_default()
                .push(f.uuid.clone());
        }
        assert_eq!(
            by_node.keys().cloned().collect::<Vec<_>>(),
            vec!["node-1", "node-2", "node-3"]
        );
        for n in &nodes {
            let own: Vec<String> = flows(&get_all(&n.address, req.clone()).await)
                .into_iter()
                .map(|f| f.uuid)
                .collect();
            assert!(!own.is_empty(), "{} saw its traffic", n.name);
            let mut a = by_node.get(&n.name).cloned().unwrap_or_default();
            let mut b = own;
            a.sort();
            b.sort();
            assert_eq!(
                a, b,
                "{}: the relay's flows equal the node's own answer",
                n.name
            );
            // Each node's flows were seen on its own lab's interfaces.
            let prefix = format!("lmh{}", n.lab.id());
            for f in via_relay.iter().filter(|f| f.node_name == n.name) {
                let iface = f.interface.as_ref().map(|i| i.name.as_str()).unwrap_or("");
                assert!(iface.starts_with(&prefix), "{} flow on {iface:?}", n.name);
            }
        }
        // `--last N` through the relay: the N newest cluster-wide.
        let last = flows(
            &get_all(
                &relay.address,
                GetFlowsRequest {
                    number: 5,
                    until: Some(ns_timestamp(until)),
                    ..Default::default()
                },
            )
            .await,
        );
        let mut times: Vec<i64> = via_relay.iter().map(time_of).collect();
        times.sort();
        assert_eq!(
            last.iter().map(time_of).collect::<Vec<_>>(),
            times[times.len() - 5..].to_vec()
        );
        // The CLI reads the relay like a node.
        let out = lumen(&["observe", "--server", &relay.address, "--all", "-o", "json"]);
        assert!(
            out.status.success(),
            "lumen observe via relay: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("\"flow\""))
            .count();
        assert!(
            lines >= via_relay.len(),
            "CLI printed {lines} flows, expected at least {}",
            via_relay.len()
        );
    });
}

#[test]
fn a_killed_node_exporter_is_reported_and_its_flows_resume() {
    lumen_lab::require_privileges!("a_killed_node_exporter_is_reported_and_its_flows_resume");
    let _g = lab_lock();
    let mut nodes: Vec<Node> = ["node-1", "node-2", "node-3"]
        .iter()
        .map(|n| Node::new(n, &[]))
        .collect();
    let relay = Relay::start(
        &nodes.iter().collect::<Vec<_>>(),
        &["--sort-window", "100ms"],
    );
    let rt = rt();
    rt.block_on(async {
        let mut c = client(&relay.address).await;
        // Wait until the relay sees every node.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let st = c
                .server_status(ServerStatusRequest {})
                .await
                .unwrap()
                .into_inner();
            if st.num_connected_nodes == Some(3) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "relay did not connect all nodes: {st:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut s = c
            .get_flows(GetFlowsRequest {
                follow: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut got = Vec::new();
        read_until(&mut s, &mut got, Duration::from_secs(5), |r| !r.is_empty()).await;
        for n in &nodes {
            tokio::task::block_in_place(|| n.traffic(1));
        }
        assert!(
            read_until(&mut s, &mut got, Duration::from_secs(10), |r| {
                let names: HashSet<String> = flows(r).into_iter().map(|f| f.node_name).collect();
                names.len() == 3
            })
            .await,
            "live flows of all three nodes"
        );
        tokio::task::block_in_place(|| nodes[1].kill_exporter());
        assert!(
            read_until(&mut s, &mut got, Duration::from_secs(20), |r| has_status(
                r,
                NodeState::NodeUnavailable,
                "node-2"
            ))
            .await,
            "NODE_UNAVAILABLE for node-2"
        );
        let before: HashMap<String, usize> =
            flows(&got).into_iter().fold(HashMap::new(), |mut m, f| {
                *m.entry(f.node_name).or_default() += 1;
                m
            });
        for i in [0, 2] {
            tokio::task::block_in_place(|| nodes[i].traffic(1));
        }
        assert!(
            read_until(&mut s, &mut got, Duration::from_secs(10), |r| {
                let now: Vec<Flow> = flows(r);
                ["node-1", "node-3"].iter().all(|n| {
                    now.iter().filter(|f| f.node_name == *n).count()
                        > before.get(*n).copied().unwrap_or(0)
                })
            })
            .await,
            "the other nodes' flows keep coming"
        );
        let st = c
            .server_status(ServerStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(st.unavailable_nodes, vec!["node-2"]);
        // Restart: the relay reconnects (backoff) and node-2's flows resume in this stream.
        tokio::task::block_in_place(|| nodes[1].start_exporter());
        assert!(
            read_until(&mut s, &mut got, Duration::from_secs(45), |r| has_status(
                r,
                NodeState::NodeConnected,
                "node-2"
            ))
            .await,
            "NODE_CONNECTED for node-2 after restart"
        );
        let b_before = flows(&got)
            .iter()
            .filter(|f| f.node_name == "node-2")
            .count();
        tokio::task::block_in_place(|| nodes[1].traffic(1));
        assert!(
            read_until(&mut s, &mut got, Duration::from_secs(15), |r| flows(r)
                .iter()
                .filter(|f| f.node_name == "node-2")
                .count()
                > b_before)
            .await,
            "node-2's flows resume"
        );
    });
    let log = relay.proc.log();
    assert!(log.contains("node-2"), "relay log mentions node-2: {log}");
}

#[test]
fn the_cli_reports_a_dead_relay_and_works_after_restart() {
    lumen_lab::require_privileges!("the_cli_reports_a_dead_relay_and_works_after_restart");
    let _g = lab_lock();
    let nodes: Vec<Node> = ["node-1", "node-2", "node-3"]
        .iter()
        .map(|n| Node::new(n, &[]))
        .collect();
    let relay = Relay::start(&nodes.iter().collect::<Vec<_>>(), &[]);
    for n in &nodes {
        n.traffic(1);
    }
    std::thread::sleep(Duration::from_secs(1));
    let addr = relay.address.clone();
    let ok = lumen(&["observe", "--server", &addr, "--last", "5", "-o", "json"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let Relay {
        mut proc,
        address,
        args,
        _dir,
    } = relay;
    proc.kill("-KILL");
    let failed = lumen(&[
        "observe",
        "--server",
        &address,
        "--last",
        "5",
        "--timeout",
        "2s",
    ]);
    let stderr = String::from_utf8_lossy(&failed.stderr).to_string();
    assert!(
        !failed.status.success(),
        "lumen must fail against a dead relay"
    );
    assert!(
        stderr.contains(&address) || stderr.to_lowercase().contains("connect"),
        "the CLI says what failed: {stderr:?}"
    );
    assert!(
        stderr.lines().count() <= 5,
        "a clear message, not a dump: {stderr}"
    );
    let relay = Relay::spawn(&address, args, _dir);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = lumen(&[
            "observe",
            "--server",
            &relay.address,
            "--last",
            "5",
            "-o",
            "json",
        ]);
        let n = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("\"flow\""))
            .count();
        if out.status.success() && n == 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "relay did not serve again: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = lumen(&["status", "--server", &relay.address]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let _ = relay.restart();
}

#[test]
fn a_stalled_client_does_not_slow_another_and_memory_stays_bounded() {
    lumen_lab::require_privileges!(
        "a_stalled_client_does_not_slow_another_and_memory_stays_bounded"
    );
    let _g = lab_lock();
    // Every packet is a flow event: a ping flood is a flood of flows.
    let nodes: Vec<Node> = ["node-1", "node-2", "node-3"]
        .iter()
        .map(|n| Node::new(n, &["--aggregation", "packets"]))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.yaml");
    std::fs::File::create(&config)
        .unwrap()
        .write_all(b"client_queue_flows: 2000\n")
        .unwrap();
    let config_s = config.display().to_string();
    let relay = Relay::start(&nodes.iter().collect::<Vec<_>>(), &["--config", &config_s]);
    let rt = rt();
    rt.block_on(async {
        // The stalled client: never reads, small HTTP/2 windows.
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", relay.address))
            .unwrap()
            .initial_stream_window_size(Some(64 << 10))
            .initial_connection_window_size(Some(64 << 10))
            .connect()
            .await
            .unwrap();
        let mut stalled_c = ObserverClient::new(ch);
        let follow = GetFlowsRequest {
            follow: true,
            ..Default::default()
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut stalled = stalled_c.get_flows(follow.clone()).await.unwrap().into_inner();
        let mut fast_c = client(&relay.address).await;
        let mut fast = fast_c.get_flows(follow).await.unwrap().into_inner();
        let mut got = Vec::new();
        read_until(&mut fast, &mut got, Duration::from_secs(5), |r| !r.is_empty()).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let since = now_ns();
        let rss_before = relay.rss_kib();
        let mut rss_max = rss_before;
        // 3 × 3000 pings, 1 ms apart: tens of thousands of flow events.
        let floods: Vec<_> = nodes
            .iter()
            .map(|n| {
                let (client, ip) = (n.client.clone(), n.server.ipv4.to_string());
                std::thread::spawn(move || {
                    client
                        .exec(&["ping", "-n", "-q", "-i", "0.001", "-c", "3000", &ip])
                        .expect("ping flood")
                })
            })
            .collect();
        let mut running = true;
        while running {
            read_until(&mut fast, &mut got, Duration::from_millis(200), |_| false).await;
            rss_max = rss_max.max(relay.rss_kib());
            running = floods.iter().any(|f| !f.is_finished());
        }
        for f in floods {
            f.join().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let until = now_ns();
        read_until(&mut fast, &mut got, Duration::from_secs(3), |_| false).await;
        rss_max = rss_max.max(relay.rss_kib());
        // The reading client got every flow the nodes hold for the flood's time range.
        let mut expected = 0usize;
        for n in &nodes {
            expected += count_flows(
                &get_all(
                    &n.address,
                    GetFlowsRequest {
                        since: Some(ns_timestamp(since)),
                        until: Some(ns_timestamp(until)),
                        ..Default::default()
                    },
                )
                .await,
            );
        }
        let fast_flows = flows(&got)
            .iter()
            .filter(|f| (since..=until).contains(&time_of(f)))
            .count();
        assert!(expected > 20_000, "the flood made {expected} flows");
        assert_eq!(fast_flows, expected, "the reading client is not slowed into losing flows");
        assert!(
            rss_max < rss_before + 200 * 1024,
            "relay memory stays bounded: {rss_before} KiB before, {rss_max} KiB max"
        );
        // The stalled client reads at last: some flows, then how many it lost.
        let mut slow = Vec::new();
        let lost = |r: &[GetFlowsResponse]| -> u64 {
            r.iter()
                .filter_map(|x| match &x.response_types {
                    Some(ResponseTypes::LostEvents(l)) => Some(l.num_events_lost),
                    _ => None,
                })
                .sum()
        };
        assert!(
            read_until(&mut stalled, &mut slow, Duration::from_secs(20), |r| lost(r) > 0).await,
            "the stalled client is told it lost flows"
        );
        // Then everything is accounted for: delivered or counted as lost.
        read_until(&mut stalled, &mut slow, Duration::from_secs(5), |r| {
            let delivered = flows(r)
                .iter()
                .filter(|f| (since..=until).contains(&time_of(f)))
                .count() as u64;
            delivered + lost(r) >= expected as u64
        })
        .await;
        let delivered = flows(&slow)
            .iter()
            .filter(|f| (since..=until).contains(&time_of(f)))
            .count() as u64;
        assert!(
            delivered + lost(&slow) >= expected as u64,
            "delivered {delivered} + lost {} < {expected}",
            lost(&slow)
        );
        println!(
            "flood: {expected} flows; stalled client got {} and lost {}; relay RSS {rss_before} -> max {rss_max} KiB",
            count_flows(&slow),
            lost(&slow)
        );
    });
}

#[test]
fn hostile_requests_to_the_relay_binary() {
    lumen_lab::require_privileges!("hostile_requests_to_the_relay_binary");
    let _g = lab_lock();
    let nodes: Vec<Node> = ["node-1"].iter().map(|n| Node::new(n, &[])).collect();
    let relay = Relay::start(&nodes.iter().collect::<Vec<_>>(), &[]);
    nodes[0].traffic(1);
    rt().block_on(async {
        let mut c = client(&relay.address).await;
        for req in [
            GetFlowsRequest {
                since: Some(ns_timestamp(now_ns())),
                until: Some(ns_timestamp(now_ns() - 1_000_000_000)),
                ..Default::default()
            },
            GetFlowsRequest {
                whitelist: vec![lumen_proto::flow::FlowFilter {
                    destination_port: vec!["http-ish".into()],
                    ..Default::default()
                }],
                ..Default::default()
            },
        ] {
            let e = c.get_flows(req).await.expect_err("refused");
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        }
        let ok = get_all(&relay.address, GetFlowsRequest::default()).await;
        assert!(count_flows(&ok) > 0, "still serving");
    });
}

/// Cross-node traffic: one L2 segment, pods split over three node exporters (each attached
/// only to its own pods' interfaces). A connection from a pod of node-i to a pod of node-j
/// is seen by both nodes; through the relay every flow of every node arrives exactly once,
/// in time order, with the right node name, and equal to each node's own answer.
#[test]
fn cross_node_traffic_through_the_relay() {
    lumen_lab::require_privileges!("cross_node_traffic_through_the_relay");
    let _g = lab_lock();
    let mut lab = Lab::new("relay-cross").expect("lab");
    let names = ["node-1", "node-2", "node-3"];
    let mut clients = Vec::new();
    let mut servers = Vec::new();
    for i in 1..=names.len() {
        clients.push(lab.add_pod(&format!("client{i}")).expect("pod"));
        servers.push(lab.add_pod(&format!("server{i}")).expect("pod"));
    }
    let _http: Vec<_> = servers
        .iter()
        .map(|s| s.http_server(8080).expect("http server"))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let bin = workspace_bin("lumen-node-exporter", "lumen-node-exporter");
    let mut exporters = Vec::new();
    let mut addrs = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let address = format!("127.0.0.1:{}", free_port());
        let args: Vec<String> = vec![
            "--node-name".into(),
            (*name).into(),
            "--listen-address".into(),
            address.clone(),
            "--metrics-address".into(),
            String::new(),
            "--interface".into(),
            clients[i].host_if.clone(),
            "--interface".into(),
            servers[i].host_if.clone(),
        ];
        let mut p = Proc::spawn(&bin, &args, dir.path().join(format!("{name}.log")));
        p.wait_listening(&address, name);
        exporters.push(p);
        addrs.push(address);
    }
    std::thread::sleep(Duration::from_millis(700));
    let relay_addr = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "--listen-address".to_owned(),
        relay_addr.clone(),
        "--metrics-address".to_owned(),
        String::new(),
    ];
    for (name, addr) in names.iter().zip(&addrs) {
        args.push("--node".into());
        args.push(format!("{name}={addr}"));
    }
    let relay = Relay::spawn(&relay_addr, args, tempfile::tempdir().unwrap());
    let since = now_ns();
    // client of node i -> server of node i+1: every connection crosses two nodes.
    for i in 0..names.len() {
        let target: IpAddr = servers[(i + 1) % servers.len()].ipv4.into();
        for _ in 0..2 {
            clients[i].http_get(target, 8080, "/").expect("http get");
        }
    }
    std::thread::sleep(Duration::from_millis(1500));
    let until = now_ns();
    let req = GetFlowsRequest {
        since: Some(ns_timestamp(since)),
        until: Some(ns_timestamp(until)),
        ..Default::default()
    };
    rt().block_on(async {
        let via_relay = flows(&get_all(&relay.address, req.clone()).await);
        assert_time_ordered_once(&via_relay);
        for (i, (name, addr)) in names.iter().zip(&addrs).enumerate() {
            let mut own: Vec<String> = flows(&get_all(addr, req.clone()).await)
                .into_iter()
                .map(|f| f.uuid)
                .collect();
            let mut relayed: Vec<String> = via_relay
                .iter()
                .filter(|f| f.node_name == *name)
                .map(|f| f.uuid.clone())
                .collect();
            own.sort();
            relayed.sort();
            assert!(!own.is_empty(), "{name} saw traffic");
            assert_eq!(relayed, own, "{name}: relay equals the node's own answer");
            // The node saw both its client's outgoing and its server's incoming connections.
            let mine = [clients[i].host_if.as_str(), servers[i].host_if.as_str()];
            for f in via_relay.iter().filter(|f| f.node_name == *name) {
                let iface = f.interface.as_ref().map(|x| x.name.as_str()).unwrap_or("");
                assert!(mine.contains(&iface), "{name} reported a flow on {iface}");
            }
        }
        // One cross-node connection appears on both of its nodes.
        let client_ip = clients[0].ipv4.to_string();
        let server_ip = servers[1].ipv4.to_string();
        let nodes_seeing: HashSet<String> = via_relay
            .iter()
            .filter(|f| {
                f.ip.as_ref()
                    .is_some_and(|ip| ip.source == client_ip && ip.destination == server_ip)
            })
            .map(|f| f.node_name.clone())
            .collect();
        assert_eq!(
            nodes_seeing,
            HashSet::from(["node-1".to_owned(), "node-2".to_owned()]),
            "client1 -> server2 seen on node-1 (egress) and node-2 (ingress)"
        );
    });
    drop(relay);
    drop(exporters);
    let _ = &mut lab;
}

//! Privileged end-to-end tests of the relay: a lab of three nodes (network namespaces of
//! their own on the lab bridge, each routing for its own client and server pods), a real
//! `lumen-node-exporter` process inside each node's namespace (real eBPF datapath on that
//! node's pod interfaces, listening on the node's address, its own --node-name), the real
//! `lumen-relay` binary in the root namespace fanning them in over the lab bridge, real
//! traffic within and across nodes, and the real `lumen` CLI and gRPC clients reading.
//! Answers are checked against each node's own answer for the same request, and cross-node
//! connections against packet captures taken inside the nodes.
//!
//! Run single-threaded by the lab runner; without root they print why they were skipped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    io::Write,
    net::{IpAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use lumen_lab::{ipproto, Capture, CaptureOptions, FiveTuple, Lab, Pod};
use lumen_proto::{
    flow::{layer4::Protocol, Flow},
    observer::{
        get_flows_response::ResponseTypes, observer_client::ObserverClient, GetFlowsRequest,
        GetFlowsResponse, ServerStatusRequest,
    },
    relay::NodeState,
};
use lumen_relay::wire::{now_ns, ns_timestamp, timestamp_ns};

mod pki;
use pki::Pki;
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
        let mut cmd = Command::new(bin);
        cmd.args(args);
        Self::start(cmd, &bin.display().to_string(), log)
    }

    /// `bin` inside network namespace `netns`. `nsenter` joins the network namespace only
    /// (as a container runtime's setns does; `ip netns exec` would also mount the
    /// namespace's own /sys), so what `bin` learns about interfaces it must learn from the
    /// kernel of its namespace, not from /sys/class/net. It execs `bin`: the pid is its own.
    fn spawn_in(netns: &str, bin: &PathBuf, args: &[String], log: PathBuf) -> Proc {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{netns}"))
            .arg("--")
            .arg(bin)
            .args(args);
        Self::start(cmd, &format!("{} in {netns}", bin.display()), log)
    }

    fn start(mut cmd: Command, what: &str, log: PathBuf) -> Proc {
        let child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
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

/// The node exporters' port: each listens on its own node's address.
const EXPORTER_PORT: u16 = 4244;

/// The lab: one namespace per node, a client and a server pod on each node. The nodes (and
/// their processes) go before the lab that holds their namespaces.
struct Cluster {
    nodes: Vec<Node>,
    /// Held for its Drop: it removes every namespace, link and route of the lab.
    _lab: Lab,
}

impl Cluster {
    /// Nodes `names`, each with pods `client-<n>` and `server-<n>` (`<n>` from 1) and an
    /// HTTP server on the server pod; node exporters started with `extra` arguments.
    fn new(names: &[&str], extra: &[&str]) -> Cluster {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Self::new_with(names, |_, _| extra.clone())
    }

    /// As [`Cluster::new`], with each node's own extra arguments (from its name and
    /// address).
    fn new_with(names: &[&str], extra: impl Fn(&str, &str) -> Vec<String>) -> Cluster {
        let mut lab = Lab::new("relay-nodes").expect("lab");
        let mut nodes = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let lab_node = lab.add_node(name).expect("node");
            let server = lab
                .add_pod_on(name, &format!("server-{}", i + 1))
                .expect("server pod");
            let client = lab
                .add_pod_on(name, &format!("client-{}", i + 1))
                .expect("client pod");
            let http = server.http_server(8080).expect("http server");
            let address = lab_node.socket_addr(EXPORTER_PORT).to_string();
            nodes.push(Node {
                name: (*name).to_owned(),
                extra: extra(name, &address),
                address,
                lab_node,
                client,
                server,
                _http: http,
                exporter: None,
                interfaces: format!("lmh{}*", lab.id()),
                dir: tempfile::tempdir().unwrap(),
            });
        }
        for n in &mut nodes {
            n.start_exporter();
        }
        Cluster { nodes, _lab: lab }
    }

    fn node_refs(&self) -> Vec<&Node> {
        self.nodes.iter().collect()
    }
}

/// One node of the lab: its namespace, a client and a server pod on it, and its node exporter.
struct Node {
    name: String,
    lab_node: lumen_lab::Node,
    client: Pod,
    server: Pod,
    _http: lumen_lab::Background,
    exporter: Option<Proc>,
    /// The node's address and [`EXPORTER_PORT`], reached from the root namespace.
    address: String,
    /// `lmh<lab id>*`: in the node's namespace, the host-side veths of its pods only.
    interfaces: String,
    extra: Vec<String>,
    dir: tempfile::TempDir,
}

impl Node {
    /// Starts the node exporter in the node's namespace, on the node's address, attached to
    /// the node's pods' interfaces (the lab's host-side veths in that namespace).
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
            self.interfaces.clone(),
        ];
        args.extend(self.extra.iter().cloned());
        let log = self.dir.path().join(format!("exporter-{}.log", now_ns()));
        let mut p = Proc::spawn_in(&self.lab_node.netns, &bin, &args, log);
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

    /// The host-side veths of this node's pods (in the node's namespace).
    fn pod_interfaces(&self) -> [&str; 2] {
        [self.client.host_if.as_str(), self.server.host_if.as_str()]
    }

    /// Pod-to-pod HTTP and ping within this node.
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
    get_all_with(&mut client(addr).await, req).await
}

async fn get_all_with(
    c: &mut ObserverClient<Channel>,
    req: GetFlowsRequest,
) -> Vec<GetFlowsResponse> {
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
    let cluster = Cluster::new(&["node-1", "node-2", "node-3"], &[]);
    let nodes = &cluster.nodes;
    let relay = Relay::start(&cluster.node_refs(), &[]);
    let since = now_ns();
    for n in nodes {
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
        for n in nodes {
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
            // Each node's flows were seen on its own pods' interfaces, in its namespace.
            for f in via_relay.iter().filter(|f| f.node_name == n.name) {
                let iface = f.interface.as_ref().map(|i| i.name.as_str()).unwrap_or("");
                assert!(
                    n.pod_interfaces().contains(&iface),
                    "{} flow on {iface:?}",
                    n.name
                );
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
    let mut cluster = Cluster::new(&["node-1", "node-2", "node-3"], &[]);
    let relay = Relay::start(&cluster.node_refs(), &["--sort-window", "100ms"]);
    let nodes = &mut cluster.nodes;
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
        for n in nodes.iter() {
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
    let cluster = Cluster::new(&["node-1", "node-2", "node-3"], &[]);
    let relay = Relay::start(&cluster.node_refs(), &[]);
    for n in &cluster.nodes {
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
    let cluster = Cluster::new(
        &["node-1", "node-2", "node-3"],
        &["--aggregation", "packets"],
    );
    let nodes = &cluster.nodes;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.yaml");
    std::fs::File::create(&config)
        .unwrap()
        .write_all(b"client_queue_flows: 2000\n")
        .unwrap();
    let config_s = config.display().to_string();
    let relay = Relay::start(&cluster.node_refs(), &["--config", &config_s]);
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
        for n in nodes {
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
    let cluster = Cluster::new(&["node-1"], &[]);
    let relay = Relay::start(&cluster.node_refs(), &[]);
    cluster.nodes[0].traffic(1);
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

/// Cross-node traffic: a pod of node-i talks to a pod of node-i+1 (IPv4 and IPv6), routed by
/// both nodes over the lab bridge, each node exporter attached only to its own pods'
/// interfaces in its own namespace. Such a connection is seen by both nodes; through the
/// relay every flow of every node arrives exactly once, in time order, with the right node
/// name, and equal to each node's own answer; and the connections each node reports are
/// exactly the ones a packet capture inside that node saw on its pods' interfaces.
#[test]
fn cross_node_traffic_through_the_relay() {
    lumen_lab::require_privileges!("cross_node_traffic_through_the_relay");
    let _g = lab_lock();
    let cluster = Cluster::new(&["node-1", "node-2", "node-3"], &[]);
    let nodes = &cluster.nodes;
    let relay = Relay::start(&cluster.node_refs(), &[]);
    let captures: Vec<Capture> = nodes
        .iter()
        .map(|n| {
            Capture::start_with(
                &n.pod_interfaces(),
                CaptureOptions {
                    netns: Some(n.lab_node.netns.clone()),
                    filter: Some("tcp port 8080".into()),
                    ..CaptureOptions::default()
                },
            )
            .expect("capture in the node")
        })
        .collect();
    let since = now_ns();
    // client of node i -> server of node i+1: every connection crosses two nodes.
    for (i, n) in nodes.iter().enumerate() {
        let target = &nodes[(i + 1) % nodes.len()].server;
        for ip in [
            IpAddr::from(target.ipv4),
            IpAddr::from(target.ipv4),
            IpAddr::from(target.ipv6),
        ] {
            let body = n.client.http_get(ip, 8080, "/").expect("http get");
            assert_eq!(body, target.http_index_body());
        }
    }
    std::thread::sleep(Duration::from_millis(1500));
    let until = now_ns();
    let captured: Vec<BTreeSet<FiveTuple>> = captures
        .into_iter()
        .map(|c| {
            c.stop()
                .expect("capture")
                .iter()
                .filter_map(FiveTuple::of)
                .map(|t| t.canonical())
                .collect()
        })
        .collect();
    let req = GetFlowsRequest {
        since: Some(ns_timestamp(since)),
        until: Some(ns_timestamp(until)),
        ..Default::default()
    };
    rt().block_on(async {
        let via_relay = flows(&get_all(&relay.address, req.clone()).await);
        assert_time_ordered_once(&via_relay);
        for (n, captured) in nodes.iter().zip(&captured) {
            let mut own: Vec<String> = flows(&get_all(&n.address, req.clone()).await)
                .into_iter()
                .map(|f| f.uuid)
                .collect();
            let mut relayed: Vec<String> = via_relay
                .iter()
                .filter(|f| f.node_name == n.name)
                .map(|f| f.uuid.clone())
                .collect();
            own.sort();
            relayed.sort();
            assert!(!own.is_empty(), "{} saw traffic", n.name);
            assert_eq!(
                relayed, own,
                "{}: relay equals the node's own answer",
                n.name
            );
            // The node saw its client's outgoing and its server's incoming connections, on
            // its own pods' interfaces only.
            for f in via_relay.iter().filter(|f| f.node_name == n.name) {
                let iface = f.interface.as_ref().map(|x| x.name.as_str()).unwrap_or("");
                assert!(
                    n.pod_interfaces().contains(&iface),
                    "{} reported a flow on {iface}",
                    n.name
                );
            }
            // Its HTTP connections are those the capture inside the node saw: 2 over IPv4
            // and 1 over IPv6 from its client, as many to its server.
            let reported: BTreeSet<FiveTuple> = via_relay
                .iter()
                .filter(|f| f.node_name == n.name)
                .filter_map(tcp_tuple)
                .filter(|t| t.dport == 8080 || t.sport == 8080)
                .map(|t| t.canonical())
                .collect();
            assert_eq!(captured.len(), 6, "{}: captured {captured:?}", n.name);
            assert_eq!(
                &reported, captured,
                "{}: the connections it reports are those captured on its pods",
                n.name
            );
        }
        // One cross-node connection appears on both of its nodes, over IPv4 and IPv6.
        let (client, server) = (&nodes[0].client, &nodes[1].server);
        for (src, dst) in [
            (client.ipv4.to_string(), server.ipv4.to_string()),
            (client.ipv6.to_string(), server.ipv6.to_string()),
        ] {
            let nodes_seeing: HashSet<String> = via_relay
                .iter()
                .filter(|f| {
                    f.ip.as_ref()
                        .is_some_and(|ip| ip.source == src && ip.destination == dst)
                })
                .map(|f| f.node_name.clone())
                .collect();
            assert_eq!(
                nodes_seeing,
                HashSet::from(["node-1".to_owned(), "node-2".to_owned()]),
                "{src} -> {dst} seen on node-1 (egress) and node-2 (ingress)"
            );
        }
    });
}

/// The 5-tuple of a TCP flow as the flow states it.
fn tcp_tuple(f: &Flow) -> Option<FiveTuple> {
    let ip = f.ip.as_ref()?;
    let Some(Protocol::Tcp(tcp)) = f.l4.as_ref()?.protocol.as_ref() else {
        return None;
    };
    Some(FiveTuple {
        proto: ipproto::TCP,
        src: ip.source.parse().ok()?,
        sport: u16::try_from(tcp.source_port).ok()?,
        dst: ip.destination.parse().ok()?,
        dport: u16::try_from(tcp.destination_port).ok()?,
    })
}

/// The relay finds the nodes through a node exporter's `peer.Peer` service (the `nodes:` of
/// its endpoints file), and every hop is mutual TLS: relay → peer service, relay → nodes
/// (verified by the names the peer service announces), client → relay. Nodes join and
/// leave by editing the file; a broken file keeps the nodes in force; plaintext and
/// certificate-less clients are refused by the node exporters.
#[test]
fn nodes_from_a_node_exporters_peer_service_over_mutual_tls() {
    lumen_lab::require_privileges!("nodes_from_a_node_exporters_peer_service_over_mutual_tls");
    let _g = lab_lock();
    let pki = Pki::new(&["relay.lumen.test", "relay-client", "cli"]);
    let files = tempfile::tempdir().unwrap();
    let endpoints = files.path().join("endpoints.yaml");
    std::fs::write(&endpoints, "endpoints: []\n").unwrap();
    let endpoints_arg = endpoints.display().to_string();
    let cluster = Cluster::new_with(&["node-1", "node-2"], |name, address| {
        // Its address (the relay reaches the peer service by it) and the name the peer
        // service announces for it.
        let host = address.rsplit_once(':').unwrap().0;
        pki.issue(name, &[host, &format!("{name}.lumen.test")]);
        let (cert, key) = pki.cert_key(name);
        vec![
            "--endpoints-file".into(),
            endpoints_arg.clone(),
            "--tls-cert".into(),
            cert,
            "--tls-key".into(),
            key,
            "--tls-client-ca".into(),
            pki.path("ca.pem").display().to_string(),
        ]
    });
    let nodes = &cluster.nodes;
    let nodes_file = |which: &[&Node], extra: &str| {
        let mut y = String::from("endpoints: []\nnodes:\n");
        for n in which {
            y.push_str(&format!(
                "  - name: {}\n    address: \"{}\"\n    tlsServerName: {}.lumen.test\n",
                n.name, n.address, n.name
            ));
        }
        y.push_str(extra);
        // Atomically, as configuration management writes files.
        let tmp = files.path().join("endpoints.yaml.tmp");
        std::fs::write(&tmp, y).unwrap();
        std::fs::rename(&tmp, &endpoints).unwrap();
    };
    nodes_file(&[&nodes[0]], "");

    let (relay_cert, relay_key) = pki.cert_key("relay.lumen.test");
    let (client_cert, client_key) = pki.cert_key("relay-client");
    let ca = pki.path("ca.pem").display().to_string();
    let relay = Relay::start(
        &[],
        &[
            "--peer-service",
            &nodes[0].address,
            "--node-tls-ca",
            &ca,
            "--node-tls-cert",
            &client_cert,
            "--node-tls-key",
            &client_key,
            "--tls-cert",
            &relay_cert,
            "--tls-key",
            &relay_key,
            "--tls-client-ca",
            &ca,
        ],
    );

    rt().block_on(async {
        let mut c = pki
            .client(&relay.address, "relay.lumen.test", Some("cli"))
            .await
            .expect("mutual TLS client of the relay");
        wait_connected(&mut c, &["node-1"], &relay).await;

        // node-2 joins: listed in node-1's file, reached over mutual TLS by its announced name.
        nodes_file(&[&nodes[0], &nodes[1]], "");
        wait_connected(&mut c, &["node-1", "node-2"], &relay).await;
        let since = now_ns();
        nodes[1].traffic(2);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = flows(
                &get_all_with(
                    &mut c,
                    GetFlowsRequest {
                        since: Some(ns_timestamp(since)),
                        ..Default::default()
                    },
                )
                .await,
            );
            if got.iter().any(|f| f.node_name == "node-2") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no flow of node-2 through the relay"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // A broken file is rejected; the nodes in force stay.
        nodes_file(&[&nodes[0]], "  - name: [not, a, name]\n");
        tokio::time::sleep(Duration::from_secs(2)).await;
        wait_connected(&mut c, &["node-1", "node-2"], &relay).await;

        // node-2 leaves.
        nodes_file(&[&nodes[0]], "");
        wait_connected(&mut c, &["node-1"], &relay).await;

        // The node exporters refuse plaintext and clients without a certificate.
        let plain = Channel::from_shared(format!("http://{}", nodes[0].address))
            .unwrap()
            .connect()
            .await;
        if let Ok(ch) = plain {
            let r = ObserverClient::new(ch)
                .server_status(ServerStatusRequest {})
                .await;
            assert!(r.is_err(), "plaintext answered: {r:?}");
        }
        let anonymous = pki
            .client(&nodes[0].address, "node-1.lumen.test", None)
            .await;
        if let Ok(mut a) = anonymous {
            let r = a.server_status(ServerStatusRequest {}).await;
            assert!(
                r.is_err(),
                "a client without a certificate was answered: {r:?}"
            );
        }
        let mut with_cert = pki
            .client(&nodes[0].address, "node-1.lumen.test", Some("cli"))
            .await
            .expect("mutual TLS client of a node exporter");
        with_cert
            .server_status(ServerStatusRequest {})
            .await
            .expect("node exporter answers over mutual TLS");
    });
}

/// Waits until the relay's GetNodes lists exactly `want`, all connected.
async fn wait_connected(c: &mut ObserverClient<Channel>, want: &[&str], relay: &Relay) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    while Instant::now() < deadline {
        let r = c
            .get_nodes(lumen_proto::observer::GetNodesRequest {})
            .await
            .unwrap()
            .into_inner();
        got = r
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.state))
            .collect::<Vec<_>>();
        got.sort();
        let connected = got
            .iter()
            .all(|(_, s)| *s == NodeState::NodeConnected as i32);
        if connected && got.iter().map(|(n, _)| n.as_str()).eq(want.iter().copied()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "relay nodes {got:?}, want {want:?} connected: {}",
        relay.proc.log()
    );
}

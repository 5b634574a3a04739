//! `cargo xtask demo`: a lab of pods (network namespaces + veth pairs, IPv4 and IPv6) on a
//! bridge, the node exporter attached to their host-side interfaces with their metadata,
//! a loop of real traffic (HTTP over TCP on v4 and v6, UDP, ping, a refused connection),
//! and `lumen observe --follow` in the terminal. With `--nodes N`, a lab of N nodes (network
//! namespaces of their own, each with its pods and its node exporter) behind `lumen-relay`.
//! Ctrl-C (or --duration) tears it all down.

use std::{
    net::IpAddr,
    os::unix::process::CommandExt as _,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use lumen_lab::{Lab, Pod};

use crate::{setup, sh, workspace_root};

/// The node exporters' gRPC port in multi-node mode: each listens on its own node's address.
const EXPORTER_PORT: u16 = 4244;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    duration: Option<u64>,
    /// Output format passed to `lumen observe -o`.
    #[arg(long, default_value = "compact")]
    output: String,
    /// Skip `cargo xtask setup`.
    #[arg(long)]
    no_setup: bool,
    /// Run this many nodes, each a network namespace with two pods of its own and its node
    /// exporter, routed to each other over the lab bridge so traffic crosses nodes, behind a
    /// relay (in the root namespace), and stream through the relay.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
}

struct Proc(Child, &'static str);

impl Proc {
    /// Starts `cmd` (`what` names it) in a process group of its own: Ctrl-C reaches only the
    /// demo, which then stops everything in order (observe, status, relay, node exporters).
    fn start(cmd: &mut Command, what: &'static str) -> Result<Proc> {
        let child = cmd
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        Ok(Proc(child, what))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first so the node exporter detaches cleanly; then make sure.
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("demo: {} did not stop on SIGTERM; killing it", self.1);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(args: DemoArgs) -> Result<()> {
    if !args.no_setup {
        setup::run()?;
    }
    if args.nodes > 1 {
        return run_multi_node(args);
    }
    sh::cargo(
        &[
            "build",
            "--locked",
            "-p",
            "lumen-node-exporter",
            "-p",
            "lumen",
            "--bins",
        ],
        &[],
    )?;
    let bin = workspace_root().join("target/debug");

    let stop = stop_flag()?;

    let mut lab = Lab::new("demo")?;
    let web = lab.add_pod("web")?;
    let api = lab.add_pod("api")?;
    let db = lab.add_pod("db")?;
    eprintln!(
        "demo: lab {} — web {} / {}, api {} / {}, db {} / {}",
        lab.id(),
        web.ipv4,
        web.ipv6,
        api.ipv4,
        api.ipv6,
        db.ipv4,
        db.ipv6
    );

    let dir = tempfile::tempdir()?;
    let endpoints = dir.path().join("endpoints.yaml");
    std::fs::write(
        &endpoints,
        endpoints_yaml(&[
            (&web, "web", "frontend"),
            (&api, "api", "backend"),
            (&db, "db", "storage"),
        ]),
    )?;

    let server = format!("127.0.0.1:{}", preferred_port(4244)?);
    let exporter = Proc::start(
        Command::new(bin.join("lumen-node-exporter"))
            .args([
                "--node-name",
                "demo-node",
                "--listen-address",
                &server,
                "--metrics-address",
                "127.0.0.1:0",
                "--endpoints-file",
            ])
            .arg(&endpoints)
            .env("RUST_LOG", "warn"),
        "lumen-node-exporter",
    )?;
    wait_for_port(&server, Duration::from_secs(20))?;
    eprintln!(
        "demo: node exporter on {server}; from another terminal: target/debug/lumen observe --server {server} --last 20"
    );

    let _http4 = web.http_server(8080)?;
    let _udp = db.udp_listen(5353)?;
    std::thread::sleep(Duration::from_millis(300));

    let observe = observe_follow(&bin, &server, &args.output)?;

    let started = Instant::now();
    let deadline = args.duration.map(Duration::from_secs);
    let mut round = 0u32;
    while !stop.load(Ordering::SeqCst) && deadline.is_none_or(|d| started.elapsed() < d) {
        traffic_round(&web, &api, &db, round);
        round += 1;
        for _ in 0..20 {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    eprintln!("\ndemo: stopping (ran {round} traffic rounds)");
    drop(observe);
    let status = Command::new(bin.join("lumen"))
        .args(["status", "--server", &server])
        .status();
    if let Err(e) = status {
        eprintln!("demo: lumen status: {e}");
    }
    drop(exporter);
    remove_lab(lab)
}

/// One round of mixed traffic: HTTP over v4 and v6, UDP, ping v4/v6, a refused connect.
fn traffic_round(web: &Pod, api: &Pod, db: &Pod, round: u32) {
    let report = |what: &str, r: Result<()>| {
        if let Err(e) = r {
            eprintln!("demo: {what}: {e:#}");
        }
    };
    report(
        "http v4",
        api.http_get(IpAddr::V4(web.ipv4), 8080, "/").map(drop),
    );
    if round.is_multiple_of(2) {
        report(
            "http v6",
            api.http_get(IpAddr::V6(web.ipv6), 8080, "/").map(drop),
        );
    }
    report(
        "udp",
        web.udp_send(
            IpAddr::V4(db.ipv4),
            5353,
            format!("lumen demo {round}").as_bytes(),
        ),
    );
    if round.is_multiple_of(3) {
        report("ping v4", api.ping(IpAddr::V4(db.ipv4), 1).map(drop));
        report("ping v6", web.ping(IpAddr::V6(api.ipv6), 1).map(drop));
    }
    if round % 4 == 1 {
        report(
            "refused",
            api.tcp_connect_refused(IpAddr::V4(db.ipv4), 6379).map(drop),
        );
    }
}

fn endpoints_yaml(pods: &[(&Pod, &str, &str)]) -> String {
    let mut s = String::from("node: demo-node\nendpoints:\n");
    for (pod, app, tier) in pods {
        s.push_str(&format!(
            "  - pod: {name}-{id}\n    namespace: demo\n    labels: {{app: {app}, tier: {tier}}}\n    interface: {iface}\n    ips: [\"{v4}\", \"{v6}\"]\n    workload: {{kind: Deployment, name: {name}}}\n",
            name = pod.name,
            id = &pod.host_if[pod.host_if.len().saturating_sub(3)..],
            iface = pod.host_if,
            v4 = pod.ipv4,
            v6 = pod.ipv6,
        ));
    }
    s
}

/// `port` (Hubble's default for the role) when it is free on loopback, else any free port.
fn preferred_port(port: u16) -> Result<u16> {
    match std::net::TcpListener::bind(("127.0.0.1", port)) {
        Ok(_) => Ok(port),
        Err(_) => free_port(),
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn wait_for_port(addr: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the node exporter did not listen on {addr} within {timeout:?}")
}

/// Multi-node mode: `nodes` lab nodes `node-1..` (network namespaces), each with pods
/// `web<n>` and `api<n>` and a node exporter inside the node's namespace listening on the
/// node's address (attached to its own pods' interfaces, named in the shared endpoints file),
/// a relay in the root namespace dialling the nodes' addresses, and `lumen observe --follow`
/// against the relay. Each api pod calls the web pod of another node: every request crosses
/// two nodes.
fn run_multi_node(args: DemoArgs) -> Result<()> {
    sh::cargo(
        &[
            "build",
            "--locked",
            "-p",
            "lumen-node-exporter",
            "-p",
            "lumen",
            "-p",
            "lumen-relay",
            "--bins",
        ],
        &[],
    )?;
    let bin = workspace_root().join("target/debug");
    let stop = stop_flag()?;
    let mut lab = Lab::new("demo-multi")?;
    let mut nodes = Vec::new();
    let mut webs = Vec::new();
    let mut apis = Vec::new();
    for n in 1..=args.nodes {
        let node = lab.add_node(&format!("node-{n}"))?;
        webs.push(lab.add_pod_on(&node.name, &format!("web{n}"))?);
        apis.push(lab.add_pod_on(&node.name, &format!("api{n}"))?);
        nodes.push(node);
    }
    let dir = tempfile::tempdir()?;
    let endpoints = dir.path().join("endpoints.yaml");
    let mut yaml = String::from("endpoints:\n");
    for p in webs.iter().chain(&apis) {
        let app = p.name.trim_end_matches(|c: char| c.is_ascii_digit());
        yaml.push_str(&format!(
            "  - pod: {name}\n    namespace: demo\n    labels: {{app: {app}}}\n    interface: {iface}\n    node: {node}\n    ips: [\"{v4}\", \"{v6}\"]\n",
            name = p.name,
            iface = p.host_if,
            node = p.node.as_deref().unwrap_or_default(),
            v4 = p.ipv4,
            v6 = p.ipv6
        ));
    }
    yaml.push_str("nodes:\n");
    for node in &nodes {
        yaml.push_str(&format!(
            "  - {{name: {}, address: \"{}\"}}\n",
            node.name,
            node.socket_addr(EXPORTER_PORT)
        ));
    }
    std::fs::write(&endpoints, yaml)?;
    let mut exporters = Vec::new();
    for node in &nodes {
        let listen = node.socket_addr(EXPORTER_PORT).to_string();
        exporters.push(
            Proc::start(
                Command::new("ip")
                    .args(["netns", "exec", &node.netns])
                    .arg(bin.join("lumen-node-exporter"))
                    .args([
                        "--node-name",
                        &node.name,
                        "--listen-address",
                        &listen,
                        "--metrics-address",
                        "",
                        "--endpoints-file",
                    ])
                    .arg(&endpoints)
                    .env("RUST_LOG", "warn"),
                "lumen-node-exporter",
            )
            .with_context(|| format!("in node namespace {}", node.netns))?,
        );
    }
    for node in &nodes {
        wait_for_port(
            &node.socket_addr(EXPORTER_PORT).to_string(),
            Duration::from_secs(20),
        )?;
    }
    let relay_addr = format!("127.0.0.1:{}", preferred_port(4245)?);
    let mut relay_cmd = Command::new(bin.join("lumen-relay"));
    relay_cmd.args(["--listen-address", &relay_addr, "--metrics-address", ""]);
    // The relay learns the nodes from node-1's peer service (the `nodes:` of the endpoints
    // file), as Hubble's relay does from its local agent.
    relay_cmd.args([
        "--peer-service",
        &nodes[0].socket_addr(EXPORTER_PORT).to_string(),
    ]);
    let relay = Proc::start(relay_cmd.env("RUST_LOG", "warn"), "lumen-relay")?;
    wait_for_port(&relay_addr, Duration::from_secs(20))?;
    let servers: Vec<_> = webs
        .iter()
        .map(|p| p.http_server(8080))
        .collect::<Result<_>>()?;
    std::thread::sleep(Duration::from_millis(500));
    eprintln!(
        "demo: lab {}, {} nodes ({}) behind relay {relay_addr} (found through node-1's peer service); from another terminal: target/debug/lumen observe --server {relay_addr} --last 20",
        lab.id(),
        nodes.len(),
        nodes
            .iter()
            .map(|n| format!("{} {}", n.name, n.ipv4))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let observe = observe_follow(&bin, &relay_addr, &args.output)?;
    let started = Instant::now();
    let deadline = args.duration.map(Duration::from_secs);
    let mut round = 0usize;
    while !stop.load(Ordering::SeqCst) && deadline.is_none_or(|d| started.elapsed() < d) {
        // Each api calls the web pod of another node, over IPv4 and IPv6 by turns.
        for (i, api) in apis.iter().enumerate() {
            // An offset of 1 to nodes-1: never the api's own node.
            let web = &webs[(i + 1 + round % (webs.len() - 1)) % webs.len()];
            let ip = if (i + round).is_multiple_of(2) {
                IpAddr::V4(web.ipv4)
            } else {
                IpAddr::V6(web.ipv6)
            };
            if let Err(e) = api.http_get(ip, 8080, "/") {
                eprintln!("demo: http: {e:#}");
            }
        }
        round += 1;
        for _ in 0..20 {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    eprintln!("\ndemo: stopping (ran {round} traffic rounds)");
    drop(observe);
    let _ = Command::new(bin.join("lumen"))
        .args(["status", "--server", &relay_addr])
        .status();
    drop(relay);
    drop(exporters);
    drop(servers);
    remove_lab(lab)
}

/// A flag set by Ctrl-C (SIGINT), so the demo tears down instead of dying.
fn stop_flag() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;
    Ok(stop)
}

/// Remove the lab and fail if any program is still attached to its interfaces (in the root
/// namespace and in its nodes' namespaces) or they cannot be checked.
fn remove_lab(lab: Lab) -> Result<()> {
    let attached: Vec<String> = match lab.attachments() {
        Ok(all) => all
            .iter()
            .filter(|a| !a.is_empty())
            .map(|a| a.to_string())
            .collect(),
        Err(e) => vec![format!("cannot check: {e:#}")],
    };
    drop(lab);
    if attached.is_empty() {
        eprintln!("demo: lab removed; nothing left attached");
        Ok(())
    } else {
        bail!(
            "the lab's interfaces are not clean after shutdown: {}",
            attached.join("; ")
        )
    }
}

/// `lumen observe --follow` against `server`, printing to the terminal.
fn observe_follow(bin: &std::path::Path, server: &str, output: &str) -> Result<Proc> {
    Proc::start(
        Command::new(bin.join("lumen")).args([
            "observe",
            "--server",
            server,
            "--follow",
            "-o",
            output,
            "--print-node-name",
        ]),
        "lumen observe",
    )
}

//! `cargo xtask demo`: a lab of pods (network namespaces + veth pairs, IPv4 and IPv6) on a
//! bridge, the node exporter attached to their host-side interfaces with their metadata,
//! a loop of real traffic (HTTP over TCP on v4 and v6, UDP, ping, a refused connection),
//! and `lumen observe --follow` in the terminal. Ctrl-C (or --duration) tears it all down.

use std::{
    net::IpAddr,
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
    /// Run this many node exporters (each owning some of the pods, all pods on one L2
    /// segment so traffic crosses nodes) behind a relay, and stream through the relay.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
}

struct Proc(Child, &'static str);

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

    let port = free_port()?;
    let server = format!("127.0.0.1:{port}");
    let exporter = Proc(
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
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .context("starting lumen-node-exporter")?,
        "lumen-node-exporter",
    );
    wait_for_port(&server, Duration::from_secs(20))?;

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

/// Multi-node mode: `nodes` node exporters, each attached to its own pods' interfaces and
/// named `node-1..`, all pods on one bridge (so pods talk across nodes), a relay fanning
/// the nodes in, and `lumen observe --follow` against the relay.
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
    let mut pods: Vec<(usize, Pod)> = Vec::new();
    for n in 1..=args.nodes {
        for role in ["web", "api"] {
            pods.push((n, lab.add_pod(&format!("{role}{n}"))?));
        }
    }
    let dir = tempfile::tempdir()?;
    let endpoints = dir.path().join("endpoints.yaml");
    let mut yaml = String::from("endpoints:\n");
    for (n, p) in &pods {
        let app = p.name.trim_end_matches(|c: char| c.is_ascii_digit());
        yaml.push_str(&format!(
            "  - pod: {name}\n    namespace: demo\n    labels: {{app: {app}}}\n    interface: {iface}\n    node: node-{n}\n    ips: [\"{v4}\", \"{v6}\"]\n",
            name = p.name, iface = p.host_if, v4 = p.ipv4, v6 = p.ipv6
        ));
    }
    yaml.push_str("nodes:\n");
    let mut procs = Vec::new();
    let mut node_flags = Vec::new();
    let mut addrs = Vec::new();
    for n in 1..=args.nodes {
        let addr = format!("127.0.0.1:{}", free_port()?);
        yaml.push_str(&format!("  - {{name: node-{n}, address: \"{addr}\"}}\n"));
        addrs.push((n, addr));
    }
    std::fs::write(&endpoints, yaml)?;
    for (n, addr) in &addrs {
        procs.push(Proc(
            Command::new(bin.join("lumen-node-exporter"))
                .args([
                    "--node-name",
                    &format!("node-{n}"),
                    "--listen-address",
                    addr,
                    "--metrics-address",
                    "127.0.0.1:0",
                    "--endpoints-file",
                ])
                .arg(&endpoints)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .spawn()
                .context("starting lumen-node-exporter")?,
            "lumen-node-exporter",
        ));
        node_flags.push(format!("node-{n}={addr}"));
    }
    for (_, addr) in &addrs {
        wait_for_port(addr, Duration::from_secs(20))?;
    }
    let relay_addr = format!("127.0.0.1:{}", free_port()?);
    let mut relay_cmd = Command::new(bin.join("lumen-relay"));
    relay_cmd.args(["--listen-address", &relay_addr, "--metrics-address", ""]);
    for f in &node_flags {
        relay_cmd.args(["--node", f]);
    }
    let relay = Proc(
        relay_cmd
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .context("starting lumen-relay")?,
        "lumen-relay",
    );
    wait_for_port(&relay_addr, Duration::from_secs(20))?;
    let servers: Vec<_> = pods
        .iter()
        .filter(|(_, p)| p.name.starts_with("web"))
        .map(|(_, p)| p.http_server(8080))
        .collect::<Result<_>>()?;
    std::thread::sleep(Duration::from_millis(500));
    eprintln!(
        "demo: {} nodes behind relay {relay_addr}; lab {}",
        args.nodes,
        lab.id()
    );
    let observe = observe_follow(&bin, &relay_addr, &args.output)?;
    let started = Instant::now();
    let deadline = args.duration.map(Duration::from_secs);
    let mut round = 0usize;
    let webs: Vec<&Pod> = pods
        .iter()
        .filter(|(_, p)| p.name.starts_with("web"))
        .map(|(_, p)| p)
        .collect();
    let apis: Vec<&Pod> = pods
        .iter()
        .filter(|(_, p)| p.name.starts_with("api"))
        .map(|(_, p)| p)
        .collect();
    while !stop.load(Ordering::SeqCst) && deadline.is_none_or(|d| started.elapsed() < d) {
        // Each api talks to the web pod of the next node: traffic crosses nodes.
        for (i, api) in apis.iter().enumerate() {
            let web = webs[(i + round + 1) % webs.len()];
            if let Err(e) = api.http_get(IpAddr::V4(web.ipv4), 8080, "/") {
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
    drop(procs);
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

/// Remove the lab and fail if any program is still attached to its interfaces.
fn remove_lab(lab: Lab) -> Result<()> {
    let attached: Vec<String> = lab
        .host_interfaces()
        .iter()
        .filter_map(|i| {
            lumen_lab::attachments(i)
                .ok()
                .filter(|a| !a.is_empty())
                .map(|a| format!("{i}: {a}"))
        })
        .collect();
    drop(lab);
    if attached.is_empty() {
        eprintln!("demo: lab removed; nothing left attached");
        Ok(())
    } else {
        bail!(
            "programs still attached after shutdown: {}",
            attached.join("; ")
        )
    }
}

/// `lumen observe --follow` against `server`, printing to the terminal.
fn observe_follow(bin: &std::path::Path, server: &str, output: &str) -> Result<Proc> {
    let child = Command::new(bin.join("lumen"))
        .args([
            "observe",
            "--server",
            server,
            "--follow",
            "-o",
            output,
            "--print-node-name",
        ])
        .stdin(Stdio::null())
        .spawn()
        .context("starting lumen observe")?;
    Ok(Proc(child, "lumen observe"))
}

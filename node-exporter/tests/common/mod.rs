//! Shared harness of the node exporter's privileged lab tests: a lab lock, the real
//! `lumen-node-exporter` binary as a child process, the real `lumen` CLI, and metrics.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use lumen_lab::Pod;
use serde_json::Value;

static LAB_LOCK: Mutex<()> = Mutex::new(());

/// Lab tests share the kernel; run them one at a time within this binary.
pub fn lab_lock() -> MutexGuard<'static, ()> {
    LAB_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn target_dir() -> PathBuf {
    // CARGO_BIN_EXE_* points into target/<profile>/; the CLI is built next to it.
    PathBuf::from(env!("CARGO_BIN_EXE_lumen-node-exporter"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Path of the `lumen` CLI binary, building it if this test run did not.
pub fn lumen_bin() -> PathBuf {
    let bin = target_dir().join("lumen");
    if !bin.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "lumen", "--bin", "lumen"])
            .status()
            .expect("cargo build -p lumen");
        assert!(status.success(), "building the lumen CLI failed");
    }
    bin
}

pub fn lumen(args: &[&str]) -> Output {
    Command::new(lumen_bin())
        .args(args)
        .output()
        .expect("running lumen")
}

/// `lumen observe -o json` lines parsed as GetFlowsResponse JSON objects.
pub fn observe_json(server: &str, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["observe", "--server", server, "-o", "json"];
    all.extend_from_slice(args);
    let out = lumen(&all);
    assert!(
        out.status.success(),
        "lumen {all:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// Only the flow objects of a response list.
pub fn flows(responses: &[Value]) -> Vec<Value> {
    responses
        .iter()
        .filter_map(|r| r.get("flow").cloned())
        .collect()
}

/// A running node exporter; SIGTERM + wait on drop.
pub struct Exporter {
    pub child: Option<Child>,
    pub server: String,
    pub metrics: String,
    pub stderr_log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Exporter {
    pub fn start(node: &str, endpoints: Option<&Path>, extra: &[&str]) -> Exporter {
        let dir = tempfile::tempdir().unwrap();
        let server = format!("127.0.0.1:{}", free_port());
        let metrics = format!("127.0.0.1:{}", free_port());
        let stderr_log = dir.path().join("exporter.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lumen-node-exporter"));
        cmd.args([
            "--node-name",
            node,
            "--listen-address",
            &server,
            "--metrics-address",
            &metrics,
        ]);
        if let Some(e) = endpoints {
            cmd.arg("--endpoints-file").arg(e);
        }
        cmd.args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_log).unwrap());
        let child = cmd.spawn().expect("start lumen-node-exporter");
        let mut e = Exporter {
            child: Some(child),
            server,
            metrics,
            stderr_log,
            _dir: dir,
        };
        e.wait_ready();
        e
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(&self.server).is_ok() {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("node exporter exited early ({status}): {}", self.log());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "node exporter did not listen on {}: {}",
            self.server,
            self.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("node exporter ignored SIGTERM: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Prometheus text from /metrics.
    pub fn scrape(&self) -> String {
        let out = Command::new("curl")
            .args(["-sf", &format!("http://{}/metrics", self.metrics)])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Sum of a metric's samples whose line contains `label_filter`.
    pub fn metric(&self, name: &str, label_filter: &str) -> f64 {
        parse_metric(&self.scrape(), name, label_filter)
    }
}

pub fn parse_metric(text: &str, name: &str, label_filter: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name)
                && l[name.len()..].starts_with(['{', ' '])
                && l.contains(label_filter)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

impl Drop for Exporter {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// Wait until the datapath is attached (TCX or tc filters) to every interface.
pub fn wait_attached(ifaces: &[String], timeout: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let all = ifaces.iter().all(|i| {
            lumen_lab::attachments(i)
                .map(|a| !a.is_empty())
                .unwrap_or(false)
        });
        if all {
            return start.elapsed();
        }
        if start.elapsed() > timeout {
            panic!("datapath not attached to {ifaces:?} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Endpoint metadata YAML for lab pods: namespace `lab`, label app=<pod name>.
pub fn endpoints_yaml(node: &str, pods: &[&Pod]) -> String {
    let mut s = format!("node: {node}\nendpoints:\n");
    for p in pods {
        s.push_str(&format!(
            "  - pod: {name}\n    namespace: lab\n    labels: {{app: {name}}}\n    interface: {iface}\n    ips: [\"{v4}\", \"{v6}\"]\n    workload: {{kind: Deployment, name: {name}}}\n",
            name = p.name,
            iface = p.host_if,
            v4 = p.ipv4,
            v6 = p.ipv6
        ));
    }
    s
}

/// Stream `lumen observe --follow -o json` lines from a child until `pred` matches one or
/// the timeout passes; returns the matching line.
pub fn follow_until(
    server: &str,
    args: &[&str],
    timeout: Duration,
    mut trigger: impl FnMut(),
    mut pred: impl FnMut(&Value) -> bool,
) -> Option<Value> {
    let mut all = vec!["observe", "--server", server, "-o", "json", "--follow"];
    all.extend_from_slice(args);
    let mut child = Command::new(lumen_bin())
        .args(&all)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("lumen observe --follow");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    trigger();
    let deadline = Instant::now() + timeout;
    let mut found = None;
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if pred(&v) {
                        found = Some(v);
                        break;
                    }
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    found
}

/// proto3-JSON uint64 values are strings; accept both.
pub fn u64_of(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_u64().unwrap_or(0),
        _ => 0,
    }
}

/// proto3-JSON Duration ("0.000045123s") to ns.
pub fn duration_ns(v: &Value) -> Option<u64> {
    let s = v.as_str()?.strip_suffix('s')?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let mut frac = frac.to_owned();
    frac.truncate(9);
    while frac.len() < 9 {
        frac.push('0');
    }
    Some(secs.parse::<u64>().ok()? * 1_000_000_000 + frac.parse::<u64>().ok()?)
}

//! A pod of the lab and what runs in it: commands, background servers, traffic helpers.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::cmd;

/// How long servers may take to start listening.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopped background process may take to exit before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// A pod: a network namespace whose `eth0` is a veth to the lab bridge (in the root
/// namespace), or to its [`Node`](crate::Node)'s namespace.
///
/// It is plain data (cheap to clone); the [`Lab`](crate::Lab) owns the namespace. Methods on a
/// pod that was removed fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub name: String,
    /// `lmn-<lab id>-<name>`.
    pub netns: String,
    /// The node the pod runs on ([`Lab::add_pod_on`](crate::Lab::add_pod_on)); `None` for a
    /// pod on the lab bridge ([`Lab::add_pod`](crate::Lab::add_pod)).
    pub node: Option<String>,
    /// The host-side veth, `lmh<lab id><N>` (where the datapath attaches): in the root
    /// namespace, or in the node's namespace for a pod on a node.
    pub host_if: String,
    /// The host-side veth's ifindex in its namespace.
    pub host_ifindex: u32,
    /// `10.x.y.N` on `eth0` (`/24` on the lab bridge, `/32` on a node).
    pub ipv4: Ipv4Addr,
    /// `fd00:6c6d:xxyy::N` on `eth0` (`/64` on the lab bridge, `/128` on a node).
    pub ipv6: Ipv6Addr,
}

/// Result of [`Pod::ping`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingStats {
    pub transmitted: u32,
    pub received: u32,
}

impl PingStats {
    pub fn all_answered(&self) -> bool {
        self.transmitted > 0 && self.received == self.transmitted
    }
}

/// Result of [`Pod::tcp_connect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectOutcome {
    Connected,
    /// A RST answered the SYN.
    Refused,
    TimedOut,
    /// Any other socket error (e.g. "No route to host").
    Failed(String),
}

/// `http://ip:port/path`, with IPv6 in brackets.
pub fn http_url(ip: IpAddr, port: u16, path: &str) -> String {
    let path = path.strip_prefix('/').unwrap_or(path);
    match ip {
        IpAddr::V4(a) => format!("http://{a}:{port}/{path}"),
        IpAddr::V6(a) => format!("http://[{a}]:{port}/{path}"),
    }
}

const CONNECT_PY: &str = r#"
import socket, sys
ip, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(timeout)
try:
    s.connect((ip, port))
    print("connected")
except ConnectionRefusedError:
    print("refused")
except (socket.timeout, TimeoutError):
    print("timeout")
except OSError as e:
    print("error", e.strerror)
"#;

const UDP_SEND_PY: &str = r#"
import socket, sys
ip, port, data = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(data, (ip, port))
"#;

const UDP_LISTEN_PY: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
while True:
    data, addr = s.recvfrom(65535)
    host = addr[0][7:] if addr[0].startswith("::ffff:") else addr[0]
    print(host, addr[1], data.hex(), flush=True)
"#;

impl Pod {
    /// Runs `argv` in the pod's namespace to completion (any exit status).
    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        cmd::run(&self.netns_argv(argv))
    }

    /// Runs `argv` in the pod; fails unless it exits 0; returns its stdout.
    pub fn exec_ok(&self, argv: &[&str]) -> Result<String> {
        cmd::run_ok(&self.netns_argv(argv))
    }

    fn netns_argv<'a>(&'a self, argv: &[&'a str]) -> Vec<&'a str> {
        cmd::in_netns(&self.netns, argv)
    }

    /// Starts `argv` in the pod in the background. Its stdout and stderr go to a log
    /// ([`Background::output`]); the guard kills it when dropped.
    pub fn spawn(&self, argv: &[&str]) -> Result<Background> {
        Background::start(&self.netns_argv(argv), None)
    }

    /// An HTTP server on `port` (dual-stack, `python3 -m http.server`) serving
    /// [`Pod::http_index_body`] at `/`; returns once it listens.
    pub fn http_server(&self, port: u16) -> Result<Background> {
        let dir = tempfile::Builder::new()
            .prefix("lumen-lab-www-")
            .tempdir()
            .context("cannot create the web root")?;
        std::fs::write(dir.path().join("index.html"), self.http_index_body())
            .context("cannot write index.html")?;
        let root = dir.path().to_string_lossy().into_owned();
        let port_s = port.to_string();
        let mut server = Background::start(
            &self.netns_argv(&[
                "python3",
                "-u",
                "-m",
                "http.server",
                &port_s,
                "--bind",
                "::",
                "--directory",
                &root,
            ]),
            Some(dir),
        )?;
        self.wait_listening(&mut server, "tcp", port)?;
        Ok(server)
    }

    /// The body [`Pod::http_server`] serves at `/`.
    pub fn http_index_body(&self) -> String {
        format!("hello from lumen-lab pod {}\n", self.name)
    }

    /// A UDP sink on `port` (dual-stack) printing `<src ip> <src port> <payload hex>` per
    /// datagram to its [`Background::output`]; returns once it listens.
    pub fn udp_listen(&self, port: u16) -> Result<Background> {
        let port_s = port.to_string();
        let mut server = Background::start(
            &self.netns_argv(&["python3", "-c", UDP_LISTEN_PY, &port_s]),
            None,
        )?;
        self.wait_listening(&mut server, "udp", port)?;
        Ok(server)
    }

    /// Waits until something in the pod listens on `proto` (`"tcp"`/`"udp"`) `port`, failing
    /// early if `process` exits.
    pub fn wait_listening(&self, process: &mut Background, proto: &str, port: u16) -> Result<()> {
        let flag = match proto {
            "tcp" => "-ltnH",
            "udp" => "-lunH",
            other => bail!("wait_listening: unknown protocol {other:?}"),
        };
        let filter = format!("sport = :{port}");
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        loop {
            let out = self.exec_ok(&["ss", flag, &filter])?;
            if !out.trim().is_empty() {
                return Ok(());
            }
            if let Some(status) = process.try_wait()? {
                bail!(
                    "`{}` in pod {} exited ({status}) before listening on {proto} {port}: {}",
                    process.what,
                    self.name,
                    process.output().trim()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "nothing listens on {proto} {port} in pod {} after {LISTEN_TIMEOUT:?}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `curl` from the pod; fails on a transport error or an HTTP error status; returns the body.
    /// Proxies are bypassed and IPv6 literals work (`-g`).
    pub fn curl(&self, url: &str) -> Result<String> {
        self.exec_ok(&[
            "curl",
            "--silent",
            "--show-error",
            "--fail",
            "--globoff",
            "--noproxy",
            "*",
            "--max-time",
            "10",
            url,
        ])
        .with_context(|| format!("GET {url} from pod {}", self.name))
    }

    /// `GET http://ip:port/path` from the pod; returns the body.
    pub fn http_get(&self, ip: IpAddr, port: u16, path: &str) -> Result<String> {
        self.curl(&http_url(ip, port, path))
    }

    /// `ping -c count` (0.2 s apart) to `dst`; a lost reply is a result, not an error.
    pub fn ping(&self, dst: IpAddr, count: u32) -> Result<PingStats> {
        let count_s = count.to_string();
        let dst_s = dst.to_string();
        let out = self.exec(&["ping", "-n", "-c", &count_s, "-i", "0.2", "-W", "2", &dst_s])?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        parse_ping(&stdout).with_context(|| {
            format!(
                "unexpected ping output from pod {} to {dst}: {} {}",
                self.name,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })
    }

    /// Sends one UDP datagram from the pod.
    pub fn udp_send(&self, ip: IpAddr, port: u16, payload: &[u8]) -> Result<()> {
        let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
        let (ip_s, port_s) = (ip.to_string(), port.to_string());
        self.exec_ok(&["python3", "-c", UDP_SEND_PY, &ip_s, &port_s, &hex])
            .map(drop)
    }

    /// Opens (and closes) a TCP connection from the pod and says how it went.
    pub fn tcp_connect(&self, ip: IpAddr, port: u16, timeout: Duration) -> Result<ConnectOutcome> {
        let (ip_s, port_s) = (ip.to_string(), port.to_string());
        let timeout_s = format!("{:.3}", timeout.as_secs_f64());
        let out = self.exec_ok(&["python3", "-c", CONNECT_PY, &ip_s, &port_s, &timeout_s])?;
        let out = out.trim();
        Ok(match out {
            "connected" => ConnectOutcome::Connected,
            "refused" => ConnectOutcome::Refused,
            "timeout" => ConnectOutcome::TimedOut,
            other => {
                ConnectOutcome::Failed(other.strip_prefix("error ").unwrap_or(other).to_owned())
            }
        })
    }

    /// Whether a TCP connection to `ip:port` is refused (RST) within 5 s.
    pub fn tcp_connect_refused(&self, ip: IpAddr, port: u16) -> Result<bool> {
        Ok(self.tcp_connect(ip, port, Duration::from_secs(5))? == ConnectOutcome::Refused)
    }
}

/// `N packets transmitted, M received` from ping's summary.
fn parse_ping(stdout: &str) -> Option<PingStats> {
    let line = stdout.lines().find(|l| l.contains("packets transmitted"))?;
    let mut parts = line.split(',').map(str::trim);
    let transmitted = parts.next()?.split_whitespace().next()?.parse().ok()?;
    let received = parts.next()?.split_whitespace().next()?.parse().ok()?;
    Some(PingStats {
        transmitted,
        received,
    })
}

/// A background process (a server in a pod). Dropping the guard SIGKILLs its process group
/// and reaps it.
pub struct Background {
    child: Child,
    what: String,
    log: PathBuf,
    reaped: bool,
    _dir: tempfile::TempDir,
    /// Files the process needs while it runs (e.g. the web root).
    _keep: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for Background {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Background")
            .field("pid", &self.child.id())
            .field("what", &self.what)
            .finish()
    }
}

impl Background {
    pub(crate) fn start(argv: &[&str], keep: Option<tempfile::TempDir>) -> Result<Background> {
        let dir = tempfile::Builder::new()
            .prefix("lumen-lab-bg-")
            .tempdir()
            .context("cannot create a log directory")?;
        let log = dir.path().join("output.log");
        let file =
            File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = cmd::command(argv)?
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            // Its own process group, so stop/drop reach anything it forks.
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start `{}`", argv.join(" ")))?;
        Ok(Background {
            child,
            what: argv.join(" "),
            log,
            reaped: false,
            _dir: dir,
            _keep: keep,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        let status = self.child.try_wait()?;
        self.reaped |= status.is_some();
        Ok(status)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Everything it wrote to stdout and stderr so far.
    pub fn output(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// SIGTERM, then SIGKILL after a grace period; returns how it ended.
    pub fn stop(mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        self.signal_group("TERM");
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.signal_group("KILL");
        let status = self.child.wait()?;
        self.reaped = true;
        Ok(status)
    }

    fn signal_group(&self, signal: &str) {
        // `kill -SIG -- -pgid`: the whole group (pgid == pid, see `process_group(0)`).
        let group = format!("-{}", self.child.id());
        let _ = cmd::run(&["kill", &format!("-{signal}"), "--", &group]);
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        self.signal_group("KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ping_summaries() {
        let out = "PING 10.0.0.2 (10.0.0.2) 56(84) bytes of data.\n\
                   64 bytes from 10.0.0.2: icmp_seq=1 ttl=64 time=0.05 ms\n\n\
                   --- 10.0.0.2 ping statistics ---\n\
                   3 packets transmitted, 2 received, 33.3333% packet loss, time 401ms\n";
        assert_eq!(
            parse_ping(out),
            Some(PingStats {
                transmitted: 3,
                received: 2
            })
        );
        let errors = "4 packets transmitted, 0 received, +4 errors, 100% packet loss, time 3ms\n";
        assert_eq!(parse_ping(errors).map(|s| s.all_answered()), Some(false));
        assert_eq!(parse_ping("connect: Network is unreachable"), None);
    }

    #[test]
    fn brackets_ipv6_in_urls() {
        assert_eq!(
            http_url("fd00::2".parse().expect("ip"), 80, "/x"),
            "http://[fd00::2]:80/x"
        );
        assert_eq!(
            http_url("10.0.0.2".parse().expect("ip"), 8080, ""),
            "http://10.0.0.2:8080/"
        );
    }
}

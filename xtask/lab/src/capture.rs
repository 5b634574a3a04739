//! Packet capture with tcpdump (one process per interface and direction), parsed in Rust.
//!
//! This is the independent witness tests compare the datapath against: it does not share any
//! code with Lumen's own packet parsing.

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::cmd;
use crate::packet::{CapturedPacket, Direction};
use crate::pcap;

/// How long tcpdump may take to say "listening on".
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long tcpdump may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Capture settings; [`Capture::start`] uses the defaults.
#[derive(Debug, Clone)]
pub struct CaptureOptions {
    /// Bytes kept per frame. 128 holds Ethernet + VLAN + IPv6 + a TCP header with options.
    pub snaplen: u32,
    /// Capture inside this network namespace (`ip netns exec`) instead of the current one.
    pub netns: Option<String>,
    /// A pcap-filter expression (e.g. `"tcp port 8080"`); `None` captures everything.
    pub filter: Option<String>,
    /// Wait this long before stopping so frames still in flight are written.
    pub settle: Duration,
    /// Write the pcap files (`<iface>-<in|out>.pcap`) into this existing directory and keep
    /// them (e.g. as CI artefacts); by default they go to a temporary directory.
    pub pcap_dir: Option<PathBuf>,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        CaptureOptions {
            snaplen: 128,
            netns: None,
            filter: None,
            settle: Duration::from_millis(100),
            pcap_dir: None,
        }
    }
}

/// What one tcpdump process reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureStats {
    pub iface: String,
    pub direction: Direction,
    /// Records read back from the pcap file.
    pub packets: usize,
    /// tcpdump's "packets dropped by kernel", when it printed it.
    pub dropped_by_kernel: Option<u64>,
    /// Set when tcpdump stopped on its own, e.g. because the interface was deleted
    /// (the frames captured until then are still returned).
    pub ended_early: Option<String>,
    /// The pcap file ended inside a record.
    pub truncated: bool,
    /// Where the pcap file was (deleted with the capture unless [`CaptureOptions::pcap_dir`]).
    pub pcap: PathBuf,
}

/// The packets of a stopped capture and per-process stats.
#[derive(Debug, Clone)]
pub struct CaptureResult {
    /// All frames, in timestamp order.
    pub packets: Vec<CapturedPacket>,
    pub stats: Vec<CaptureStats>,
}

struct Tcpdump {
    iface: String,
    direction: Direction,
    child: Child,
    pcap: PathBuf,
    stderr: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
}

/// A running capture; stop it with [`Capture::stop`]. Dropping it kills tcpdump.
pub struct Capture {
    procs: Vec<Tcpdump>,
    settle: Duration,
    dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field(
                "tcpdump",
                &self
                    .procs
                    .iter()
                    .map(|p| format!("{}/{} pid {}", p.iface, p.direction, p.child.id()))
                    .collect::<Vec<_>>(),
            )
            .field("dir", &self.dir)
            .finish()
    }
}

impl Capture {
    /// Starts capturing both directions of every interface in `ifaces` (current namespace) and
    /// returns once every tcpdump is listening.
    pub fn start<S: AsRef<str>>(ifaces: &[S]) -> Result<Capture> {
        Self::start_with(ifaces, CaptureOptions::default())
    }

    /// [`Capture::start`] with explicit options.
    pub fn start_with<S: AsRef<str>>(ifaces: &[S], options: CaptureOptions) -> Result<Capture> {
        if ifaces.is_empty() {
            bail!("Capture::start needs at least one interface");
        }
        let (dir, temp) = match &options.pcap_dir {
            Some(dir) => (dir.clone(), None),
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("lumen-lab-capture-")
                    .tempdir()
                    .context("cannot create a directory for pcap files")?;
                (temp.path().to_owned(), Some(temp))
            }
        };
        let mut capture = Capture {
            procs: Vec::new(),
            settle: options.settle,
            dir,
            _temp: temp,
        };
        let mut ready = Vec::new();
        for iface in ifaces {
            for direction in [Direction::In, Direction::Out] {
                let (proc, rx) = spawn_tcpdump(iface.as_ref(), direction, &options, &capture.dir)?;
                capture.procs.push(proc);
                ready.push(rx);
            }
        }
        let deadline = Instant::now() + START_TIMEOUT;
        for (proc, rx) in capture.procs.iter_mut().zip(ready) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(()) => {}
                Err(e) => {
                    let _ = proc.child.kill();
                    let _ = proc.child.wait();
                    if let Some(reader) = proc.reader.take() {
                        let _ = reader.join();
                    }
                    let why = match e {
                        mpsc::RecvTimeoutError::Timeout => "did not start listening in time",
                        mpsc::RecvTimeoutError::Disconnected => "exited before listening",
                    };
                    bail!(
                        "tcpdump on {} ({}) {why}: {}",
                        proc.iface,
                        proc.direction,
                        lock(&proc.stderr).trim()
                    );
                }
            }
        }
        Ok(capture)
    }

    /// Stops every tcpdump and returns the frames in timestamp order.
    ///
    /// Fails when the kernel dropped frames: assertions against an incomplete capture would be
    /// wrong. Use [`Capture::stop_with_stats`] to get the frames anyway.
    pub fn stop(self) -> Result<Vec<CapturedPacket>> {
        let result = self.stop_with_stats()?;
        let lossy: Vec<String> = result
            .stats
            .iter()
            .filter(|s| s.dropped_by_kernel.unwrap_or(0) > 0)
            .map(|s| {
                format!(
                    "{} ({}): {} dropped",
                    s.iface,
                    s.direction,
                    s.dropped_by_kernel.unwrap_or(0)
                )
            })
            .collect();
        if !lossy.is_empty() {
            bail!(
                "capture incomplete, kernel dropped frames: {}",
                lossy.join("; ")
            );
        }
        Ok(result.packets)
    }

    /// Stops every tcpdump and returns the frames plus per-process stats.
    pub fn stop_with_stats(mut self) -> Result<CaptureResult> {
        std::thread::sleep(self.settle);
        for proc in &mut self.procs {
            if proc.child.try_wait().ok().flatten().is_none() {
                // tcpdump flushes and prints its stats on SIGTERM.
                let _ = cmd::signal(proc.child.id(), "TERM");
            }
        }
        let mut packets = Vec::new();
        let mut stats = Vec::new();
        for mut proc in std::mem::take(&mut self.procs) {
            let deadline = Instant::now() + STOP_TIMEOUT;
            let mut signalled = true;
            let status = loop {
                if let Some(status) = proc.child.try_wait()? {
                    break status;
                }
                if Instant::now() >= deadline {
                    signalled = false;
                    let _ = proc.child.kill();
                    break proc.child.wait()?;
                }
                std::thread::sleep(Duration::from_millis(10));
            };
            if let Some(reader) = proc.reader.take() {
                let _ = reader.join();
            }
            let stderr = lock(&proc.stderr).clone();
            // Exit after our SIGTERM is normal; anything else means it ended on its own.
            let ended_early = (!signalled || !(status.success() || was_term(&status)))
                .then(|| format!("{status}: {}", stderr.trim()));
            let bytes = std::fs::read(&proc.pcap)
                .with_context(|| format!("cannot read {}", proc.pcap.display()))?;
            let file = if bytes.is_empty() {
                // tcpdump died before writing the header (interface vanished at once).
                pcap::PcapFile {
                    linktype: pcap::LINKTYPE_ETHERNET,
                    records: Vec::new(),
                    truncated: false,
                }
            } else {
                pcap::parse(&bytes).with_context(|| format!("in {}", proc.pcap.display()))?
            };
            stats.push(CaptureStats {
                iface: proc.iface.clone(),
                direction: proc.direction,
                packets: file.records.len(),
                dropped_by_kernel: parse_dropped(&stderr),
                ended_early,
                truncated: file.truncated,
                pcap: proc.pcap.clone(),
            });
            packets.extend(
                file.records
                    .iter()
                    .map(|r| CapturedPacket::decode(&proc.iface, proc.direction, file.linktype, r)),
            );
        }
        packets.sort_by_key(|p| p.ts);
        Ok(CaptureResult { packets, stats })
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        for proc in &mut self.procs {
            let _ = proc.child.kill();
            let _ = proc.child.wait();
            if let Some(reader) = proc.reader.take() {
                let _ = reader.join();
            }
        }
    }
}

fn lock(m: &Mutex<String>) -> std::sync::MutexGuard<'_, String> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn was_term(status: &std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt as _;
    matches!(status.signal(), Some(2 | 15))
}

fn spawn_tcpdump(
    iface: &str,
    direction: Direction,
    options: &CaptureOptions,
    dir: &std::path::Path,
) -> Result<(Tcpdump, mpsc::Receiver<()>)> {
    let pcap = dir.join(format!("{iface}-{direction}.pcap"));
    let pcap_str = pcap.to_string_lossy().into_owned();
    let snaplen = options.snaplen.to_string();
    let mut argv: Vec<&str> = Vec::new();
    if let Some(netns) = &options.netns {
        argv.extend(["ip", "netns", "exec", netns]);
    }
    argv.extend([
        "tcpdump",
        "-i",
        iface,
        "-Q",
        direction.tcpdump_arg(),
        "-w",
        &pcap_str,
        "-U",
        "--immediate-mode",
        "-s",
        &snaplen,
        "--time-stamp-precision=nano",
        "-n",
        // Keep root: the pcap file lives in our private temp dir.
        "-Z",
        "root",
    ]);
    if let Some(filter) = &options.filter {
        argv.push(filter);
    }
    let mut child = cmd::command(&argv)?
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{}`", argv.join(" ")))?;
    let stderr = child.stderr.take().context("tcpdump stderr not piped")?;
    let text = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    let sink = Arc::clone(&text);
    let reader = std::thread::Builder::new()
        .name(format!("tcpdump-{iface}-{direction}"))
        .spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("listening on") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
                let mut text = lock(&sink);
                text.push_str(&line);
                text.push('\n');
            }
        })
        .context("cannot start a tcpdump stderr reader")?;
    Ok((
        Tcpdump {
            iface: iface.to_owned(),
            direction,
            child,
            pcap,
            stderr: text,
            reader: Some(reader),
        },
        rx,
    ))
}

/// tcpdump's "N packets dropped by kernel" line.
fn parse_dropped(stderr: &str) -> Option<u64> {
    stderr.lines().find_map(|l| {
        l.trim()
            .strip_suffix("packets dropped by kernel")?
            .trim()
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tcpdump_drop_count() {
        let stderr = "tcpdump: listening on lo, link-type EN10MB (Ethernet), snapshot length 128 bytes\n\
                      2 packets captured\n4 packets received by filter\n3 packets dropped by kernel\n";
        assert_eq!(parse_dropped(stderr), Some(3));
        assert_eq!(parse_dropped("tcpdump: lo: No such device exists"), None);
    }
}

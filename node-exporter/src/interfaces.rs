//! Which interfaces the datapath attaches to: names matched against glob patterns
//! (`lxc*`, `veth?a`, exact names), followed while running through rtnetlink link
//! notifications (RTNLGRP_LINK). Every notification triggers a rescan of the interface
//! list, so a burst of changes costs one scan and nothing is missed if messages overflow.

use std::{collections::BTreeMap, path::Path, time::Duration};

use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use tokio::{io::unix::AsyncFd, sync::mpsc};
use tracing::{debug, warn};

/// RTMGRP_LINK multicast group bit.
const RTMGRP_LINK: u32 = 1;

/// A set of glob patterns (`*` any run, `?` one char) for interface names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfacePatterns(Vec<String>);

impl InterfacePatterns {
    pub fn new(patterns: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self(patterns.into_iter().map(Into::into).collect())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, name: &str) -> bool {
        self.0
            .iter()
            .any(|p| glob_match(p.as_bytes(), name.as_bytes()))
    }

    pub fn add(&mut self, pattern: &str) {
        if !self.0.iter().any(|p| p == pattern) {
            self.0.push(pattern.to_owned());
        }
    }
}

fn glob_match(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob_match(&p[1..], s) || (!s.is_empty() && glob_match(p, &s[1..])),
        (Some(b'?'), Some(_)) => glob_match(&p[1..], &s[1..]),
        (Some(a), Some(b)) if a == b => glob_match(&p[1..], &s[1..]),
        _ => false,
    }
}

/// Current interfaces of this network namespace: name -> ifindex.
pub fn list_interfaces() -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
        return out;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(idx) = read_ifindex(&entry.path()) {
            out.insert(name, idx);
        }
    }
    out
}

fn read_ifindex(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join("ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Subscribe to link notifications and send a unit on `tx` after every burst of them.
/// Falls back to polling every `fallback` if the netlink socket cannot be opened.
pub async fn watch_links(tx: mpsc::Sender<()>, fallback: Duration) {
    let socket = match open_link_socket() {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "rtnetlink link notifications unavailable; polling interfaces");
            loop {
                tokio::time::sleep(fallback).await;
                if tx.send(()).await.is_err() {
                    return;
                }
            }
        }
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let ready = socket.readable().await;
        let mut guard = match ready {
            Ok(g) => g,
            Err(e) => {
                warn!(error = %e, "netlink socket failed");
                return;
            }
        };
        // Drain everything pending; the content does not matter, a rescan follows.
        let mut got = false;
        loop {
            match guard.get_inner().recv(&mut &mut buf[..], 0) {
                Ok(0) => break,
                Ok(_) => got = true,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    guard.clear_ready();
                    break;
                }
                Err(e) => {
                    // ENOBUFS: we missed messages; the rescan covers them.
                    debug!(error = %e, "netlink recv");
                    got = true;
                    break;
                }
            }
        }
        if got && tx.send(()).await.is_err() {
            return;
        }
    }
}

fn open_link_socket() -> std::io::Result<AsyncFd<Socket>> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind(&SocketAddr::new(0, RTMGRP_LINK))?;
    socket.set_non_blocking(true)?;
    // The socket owns its fd and keeps it open for as long as the AsyncFd lives.
    #[allow(deprecated)]
    AsyncFd::new(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let p = InterfacePatterns::new(["lxc*", "veth?a", "eth0"]);
        assert!(p.matches("lxc12ab"));
        assert!(p.matches("lxc"));
        assert!(p.matches("veth1a"));
        assert!(!p.matches("veth12a"));
        assert!(p.matches("eth0"));
        assert!(!p.matches("eth01"));
        assert!(!p.matches("lo"));
    }
}

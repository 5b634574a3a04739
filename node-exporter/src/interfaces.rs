//! Which interfaces the datapath attaches to: names matched against glob patterns
//! (`lxc*`, `veth?a`, exact names), followed while running through rtnetlink link
//! notifications (RTNLGRP_LINK). Every notification triggers a rescan of the interface
//! list, so a burst of changes costs one scan and nothing is missed if messages overflow.
//!
//! Both the list (an RTM_GETLINK dump) and the notifications come from rtnetlink, which
//! answers for the network namespace the process is in. /sys/class/net is not used: it shows
//! the namespace of whoever mounted /sys, which is not ours when the exporter joined a node's
//! namespace with setns (`nsenter --net`, a container runtime) rather than `ip netns exec`.

use std::{collections::BTreeMap, io, time::Duration};

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

/// Current interfaces of this process's network namespace: name -> ifindex. Empty (with a
/// warning) when rtnetlink cannot be asked.
pub fn list_interfaces() -> BTreeMap<String, u32> {
    dump_links().unwrap_or_else(|e| {
        warn!(error = %e, "cannot list interfaces over rtnetlink");
        BTreeMap::new()
    })
}

/// `struct nlmsghdr` and `struct ifinfomsg` sizes (both already 4-byte aligned).
const NLMSG_HEADER_LEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
/// `struct rtattr` header size.
const RTATTR_HEADER_LEN: usize = 4;
/// Attribute type bits (the top two are the nested / byte-order flags).
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Every link of the namespace, from an RTM_GETLINK dump.
fn dump_links() -> io::Result<BTreeMap<String, u32>> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.send(&getlink_dump_request(), 0)?;
    let mut links = BTreeMap::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let len = socket.recv(&mut &mut buf[..], 0)?;
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "rtnetlink closed the link dump before its end",
            ));
        }
        if parse_link_dump(&buf[..len], &mut links)? {
            return Ok(links);
        }
    }
}

/// RTM_GETLINK with NLM_F_DUMP for every family: one `nlmsghdr` and a zeroed `ifinfomsg`.
fn getlink_dump_request() -> [u8; NLMSG_HEADER_LEN + IFINFOMSG_LEN] {
    const LEN: usize = NLMSG_HEADER_LEN + IFINFOMSG_LEN;
    let mut request = [0u8; LEN];
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    request[0..4].copy_from_slice(&(LEN as u32).to_ne_bytes());
    request[4..6].copy_from_slice(&libc::RTM_GETLINK.to_ne_bytes());
    request[6..8].copy_from_slice(&flags.to_ne_bytes());
    request[8..12].copy_from_slice(&1u32.to_ne_bytes());
    request
}

/// Adds the links of one datagram of a link dump to `links`; true once the dump is complete
/// (NLMSG_DONE). A netlink error message or a malformed message is an error.
fn parse_link_dump(mut data: &[u8], links: &mut BTreeMap<String, u32>) -> io::Result<bool> {
    let malformed = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("malformed rtnetlink link dump: {what}"),
        )
    };
    while data.len() >= NLMSG_HEADER_LEN {
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        if len < NLMSG_HEADER_LEN || len > data.len() {
            return Err(malformed(&format!(
                "message length {len} with {} bytes left",
                data.len()
            )));
        }
        let body = &data[NLMSG_HEADER_LEN..len];
        match i32::from(kind) {
            libc::NLMSG_DONE => return Ok(true),
            libc::NLMSG_ERROR => {
                let errno = body
                    .get(..4)
                    .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .ok_or_else(|| malformed("short error message"))?;
                if errno != 0 {
                    return Err(io::Error::from_raw_os_error(-errno));
                }
            }
            _ if kind == libc::RTM_NEWLINK => {
                let (name, index) =
                    parse_newlink(body).ok_or_else(|| malformed("link without name or index"))?;
                links.insert(name, index);
            }
            _ => {}
        }
        data = data.get(align4(len)..).unwrap_or_default();
    }
    Ok(false)
}

/// The name (IFLA_IFNAME) and index of an RTM_NEWLINK body (`ifinfomsg` and attributes).
fn parse_newlink(body: &[u8]) -> Option<(String, u32)> {
    let index = u32::try_from(i32::from_ne_bytes(body.get(4..8)?.try_into().ok()?)).ok()?;
    let mut attrs = body.get(IFINFOMSG_LEN..)?;
    while attrs.len() >= RTATTR_HEADER_LEN {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & NLA_TYPE_MASK;
        if len < RTATTR_HEADER_LEN || len > attrs.len() {
            return None;
        }
        if kind == libc::IFLA_IFNAME {
            let value = &attrs[RTATTR_HEADER_LEN..len];
            let name = value.split(|b| *b == 0).next()?;
            return Some((String::from_utf8(name.to_vec()).ok()?, index));
        }
        attrs = attrs.get(align4(len)..).unwrap_or_default();
    }
    None
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
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

    /// One netlink message of `kind` with `body`, padded to 4 bytes.
    fn message(kind: u16, body: &[u8]) -> Vec<u8> {
        let len = NLMSG_HEADER_LEN + body.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(body);
        m.resize(align4(len), 0);
        m
    }

    /// An RTM_NEWLINK body: `ifinfomsg` with `index`, an IFLA_MTU and an IFLA_IFNAME.
    fn newlink(index: i32, name: &str) -> Vec<u8> {
        let mut b = vec![0u8; IFINFOMSG_LEN];
        b[4..8].copy_from_slice(&index.to_ne_bytes());
        b.extend_from_slice(&8u16.to_ne_bytes());
        b.extend_from_slice(&libc::IFLA_MTU.to_ne_bytes());
        b.extend_from_slice(&1500u32.to_ne_bytes());
        let attr_len = RTATTR_HEADER_LEN + name.len() + 1;
        b.extend_from_slice(&(attr_len as u16).to_ne_bytes());
        b.extend_from_slice(&libc::IFLA_IFNAME.to_ne_bytes());
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        b.resize(align4(b.len()), 0);
        b
    }

    #[test]
    fn parses_link_dumps() {
        let mut links = BTreeMap::new();
        let mut first = message(libc::RTM_NEWLINK, &newlink(1, "lo"));
        first.extend(message(libc::RTM_NEWLINK, &newlink(7, "lmhab3cd12")));
        assert!(!parse_link_dump(&first, &mut links).expect("parses"));
        let done = message(libc::NLMSG_DONE as u16, &0i32.to_ne_bytes());
        assert!(parse_link_dump(&done, &mut links).expect("parses"));
        assert_eq!(
            links,
            BTreeMap::from([("lmhab3cd12".to_owned(), 7), ("lo".to_owned(), 1)])
        );

        let denied = message(libc::NLMSG_ERROR as u16, &(-libc::EPERM).to_ne_bytes());
        let e = parse_link_dump(&denied, &mut links).expect_err("an error message");
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        let mut truncated = message(libc::RTM_NEWLINK, &newlink(3, "eth0"));
        truncated.truncate(20);
        truncated[0..4].copy_from_slice(&64u32.to_ne_bytes());
        let e = parse_link_dump(&truncated, &mut links).expect_err("truncated");
        assert!(e.to_string().contains("message length 64"), "{e}");
        let nameless = message(libc::RTM_NEWLINK, &[0u8; IFINFOMSG_LEN]);
        assert!(parse_link_dump(&nameless, &mut links).is_err());
    }

    #[test]
    fn lists_this_namespaces_interfaces() {
        // The test runs in the namespace /sys was mounted in: both must agree.
        let from_sysfs: BTreeMap<String, u32> = std::fs::read_dir("/sys/class/net")
            .expect("/sys/class/net")
            .flatten()
            .filter_map(|e| {
                let index = std::fs::read_to_string(e.path().join("ifindex")).ok()?;
                Some((
                    e.file_name().to_string_lossy().into_owned(),
                    index.trim().parse().ok()?,
                ))
            })
            .collect();
        let listed = dump_links().expect("RTM_GETLINK dump");
        assert_eq!(listed.get("lo"), Some(&1));
        assert_eq!(listed, from_sysfs);
    }

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

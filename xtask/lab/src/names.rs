//! Lab ids, the names derived from them, and the address plan.
//!
//! Every object a lab creates carries its id, so overlapping labs never collide and leftovers
//! can be found by name: bridge `lmb<id>`, host-side veths `lmh<id><n>` (in the root
//! namespace or in a node's), pod namespaces `lmn-<id>-<pod>`, node namespaces
//! `lmnode-<id>-<node>`. Ids are 5 characters of `[0-9a-z]`.

use std::collections::hash_map::{DefaultHasher, RandomState};
use std::hash::{BuildHasher as _, Hash, Hasher as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub(crate) const ID_LEN: usize = 5;
pub(crate) const BRIDGE_PREFIX: &str = "lmb";
pub(crate) const HOST_IF_PREFIX: &str = "lmh";
pub(crate) const NETNS_PREFIX: &str = "lmn-";
/// Not a prefix of [`NETNS_PREFIX`] nor the other way round: a pod may be called `node-1`.
pub(crate) const NODE_NETNS_PREFIX: &str = "lmnode-";
/// The second 16-bit group of every lab IPv6 address ("lm").
const IPV6_TAG: u16 = 0x6c6d;

const ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// A fresh lab id from the pid, a process-wide counter, the clock and a random hash key.
pub(crate) fn new_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    std::process::id().hash(&mut h);
    COUNTER.fetch_add(1, Ordering::Relaxed).hash(&mut h);
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
        .hash(&mut h);
    let mut v = h.finish();
    (0..ID_LEN)
        .map(|_| {
            let c = ALPHABET[(v % 36) as usize] as char;
            v /= 36;
            c
        })
        .collect()
}

pub(crate) fn is_id(s: &str) -> bool {
    s.len() == ID_LEN && s.bytes().all(|b| ALPHABET.contains(&b))
}

pub(crate) fn bridge(id: &str) -> String {
    format!("{BRIDGE_PREFIX}{id}")
}

pub(crate) fn host_if(id: &str, n: u8) -> String {
    format!("{HOST_IF_PREFIX}{id}{n}")
}

pub(crate) fn netns(id: &str, pod: &str) -> String {
    format!("{NETNS_PREFIX}{id}-{pod}")
}

pub(crate) fn node_netns(id: &str, node: &str) -> String {
    format!("{NODE_NETNS_PREFIX}{id}-{node}")
}

/// The lab id in a bridge name `lmb<id>`.
pub(crate) fn id_of_bridge(name: &str) -> Option<&str> {
    name.strip_prefix(BRIDGE_PREFIX).filter(|id| is_id(id))
}

/// The lab id in a host-side veth name `lmh<id><n>`.
pub(crate) fn id_of_host_if(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(HOST_IF_PREFIX)?;
    let (id, n) = (rest.get(..ID_LEN)?, rest.get(ID_LEN..)?);
    (is_id(id) && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then_some(id)
}

/// The lab id and pod name in a namespace name `lmn-<id>-<pod>`.
pub(crate) fn id_of_netns(name: &str) -> Option<(&str, &str)> {
    split_netns(name.strip_prefix(NETNS_PREFIX)?)
}

/// The lab id and node name in a namespace name `lmnode-<id>-<node>`.
pub(crate) fn id_of_node_netns(name: &str) -> Option<(&str, &str)> {
    split_netns(name.strip_prefix(NODE_NETNS_PREFIX)?)
}

/// `<id>-<name>` into its two parts.
fn split_netns(rest: &str) -> Option<(&str, &str)> {
    let (id, name) = (rest.get(..ID_LEN)?, rest.get(ID_LEN..)?.strip_prefix('-')?);
    (is_id(id) && !name.is_empty()).then_some((id, name))
}

/// A lab's /24 and /64: `10.<x>.<y>.0/24` and `fd00:6c6d:<x><y>::/64`, `x` in 200..250.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Subnet {
    pub x: u8,
    pub y: u8,
}

impl Subnet {
    /// The `attempt`-th candidate for lab `id` (deterministic, spread over 12,800 subnets).
    pub fn candidate(id: &str, attempt: u32) -> Subnet {
        let mut h = DefaultHasher::new();
        (id, attempt).hash(&mut h);
        let v = h.finish();
        Subnet {
            x: 200 + (v % 50) as u8,
            y: ((v / 50) % 256) as u8,
        }
    }

    pub fn ipv4(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.x, self.y, host)
    }

    pub fn ipv6(&self, host: u8) -> Ipv6Addr {
        let group = (u16::from(self.x) << 8) | u16::from(self.y);
        Ipv6Addr::new(0xfd00, IPV6_TAG, group, 0, 0, 0, 0, u16::from(host))
    }

    /// The host number `N` of `10.x.y.N`.
    pub fn host_of(&self, ipv4: Ipv4Addr) -> u8 {
        ipv4.octets()[3]
    }

    pub fn ipv4_cidr(&self) -> String {
        format!("{}/24", self.ipv4(0))
    }

    pub fn ipv6_cidr(&self) -> String {
        format!("{}/64", self.ipv6(0))
    }

    /// Whether `(addr, len)` overlaps this lab's v4 or v6 prefix.
    pub fn overlaps(&self, addr: IpAddr, len: u8) -> bool {
        match addr {
            IpAddr::V4(a) => prefixes_overlap(
                u128::from(u32::from(a)) << 96,
                len,
                u128::from(u32::from(self.ipv4(0))) << 96,
                24,
            ),
            IpAddr::V6(a) => prefixes_overlap(u128::from(a), len, u128::from(self.ipv6(0)), 64),
        }
    }
}

/// Whether two prefixes (left-aligned in a u128) share any address.
fn prefixes_overlap(a: u128, a_len: u8, b: u128, b_len: u8) -> bool {
    let len = u32::from(a_len.min(b_len));
    if len == 0 {
        return true;
    }
    let mask = u128::MAX << (128 - len);
    a & mask == b & mask
}

/// Parses the destination of an `ip -o route show` line: `(addr, prefix len)`, skipping the
/// route type word; `None` for `default` and what does not parse.
pub(crate) fn route_destination(line: &str) -> Option<(IpAddr, u8)> {
    const TYPES: [&str; 10] = [
        "unicast",
        "local",
        "broadcast",
        "multicast",
        "throw",
        "unreachable",
        "prohibit",
        "blackhole",
        "nat",
        "anycast",
    ];
    let mut words = line.split_whitespace();
    let mut dst = words.next()?;
    if TYPES.contains(&dst) {
        dst = words.next()?;
    }
    let (addr, len) = match dst.split_once('/') {
        Some((a, l)) => (a.parse::<IpAddr>().ok()?, l.parse().ok()?),
        None => {
            let a = dst.parse::<IpAddr>().ok()?;
            (a, if a.is_ipv4() { 32 } else { 128 })
        }
    };
    Some((addr, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_in_ifnamsiz_and_round_trip() {
        let id = new_id();
        assert!(is_id(&id), "{id}");
        assert_ne!(new_id(), id);
        let h = host_if(&id, 254);
        assert!(h.len() <= 15, "{h}");
        assert_eq!(id_of_host_if(&h), Some(id.as_str()));
        assert_eq!(id_of_bridge(&bridge(&id)), Some(id.as_str()));
        assert_eq!(
            id_of_netns(&netns(&id, "client-1")),
            Some((id.as_str(), "client-1"))
        );
        assert_eq!(id_of_host_if("lmhabc"), None);
        assert_eq!(id_of_host_if("lmhabcdex"), None);
        assert_eq!(id_of_bridge("lmbABCDE"), None);
        assert_eq!(id_of_netns("lmn-abcde"), None);
        assert_eq!(
            id_of_node_netns(&node_netns(&id, "node-1")),
            Some((id.as_str(), "node-1"))
        );
        assert_eq!(id_of_netns(&node_netns(&id, "node-1")), None);
        assert_eq!(id_of_node_netns(&netns(&id, "node-1")), None);
        assert_eq!(id_of_node_netns("lmnode-abcde-"), None);
        assert_eq!(id_of_netns("lmn-abcde-"), None);
    }

    #[test]
    fn subnet_addresses_and_overlap() {
        let s = Subnet { x: 201, y: 7 };
        assert_eq!(s.ipv4(1).to_string(), "10.201.7.1");
        assert_eq!(s.ipv6(2).to_string(), "fd00:6c6d:c907::2");
        assert_eq!(s.ipv4_cidr(), "10.201.7.0/24");
        assert_eq!(s.ipv6_cidr(), "fd00:6c6d:c907::/64");
        let ip = |t: &str| t.parse::<IpAddr>().expect("ip");
        assert!(s.overlaps(ip("10.201.7.200"), 32));
        assert!(s.overlaps(ip("10.201.0.0"), 16));
        assert!(!s.overlaps(ip("10.201.8.0"), 24));
        assert!(s.overlaps(ip("fd00:6c6d:c907::"), 64));
        assert!(!s.overlaps(ip("fd00:6c6d:c908::"), 64));
        for attempt in 0..100 {
            let c = Subnet::candidate("abcde", attempt);
            assert!((200..250).contains(&c.x));
        }
        assert_ne!(Subnet::candidate("abcde", 0), Subnet::candidate("abcdf", 0));
    }

    #[test]
    fn parses_route_destinations() {
        let ip = |t: &str| t.parse::<IpAddr>().expect("ip");
        assert_eq!(
            route_destination("10.0.2.0/24 dev eth0 proto kernel scope link src 10.0.2.15"),
            Some((ip("10.0.2.0"), 24))
        );
        assert_eq!(
            route_destination("local 10.0.2.15 dev eth0 table local proto kernel scope host"),
            Some((ip("10.0.2.15"), 32))
        );
        assert_eq!(
            route_destination("fe80::/64 dev eth0 proto kernel metric 256"),
            Some((ip("fe80::"), 64))
        );
        assert_eq!(route_destination("default via 10.0.2.2 dev eth0"), None);
    }
}

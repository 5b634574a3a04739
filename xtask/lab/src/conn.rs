//! Grouping captured packets into connections by 5-tuple, oriented client → server.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::SystemTime;

use crate::packet::{CapturedPacket, Direction, TcpFlags};

/// A directed 5-tuple. ICMP has ports 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FiveTuple {
    pub proto: u8,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

impl FiveTuple {
    /// The tuple of a packet with an IP header.
    pub fn of(packet: &CapturedPacket) -> Option<Self> {
        let l3 = packet.l3?;
        Some(FiveTuple {
            proto: l3.proto,
            src: l3.src,
            sport: packet.sport().unwrap_or(0),
            dst: l3.dst,
            dport: packet.dport().unwrap_or(0),
        })
    }

    /// The same flow seen from the other end.
    pub fn reversed(&self) -> Self {
        FiveTuple {
            proto: self.proto,
            src: self.dst,
            sport: self.dport,
            dst: self.src,
            dport: self.sport,
        }
    }

    /// One orientation shared by both directions (the smaller endpoint first).
    pub fn canonical(&self) -> Self {
        if (self.src, self.sport) <= (self.dst, self.dport) {
            *self
        } else {
            self.reversed()
        }
    }

    pub fn client(&self) -> SocketAddr {
        SocketAddr::new(self.src, self.sport)
    }

    pub fn server(&self) -> SocketAddr {
        SocketAddr::new(self.dst, self.dport)
    }
}

impl fmt::Display for FiveTuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "proto {} {} -> {}",
            self.proto,
            self.client(),
            self.server()
        )
    }
}

/// The packets of one connection (both directions, every interface they were captured on).
#[derive(Debug, Clone)]
pub struct Connection {
    /// Oriented client → server: from the SYN when one was seen, else from the first packet.
    pub tuple: FiveTuple,
    /// In capture-timestamp order.
    pub packets: Vec<CapturedPacket>,
}

impl Connection {
    /// Whether `packet` travels client → server.
    pub fn is_forward(&self, packet: &CapturedPacket) -> bool {
        FiveTuple::of(packet) == Some(self.tuple)
    }

    /// Client → server packets.
    pub fn forward(&self) -> impl Iterator<Item = &CapturedPacket> {
        self.packets.iter().filter(|p| self.is_forward(p))
    }

    /// Server → client packets.
    pub fn reply(&self) -> impl Iterator<Item = &CapturedPacket> {
        self.packets.iter().filter(|p| !self.is_forward(p))
    }

    /// Packets captured on `iface` in `direction`.
    pub fn seen(&self, iface: &str, direction: Direction) -> impl Iterator<Item = &CapturedPacket> {
        let iface = iface.to_owned();
        self.packets
            .iter()
            .filter(move |p| p.seen(&iface, direction))
    }

    /// Only the packets captured on `iface` (so each wire packet counts once).
    pub fn on_iface(&self, iface: &str) -> Connection {
        Connection {
            tuple: self.tuple,
            packets: self
                .packets
                .iter()
                .filter(|p| p.iface == iface)
                .cloned()
                .collect(),
        }
    }

    /// Union of the TCP flags seen in one direction.
    pub fn tcp_flags(&self, forward: bool) -> TcpFlags {
        TcpFlags(
            self.packets
                .iter()
                .filter(|p| self.is_forward(p) == forward)
                .filter_map(CapturedPacket::tcp_flags)
                .fold(0, |acc, f| acc | f.0),
        )
    }

    /// SYN from the client, then SYN-ACK from the server, then a bare ACK from the client,
    /// in timestamp order (on any one interface).
    pub fn handshake_complete(&self) -> bool {
        let mut stage = 0;
        for p in &self.packets {
            let Some(flags) = p.tcp_flags() else { continue };
            let forward = self.is_forward(p);
            stage = match stage {
                0 if forward && flags.is_syn() => 1,
                1 if !forward && flags.is_syn_ack() => 2,
                2 if forward && flags.is_ack() && !flags.has(TcpFlags::SYN) => return true,
                s => s,
            };
        }
        false
    }

    pub fn first_ts(&self) -> Option<SystemTime> {
        self.packets.first().map(|p| p.ts)
    }

    pub fn last_ts(&self) -> Option<SystemTime> {
        self.packets.last().map(|p| p.ts)
    }

    /// Sum of `frame_len` over the packets in one direction.
    pub fn bytes(&self, forward: bool) -> u64 {
        self.packets
            .iter()
            .filter(|p| self.is_forward(p) == forward)
            .map(|p| u64::from(p.frame_len))
            .sum()
    }
}

/// Groups packets with an IP header into connections by 5-tuple, oriented client → server,
/// ordered by their first packet. Packets are cloned; the input order does not matter.
pub fn connections(packets: &[CapturedPacket]) -> Vec<Connection> {
    let mut sorted: Vec<&CapturedPacket> = packets.iter().collect();
    sorted.sort_by_key(|p| p.ts);
    let mut index: HashMap<FiveTuple, usize> = HashMap::new();
    let mut out: Vec<Connection> = Vec::new();
    for p in sorted {
        let Some(tuple) = FiveTuple::of(p) else {
            continue;
        };
        let i = *index.entry(tuple.canonical()).or_insert_with(|| {
            out.push(Connection {
                tuple,
                packets: Vec::new(),
            });
            out.len() - 1
        });
        out[i].packets.push(p.clone());
    }
    for conn in &mut out {
        let syn = conn.packets.iter().find_map(|p| {
            let flags = p.tcp_flags()?;
            let t = FiveTuple::of(p)?;
            if flags.is_syn() {
                Some(t)
            } else if flags.is_syn_ack() {
                Some(t.reversed())
            } else {
                None
            }
        });
        if let Some(t) = syn {
            conn.tuple = t;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::packet::{ipproto, L3, L4};

    fn pkt(at_ms: u64, src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> CapturedPacket {
        CapturedPacket {
            iface: "lmhtest2".into(),
            direction: Direction::In,
            ts: UNIX_EPOCH + Duration::from_millis(at_ms),
            frame_len: 66,
            captured_len: 66,
            ethertype: Some(0x0800),
            l3: Some(L3 {
                src: src.parse().expect("ip"),
                dst: dst.parse().expect("ip"),
                proto: ipproto::TCP,
                ip_len: 52,
                ttl: 64,
            }),
            l4: Some(L4::Tcp {
                sport,
                dport,
                flags: TcpFlags(flags),
                seq: 0,
                ack: 0,
                payload_len: 0,
            }),
        }
    }

    #[test]
    fn orients_by_syn_even_when_a_reply_sorts_first() {
        let (a, s) = ("10.0.0.9", "10.0.0.2");
        let packets = vec![
            pkt(2, s, 80, a, 5555, TcpFlags::SYN | TcpFlags::ACK),
            pkt(1, a, 5555, s, 80, TcpFlags::SYN),
            pkt(3, a, 5555, s, 80, TcpFlags::ACK),
            pkt(4, a, 6666, s, 80, TcpFlags::SYN),
        ];
        let conns = connections(&packets);
        assert_eq!(conns.len(), 2);
        let c = &conns[0];
        assert_eq!(c.tuple.client(), "10.0.0.9:5555".parse().expect("addr"));
        assert_eq!(c.tuple.server(), "10.0.0.2:80".parse().expect("addr"));
        assert!(c.handshake_complete());
        assert_eq!(c.forward().count(), 2);
        assert_eq!(c.reply().count(), 1);
        assert_eq!(c.bytes(true), 132);
        assert!(c.tcp_flags(false).is_syn_ack());
        assert!(!conns[1].handshake_complete());
    }

    #[test]
    fn a_handshake_needs_the_final_ack() {
        let packets = vec![
            pkt(1, "10.0.0.1", 1, "10.0.0.2", 2, TcpFlags::SYN),
            pkt(
                2,
                "10.0.0.2",
                2,
                "10.0.0.1",
                1,
                TcpFlags::RST | TcpFlags::ACK,
            ),
        ];
        let conns = connections(&packets);
        assert_eq!(conns.len(), 1);
        assert!(!conns[0].handshake_complete());
        assert!(conns[0].tcp_flags(false).is_rst());
    }
}

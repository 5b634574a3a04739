//! What a capture saw: one decoded frame per pcap record (Ethernet, VLAN, IPv4/IPv6, TCP/UDP/ICMP).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::SystemTime;

use crate::pcap;

/// IP protocol numbers the lab decodes.
pub mod ipproto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
}

/// Which way a frame crossed the captured interface.
///
/// On a pod's host-side veth, `In` is a frame the host side received, i.e. one the pod sent;
/// `Out` is a frame sent towards the pod. (tcpdump `-Q in` / `-Q out`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    In,
    Out,
}

impl Direction {
    /// The tcpdump `-Q` argument.
    pub fn tcpdump_arg(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.tcpdump_arg())
    }
}

/// TCP header flags (the low byte of the flags field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    pub const ECE: u8 = 0x40;
    pub const CWR: u8 = 0x80;

    /// Whether every bit of `mask` is set.
    pub fn has(self, mask: u8) -> bool {
        self.0 & mask == mask
    }
    /// A connection-opening SYN (SYN without ACK).
    pub fn is_syn(self) -> bool {
        self.has(Self::SYN) && !self.has(Self::ACK)
    }
    /// The server's SYN-ACK.
    pub fn is_syn_ack(self) -> bool {
        self.has(Self::SYN | Self::ACK)
    }
    pub fn is_rst(self) -> bool {
        self.has(Self::RST)
    }
    pub fn is_fin(self) -> bool {
        self.has(Self::FIN)
    }
    pub fn is_ack(self) -> bool {
        self.has(Self::ACK)
    }
}

/// tcpdump's notation: `S` SYN, `.` ACK, `F`, `R`, `P`, `U`, `E`, `W`; e.g. `S.` for SYN-ACK.
impl fmt::Display for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (bit, c) in [
            (Self::SYN, 'S'),
            (Self::FIN, 'F'),
            (Self::RST, 'R'),
            (Self::PSH, 'P'),
            (Self::URG, 'U'),
            (Self::ECE, 'E'),
            (Self::CWR, 'W'),
            (Self::ACK, '.'),
        ] {
            if self.0 & bit != 0 {
                write!(f, "{c}")?;
            }
        }
        if self.0 == 0 {
            f.write_str("none")?;
        }
        Ok(())
    }
}

/// The IP header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct L3 {
    /// Source address; `IpAddr::V4` or `V6` tells the family.
    pub src: IpAddr,
    pub dst: IpAddr,
    /// The upper-layer protocol (after IPv6 extension headers), see [`ipproto`].
    pub proto: u8,
    /// The IP packet's length from its header (IPv4 total length, IPv6 40 + payload length),
    /// independent of the snap length.
    pub ip_len: u32,
    pub ttl: u8,
}

/// The transport header of a frame, when it was captured whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: TcpFlags,
        seq: u32,
        ack: u32,
        /// Segment payload length from the IP/TCP header lengths (not limited by the snap length).
        payload_len: u32,
    },
    Udp {
        sport: u16,
        dport: u16,
        /// Datagram payload length from the UDP header.
        payload_len: u32,
    },
    /// ICMP (IPv4) or ICMPv6 — [`L3::proto`] tells which.
    Icmp {
        icmp_type: u8,
        code: u8,
        /// The identifier of an echo request/reply.
        echo_id: Option<u16>,
    },
}

/// One frame a [`Capture`](crate::Capture) saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedPacket {
    /// The interface it was captured on.
    pub iface: String,
    pub direction: Direction,
    /// Capture timestamp (nanosecond precision when the kernel gives it).
    pub ts: SystemTime,
    /// Length on the wire, from the pcap record header (the frame, with its Ethernet header).
    pub frame_len: u32,
    /// Bytes captured (at most the snap length).
    pub captured_len: u32,
    /// The EtherType after any VLAN tags, when the link layer was understood.
    pub ethertype: Option<u16>,
    pub l3: Option<L3>,
    pub l4: Option<L4>,
}

impl CapturedPacket {
    /// Decodes one pcap record captured on `iface` in `direction`.
    pub(crate) fn decode(
        iface: &str,
        direction: Direction,
        linktype: u32,
        record: &pcap::Record,
    ) -> Self {
        let (ethertype, l3, l4) = match decode_link(linktype, &record.data) {
            Some((ethertype, payload)) => {
                let (l3, l4) = decode_l3(ethertype, payload).unzip();
                (Some(ethertype), l3, l4.flatten())
            }
            None => (None, None, None),
        };
        CapturedPacket {
            iface: iface.to_owned(),
            direction,
            ts: record.ts,
            frame_len: record.orig_len,
            captured_len: u32::try_from(record.data.len()).unwrap_or(u32::MAX),
            ethertype,
            l3,
            l4,
        }
    }

    pub fn src(&self) -> Option<IpAddr> {
        self.l3.map(|l3| l3.src)
    }
    pub fn dst(&self) -> Option<IpAddr> {
        self.l3.map(|l3| l3.dst)
    }
    /// IP protocol number, see [`ipproto`].
    pub fn proto(&self) -> Option<u8> {
        self.l3.map(|l3| l3.proto)
    }
    pub fn is_ipv4(&self) -> bool {
        matches!(self.src(), Some(IpAddr::V4(_)))
    }
    pub fn is_ipv6(&self) -> bool {
        matches!(self.src(), Some(IpAddr::V6(_)))
    }
    pub fn is_tcp(&self) -> bool {
        matches!(self.l4, Some(L4::Tcp { .. }))
    }
    pub fn is_udp(&self) -> bool {
        matches!(self.l4, Some(L4::Udp { .. }))
    }
    /// ICMP or ICMPv6.
    pub fn is_icmp(&self) -> bool {
        matches!(self.l4, Some(L4::Icmp { .. }))
    }
    pub fn sport(&self) -> Option<u16> {
        match self.l4? {
            L4::Tcp { sport, .. } | L4::Udp { sport, .. } => Some(sport),
            L4::Icmp { .. } => None,
        }
    }
    pub fn dport(&self) -> Option<u16> {
        match self.l4? {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } => Some(dport),
            L4::Icmp { .. } => None,
        }
    }
    pub fn tcp_flags(&self) -> Option<TcpFlags> {
        match self.l4? {
            L4::Tcp { flags, .. } => Some(flags),
            _ => None,
        }
    }
    /// ICMP or ICMPv6 `(type, code)`.
    pub fn icmp_type(&self) -> Option<(u8, u8)> {
        match self.l4? {
            L4::Icmp {
                icmp_type, code, ..
            } => Some((icmp_type, code)),
            _ => None,
        }
    }
    /// Transport payload length (TCP segment data or UDP datagram data).
    pub fn payload_len(&self) -> Option<u32> {
        match self.l4? {
            L4::Tcp { payload_len, .. } | L4::Udp { payload_len, .. } => Some(payload_len),
            L4::Icmp { .. } => None,
        }
    }
    /// Whether it is an ICMP/ICMPv6 echo request or reply (ping).
    pub fn is_echo(&self) -> bool {
        matches!(
            (self.proto(), self.icmp_type()),
            (Some(ipproto::ICMP), Some((0 | 8, _))) | (Some(ipproto::ICMPV6), Some((128 | 129, _)))
        )
    }
    /// Whether it was captured on `iface` in `direction`.
    pub fn seen(&self, iface: &str, direction: Direction) -> bool {
        self.iface == iface && self.direction == direction
    }
}

/// One line in the spirit of `tcpdump -n`, for assertion messages.
impl fmt::Display for CapturedPacket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ts = self
            .ts
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        write!(
            f,
            "{}.{:09} {} {} len {}",
            ts.as_secs(),
            ts.subsec_nanos(),
            self.iface,
            self.direction,
            self.frame_len
        )?;
        let Some(l3) = self.l3 else {
            return match self.ethertype {
                Some(t) => write!(f, " ethertype {t:#06x}"),
                None => f.write_str(" (undecoded)"),
            };
        };
        match self.l4 {
            Some(L4::Tcp {
                sport,
                dport,
                flags,
                payload_len,
                ..
            }) => write!(
                f,
                " tcp {} -> {} [{flags}] payload {payload_len}",
                sockaddr(l3.src, sport),
                sockaddr(l3.dst, dport)
            ),
            Some(L4::Udp {
                sport,
                dport,
                payload_len,
            }) => write!(
                f,
                " udp {} -> {} payload {payload_len}",
                sockaddr(l3.src, sport),
                sockaddr(l3.dst, dport)
            ),
            Some(L4::Icmp {
                icmp_type, code, ..
            }) => write!(
                f,
                " icmp {} -> {} type {icmp_type} code {code}",
                l3.src, l3.dst
            ),
            None => write!(f, " proto {} {} -> {}", l3.proto, l3.src, l3.dst),
        }
    }
}

fn sockaddr(ip: IpAddr, port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::new(ip, port)
}

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Strips the link-layer header: `(ethertype, network payload)`.
fn decode_link(linktype: u32, data: &[u8]) -> Option<(u16, &[u8])> {
    let (mut ethertype, mut at) = match linktype {
        pcap::LINKTYPE_ETHERNET => (be16(data, 12)?, 14),
        pcap::LINKTYPE_LINUX_SLL => (be16(data, 14)?, 16),
        pcap::LINKTYPE_LINUX_SLL2 => (be16(data, 0)?, 20),
        _ => return None,
    };
    while ethertype == ETHERTYPE_VLAN || ethertype == ETHERTYPE_QINQ {
        ethertype = be16(data, at + 2)?;
        at += 4;
    }
    Some((ethertype, data.get(at..)?))
}

/// Decodes the IP header and, when captured whole, the transport header.
fn decode_l3(ethertype: u16, p: &[u8]) -> Option<(L3, Option<L4>)> {
    match ethertype {
        ETHERTYPE_IPV4 => {
            if p.first()? >> 4 != 4 {
                return None;
            }
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let total = be16(p, 2)?;
            let fragment_offset = be16(p, 6)? & 0x1fff;
            let proto = *p.get(9)?;
            let src: [u8; 4] = p.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = p.get(16..20)?.try_into().ok()?;
            let l3 = L3 {
                src: IpAddr::V4(Ipv4Addr::from(src)),
                dst: IpAddr::V4(Ipv4Addr::from(dst)),
                proto,
                ip_len: u32::from(total),
                ttl: p[8],
            };
            let l4_len = u32::from(total).saturating_sub(ihl as u32);
            let l4 = (fragment_offset == 0)
                .then(|| decode_l4(proto, p.get(ihl..)?, l4_len))
                .flatten();
            Some((l3, l4))
        }
        ETHERTYPE_IPV6 => {
            if p.first()? >> 4 != 6 {
                return None;
            }
            let payload_len = u32::from(be16(p, 4)?);
            let src: [u8; 16] = p.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = p.get(24..40)?.try_into().ok()?;
            let (mut next, mut at, mut first_fragment) = (p[6], 40usize, true);
            // Walk the extension headers to the upper-layer protocol.
            loop {
                let hdr_len = match next {
                    0 | 43 | 60 => (usize::from(*p.get(at + 1)?) + 1) * 8,
                    44 => {
                        first_fragment = be16(p, at + 2)? >> 3 == 0;
                        8
                    }
                    51 => (usize::from(*p.get(at + 1)?) + 2) * 4,
                    _ => break,
                };
                next = *p.get(at)?;
                at += hdr_len;
            }
            let l3 = L3 {
                src: IpAddr::V6(Ipv6Addr::from(src)),
                dst: IpAddr::V6(Ipv6Addr::from(dst)),
                proto: next,
                ip_len: 40 + payload_len,
                ttl: p[7],
            };
            let l4_len = (40 + payload_len).saturating_sub(at as u32);
            let l4 = first_fragment
                .then(|| decode_l4(next, p.get(at..)?, l4_len))
                .flatten();
            Some((l3, l4))
        }
        _ => None,
    }
}

/// Decodes a transport header; `l4_len` is its length with payload according to the IP header.
fn decode_l4(proto: u8, p: &[u8], l4_len: u32) -> Option<L4> {
    match proto {
        ipproto::TCP => {
            let data_offset = u32::from(*p.get(12)? >> 4) * 4;
            Some(L4::Tcp {
                sport: be16(p, 0)?,
                dport: be16(p, 2)?,
                seq: be32(p, 4)?,
                ack: be32(p, 8)?,
                flags: TcpFlags(*p.get(13)?),
                payload_len: l4_len.saturating_sub(data_offset),
            })
        }
        ipproto::UDP => Some(L4::Udp {
            sport: be16(p, 0)?,
            dport: be16(p, 2)?,
            payload_len: u32::from(be16(p, 4)?).saturating_sub(8),
        }),
        ipproto::ICMP | ipproto::ICMPV6 => {
            let (icmp_type, code) = (*p.first()?, *p.get(1)?);
            let echo = matches!(
                (proto, icmp_type),
                (ipproto::ICMP, 0 | 8) | (ipproto::ICMPV6, 128 | 129)
            );
            Some(L4::Icmp {
                icmp_type,
                code,
                echo_id: if echo { be16(p, 4) } else { None },
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn ipv4(proto: u8, l4: &[u8]) -> Vec<u8> {
        let total = (20 + l4.len()) as u16;
        let mut p = vec![0x45, 0];
        p.extend_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
        p.extend_from_slice(&[10, 200, 7, 2, 10, 200, 7, 3]);
        p.extend_from_slice(l4);
        p
    }

    fn tcp(sport: u16, dport: u16, flags: u8, payload: usize) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(&sport.to_be_bytes());
        t.extend_from_slice(&dport.to_be_bytes());
        t.extend_from_slice(&1000u32.to_be_bytes());
        t.extend_from_slice(&0u32.to_be_bytes());
        t.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        t.extend(std::iter::repeat_n(0xab, payload));
        t
    }

    fn record(data: Vec<u8>) -> pcap::Record {
        pcap::Record {
            ts: UNIX_EPOCH + Duration::from_secs(1),
            orig_len: data.len() as u32,
            data,
        }
    }

    #[test]
    fn decodes_ipv4_tcp_syn() {
        let frame = eth(0x0800, &ipv4(6, &tcp(40000, 8080, TcpFlags::SYN, 0)));
        let p = CapturedPacket::decode(
            "lmhx",
            Direction::In,
            pcap::LINKTYPE_ETHERNET,
            &record(frame),
        );
        assert_eq!(p.frame_len, 14 + 20 + 20);
        assert_eq!(p.src(), Some("10.200.7.2".parse().expect("ip")));
        assert_eq!(p.dst(), Some("10.200.7.3".parse().expect("ip")));
        assert_eq!((p.sport(), p.dport()), (Some(40000), Some(8080)));
        let flags = p.tcp_flags().expect("tcp");
        assert!(flags.is_syn() && !flags.is_syn_ack());
        assert_eq!(flags.to_string(), "S");
        assert_eq!(p.payload_len(), Some(0));
        assert_eq!(p.l3.expect("l3").ttl, 64);
    }

    #[test]
    fn payload_length_comes_from_headers_not_the_snap_length() {
        let mut frame = eth(
            0x0800,
            &ipv4(6, &tcp(1, 2, TcpFlags::PSH | TcpFlags::ACK, 1000)),
        );
        let orig = frame.len() as u32;
        frame.truncate(128);
        let rec = pcap::Record {
            ts: UNIX_EPOCH,
            orig_len: orig,
            data: frame,
        };
        let p = CapturedPacket::decode("x", Direction::Out, pcap::LINKTYPE_ETHERNET, &rec);
        assert_eq!(p.frame_len, orig);
        assert_eq!(p.captured_len, 128);
        assert_eq!(p.payload_len(), Some(1000));
        assert_eq!(p.tcp_flags().expect("tcp").to_string(), "P.");
    }

    #[test]
    fn decodes_vlan_tagged_ipv6_icmp_echo_after_an_extension_header() {
        let mut v6 = vec![0x60, 0, 0, 0, 0, 16, 0 /* hop-by-hop */, 64];
        v6.extend_from_slice(&"fd00::2".parse::<Ipv6Addr>().expect("ip").octets());
        v6.extend_from_slice(&"fd00::3".parse::<Ipv6Addr>().expect("ip").octets());
        v6.extend_from_slice(&[58, 0, 0, 0, 0, 0, 0, 0]); // hop-by-hop, next = ICMPv6
        v6.extend_from_slice(&[128, 0, 0, 0, 0x12, 0x34, 0, 1]);
        let mut tagged = vec![0, 5];
        tagged.extend_from_slice(&0x86ddu16.to_be_bytes());
        tagged.extend_from_slice(&v6);
        let p = CapturedPacket::decode(
            "x",
            Direction::In,
            pcap::LINKTYPE_ETHERNET,
            &record(eth(0x8100, &tagged)),
        );
        assert!(p.is_ipv6() && p.is_echo());
        assert_eq!(p.proto(), Some(ipproto::ICMPV6));
        assert_eq!(p.icmp_type(), Some((128, 0)));
        assert_eq!(
            p.l4,
            Some(L4::Icmp {
                icmp_type: 128,
                code: 0,
                echo_id: Some(0x1234)
            })
        );
        assert_eq!(p.l3.expect("l3").ip_len, 56);
    }

    #[test]
    fn later_fragments_and_unknown_frames_have_no_transport_header() {
        let mut v4 = ipv4(17, &[0; 8]);
        v4[6] = 0x00;
        v4[7] = 0x10; // fragment offset 16
        let p = CapturedPacket::decode(
            "x",
            Direction::In,
            pcap::LINKTYPE_ETHERNET,
            &record(eth(0x0800, &v4)),
        );
        assert!(p.l3.is_some() && p.l4.is_none());

        let arp = CapturedPacket::decode(
            "x",
            Direction::In,
            pcap::LINKTYPE_ETHERNET,
            &record(eth(0x0806, &[0; 28])),
        );
        assert_eq!((arp.ethertype, arp.l3), (Some(0x0806), None));
        assert!(arp.to_string().contains("ethertype 0x0806"));
    }
}

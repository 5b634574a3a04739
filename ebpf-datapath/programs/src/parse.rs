//! Header parsing with `bpf_skb_load_bytes` (no direct packet access, so no pointer
//! bounds dance): Ethernet, IPv4 (fragments), IPv6 (extension headers, fragments), then
//! TCP, UDP, ICMP and ICMPv6. Anything past L3 that cannot be read is reported L3-only.

use aya_ebpf::programs::TcContext;
use lumen_datapath_common::{family, flow_flags, Counter};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

/// What the datapath needs of one packet.
///
/// Addresses are IPv6 or IPv4-mapped (`::ffff:a.b.c.d`), held as four words whose memory
/// bytes are the address in network order (`u32::from_ne_bytes` of each 4-byte group):
/// words keep the verifier-visible code small (no 32 single-byte values to spill) and an
/// IPv4 address is simply word 3.
pub struct Packet {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub tcp_flags: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub flags: u8,
}

#[inline(always)]
fn be16(ctx: &TcContext, off: usize) -> Result<u16, Counter> {
    ctx.load::<u16>(off)
        .map(u16::from_be)
        .map_err(|_| Counter::ParseErrors)
}

#[inline(always)]
fn byte(ctx: &TcContext, off: usize) -> Result<u8, Counter> {
    ctx.load::<u8>(off).map_err(|_| Counter::ParseErrors)
}

/// Direct packet access: a pointer to `T` at `off` if it lies inside the linear data.
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

/// Fast path for the common case, reading the linear packet data directly: Ethernet,
/// IPv4 without fragmentation or IPv6 without extension headers, then TCP/UDP/ICMP.
/// `None` means "use the general path" (it never means the packet is bad).
#[inline(always)]
fn parse_fast(ctx: &TcContext) -> Option<Packet> {
    let eth = ptr_at::<[u8; 14]>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at against data_end.
    let eth = unsafe { &*eth };
    let proto = u16::from_be_bytes([eth[12], eth[13]]);
    let mut pkt = Packet {
        saddr: [0; 4],
        daddr: [0; 4],
        sport: 0,
        dport: 0,
        proto: 0,
        family: 0,
        tcp_flags: 0,
        icmp_type: 0,
        icmp_code: 0,
        flags: 0,
    };
    let l4 = match proto {
        ETH_P_IP => {
            let ip = ptr_at::<[u8; 20]>(ctx, ETH_HLEN)?;
            // SAFETY: as above.
            let ip = unsafe { &*ip };
            if ip[0] != 0x45 || (u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff) != 0 {
                // Options or fragments: general path.
                return None;
            }
            pkt.family = family::IPV4;
            pkt.proto = ip[9];
            pkt.saddr = mapped(word(ip, 12));
            pkt.daddr = mapped(word(ip, 16));
            ETH_HLEN + 20
        }
        ETH_P_IPV6 => {
            let ip = ptr_at::<[u8; 40]>(ctx, ETH_HLEN)?;
            // SAFETY: as above.
            let ip = unsafe { &*ip };
            let next = ip[6];
            if ip[0] >> 4 != 6 || !matches!(next, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMPV6) {
                return None;
            }
            pkt.family = family::IPV6;
            pkt.proto = next;
            pkt.saddr = [word(ip, 8), word(ip, 12), word(ip, 16), word(ip, 20)];
            pkt.daddr = [word(ip, 24), word(ip, 28), word(ip, 32), word(ip, 36)];
            ETH_HLEN + 40
        }
        _ => return None,
    };
    match pkt.proto {
        IPPROTO_TCP => {
            let t = ptr_at::<[u8; 14]>(ctx, l4)?;
            // SAFETY: as above.
            let t = unsafe { &*t };
            pkt.sport = u16::from_be_bytes([t[0], t[1]]);
            pkt.dport = u16::from_be_bytes([t[2], t[3]]);
            pkt.tcp_flags = t[13];
        }
        IPPROTO_UDP | IPPROTO_SCTP => {
            let u = ptr_at::<[u8; 4]>(ctx, l4)?;
            // SAFETY: as above.
            let u = unsafe { &*u };
            pkt.sport = u16::from_be_bytes([u[0], u[1]]);
            pkt.dport = u16::from_be_bytes([u[2], u[3]]);
        }
        _ => return None,
    }
    Some(pkt)
}

#[inline(always)]
pub fn parse_packet(ctx: &TcContext) -> Result<Packet, Counter> {
    if let Some(p) = parse_fast(ctx) {
        return Ok(p);
    }
    parse_general(ctx)
}

/// The general path with `bpf_skb_load_bytes`: VLAN, IP options, fragments, IPv6
/// extension headers, ICMP, non-linear data.
#[inline(always)]
fn parse_general(ctx: &TcContext) -> Result<Packet, Counter> {
    let mut l3 = ETH_HLEN;
    let mut proto = be16(ctx, 12)?;
    if proto == ETH_P_8021Q {
        proto = be16(ctx, 16)?;
        l3 += 4;
    }
    let mut pkt = Packet {
        saddr: [0; 4],
        daddr: [0; 4],
        sport: 0,
        dport: 0,
        proto: 0,
        family: 0,
        tcp_flags: 0,
        icmp_type: 0,
        icmp_code: 0,
        flags: 0,
    };
    let l4 = match proto {
        ETH_P_IP => parse_ipv4(ctx, l3, &mut pkt)?,
        ETH_P_IPV6 => parse_ipv6(ctx, l3, &mut pkt)?,
        _ => return Err(Counter::NonIpPackets),
    };
    if let Some(l4) = l4 {
        if parse_l4(ctx, l4, &mut pkt).is_err() {
            // Truncated L4 header: still a flow, at L3.
            pkt.sport = 0;
            pkt.dport = 0;
            pkt.flags |= flow_flags::L3_ONLY;
        }
    }
    Ok(pkt)
}

/// Returns the L4 offset, or None when only L3 can be reported.
#[inline(always)]
fn parse_ipv4(ctx: &TcContext, off: usize, pkt: &mut Packet) -> Result<Option<usize>, Counter> {
    let ver_ihl = byte(ctx, off)?;
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ver_ihl >> 4 != 4 || ihl < 20 {
        return Err(Counter::ParseErrors);
    }
    let frag = be16(ctx, off + 6)?;
    pkt.proto = byte(ctx, off + 9)?;
    pkt.family = family::IPV4;
    let s: [u8; 4] = ctx.load(off + 12).map_err(|_| Counter::ParseErrors)?;
    let d: [u8; 4] = ctx.load(off + 16).map_err(|_| Counter::ParseErrors)?;
    pkt.saddr = mapped(u32::from_ne_bytes(s));
    pkt.daddr = mapped(u32::from_ne_bytes(d));
    let more_fragments = frag & 0x2000 != 0;
    let frag_offset = frag & 0x1fff;
    if more_fragments || frag_offset != 0 {
        pkt.flags |= flow_flags::FRAGMENT;
    }
    if frag_offset != 0 {
        pkt.flags |= flow_flags::L3_ONLY;
        return Ok(None);
    }
    Ok(Some(off + ihl))
}

/// Word 2 of an IPv4-mapped address: bytes 00 00 ff ff.
pub const MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The IPv4-mapped address (`::ffff:a.b.c.d`) of an IPv4 address word.
#[inline(always)]
fn mapped(a: u32) -> [u32; 4] {
    [0, 0, MAPPED_WORD, a]
}

/// The 4 bytes at `off` of a header as a word (memory order kept).
#[inline(always)]
fn word<const N: usize>(h: &[u8; N], off: usize) -> u32 {
    u32::from_ne_bytes([h[off], h[off + 1], h[off + 2], h[off + 3]])
}

#[inline(always)]
fn parse_ipv6(ctx: &TcContext, off: usize, pkt: &mut Packet) -> Result<Option<usize>, Counter> {
    if byte(ctx, off)? >> 4 != 6 {
        return Err(Counter::ParseErrors);
    }
    pkt.family = family::IPV6;
    pkt.saddr = ctx.load(off + 8).map_err(|_| Counter::ParseErrors)?;
    pkt.daddr = ctx.load(off + 24).map_err(|_| Counter::ParseErrors)?;
    let mut next = byte(ctx, off + 6)?;
    let mut hdr = off + 40;
    // Walk a bounded number of extension headers.
    for _ in 0..6 {
        match next {
            // Hop-by-hop, routing, destination options: (len + 1) * 8 bytes.
            0 | 43 | 60 => {
                let nh = byte(ctx, hdr)?;
                let len = (usize::from(byte(ctx, hdr + 1)?) + 1) * 8;
                next = nh;
                hdr += len;
            }
            // Authentication header: (len + 2) * 4 bytes.
            51 => {
                let nh = byte(ctx, hdr)?;
                let len = (usize::from(byte(ctx, hdr + 1)?) + 2) * 4;
                next = nh;
                hdr += len;
            }
            // Fragment header: 8 bytes; later fragments carry no L4 header.
            44 => {
                let nh = byte(ctx, hdr)?;
                let frag = be16(ctx, hdr + 2)?;
                pkt.flags |= flow_flags::FRAGMENT;
                next = nh;
                hdr += 8;
                if frag & 0xfff8 != 0 {
                    pkt.proto = next;
                    pkt.flags |= flow_flags::L3_ONLY;
                    return Ok(None);
                }
            }
            _ => break,
        }
    }
    pkt.proto = next;
    Ok(Some(hdr))
}

#[inline(always)]
fn parse_l4(ctx: &TcContext, off: usize, pkt: &mut Packet) -> Result<(), Counter> {
    match pkt.proto {
        IPPROTO_TCP => {
            pkt.sport = be16(ctx, off)?;
            pkt.dport = be16(ctx, off + 2)?;
            pkt.tcp_flags = byte(ctx, off + 13)?;
        }
        IPPROTO_UDP | IPPROTO_SCTP => {
            pkt.sport = be16(ctx, off)?;
            pkt.dport = be16(ctx, off + 2)?;
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let ty = byte(ctx, off)?;
            let code = byte(ctx, off + 1)?;
            pkt.icmp_type = ty;
            pkt.icmp_code = code;
            let echo = if pkt.proto == IPPROTO_ICMP {
                ty == 8 || ty == 0
            } else {
                ty == 128 || ty == 129
            };
            if echo {
                // Request and reply share the identifier: the same flow in both directions.
                let id = be16(ctx, off + 4)?;
                pkt.sport = id;
                pkt.dport = id;
            } else {
                pkt.sport = (u16::from(ty) << 8) | u16::from(code);
                pkt.dport = 0;
            }
        }
        _ => {
            pkt.flags |= flow_flags::L3_ONLY;
        }
    }
    Ok(())
}

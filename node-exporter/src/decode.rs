//! Decoding of ring buffer records: the versioned header is checked (version, kind,
//! length) and every field is read from the byte slice with bounds checks, so a short or
//! foreign record is an error, never undefined behaviour.

use lumen_datapath_common::{EventHeader, EventKind, FlowEvent, FlowKey, ABI_VERSION};

/// Why a record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than its {need}-byte header/body")]
    Truncated { len: usize, need: usize },
    #[error("record has ABI version {found}, this exporter understands {expected}")]
    Version { found: u16, expected: u16 },
    #[error("unknown record kind {kind}")]
    UnknownKind { kind: u16 },
    #[error("record header says {declared} bytes, but {actual} bytes were read")]
    Length { declared: u32, actual: usize },
}

impl DecodeError {
    /// Short label for the `reason` of a discarded-events metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Truncated { .. } => "truncated",
            Self::Version { .. } => "abi_version",
            Self::UnknownKind { .. } => "unknown_kind",
            Self::Length { .. } => "length_mismatch",
        }
    }
}

/// A decoded ring buffer record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Flow(FlowEvent),
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        // Callers check the total length first; a short slice yields zeros, never a panic.
        let mut out = [0u8; N];
        if let Some(src) = self.buf.get(self.pos..self.pos + N) {
            out.copy_from_slice(src);
        }
        self.pos += N;
        out
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_ne_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_ne_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_ne_bytes(self.take())
    }
}

/// Decode one record from the bytes the ring buffer handed out.
pub fn decode(buf: &[u8]) -> Result<Record, DecodeError> {
    let hdr_len = core::mem::size_of::<EventHeader>();
    if buf.len() < hdr_len {
        return Err(DecodeError::Truncated {
            len: buf.len(),
            need: hdr_len,
        });
    }
    let mut c = Cursor { buf, pos: 0 };
    let header = EventHeader {
        version: c.u16(),
        kind: c.u16(),
        len: c.u32(),
    };
    if header.version != ABI_VERSION {
        return Err(DecodeError::Version {
            found: header.version,
            expected: ABI_VERSION,
        });
    }
    if header.len as usize > buf.len() {
        return Err(DecodeError::Length {
            declared: header.len,
            actual: buf.len(),
        });
    }
    match EventKind::from_u16(header.kind) {
        Some(EventKind::Flow) => {
            let need = core::mem::size_of::<FlowEvent>();
            if buf.len() < need || (header.len as usize) < need {
                return Err(DecodeError::Truncated {
                    len: buf.len().min(header.len as usize),
                    need,
                });
            }
            Ok(Record::Flow(decode_flow(header, &mut c)))
        }
        None => Err(DecodeError::UnknownKind { kind: header.kind }),
    }
}

fn decode_flow(header: EventHeader, c: &mut Cursor<'_>) -> FlowEvent {
    let ts_ns = c.u64();
    let first_seen_ns = c.u64();
    let key = FlowKey {
        saddr: c.take(),
        daddr: c.take(),
        sport: c.u16(),
        dport: c.u16(),
        proto: c.u8(),
        family: c.u8(),
        _pad: c.take(),
        ifindex: c.u32(),
    };
    FlowEvent {
        header,
        ts_ns,
        first_seen_ns,
        key,
        _pad0: c.u32(),
        orig_packets: c.u64(),
        orig_bytes: c.u64(),
        reply_packets: c.u64(),
        reply_bytes: c.u64(),
        handshake_rtt_ns: c.u64(),
        flow_id: c.u64(),
        packet_len: c.u32(),
        endpoint_id: c.u32(),
        src_identity: c.u32(),
        dst_identity: c.u32(),
        policy_rule_id: c.u32(),
        reason: c.u8(),
        verdict: c.u8(),
        drop_reason: c.u8(),
        direction: c.u8(),
        flags: c.u8(),
        tcp_flags: c.u8(),
        orig_tcp_flags: c.u8(),
        reply_tcp_flags: c.u8(),
        icmp_type: c.u8(),
        icmp_code: c.u8(),
        hook: c.u8(),
        _pad: c.take(),
    }
}

/// Encode an event as the datapath lays it out (native endian). Used by tests and by the
/// decoder benchmark to produce records without a kernel.
pub fn encode_flow(ev: &FlowEvent) -> Vec<u8> {
    let mut v = Vec::with_capacity(core::mem::size_of::<FlowEvent>());
    let h = &ev.header;
    v.extend_from_slice(&h.version.to_ne_bytes());
    v.extend_from_slice(&h.kind.to_ne_bytes());
    v.extend_from_slice(&h.len.to_ne_bytes());
    v.extend_from_slice(&ev.ts_ns.to_ne_bytes());
    v.extend_from_slice(&ev.first_seen_ns.to_ne_bytes());
    let k = &ev.key;
    v.extend_from_slice(&k.saddr);
    v.extend_from_slice(&k.daddr);
    v.extend_from_slice(&k.sport.to_ne_bytes());
    v.extend_from_slice(&k.dport.to_ne_bytes());
    v.push(k.proto);
    v.push(k.family);
    v.extend_from_slice(&k._pad);
    v.extend_from_slice(&k.ifindex.to_ne_bytes());
    v.extend_from_slice(&ev._pad0.to_ne_bytes());
    for x in [
        ev.orig_packets,
        ev.orig_bytes,
        ev.reply_packets,
        ev.reply_bytes,
        ev.handshake_rtt_ns,
        ev.flow_id,
    ] {
        v.extend_from_slice(&x.to_ne_bytes());
    }
    for x in [
        ev.packet_len,
        ev.endpoint_id,
        ev.src_identity,
        ev.dst_identity,
        ev.policy_rule_id,
    ] {
        v.extend_from_slice(&x.to_ne_bytes());
    }
    v.extend_from_slice(&[
        ev.reason,
        ev.verdict,
        ev.drop_reason,
        ev.direction,
        ev.flags,
        ev.tcp_flags,
        ev.orig_tcp_flags,
        ev.reply_tcp_flags,
        ev.icmp_type,
        ev.icmp_code,
        ev.hook,
    ]);
    v.extend_from_slice(&ev._pad);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> FlowEvent {
        FlowEvent {
            header: EventHeader {
                version: ABI_VERSION,
                kind: EventKind::Flow as u16,
                len: core::mem::size_of::<FlowEvent>() as u32,
            },
            ts_ns: 123,
            first_seen_ns: 100,
            key: FlowKey {
                saddr: [1; 16],
                daddr: [2; 16],
                sport: 1234,
                dport: 80,
                proto: 6,
                family: 6,
                _pad: [0; 2],
                ifindex: 7,
            },
            orig_packets: 3,
            orig_bytes: 300,
            reply_packets: 2,
            reply_bytes: 200,
            handshake_rtt_ns: 55_000,
            flow_id: 0xdead_beef,
            packet_len: 66,
            endpoint_id: 9,
            reason: 2,
            verdict: 1,
            direction: 2,
            tcp_flags: 0x12,
            orig_tcp_flags: 0x02,
            reply_tcp_flags: 0x12,
            hook: 2,
            ..FlowEvent::default()
        }
    }

    #[test]
    fn round_trip_matches_the_kernel_layout() {
        let ev = sample();
        let bytes = encode_flow(&ev);
        assert_eq!(bytes.len(), core::mem::size_of::<FlowEvent>());
        // The encoder must produce exactly the in-memory repr(C) layout.
        #[allow(unsafe_code)]
        // SAFETY: FlowEvent is repr(C) with explicit padding (no uninitialised bytes).
        let expected: &[u8] = unsafe {
            std::slice::from_raw_parts(
                (&ev as *const FlowEvent).cast::<u8>(),
                core::mem::size_of::<FlowEvent>(),
            )
        };
        assert_eq!(bytes.as_slice(), expected);
        assert_eq!(decode(&bytes), Ok(Record::Flow(ev)));
    }

    #[test]
    fn short_and_foreign_records_are_errors() {
        let bytes = encode_flow(&sample());
        assert!(matches!(
            decode(&bytes[..4]),
            Err(DecodeError::Truncated { .. })
        ));
        assert!(matches!(
            decode(&bytes[..100]),
            Err(DecodeError::Length { .. })
        ));
        let mut wrong = bytes.clone();
        wrong[0] = 99;
        assert!(matches!(
            decode(&wrong),
            Err(DecodeError::Version { found: 99, .. })
        ));
        let mut kind = bytes.clone();
        kind[2] = 42;
        assert!(matches!(
            decode(&kind),
            Err(DecodeError::UnknownKind { kind: 42 })
        ));
    }
}

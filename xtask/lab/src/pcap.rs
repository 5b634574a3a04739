//! A reader for classic pcap files (what `tcpdump -w` writes): micro- or nanosecond, either byte order.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};

pub(crate) const LINKTYPE_ETHERNET: u32 = 1;
pub(crate) const LINKTYPE_LINUX_SLL: u32 = 113;
pub(crate) const LINKTYPE_LINUX_SLL2: u32 = 276;

const GLOBAL_HEADER_LEN: usize = 24;
const RECORD_HEADER_LEN: usize = 16;

/// One record of a pcap file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub ts: SystemTime,
    /// The packet's length on the wire (`orig_len`).
    pub orig_len: u32,
    /// The captured bytes, at most the snap length.
    pub data: Vec<u8>,
}

/// A parsed pcap file.
#[derive(Debug, Clone)]
pub(crate) struct PcapFile {
    pub linktype: u32,
    pub records: Vec<Record>,
    /// Whether the file ended inside a record (the writer was killed mid-write).
    pub truncated: bool,
}

/// Parses a whole pcap file. A record cut short at the end is dropped and flagged, not an error.
pub(crate) fn parse(bytes: &[u8]) -> Result<PcapFile> {
    if bytes.len() < GLOBAL_HEADER_LEN {
        bail!(
            "not a pcap file: {} bytes, shorter than the 24-byte header",
            bytes.len()
        );
    }
    let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
    let (big_endian, nanos) = match u32::from_le_bytes(magic) {
        0xa1b2_c3d4 => (false, false),
        0xa1b2_3c4d => (false, true),
        0xd4c3_b2a1 => (true, false),
        0x4d3c_b2a1 => (true, true),
        other => bail!("not a pcap file: magic {other:#010x}"),
    };
    let u32_at = |b: &[u8], at: usize| {
        let raw = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        if big_endian {
            u32::from_be_bytes(raw)
        } else {
            u32::from_le_bytes(raw)
        }
    };
    let linktype = u32_at(bytes, 20) & 0x0fff_ffff;
    let mut records = Vec::new();
    let mut rest = &bytes[GLOBAL_HEADER_LEN..];
    let mut truncated = false;
    while !rest.is_empty() {
        if rest.len() < RECORD_HEADER_LEN {
            truncated = true;
            break;
        }
        let secs = u32_at(rest, 0);
        let frac = u32_at(rest, 4);
        let incl_len = u32_at(rest, 8) as usize;
        let orig_len = u32_at(rest, 12);
        let Some(data) = rest.get(RECORD_HEADER_LEN..RECORD_HEADER_LEN + incl_len) else {
            truncated = true;
            break;
        };
        let frac = if nanos {
            Duration::from_nanos(u64::from(frac))
        } else {
            Duration::from_micros(u64::from(frac))
        };
        records.push(Record {
            ts: UNIX_EPOCH + Duration::from_secs(u64::from(secs)) + frac,
            orig_len,
            data: data.to_vec(),
        });
        rest = &rest[RECORD_HEADER_LEN + incl_len..];
    }
    Ok(PcapFile {
        linktype,
        records,
        truncated,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a pcap file the way libpcap writes one (little-endian, nanosecond magic).
    pub(crate) fn build(linktype: u32, records: &[(u64, u32, u32, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&0xa1b2_3c4d_u32.to_le_bytes());
        out.extend_from_slice(&2u16.to_le_bytes());
        out.extend_from_slice(&4u16.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&128u32.to_le_bytes());
        out.extend_from_slice(&linktype.to_le_bytes());
        for (secs, nanos, orig_len, data) in records {
            out.extend_from_slice(&(*secs as u32).to_le_bytes());
            out.extend_from_slice(&nanos.to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&orig_len.to_le_bytes());
            out.extend_from_slice(data);
        }
        out
    }

    #[test]
    fn reads_nanosecond_records_and_flags_a_cut_tail() {
        let mut file = build(
            LINKTYPE_ETHERNET,
            &[
                (1_700_000_000, 123_456_789, 1514, &[1, 2, 3]),
                (5, 1, 60, &[4]),
            ],
        );
        let parsed = parse(&file).expect("parses");
        assert_eq!(parsed.linktype, LINKTYPE_ETHERNET);
        assert!(!parsed.truncated);
        assert_eq!(parsed.records.len(), 2);
        assert_eq!(
            parsed.records[0].ts,
            UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789)
        );
        assert_eq!(parsed.records[0].orig_len, 1514);
        assert_eq!(parsed.records[0].data, vec![1, 2, 3]);

        file.truncate(file.len() - 1);
        let parsed = parse(&file).expect("parses");
        assert!(parsed.truncated);
        assert_eq!(parsed.records.len(), 1);
    }

    #[test]
    fn reads_big_endian_microseconds() {
        let mut file = Vec::new();
        file.extend_from_slice(&0xa1b2_c3d4_u32.to_be_bytes());
        file.extend_from_slice(&[0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 128, 0, 0, 0, 1]);
        file.extend_from_slice(&7u32.to_be_bytes());
        file.extend_from_slice(&250u32.to_be_bytes());
        file.extend_from_slice(&1u32.to_be_bytes());
        file.extend_from_slice(&99u32.to_be_bytes());
        file.push(0xff);
        let parsed = parse(&file).expect("parses");
        assert_eq!(parsed.linktype, LINKTYPE_ETHERNET);
        assert_eq!(parsed.records[0].ts, UNIX_EPOCH + Duration::new(7, 250_000));
        assert_eq!(parsed.records[0].orig_len, 99);
    }

    #[test]
    fn rejects_what_is_not_pcap() {
        assert!(parse(b"short").is_err());
        assert!(parse(&[0u8; 40]).is_err());
    }
}

//! The disk spool: sealed batches wait here, in order, until ClickHouse has them.
//!
//! One batch per segment file `<seq>.seg` (20-digit sequence number, so names sort in
//! order). A segment is a 64-byte header — magic, format version, payload layout, batch id,
//! row count, time range, payload length and CRC-32, and a CRC-32 of the header itself —
//! followed by the RowBinary payload. Segments are written to `<seq>.seg.tmp`, fsynced and
//! renamed, so a crash leaves either a whole segment or a `.tmp` file (removed at open). A
//! segment that fails its checks anyway (torn by the disk, edited, truncated) is moved to
//! `corrupt/` and reported; the segments after it are unaffected. Batches ClickHouse rejects
//! for good go to `dead/` with the error beside them (`<seq>.seg` + `<seq>.error.txt`).
//!
//! The spool is bounded by `max_bytes`: [`Spool::try_append`] refuses a batch that does not
//! fit (unless the spool is empty, so one oversized batch cannot wedge the writer).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;

use crate::schema::{Flavor, Layout};

const MAGIC: &[u8; 8] = b"LUMSPOOL";
const FORMAT_VERSION: u16 = 1;
/// Size of a segment header.
pub const HEADER_LEN: usize = 64;
const SUFFIX: &str = ".seg";
const TMP_SUFFIX: &str = ".seg.tmp";
/// Subdirectory for segments that failed their checks.
pub const CORRUPT_DIR: &str = "corrupt";
/// Subdirectory for batches ClickHouse rejected permanently.
pub const DEAD_DIR: &str = "dead";

/// A sealed batch of rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Random, fixed when the batch is sealed; the insert dedup token and `batch_id` column.
    pub batch_id: u64,
    pub layout: Layout,
    pub rows: u32,
    pub min_time_ns: i64,
    pub max_time_ns: i64,
    /// RowBinary rows in `layout`.
    pub payload: Bytes,
}

/// Why a segment could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("segment {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("reading segment {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, Clone, Copy)]
struct SegmentInfo {
    bytes: u64,
    /// Flow time range of the segment (from its header), when readable.
    times: Option<(i64, i64)>,
}

#[derive(Debug, Default)]
struct State {
    segments: BTreeMap<u64, SegmentInfo>,
    bytes: u64,
    next_seq: u64,
}

/// What [`Spool::open`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    pub segments: usize,
    pub bytes: u64,
    /// Half-written `.tmp` files removed (batches that were never acknowledged).
    pub removed_tmp: usize,
}

/// The spool directory.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    fsync: bool,
    state: Mutex<State>,
}

fn seg_name(seq: u64) -> String {
    format!("{seq:020}{SUFFIX}")
}

fn parse_seq(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SUFFIX)?;
    (digits.len() == 20).then(|| digits.parse().ok()).flatten()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Encodes a segment: header followed by payload.
pub fn encode_segment(b: &Batch) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + b.payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(b.layout.version as u16).to_le_bytes());
    out.push(match b.layout.flavor {
        Flavor::Modern => 0,
        Flavor::Compat => 1,
    });
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&b.batch_id.to_le_bytes());
    out.extend_from_slice(&b.rows.to_le_bytes());
    out.extend_from_slice(&(b.payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&b.min_time_ns.to_le_bytes());
    out.extend_from_slice(&b.max_time_ns.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&b.payload).to_le_bytes());
    out.extend_from_slice(&[0; 8]);
    let hcrc = crc32fast::hash(&out[..60]);
    out.extend_from_slice(&hcrc.to_le_bytes());
    debug_assert_eq!(out.len(), HEADER_LEN);
    out.extend_from_slice(&b.payload);
    out
}

fn le<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[at..at + N]);
    a
}

/// Decodes and verifies a segment.
pub fn decode_segment(data: &[u8]) -> Result<Batch, String> {
    if data.len() < HEADER_LEN {
        return Err(format!(
            "{} bytes, shorter than the {HEADER_LEN}-byte header",
            data.len()
        ));
    }
    if &data[..8] != MAGIC {
        return Err("bad magic".into());
    }
    let hcrc = u32::from_le_bytes(le(data, 60));
    if crc32fast::hash(&data[..60]) != hcrc {
        return Err("header checksum mismatch".into());
    }
    let format = u16::from_le_bytes(le(data, 8));
    if format != FORMAT_VERSION {
        return Err(format!("unknown segment format version {format}"));
    }
    let version = u32::from(u16::from_le_bytes(le(data, 10)));
    let flavor = match data[12] {
        0 => Flavor::Modern,
        1 => Flavor::Compat,
        f => return Err(format!("unknown flavor {f}")),
    };
    let payload_len = u32::from_le_bytes(le(data, 28)) as usize;
    let payload = &data[HEADER_LEN..];
    if payload.len() != payload_len {
        return Err(format!(
            "payload is {} bytes, header says {payload_len} (torn write?)",
            payload.len()
        ));
    }
    if crc32fast::hash(payload) != u32::from_le_bytes(le(data, 48)) {
        return Err("payload checksum mismatch".into());
    }
    Ok(Batch {
        batch_id: u64::from_le_bytes(le(data, 16)),
        layout: Layout { flavor, version },
        rows: u32::from_le_bytes(le(data, 24)),
        min_time_ns: i64::from_le_bytes(le(data, 32)),
        max_time_ns: i64::from_le_bytes(le(data, 40)),
        payload: Bytes::copy_from_slice(payload),
    })
}

impl Spool {
    /// Opens (creating) the spool directory and indexes the segments in it.
    pub fn open(dir: &Path, max_bytes: u64, fsync: bool) -> io::Result<(Self, OpenReport)> {
        fs::create_dir_all(dir)?;
        let mut state = State::default();
        let mut report = OpenReport::default();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(TMP_SUFFIX) {
                fs::remove_file(entry.path())?;
                report.removed_tmp += 1;
                continue;
            }
            if let Some(seq) = parse_seq(name) {
                let bytes = entry.metadata()?.len();
                state.segments.insert(
                    seq,
                    SegmentInfo {
                        bytes,
                        times: read_times(&entry.path()),
                    },
                );
                state.bytes += bytes;
                state.next_seq = state.next_seq.max(seq + 1);
            }
        }
        // Never reuse the number of a segment set aside.
        for sub in [CORRUPT_DIR, DEAD_DIR] {
            if let Ok(rd) = fs::read_dir(dir.join(sub)) {
                for e in rd.flatten() {
                    if let Some(seq) = e.file_name().to_str().and_then(parse_seq) {
                        state.next_seq = state.next_seq.max(seq + 1);
                    }
                }
            }
        }
        state.next_seq = state.next_seq.max(1);
        report.segments = state.segments.len();
        report.bytes = state.bytes;
        Ok((
            Self {
                dir: dir.to_owned(),
                max_bytes,
                fsync,
                state: Mutex::new(state),
            },
            report,
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes on disk in pending segments.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// Pending segments.
    pub fn segments(&self) -> usize {
        self.lock().segments.len()
    }

    /// The oldest pending segment.
    pub fn head(&self) -> Option<u64> {
        self.lock().segments.keys().next().copied()
    }

    /// Pending segment numbers, oldest first.
    pub fn pending(&self) -> Vec<u64> {
        self.lock().segments.keys().copied().collect()
    }

    /// Earliest flow time among pending segments whose header could be read.
    pub fn min_time_ns(&self) -> Option<i64> {
        self.lock()
            .segments
            .values()
            .filter_map(|s| s.times.map(|t| t.0))
            .min()
    }

    /// Newest flow time among pending segments whose header could be read.
    pub fn max_time_ns(&self) -> Option<i64> {
        self.lock()
            .segments
            .values()
            .filter_map(|s| s.times.map(|t| t.1))
            .max()
    }

    /// Whether a segment of `len` payload bytes fits now.
    pub fn fits(&self, payload_len: usize) -> bool {
        let st = self.lock();
        st.segments.is_empty() || st.bytes + (HEADER_LEN + payload_len) as u64 <= self.max_bytes
    }

    /// Writes a batch as the newest segment, durably (fsync) when configured. Returns its
    /// sequence number, or `None` when it does not fit.
    pub fn try_append(&self, batch: &Batch) -> io::Result<Option<u64>> {
        let data = encode_segment(batch);
        let seq = {
            let mut st = self.lock();
            if !st.segments.is_empty() && st.bytes + data.len() as u64 > self.max_bytes {
                return Ok(None);
            }
            let seq = st.next_seq;
            st.next_seq += 1;
            // Reserve the space now so concurrent appends cannot overshoot.
            st.bytes += data.len() as u64;
            seq
        };
        let result = self.write_segment(seq, &data);
        let mut st = self.lock();
        match result {
            Ok(()) => {
                st.segments.insert(
                    seq,
                    SegmentInfo {
                        bytes: data.len() as u64,
                        times: Some((batch.min_time_ns, batch.max_time_ns)),
                    },
                );
                Ok(Some(seq))
            }
            Err(e) => {
                st.bytes -= data.len() as u64;
                Err(e)
            }
        }
    }

    fn write_segment(&self, seq: u64, data: &[u8]) -> io::Result<()> {
        let tmp = self.dir.join(format!("{seq:020}{TMP_SUFFIX}"));
        let path = self.dir.join(seg_name(seq));
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(data)?;
        if self.fsync {
            f.sync_data()?;
        }
        drop(f);
        fs::rename(&tmp, &path)?;
        if self.fsync {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Reads and verifies a pending segment.
    pub fn read(&self, seq: u64) -> Result<Batch, SegmentError> {
        let path = self.dir.join(seg_name(seq));
        let mut data = Vec::new();
        File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut data))
            .map_err(|source| SegmentError::Io {
                path: path.clone(),
                source,
            })?;
        decode_segment(&data).map_err(|reason| SegmentError::Corrupt { path, reason })
    }

    fn forget(&self, seq: u64) {
        let mut st = self.lock();
        if let Some(info) = st.segments.remove(&seq) {
            st.bytes -= info.bytes;
        }
    }

    /// Deletes a segment ClickHouse has.
    pub fn remove(&self, seq: u64) -> io::Result<()> {
        let r = match fs::remove_file(self.dir.join(seg_name(seq))) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        };
        self.forget(seq);
        r
    }

    fn set_aside(&self, seq: u64, sub: &str, note: Option<&str>) -> io::Result<PathBuf> {
        let to_dir = self.dir.join(sub);
        fs::create_dir_all(&to_dir)?;
        let to = to_dir.join(seg_name(seq));
        let r = fs::rename(self.dir.join(seg_name(seq)), &to);
        self.forget(seq);
        r?;
        if let Some(note) = note {
            fs::write(to_dir.join(format!("{seq:020}.error.txt")), note)?;
        }
        if self.fsync {
            sync_dir(&to_dir)?;
            sync_dir(&self.dir)?;
        }
        Ok(to)
    }

    /// Moves a segment that failed its checks to `corrupt/`.
    pub fn quarantine(&self, seq: u64) -> io::Result<PathBuf> {
        self.set_aside(seq, CORRUPT_DIR, None)
    }

    /// Moves a batch ClickHouse rejected for good to `dead/`, with the error beside it.
    pub fn dead_letter(&self, seq: u64, error: &str) -> io::Result<PathBuf> {
        self.set_aside(seq, DEAD_DIR, Some(error))
    }

    /// Moves every dead-lettered segment back into the queue (after the schema was fixed),
    /// behind the pending ones. Returns how many were requeued.
    pub fn requeue_dead_letters(&self) -> io::Result<usize> {
        let dead = self.dir.join(DEAD_DIR);
        let mut seqs: Vec<u64> = match fs::read_dir(&dead) {
            Ok(rd) => rd
                .flatten()
                .filter_map(|e| e.file_name().to_str().and_then(parse_seq))
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        seqs.sort_unstable();
        for old in &seqs {
            let data = fs::read(dead.join(seg_name(*old)))?;
            let new = {
                let mut st = self.lock();
                let s = st.next_seq;
                st.next_seq += 1;
                st.bytes += data.len() as u64;
                s
            };
            self.write_segment(new, &data)?;
            let times = decode_segment(&data)
                .ok()
                .map(|b| (b.min_time_ns, b.max_time_ns));
            self.lock().segments.insert(
                new,
                SegmentInfo {
                    bytes: data.len() as u64,
                    times,
                },
            );
            fs::remove_file(dead.join(seg_name(*old)))?;
            let _ = fs::remove_file(dead.join(format!("{old:020}.error.txt")));
        }
        Ok(seqs.len())
    }
}

/// The flow time range in a segment's header (`None` if the header fails its check).
fn read_times(path: &Path) -> Option<(i64, i64)> {
    let mut h = [0u8; HEADER_LEN];
    File::open(path).ok()?.read_exact(&mut h).ok()?;
    (crc32fast::hash(&h[..60]) == u32::from_le_bytes(le(&h, 60))).then(|| {
        (
            i64::from_le_bytes(le(&h, 32)),
            i64::from_le_bytes(le(&h, 40)),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::LATEST_VERSION;

    fn batch(id: u64, payload: &[u8]) -> Batch {
        Batch {
            batch_id: id,
            layout: Layout {
                flavor: Flavor::Compat,
                version: LATEST_VERSION,
            },
            rows: 1,
            min_time_ns: 10,
            max_time_ns: 20,
            payload: Bytes::copy_from_slice(payload),
        }
    }

    #[test]
    fn segments_roundtrip_in_order_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (spool, _) = Spool::open(dir.path(), 1 << 20, true).expect("open");
        for i in 1..=3u64 {
            spool
                .try_append(&batch(i, &[i as u8; 100]))
                .expect("io")
                .expect("fits");
        }
        assert_eq!(spool.segments(), 3);
        assert_eq!(spool.bytes(), 3 * (HEADER_LEN as u64 + 100));
        let head = spool.head().expect("head");
        assert_eq!(spool.read(head).expect("read").batch_id, 1);
        spool.remove(head).expect("remove");
        drop(spool);
        // A torn write left behind by a crash.
        fs::write(dir.path().join("00000000000000000009.seg.tmp"), b"half").expect("write");
        let (spool, report) = Spool::open(dir.path(), 1 << 20, true).expect("reopen");
        assert_eq!(
            report,
            OpenReport {
                segments: 2,
                bytes: 2 * 164,
                removed_tmp: 1
            }
        );
        let ids: Vec<u64> = spool
            .pending()
            .into_iter()
            .map(|s| spool.read(s).expect("read").batch_id)
            .collect();
        assert_eq!(ids, vec![2, 3]);
        assert_eq!(spool.min_time_ns(), Some(10));
        assert_eq!(spool.max_time_ns(), Some(20));
        let next = spool
            .try_append(&batch(4, b"x"))
            .expect("io")
            .expect("fits");
        assert_eq!(next, 4, "sequence numbers continue after a restart");
    }

    #[test]
    fn a_full_spool_refuses_but_never_an_empty_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (spool, _) = Spool::open(dir.path(), 300, false).expect("open");
        assert!(spool
            .try_append(&batch(1, &[0; 1000]))
            .expect("io")
            .is_some());
        assert!(spool.try_append(&batch(2, &[0; 10])).expect("io").is_none());
        assert!(!spool.fits(10));
        spool.remove(spool.head().expect("head")).expect("remove");
        assert!(spool.fits(10));
    }

    #[test]
    fn corruption_is_detected() {
        let b = batch(7, b"some rows");
        let good = encode_segment(&b);
        assert_eq!(decode_segment(&good), Ok(b));
        let mut flipped = good.clone();
        *flipped.last_mut().expect("byte") ^= 1;
        assert!(decode_segment(&flipped)
            .expect_err("flipped")
            .contains("payload checksum"));
        let mut header = good.clone();
        header[20] ^= 1;
        assert!(decode_segment(&header)
            .expect_err("header")
            .contains("header checksum"));
        assert!(decode_segment(&good[..good.len() - 3])
            .expect_err("torn")
            .contains("torn"));
        assert!(decode_segment(&good[..10]).is_err());
    }

    #[test]
    fn dead_letters_can_be_requeued() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (spool, _) = Spool::open(dir.path(), 1 << 20, false).expect("open");
        let seq = spool
            .try_append(&batch(5, b"rows"))
            .expect("io")
            .expect("fits");
        spool
            .dead_letter(seq, "Code: 16. no such column")
            .expect("dead letter");
        assert_eq!(spool.segments(), 0);
        assert!(dir
            .path()
            .join(DEAD_DIR)
            .join("00000000000000000001.error.txt")
            .exists());
        assert_eq!(spool.requeue_dead_letters().expect("requeue"), 1);
        let head = spool.head().expect("requeued");
        assert!(head > seq);
        assert_eq!(spool.read(head).expect("read").batch_id, 5);
    }
}

//! A minimal RowBinary encoder and decoder for the types Lumen's rows use.
//!
//! RowBinary is ClickHouse's native row format: fixed-width integers little-endian,
//! strings as a LEB128 length and bytes, arrays as a LEB128 length and elements,
//! `FixedString(N)`/`IPv6` as N raw bytes. `LowCardinality(String)` travels as `String`.

/// Appends values to a RowBinary buffer.
pub(crate) struct Enc<'a>(pub &'a mut Vec<u8>);

impl Enc<'_> {
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn fixed16(&mut self, v: &[u8; 16]) {
        self.0.extend_from_slice(v);
    }
    pub fn len(&mut self, mut n: usize) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                self.0.push(byte);
                return;
            }
            self.0.push(byte | 0x80);
        }
    }
    pub fn str(&mut self, s: &str) {
        self.len(s.len());
        self.0.extend_from_slice(s.as_bytes());
    }
    pub fn strs<S: AsRef<str>>(&mut self, v: &[S]) {
        self.len(v.len());
        for s in v {
            self.str(s.as_ref());
        }
    }
}

/// The input ended before a whole value (a row split across chunks, or a torn payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Incomplete;

/// A value that is not what the layout says (e.g. a string that is not UTF-8).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("row data ended in the middle of a row")]
    Truncated,
    #[error("invalid row data: {0}")]
    Invalid(&'static str),
}

impl From<Incomplete> for DecodeError {
    fn from(_: Incomplete) -> Self {
        DecodeError::Truncated
    }
}

/// Reads values from a RowBinary buffer.
pub(crate) struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Dec<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }
    pub fn pos(&self) -> usize {
        self.pos
    }
    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(DecodeError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.arr::<1>()?[0])
    }
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    pub fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_le_bytes(self.arr()?))
    }
    pub fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.arr()?))
    }
    pub fn fixed16(&mut self) -> Result<[u8; 16], DecodeError> {
        self.arr()
    }
    pub fn len(&mut self) -> Result<usize, DecodeError> {
        let mut n: usize = 0;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            n |= usize::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(DecodeError::Invalid("LEB128 length longer than 64 bits"))
    }
    pub fn string(&mut self) -> Result<String, DecodeError> {
        let n = self.len()?;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::Invalid("string is not UTF-8"))
    }
    pub fn strings(&mut self) -> Result<Vec<String>, DecodeError> {
        let n = self.len()?;
        // Every element takes at least one byte; a bigger count is corrupt data.
        if n > self.buf.len().saturating_sub(self.pos) {
            return Err(DecodeError::Truncated);
        }
        (0..n).map(|_| self.string()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_values() {
        let mut buf = Vec::new();
        let mut e = Enc(&mut buf);
        e.u8(7);
        e.u16(65_000);
        e.u32(4_000_000_000);
        e.u64(u64::MAX - 1);
        e.i32(-5);
        e.i64(-1_700_000_000_000_000_000);
        e.str("héllo");
        e.strs(&["a", "", &"x".repeat(300)]);
        e.fixed16(&[9; 16]);
        let mut d = Dec::new(&buf);
        assert_eq!(d.u8(), Ok(7));
        assert_eq!(d.u16(), Ok(65_000));
        assert_eq!(d.u32(), Ok(4_000_000_000));
        assert_eq!(d.u64(), Ok(u64::MAX - 1));
        assert_eq!(d.i32(), Ok(-5));
        assert_eq!(d.i64(), Ok(-1_700_000_000_000_000_000));
        assert_eq!(d.string().as_deref(), Ok("héllo"));
        assert_eq!(
            d.strings(),
            Ok(vec!["a".to_owned(), String::new(), "x".repeat(300)])
        );
        assert_eq!(d.fixed16(), Ok([9; 16]));
        assert!(d.is_empty());
    }

    #[test]
    fn truncated_input_is_reported() {
        let mut buf = Vec::new();
        Enc(&mut buf).str("abcdef");
        buf.truncate(4);
        assert_eq!(Dec::new(&buf).string(), Err(DecodeError::Truncated));
        assert_eq!(Dec::new(&[0xff; 3]).len(), Err(DecodeError::Truncated));
    }
}

//! Checked big-endian reads and the small writers the hand-written encoders share.
//!
//! Every read returns `None` when the input is too short, so decoders of network input
//! cannot index out of bounds; callers turn `None` into 502 SYNTAX_ERROR.

use amq_protocol::types::ShortString;
use bytes::BufMut;

/// A cursor over a byte slice whose reads never panic.
#[derive(Debug, Clone)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }

    /// A short string's bytes (length octet, then up to 255 bytes).
    pub(crate) fn short_str(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    /// A long string's bytes (32-bit length, then the bytes).
    pub(crate) fn long_str(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()?;
        self.take(usize::try_from(n).ok()?)
    }
}

/// The longest prefix of `s` that fits a short string (255 bytes) and ends on a
/// character boundary.
pub(crate) fn truncate_short(s: &str) -> &str {
    if s.len() <= 255 {
        return s;
    }
    let mut n = 255;
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    s.get(..n).unwrap_or("")
}

/// A [`ShortString`] from `s`, cut to 255 bytes at a character boundary. Never panics
/// (unlike `ShortString::from`).
pub fn short_string_truncated(s: &str) -> ShortString {
    ShortString::try_new(truncate_short(s)).unwrap_or_default()
}

/// Writes a short string, truncated to 255 bytes at a character boundary.
pub(crate) fn put_short_str(out: &mut impl BufMut, s: &str) {
    let s = truncate_short(s);
    out.put_u8(s.len() as u8);
    out.put_slice(s.as_bytes());
}

/// Encoded size of a short string written by [`put_short_str`].
pub(crate) fn short_str_len(s: &str) -> usize {
    1 + truncate_short(s).len()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;

    #[test]
    fn reader_never_reads_past_end() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u16(), Some(0x0102));
        assert_eq!(r.u16(), None);
        assert_eq!(r.u8(), Some(3));
        assert_eq!(r.u8(), None);
        assert!(r.is_empty());
        let mut r = Reader::new(&[5, b'a']);
        assert_eq!(r.short_str(), None);
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff, 0]);
        assert_eq!(r.long_str(), None);
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        let s = format!("{}é", "a".repeat(254)); // é is 2 bytes: 256 total
        assert_eq!(truncate_short(&s).len(), 254);
        assert_eq!(short_string_truncated(&"x".repeat(300)).as_str().len(), 255);
        assert_eq!(short_str_len(&"x".repeat(300)), 256);
        let mut v = Vec::new();
        put_short_str(&mut v, &s);
        assert_eq!(v.len(), 255);
        assert_eq!(v.first(), Some(&254));
    }
}

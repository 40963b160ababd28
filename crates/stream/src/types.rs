//! Element and key bounds, and [`ShortStr`], an allocation-free string for small keys.

use std::fmt;
use std::hash::{Hash, Hasher};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a stream element must be: cloneable (state keeps copies), sendable between worker
/// threads and serialisable (records cross process boundaries and state is snapshotted).
pub trait Data: Clone + Send + Serialize + for<'de> Deserialize<'de> + 'static {}
impl<T: Clone + Send + Serialize + for<'de> Deserialize<'de> + 'static> Data for T {}

/// What a key must be: [`Data`] that can be hashed (to route it to its worker) and compared.
pub trait Key: Data + Hash + Eq {}
impl<T: Data + Hash + Eq> Key for T {}

/// Capacity of a [`ShortStr`] in bytes.
pub const SHORT_STR_CAP: usize = 23;

/// A string of at most 23 bytes stored inline: no heap allocation per record.
///
/// Use it for small keys (words, ids, symbols) on hot paths; it hashes, orders and prints like
/// the `&str` it holds.
///
/// ```
/// use rill_stream::ShortStr;
/// use std::fmt::Write;
/// let mut w = ShortStr::default();
/// write!(w, "w{}", 42).unwrap();
/// assert_eq!(w.as_str(), "w42");
/// assert!(ShortStr::new("a string that is far too long to fit").is_none());
/// ```
#[derive(Clone, Copy, Default, PartialOrd, Ord)]
pub struct ShortStr {
    // The string, zero-padded, then its length in the last byte: 24 bytes that compare as
    // three words (keys are compared on every hash-table probe).
    buf: [u8; SHORT_STR_CAP + 1],
}

impl PartialEq for ShortStr {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        self.words() == other.words()
    }
}

impl Eq for ShortStr {}

impl ShortStr {
    /// `None` if `s` is longer than [`SHORT_STR_CAP`] bytes.
    pub fn new(s: &str) -> Option<Self> {
        let mut out = Self::default();
        out.push_str(s).then_some(out)
    }

    #[inline]
    fn len(&self) -> usize {
        usize::from(self.buf[SHORT_STR_CAP])
    }

    #[inline]
    fn words(&self) -> (u128, u64) {
        let (mut a, mut b) = ([0u8; 16], [0u8; 8]);
        a.copy_from_slice(&self.buf[..16]);
        b.copy_from_slice(&self.buf[16..]);
        (u128::from_ne_bytes(a), u64::from_ne_bytes(b))
    }

    /// Appends `s`; returns false (and leaves `self` unchanged) if it does not fit.
    #[inline]
    pub fn push_str(&mut self, s: &str) -> bool {
        let len = self.len();
        if len + s.len() > SHORT_STR_CAP {
            return false;
        }
        self.buf[len..len + s.len()].copy_from_slice(s.as_bytes());
        self.buf[SHORT_STR_CAP] = (len + s.len()) as u8;
        true
    }

    /// Empties the string (keeps the unused tail zeroed so equality stays bytewise).
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// The held bytes (UTF-8).
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len()]
    }

    /// The held string.
    pub fn as_str(&self) -> &str {
        // Only ever filled from `&str`s, so this is valid UTF-8.
        std::str::from_utf8(&self.buf[..self.len()]).unwrap_or_default()
    }
}

impl fmt::Write for ShortStr {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.push_str(s) {
            Ok(())
        } else {
            Err(fmt::Error)
        }
    }
}

impl Hash for ShortStr {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(&self.buf[..self.len()]);
    }
}

impl fmt::Display for ShortStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for ShortStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Serialize for ShortStr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ShortStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        ShortStr::new(&s).ok_or_else(|| serde::de::Error::custom("string longer than 23 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::ShortStr;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn short_str_behaves_like_str(a in "\\PC{0,8}", b in "\\PC{0,8}") {
            if let (Some(x), Some(y)) = (ShortStr::new(&a), ShortStr::new(&b)) {
                prop_assert_eq!(x.as_str(), a.as_str());
                prop_assert_eq!(x == y, a == b);
                prop_assert_eq!(x.cmp(&y), a.cmp(&b));
                if a == b {
                    prop_assert_eq!(crate::hash::route(&x), crate::hash::route(&y));
                }
                let json = serde_json::to_string(&x).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let back: ShortStr = serde_json::from_str(&json).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(back, x);
            }
        }
    }
}

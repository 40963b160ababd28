//! In-memory bookkeeping for one segment: where its records start and which are acked.
//! About 4 bytes + 1 bit per record, dropped with the segment once it is fully acked.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::StorageFile;

pub(crate) fn seg_name(id: u32) -> String {
    format!("{id:010}.seg")
}

pub(crate) fn ack_name(id: u32) -> String {
    format!("{id:010}.ack")
}

/// `NNNNNNNNNN.seg` / `NNNNNNNNNN.ack` → (id, is_ack).
pub(crate) fn parse_name(name: &str) -> Option<(u32, bool)> {
    let (stem, ext) = name.split_once('.')?;
    let is_ack = match ext {
        "seg" => false,
        "ack" => true,
        _ => return None,
    };
    if stem.len() != 10 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((stem.parse().ok()?, is_ack))
}

#[derive(Debug)]
pub(crate) struct Segment {
    pub id: u32,
    pub path: PathBuf,
    pub file: Arc<dyn StorageFile>,
    /// Logical length: bytes in the file plus (for the active segment) bytes still buffered.
    pub len: u32,
    /// Start offsets of its records, ascending.
    offsets: Vec<u32>,
    /// Bit i set = record i acked.
    acked: Vec<u64>,
    /// Bit i set = record i was marked delivered (recovery only).
    delivered: Vec<u64>,
    /// Records not acked.
    pub live: u32,
    pub ack_path: PathBuf,
    pub ack_file: Option<Arc<dyn StorageFile>>,
    /// Bytes written to the ack file.
    pub ack_len: u32,
    /// Ack entries not yet written (u32 LE offsets).
    pub ack_pending: Vec<u8>,
    /// Written since the last sync.
    pub data_dirty: bool,
    pub ack_dirty: bool,
}

impl Segment {
    pub fn new(dir: &Path, id: u32, file: Arc<dyn StorageFile>, len: u32) -> Segment {
        Segment {
            id,
            path: dir.join(seg_name(id)),
            file,
            len,
            offsets: Vec::new(),
            acked: Vec::new(),
            delivered: Vec::new(),
            live: 0,
            ack_path: dir.join(ack_name(id)),
            ack_file: None,
            ack_len: 0,
            ack_pending: Vec::new(),
            data_dirty: false,
            ack_dirty: false,
        }
    }

    pub fn push(&mut self, offset: u32) {
        let i = self.offsets.len();
        self.offsets.push(offset);
        if i & 63 == 0 {
            self.acked.push(0);
        }
        self.live += 1;
    }

    pub fn records(&self) -> usize {
        self.offsets.len()
    }

    pub fn offset(&self, i: usize) -> u32 {
        self.offsets[i]
    }

    pub fn index_of(&self, offset: u32) -> Option<usize> {
        self.offsets.binary_search(&offset).ok()
    }

    pub fn is_acked(&self, i: usize) -> bool {
        self.acked[i / 64] & (1 << (i % 64)) != 0
    }

    /// Marks record `i` acked; false if it already was.
    pub fn set_acked(&mut self, i: usize) -> bool {
        let word = &mut self.acked[i / 64];
        let bit = 1u64 << (i % 64);
        if *word & bit != 0 {
            return false;
        }
        *word |= bit;
        self.live -= 1;
        true
    }

    pub fn set_delivered(&mut self, i: usize) {
        if self.delivered.len() <= i / 64 {
            self.delivered.resize(i / 64 + 1, 0);
        }
        self.delivered[i / 64] |= 1 << (i % 64);
    }

    pub fn is_delivered(&self, i: usize) -> bool {
        self.delivered
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Frees spare capacity once the segment stops growing.
    pub fn seal(&mut self) {
        self.offsets.shrink_to_fit();
        self.acked.shrink_to_fit();
    }

    /// Bytes on disk and in buffers.
    pub fn bytes(&self) -> u64 {
        u64::from(self.len) + u64::from(self.ack_len) + self.ack_pending.len() as u64
    }
}

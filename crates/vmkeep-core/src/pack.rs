//! Packs and pack indexes. FORMAT.md "Packs" and "Indexes".
//!
//! A pack is one object holding many encoded blobs back to back, then its header, then the
//! header's length:  blob_0 || ... || blob_n || header || header_len u32 LE
//! The header is `object::seal(Index kind bytes)`-like: magic "VMKP", version, count, entries, and
//! is AEAD-sealed in encrypted repositories (plain: BLAKE3 checksum), so a pack describes itself
//! and the repository index can be rebuilt from packs alone.
//! A pack's id (its object name) is BLAKE3 of all its bytes.
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::id::{BlobId, PackId};
use crate::keys::{BlobKind, Keys};

/// Where one blob lives inside a pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackEntry {
    pub kind: BlobKind,
    pub id: BlobId,
    /// byte offset of the encoded blob in the pack
    pub offset: u32,
    /// length of the encoded blob
    pub length: u32,
    /// length of the plaintext
    pub raw_len: u32,
}

/// Builds a pack in memory. The repository flushes it once `len()` reaches its target size.
#[derive(Default)]
pub struct PackBuilder {
    // implementation detail
    data: Vec<u8>,
    entries: Vec<PackEntry>,
}

impl PackBuilder {
    pub fn new() -> PackBuilder {
        PackBuilder::default()
    }

    /// Append an already encoded blob.
    pub fn add(&mut self, kind: BlobKind, id: BlobId, raw_len: u32, encoded: &[u8]) {
        todo!()
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn blob_count(&self) -> usize {
        self.entries.len()
    }

    /// Finish: returns (pack id, the pack's bytes, its entries).
    pub fn finish(self, keys: &Keys) -> (PackId, Vec<u8>, Vec<PackEntry>) {
        todo!()
    }
}

/// Read the header from the tail of a pack (`tail` = the last bytes of the pack, at least the
/// header and its length; `pack_len` = total length) and validate every entry lies inside the
/// pack's blob area. Used by `check` and by index rebuilding.
pub fn read_header(keys: &Keys, pack_len: u64, tail: &[u8]) -> Result<Vec<PackEntry>> {
    todo!()
}

/// The largest header `read_header` accepts; callers fetch min(pack_len, this) tail bytes.
pub const MAX_HEADER: usize = 8 << 20;

/// An index object (`index/<name>`): which blobs live in which packs. Body before sealing:
/// magic "VMKI" || version u8 || pack count u32, then per pack: pack id (32) || entry count u32 ||
/// entries (kind u8, id 32, offset u32, length u32, raw_len u32). Compact binary, bounded on read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IndexFile {
    pub packs: Vec<(PackId, Vec<PackEntry>)>,
}

impl IndexFile {
    pub fn encode(&self) -> Vec<u8> {
        todo!()
    }

    pub fn decode(body: &[u8]) -> Result<IndexFile> {
        todo!()
    }
}

//! Streams: byte sequences without fixed geometry (memory and device state, VM configuration),
//! cut by content-defined chunking (FastCDC v2020) so an insertion shifts only nearby chunks.
//! FORMAT.md "Streams".
//!
//! A stream's index is a list of (chunk id, length) entries split into Tree blobs of at most
//! [`ENTRIES_PER_BLOB`] entries: magic "VMKS" || version u8 || count u32 || count*(id 32, len u32).
//! The manifest lists those blob ids in order.
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::id::BlobId;

pub const ENTRIES_PER_BLOB: usize = 4096;

/// Chunking parameters (bytes): min, average, max; all even, max <= 4 MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CdcParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl CdcParams {
    /// Memory state dedups best with small chunks (qemu-facts.md §8): 8 / 16 / 64 KiB.
    pub const MEMORY: CdcParams = CdcParams {
        min: 8 << 10,
        avg: 16 << 10,
        max: 64 << 10,
    };
    /// General streams (configuration, files): 64 KiB / 256 KiB / 1 MiB.
    pub const GENERAL: CdcParams = CdcParams {
        min: 64 << 10,
        avg: 256 << 10,
        max: 1 << 20,
    };
}

/// Incremental content-defined chunker: feed bytes as they arrive, get back chunk boundaries.
/// Must produce exactly the cuts `fastcdc::v2020::FastCDC` produces over the whole stream.
pub struct StreamChunker {
    // implementation detail
    params: CdcParams,
    pending: Vec<u8>,
}

impl StreamChunker {
    pub fn new(params: CdcParams) -> StreamChunker {
        StreamChunker {
            params,
            pending: Vec::new(),
        }
    }

    /// Append data; returns the complete chunks now decidable (each a Vec of its bytes).
    pub fn push(&mut self, data: &[u8]) -> Vec<Vec<u8>> {
        todo!()
    }

    /// End of stream: the remaining chunks.
    pub fn finish(self) -> Vec<Vec<u8>> {
        todo!()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamEntry {
    pub id: BlobId,
    pub len: u32,
}

pub fn encode_index_blob(entries: &[StreamEntry]) -> Vec<u8> {
    todo!()
}

/// Bounded by ENTRIES_PER_BLOB; validates lengths (each <= 4 MiB).
pub fn decode_index_blob(bytes: &[u8]) -> Result<Vec<StreamEntry>> {
    todo!()
}

//! Blob framing: how one blob (chunk or tree node) is stored inside a pack. FORMAT.md "Blobs".
//!
//! plain repository:     flags(u8) || payload
//! encrypted repository: seal(aad = kind(u8) || id(32), flags(u8) || payload)
//! flags bit 0: payload is zstd-compressed (level 1); otherwise raw (stored raw when zstd does not
//! shrink it by at least 1/32).
//! Every decode verifies the plaintext against the id it is stored under.
use crate::error::Result;
use crate::id::BlobId;
use crate::keys::{BlobKind, Keys};

/// Largest plaintext of any blob: 4 MiB chunks (the largest chunk size) plus slack for nodes.
pub const MAX_BLOB_PLAINTEXT: usize = 4 * 1024 * 1024 + 4096;

/// Encode a blob whose id the caller already computed with `keys.blob_id(kind, plaintext)`.
pub fn encode(keys: &Keys, kind: BlobKind, id: &BlobId, plaintext: &[u8]) -> Vec<u8> {
    todo!()
}

/// Decode and verify. `raw_len` is the plaintext length recorded in the pack header (a bound for
/// decompression). Errors: Integrity (AEAD), Corrupt (framing / zstd), BlobMismatch (hash).
pub fn decode(
    keys: &Keys,
    kind: BlobKind,
    id: &BlobId,
    raw_len: u32,
    stored: &[u8],
) -> Result<Vec<u8>> {
    todo!()
}

//! Object framing for every repository object except packs, config and key files.
//! FORMAT.md "Objects".
//!
//! header: magic "VMKO"(4) || version u8 (=1) || kind u8 || flags u8 (bit0 encrypted) || reserved u8
//! body:   plain: body || BLAKE3(header || body) (32)   encrypted: seal(aad = header, body)
use crate::error::Result;
use crate::keys::Keys;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ObjectKind {
    Manifest = 1,
    Index = 2,
    GcRecord = 3,
    Lock = 4,
}

impl ObjectKind {
    /// Size bound checked before decoding.
    pub fn max_size(self) -> usize {
        match self {
            ObjectKind::Manifest => 64 << 20,
            ObjectKind::Index => 256 << 20,
            ObjectKind::GcRecord => 256 << 20,
            ObjectKind::Lock => 1 << 20,
        }
    }
}

pub fn seal(keys: &Keys, kind: ObjectKind, body: &[u8]) -> Vec<u8> {
    todo!()
}

/// Bounded by kind.max_size(); checks magic, version, kind, checksum or AEAD tag.
pub fn open(keys: &Keys, kind: ObjectKind, bytes: &[u8]) -> Result<Vec<u8>> {
    todo!()
}

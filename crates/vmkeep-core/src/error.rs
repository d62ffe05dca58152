//! The one error type of vmkeep-core. Each variant's message is what the user reads.
use crate::id::BlobId;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A repository object does not start with the magic its kind requires.
    #[error("not a vmkeep {kind} (bad magic)")]
    BadMagic { kind: &'static str },
    /// A format version this build does not understand.
    #[error("unsupported {kind} format version {version} (this vmkeep reads up to {supported})")]
    UnsupportedVersion {
        kind: &'static str,
        version: u32,
        supported: u32,
    },
    /// An object is shorter, longer or otherwise malformed.
    #[error("corrupt {kind}: {reason}")]
    Corrupt { kind: &'static str, reason: String },
    /// A plaintext object's checksum or an AEAD tag failed.
    #[error("integrity check failed for {kind}: the object was modified or damaged")]
    Integrity { kind: &'static str },
    /// A blob's content does not hash to the id it is stored under.
    #[error("blob {id} is damaged: its content hashes to {actual}")]
    BlobMismatch { id: BlobId, actual: BlobId },
    /// An object exceeds the size bound of its kind.
    #[error("{kind} too large: {size} bytes, at most {max} allowed")]
    TooLarge {
        kind: &'static str,
        size: u64,
        max: u64,
    },
    /// The passphrase does not unlock the key.
    #[error("wrong passphrase")]
    WrongPassphrase,
    /// A value given by the user is invalid.
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
}

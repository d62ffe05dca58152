//! Keys and the cryptographic primitives built on them. FORMAT.md "Encryption".
//!
//! A repository is either plain or encrypted. An encrypted repository has a random 64-byte
//! [`MasterKey`]: 32 bytes keying BLAKE3 for blob ids (so ids reveal nothing about content) and
//! 32 bytes of data key for AEAD. The master key is stored only wrapped by a passphrase
//! ([`KeyFile`], Argon2id). Secrets never appear in `Debug` output and are zeroed on drop.
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::id::BlobId;

/// The repository master key. `Debug` prints no key material.
#[derive(Clone, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub struct MasterKey {
    pub(crate) id_key: [u8; 32],
    pub(crate) data_key: [u8; 32],
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl MasterKey {
    /// A fresh random key from the OS.
    pub fn generate() -> MasterKey {
        todo!()
    }

    /// Paper-copy text: human-readable, with a checksum, that [`MasterKey::import`] reads back.
    pub fn export(&self) -> String {
        todo!()
    }

    pub fn import(text: &str) -> Result<MasterKey> {
        todo!()
    }
}

/// Argon2id cost parameters. Defaults: m = 64 MiB, t = 3, p = 1 (about 0.15 s here).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
}

impl Default for KdfParams {
    fn default() -> Self {
        KdfParams {
            m_cost_kib: 64 * 1024,
            t_cost: 3,
            p_cost: 1,
        }
    }
}

/// A passphrase-wrapped master key, stored as JSON in `keys/<name>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    pub version: u32,
    pub kdf: String, // "argon2id"
    pub params: KdfParams,
    /// hex
    pub salt: String,
    /// hex: nonce || AEAD(kek, master key bytes)
    pub wrapped: String,
    pub created: chrono::DateTime<chrono::Utc>,
    pub hostname: String,
}

impl KeyFile {
    pub fn wrap(
        master: &MasterKey,
        passphrase: &[u8],
        params: KdfParams,
        hostname: &str,
    ) -> Result<KeyFile> {
        todo!()
    }

    /// Err(Error::WrongPassphrase) when the passphrase does not unlock it.
    pub fn unwrap_key(&self, passphrase: &[u8]) -> Result<MasterKey> {
        todo!()
    }

    pub fn to_json(&self) -> Vec<u8> {
        todo!()
    }

    /// Bounded (64 KiB) and validated.
    pub fn from_json(bytes: &[u8]) -> Result<KeyFile> {
        todo!()
    }
}

/// What a blob or object is, bound into its id derivation and its AEAD associated data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[repr(u8)]
pub enum BlobKind {
    /// A fixed-size disk chunk or a content-defined stream chunk. Id = BLAKE3(plaintext) (keyed when encrypted).
    Data = 0,
    /// A node of a disk index tree or of a stream index. Id = BLAKE3 in a separate derive-key domain.
    Tree = 1,
}

impl BlobKind {
    pub fn from_u8(v: u8) -> Result<BlobKind> {
        todo!()
    }
}

/// The keys a repository operates with: plain (no master key) or encrypted.
/// Cheap to clone (an Arc inside is fine); Send + Sync.
#[derive(Clone, Debug)]
pub struct Keys {
    // implementation detail
    master: Option<std::sync::Arc<MasterKey>>,
}

impl Keys {
    pub fn plain() -> Keys {
        Keys { master: None }
    }

    pub fn encrypted(master: MasterKey) -> Keys {
        Keys {
            master: Some(std::sync::Arc::new(master)),
        }
    }

    pub fn is_encrypted(&self) -> bool {
        self.master.is_some()
    }

    pub fn master(&self) -> Option<&MasterKey> {
        self.master.as_deref()
    }

    /// Content id of a blob's plaintext. Data: BLAKE3 (keyed by id_key when encrypted).
    /// Tree: a separate domain so a chunk and a node never share an id by accident.
    /// NOTE: callers detect all-zero chunks themselves and use BlobId::ZERO; this never returns ZERO.
    pub fn blob_id(&self, kind: BlobKind, plaintext: &[u8]) -> BlobId {
        todo!()
    }

    /// AEAD-seal `plaintext` with associated data `aad`. Output: nonce(24) || ciphertext || tag(16).
    /// Construction (FORMAT.md): per-message subkey = BLAKE3-keyed(data_key, nonce[..16]),
    /// AES-256-GCM (ring) with nonce[16..24] || 0u32. Panics if the repository is plain.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        todo!()
    }

    /// Inverse of [`Keys::seal`]; Err(Error::Integrity) on any tampering or a wrong key.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>> {
        todo!()
    }

    /// Keyed MAC (BLAKE3 in its own derive-key domain) used to authenticate the repository config.
    pub fn config_mac(&self, bytes: &[u8]) -> Option<[u8; 32]> {
        todo!()
    }
}

//! Keys and the cryptographic primitives built on them. FORMAT.md "Encryption".
//!
//! A repository is either plain or encrypted. An encrypted repository has a random 64-byte
//! [`MasterKey`]: 32 bytes keying BLAKE3 for blob ids (so ids reveal nothing about content) and
//! 32 bytes of data key for AEAD. The master key is stored only wrapped by a passphrase
//! ([`KeyFile`], Argon2id). Secrets never appear in `Debug` output and are zeroed on drop.
use serde::{Deserialize, Serialize};

use std::mem::MaybeUninit;

use ring::aead;
use zeroize::{Zeroize, Zeroizing};

pub(crate) mod file;
pub use file::{KdfParams, KeyFile, KEY_FILE_MAX, KEY_FILE_VERSION};

use crate::error::{Error, Result};
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
        let mut key = MasterKey {
            id_key: [0u8; 32],
            data_key: [0u8; 32],
        };
        getrandom::getrandom(&mut key.id_key).expect("the OS random source failed");
        getrandom::getrandom(&mut key.data_key).expect("the OS random source failed");
        key
    }

    /// Paper-copy text: human-readable, with a checksum, that [`MasterKey::import`] reads back.
    ///
    /// ```text
    /// vmkeep master key v1
    /// 0123 4567 89ab cdef 0123 4567 89ab cdef      (4 lines of 16 key bytes each)
    /// ...
    /// checksum: 89abcdef                           (first 8 hex digits of BLAKE3(key bytes))
    /// ```
    pub fn export(&self) -> String {
        let bytes = self.to_bytes();
        let mut out = String::from(EXPORT_HEADER);
        out.push('\n');
        for line in bytes.chunks(16) {
            let groups: Vec<String> = line.chunks(2).map(hex::encode).collect();
            out.push_str(&groups.join(" "));
            out.push('\n');
        }
        out.push_str("checksum: ");
        out.push_str(&export_checksum(&bytes));
        out.push('\n');
        out
    }

    /// Parse the text of [`MasterKey::export`]. Whitespace (spaces, tabs, line breaks) is
    /// ignored wherever it is; letters may be upper or lower case.
    pub fn import(text: &str) -> Result<MasterKey> {
        let invalid = |reason: String| Error::Invalid {
            what: "master key",
            reason,
        };
        if text.len() > 64 * 1024 {
            return Err(invalid("the text is far too long for a master key".into()));
        }
        // Whitespace carries no meaning: drop it all, then read header, digits, checksum.
        let mut compact = zeroize::Zeroizing::new(String::with_capacity(text.len()));
        compact.extend(
            text.chars()
                .filter(|c| !c.is_whitespace())
                .map(|c| c.to_ascii_lowercase()),
        );
        let header: String = EXPORT_HEADER.split_whitespace().collect();
        let rest = compact
            .strip_prefix(header.as_str())
            .ok_or_else(|| invalid(format!("the text does not start with {EXPORT_HEADER:?}")))?;
        let (digits, checksum) = rest
            .split_once("checksum")
            .ok_or_else(|| invalid("the checksum line is missing".into()))?;
        let checksum = checksum.strip_prefix(':').unwrap_or(checksum);
        if let Some(c) = digits.chars().find(|c| !c.is_ascii_hexdigit()) {
            return Err(invalid(format!("{c:?} is not a hexadecimal digit")));
        }
        if digits.len() != 128 {
            return Err(invalid(format!(
                "expected 128 hex digits (64 bytes), found {}",
                digits.len()
            )));
        }
        if checksum.len() != 8 || !checksum.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(format!(
                "the checksum must be 8 hex digits, found {checksum:?}"
            )));
        }
        let mut bytes = zeroize::Zeroizing::new([0u8; 64]);
        hex::decode_to_slice(digits, &mut bytes[..])
            .map_err(|e| invalid(format!("the key is not hexadecimal: {e}")))?;
        if checksum != export_checksum(&bytes) {
            return Err(invalid(
                "checksum mismatch: the key was mistyped or damaged".into(),
            ));
        }
        Ok(MasterKey::from_bytes(&bytes))
    }

    /// id_key || data_key.
    fn to_bytes(&self) -> zeroize::Zeroizing<[u8; 64]> {
        let mut b = zeroize::Zeroizing::new([0u8; 64]);
        b[..32].copy_from_slice(&self.id_key);
        b[32..].copy_from_slice(&self.data_key);
        b
    }

    pub(crate) fn from_bytes(bytes: &[u8; 64]) -> MasterKey {
        let mut key = MasterKey {
            id_key: [0u8; 32],
            data_key: [0u8; 32],
        };
        key.id_key.copy_from_slice(&bytes[..32]);
        key.data_key.copy_from_slice(&bytes[32..]);
        key
    }
}

const EXPORT_HEADER: &str = "vmkeep master key v1";

fn export_checksum(bytes: &[u8; 64]) -> String {
    hex::encode(&blake3::hash(bytes).as_bytes()[..4])
}

/// An AES-256-GCM key (ring) whose key schedule is wiped when it is dropped: ring's keys
/// implement neither `Zeroize` nor `Drop`, so their round keys and GHASH table would otherwise
/// stay in freed stack memory. Build it where it is used and do not move it: a move copies the
/// bytes and leaves the old copy unwiped.
pub(crate) struct WipedAesKey(MaybeUninit<aead::LessSafeKey>);

// Wiping the inline bytes wipes the whole schedule only because `LessSafeKey` owns no heap
// memory; owning any (Box, Vec, ...) would give it drop glue. Checked at compile time, so a
// ring upgrade that changes this fails the build instead of leaving key material unwiped.
const _: () = assert!(!std::mem::needs_drop::<aead::LessSafeKey>());

impl WipedAesKey {
    pub(crate) fn new(key: &[u8; 32]) -> WipedAesKey {
        WipedAesKey(MaybeUninit::new(aead::LessSafeKey::new(
            aead::UnboundKey::new(&aead::AES_256_GCM, key).expect("AES-256-GCM takes 32-byte keys"),
        )))
    }

    pub(crate) fn get(&self) -> &aead::LessSafeKey {
        // SAFETY: initialised by `new`; the only write afterwards is the wipe in `drop`, after
        // which the value is never read.
        unsafe { self.0.assume_init_ref() }
    }
}

impl Drop for WipedAesKey {
    fn drop(&mut self) {
        // Sound: `MaybeUninit` may hold any bytes (zeroing it breaks no invariant, unlike zeroing
        // the `&'static Algorithm` inside a live `LessSafeKey`), and the key's destructor is not
        // run, which skips nothing: `LessSafeKey` has no drop glue (asserted above). Copies made
        // while ring built the key (moves through its constructors' stack frames) are out of
        // reach; this wipes the copy that lives for the key's whole use.
        self.0.zeroize();
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
        match v {
            0 => Ok(BlobKind::Data),
            1 => Ok(BlobKind::Tree),
            _ => Err(Error::Corrupt {
                kind: "blob kind",
                reason: format!("unknown blob kind {v}"),
            }),
        }
    }
}

/// Key-derivation contexts (BLAKE3 derive_key). Frozen: changing one changes every id or MAC.
const TREE_NODE_CONTEXT: &str = "vmkeep 2026-11 tree node v1";
const TREE_ID_KEY_CONTEXT: &str = "vmkeep 2026-11 tree id key v1";
const CONFIG_MAC_CONTEXT: &str = "vmkeep 2026-11 config mac v1";

/// Length of [`Keys::seal`]'s overhead: nonce(24) + tag(16).
pub const SEAL_OVERHEAD: usize = SEAL_NONCE_LEN + 16;
pub(crate) const SEAL_NONCE_LEN: usize = 24;

/// Keys derived once from the master key.
#[derive(zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
struct DerivedKeys {
    /// BLAKE3 key for Tree blob ids: derive_key(TREE_ID_KEY_CONTEXT, id_key).
    tree_id_key: [u8; 32],
    /// BLAKE3 key for the config MAC: derive_key(CONFIG_MAC_CONTEXT, id_key || data_key).
    config_mac_key: [u8; 32],
}

impl DerivedKeys {
    fn new(master: &MasterKey) -> DerivedKeys {
        DerivedKeys {
            tree_id_key: blake3::derive_key(TREE_ID_KEY_CONTEXT, &master.id_key),
            config_mac_key: blake3::derive_key(CONFIG_MAC_CONTEXT, &master.to_bytes()[..]),
        }
    }
}

impl std::fmt::Debug for DerivedKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DerivedKeys(<redacted>)")
    }
}

/// The keys a repository operates with: plain (no master key) or encrypted.
/// Cheap to clone (an Arc inside is fine); Send + Sync.
#[derive(Clone, Debug)]
pub struct Keys {
    // implementation detail
    master: Option<std::sync::Arc<MasterKey>>,
    derived: Option<std::sync::Arc<DerivedKeys>>,
}

impl Keys {
    pub fn plain() -> Keys {
        Keys {
            master: None,
            derived: None,
        }
    }

    pub fn encrypted(master: MasterKey) -> Keys {
        let derived = DerivedKeys::new(&master);
        Keys {
            master: Some(std::sync::Arc::new(master)),
            derived: Some(std::sync::Arc::new(derived)),
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
    ///
    /// Exactly: Data plain = BLAKE3(p); Data encrypted = BLAKE3-keyed(id_key, p);
    /// Tree plain = BLAKE3-derive-key("vmkeep 2026-11 tree node v1", p);
    /// Tree encrypted = BLAKE3-keyed(derive_key("vmkeep 2026-11 tree id key v1", id_key), p).
    /// (An all-zero 256-bit output has probability 2^-256: it is not checked for.)
    pub fn blob_id(&self, kind: BlobKind, plaintext: &[u8]) -> BlobId {
        let hash = match (kind, &self.master, &self.derived) {
            (BlobKind::Data, None, _) => blake3::hash(plaintext),
            (BlobKind::Data, Some(m), _) => blake3::keyed_hash(&m.id_key, plaintext),
            (BlobKind::Tree, Some(_), Some(d)) => blake3::keyed_hash(&d.tree_id_key, plaintext),
            (BlobKind::Tree, _, _) => blake3::Hasher::new_derive_key(TREE_NODE_CONTEXT)
                .update(plaintext)
                .finalize(),
        };
        BlobId(*hash.as_bytes())
    }

    /// An incremental [`Keys::blob_id`] of kind Data, for a whole stream too long to hold:
    /// `DataHasher::finish` gives the id `blob_id(BlobKind::Data, all bytes)` would.
    pub fn data_hasher(&self) -> DataHasher {
        DataHasher(match &self.master {
            None => blake3::Hasher::new(),
            Some(m) => blake3::Hasher::new_keyed(&m.id_key),
        })
    }

    /// AEAD-seal `plaintext` with associated data `aad`. Output: nonce(24) || ciphertext || tag(16).
    /// Construction (FORMAT.md): per-message subkey = BLAKE3-keyed(data_key, nonce[..16]),
    /// AES-256-GCM (ring) with nonce[16..24] || 0u32. Panics if the repository is plain.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let master = self
            .master
            .as_ref()
            .expect("Keys::seal called on a plain repository");
        let mut nonce = [0u8; SEAL_NONCE_LEN];
        getrandom::getrandom(&mut nonce).expect("the OS random source failed");
        seal_with_nonce(master, &nonce, aad, plaintext)
    }

    /// Inverse of [`Keys::seal`]; Err(Error::Integrity) on any tampering or a wrong key.
    /// With plain keys: Err(Error::Corrupt) (sealed data cannot occur in a plain repository).
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>> {
        let Some(master) = self.master.as_ref() else {
            return Err(Error::Corrupt {
                kind: "sealed data",
                reason: "found encrypted data, but the repository is not encrypted".into(),
            });
        };
        if sealed.len() < SEAL_OVERHEAD {
            return Err(Error::Integrity {
                kind: "sealed data",
            });
        }
        let nonce: &[u8; SEAL_NONCE_LEN] = sealed[..SEAL_NONCE_LEN]
            .try_into()
            .expect("length checked above");
        let (subkey, gcm_nonce) = message_key(&master.data_key, nonce);
        let key = WipedAesKey::new(&subkey);
        let mut out = sealed[SEAL_NONCE_LEN..].to_vec();
        let len = key
            .get()
            .open_in_place(gcm_nonce, aead::Aad::from(aad), &mut out)
            .map_err(|_| Error::Integrity {
                kind: "sealed data",
            })?
            .len();
        out.truncate(len);
        Ok(out)
    }

    /// Keyed MAC (BLAKE3 in its own derive-key domain) used to authenticate the repository config.
    /// MAC = BLAKE3-keyed(derive_key("vmkeep 2026-11 config mac v1", id_key || data_key), bytes);
    /// None for a plain repository.
    pub fn config_mac(&self, bytes: &[u8]) -> Option<[u8; 32]> {
        self.derived
            .as_ref()
            .map(|d| *blake3::keyed_hash(&d.config_mac_key, bytes).as_bytes())
    }
}

/// See [`Keys::data_hasher`]. Its state (which holds the id key) is wiped on drop.
pub struct DataHasher(blake3::Hasher);

impl DataHasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(&self) -> BlobId {
        BlobId(*self.0.finalize().as_bytes())
    }
}

impl Drop for DataHasher {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for DataHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataHasher(<redacted>)")
    }
}

/// [`Keys::seal`] with a given nonce (known-answer vectors fix it; everything else uses a
/// random one).
pub(crate) fn seal_with_nonce(
    master: &MasterKey,
    nonce: &[u8; SEAL_NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Vec<u8> {
    let (subkey, gcm_nonce) = message_key(&master.data_key, nonce);
    let key = WipedAesKey::new(&subkey);
    let mut out = Vec::with_capacity(SEAL_OVERHEAD + plaintext.len());
    out.extend_from_slice(nonce);
    out.extend_from_slice(plaintext);
    let tag = key
        .get()
        .seal_in_place_separate_tag(gcm_nonce, aead::Aad::from(aad), &mut out[SEAL_NONCE_LEN..])
        .expect("AES-GCM sealing fails only beyond 64 GiB");
    out.extend_from_slice(tag.as_ref());
    out
}

/// The per-message AES-256-GCM key material and nonce of [`Keys::seal`]. The caller builds the
/// [`WipedAesKey`] where it uses it: moving one would leave an unwiped copy behind.
fn message_key(
    data_key: &[u8; 32],
    nonce: &[u8; SEAL_NONCE_LEN],
) -> (Zeroizing<[u8; 32]>, aead::Nonce) {
    let subkey = Zeroizing::new(*blake3::keyed_hash(data_key, &nonce[..16]).as_bytes());
    let mut gcm_nonce = [0u8; 12];
    gcm_nonce[..8].copy_from_slice(&nonce[16..]);
    (subkey, aead::Nonce::assume_unique_for_key(gcm_nonce))
}

#[cfg(test)]
mod tests;

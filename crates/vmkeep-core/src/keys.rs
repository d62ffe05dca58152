//! Keys and the cryptographic primitives built on them. FORMAT.md "Encryption".
//!
//! A repository is either plain or encrypted. An encrypted repository has a random 64-byte
//! [`MasterKey`]: 32 bytes keying BLAKE3 for blob ids (so ids reveal nothing about content) and
//! 32 bytes of data key for AEAD. The master key is stored only wrapped by a passphrase
//! ([`KeyFile`], Argon2id). Secrets never appear in `Debug` output and are zeroed on drop.
use serde::{Deserialize, Serialize};

use ring::aead;
use zeroize::Zeroize;

use crate::error::{Error, Result};
use crate::id::BlobId;
use crate::kind::ObjectKind;

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

    fn from_bytes(bytes: &[u8; 64]) -> MasterKey {
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

/// Current key file format version.
const KEY_FILE_VERSION: u32 = 1;
const KEY_FILE_KDF: &str = "argon2id";
const SALT_LEN: usize = 16;
const WRAP_NONCE_LEN: usize = 12;
/// nonce(12) || AES-256-GCM(64 key bytes) || tag(16)
const WRAPPED_LEN: usize = WRAP_NONCE_LEN + 64 + 16;
/// Bounds a hostile key file cannot exceed: 4 GiB of memory, 100 passes, 64 lanes.
const KDF_MAX_M_COST_KIB: u32 = 4 * 1024 * 1024;
const KDF_MAX_T_COST: u32 = 100;
const KDF_MAX_P_COST: u32 = 64;

impl KdfParams {
    /// Check the parameters are usable and within the bounds vmkeep accepts (memory at most
    /// 4 GiB, at most 100 passes, at most 64 lanes), so a hostile key file cannot make us
    /// allocate or spin absurdly.
    pub fn validate(&self) -> Result<()> {
        let invalid = |reason: String| Error::Invalid {
            what: "key derivation parameters",
            reason,
        };
        if self.p_cost == 0 || self.p_cost > KDF_MAX_P_COST {
            return Err(invalid(format!(
                "parallelism must be 1..={KDF_MAX_P_COST}, got {}",
                self.p_cost
            )));
        }
        if self.t_cost == 0 || self.t_cost > KDF_MAX_T_COST {
            return Err(invalid(format!(
                "passes must be 1..={KDF_MAX_T_COST}, got {}",
                self.t_cost
            )));
        }
        let min_m = 8 * self.p_cost;
        if self.m_cost_kib < min_m || self.m_cost_kib > KDF_MAX_M_COST_KIB {
            return Err(invalid(format!(
                "memory must be {min_m}..={KDF_MAX_M_COST_KIB} KiB, got {}",
                self.m_cost_kib
            )));
        }
        Ok(())
    }

    /// Argon2id(passphrase, salt) -> 32-byte key-encryption key.
    fn derive(&self, passphrase: &[u8], salt: &[u8]) -> Result<zeroize::Zeroizing<[u8; 32]>> {
        self.validate()?;
        let params = argon2::Params::new(self.m_cost_kib, self.t_cost, self.p_cost, Some(32))
            .map_err(|e| Error::Invalid {
                what: "key derivation parameters",
                reason: e.to_string(),
            })?;
        let kdf = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut kek = zeroize::Zeroizing::new([0u8; 32]);
        kdf.hash_password_into(passphrase, salt, &mut kek[..])
            .map_err(|e| Error::Invalid {
                what: "key derivation input",
                reason: e.to_string(),
            })?;
        Ok(kek)
    }
}

fn aes_key(key: &[u8; 32]) -> aead::LessSafeKey {
    aead::LessSafeKey::new(
        aead::UnboundKey::new(&aead::AES_256_GCM, key).expect("AES-256-GCM takes 32-byte keys"),
    )
}

impl KeyFile {
    /// Wrap `master` under `passphrase`: KEK = Argon2id(passphrase, random 16-byte salt, params);
    /// wrapped = hex(nonce(12) || AES-256-GCM(KEK, nonce, aad = "", id_key || data_key)).
    pub fn wrap(
        master: &MasterKey,
        passphrase: &[u8],
        params: KdfParams,
        hostname: &str,
    ) -> Result<KeyFile> {
        let mut salt = [0u8; SALT_LEN];
        getrandom::getrandom(&mut salt).expect("the OS random source failed");
        let mut nonce = [0u8; WRAP_NONCE_LEN];
        getrandom::getrandom(&mut nonce).expect("the OS random source failed");
        let kek = params.derive(passphrase, &salt)?;
        let mut in_out = zeroize::Zeroizing::new(Vec::with_capacity(WRAPPED_LEN));
        in_out.extend_from_slice(&master.to_bytes()[..]);
        aes_key(&kek)
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::empty(),
                &mut *in_out,
            )
            .expect("AES-GCM sealing 64 bytes cannot fail");
        let mut wrapped = Vec::with_capacity(WRAPPED_LEN);
        wrapped.extend_from_slice(&nonce);
        wrapped.extend_from_slice(&in_out);
        Ok(KeyFile {
            version: KEY_FILE_VERSION,
            kdf: KEY_FILE_KDF.to_string(),
            params,
            salt: hex::encode(salt),
            wrapped: hex::encode(wrapped),
            created: chrono::Utc::now(),
            hostname: hostname.to_string(),
        })
    }

    /// Err(Error::WrongPassphrase) when the passphrase does not unlock it.
    pub fn unwrap_key(&self, passphrase: &[u8]) -> Result<MasterKey> {
        self.validate()?;
        let salt = hex::decode(&self.salt).map_err(|e| corrupt_key_file(format!("salt: {e}")))?;
        let wrapped = hex::decode(&self.wrapped)
            .map_err(|e| corrupt_key_file(format!("wrapped key: {e}")))?;
        if wrapped.len() != WRAPPED_LEN {
            return Err(corrupt_key_file(format!(
                "wrapped key is {} bytes, expected {WRAPPED_LEN}",
                wrapped.len()
            )));
        }
        let kek = self.params.derive(passphrase, &salt)?;
        let mut nonce = [0u8; WRAP_NONCE_LEN];
        nonce.copy_from_slice(&wrapped[..WRAP_NONCE_LEN]);
        let mut in_out = zeroize::Zeroizing::new(wrapped[WRAP_NONCE_LEN..].to_vec());
        let plain = aes_key(&kek)
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::empty(),
                &mut in_out[..],
            )
            .map_err(|_| Error::WrongPassphrase)?;
        let bytes: &[u8; 64] = (&*plain)
            .try_into()
            .map_err(|_| corrupt_key_file("wrapped key has the wrong length".into()))?;
        Ok(MasterKey::from_bytes(bytes))
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a key file always serialises")
    }

    /// Bounded (64 KiB) and validated.
    pub fn from_json(bytes: &[u8]) -> Result<KeyFile> {
        let max = ObjectKind::Key.max_size();
        if bytes.len() as u64 > max {
            return Err(Error::TooLarge {
                kind: ObjectKind::Key.name(),
                size: bytes.len() as u64,
                max,
            });
        }
        let file: KeyFile =
            serde_json::from_slice(bytes).map_err(|e| corrupt_key_file(e.to_string()))?;
        file.validate()?;
        Ok(file)
    }

    /// Version, KDF name, KDF parameter bounds, salt and wrapped-key lengths.
    fn validate(&self) -> Result<()> {
        if self.version != KEY_FILE_VERSION {
            return Err(Error::UnsupportedVersion {
                kind: "key file",
                version: self.version,
                supported: KEY_FILE_VERSION,
            });
        }
        if self.kdf != KEY_FILE_KDF {
            return Err(corrupt_key_file(format!(
                "unknown key derivation {:?} (expected {KEY_FILE_KDF:?})",
                self.kdf
            )));
        }
        self.params
            .validate()
            .map_err(|e| corrupt_key_file(e.to_string()))?;
        if self.salt.len() != 2 * SALT_LEN || !self.salt.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(corrupt_key_file(format!(
                "salt must be {} hex digits",
                2 * SALT_LEN
            )));
        }
        if self.wrapped.len() != 2 * WRAPPED_LEN
            || !self.wrapped.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(corrupt_key_file(format!(
                "wrapped key must be {} hex digits",
                2 * WRAPPED_LEN
            )));
        }
        Ok(())
    }
}

fn corrupt_key_file(reason: String) -> Error {
    Error::Corrupt {
        kind: "key file",
        reason,
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
const SEAL_NONCE_LEN: usize = 24;

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
        let (key, gcm_nonce) = message_key(&master.data_key, &nonce);
        let mut out = Vec::with_capacity(SEAL_OVERHEAD + plaintext.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = key
            .seal_in_place_separate_tag(gcm_nonce, aead::Aad::from(aad), &mut out[SEAL_NONCE_LEN..])
            .expect("AES-GCM sealing fails only beyond 64 GiB");
        out.extend_from_slice(tag.as_ref());
        out
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
        let (key, gcm_nonce) = message_key(&master.data_key, nonce);
        let mut out = sealed[SEAL_NONCE_LEN..].to_vec();
        let len = key
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

/// The per-message AES-256-GCM key and nonce of [`Keys::seal`].
fn message_key(
    data_key: &[u8; 32],
    nonce: &[u8; SEAL_NONCE_LEN],
) -> (aead::LessSafeKey, aead::Nonce) {
    let mut subkey = *blake3::keyed_hash(data_key, &nonce[..16]).as_bytes();
    let key = aes_key(&subkey);
    subkey.zeroize();
    let mut gcm_nonce = [0u8; 12];
    gcm_nonce[..8].copy_from_slice(&nonce[16..]);
    (key, aead::Nonce::assume_unique_for_key(gcm_nonce))
}

#[cfg(test)]
mod tests;

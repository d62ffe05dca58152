//! Key files: the master key wrapped under a passphrase, stored as JSON in `keys/<name>`.
//! FORMAT.md §4 "Key files".
//!
//! Version 2 (written now): the wrap's AES-GCM associated data binds the KDF parameters and
//! salt, a plain BLAKE3 checksum tells a damaged file from a wrong passphrase, and no host name
//! is stored. Version 1 files (empty associated data, a plaintext `hostname`, no checksum) are
//! still read.
use ring::aead;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{MasterKey, WipedAesKey};
use crate::error::{Error, Result};

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
    /// Version 1 only: the host that wrote it. No longer written (it leaked in plaintext).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Version 2 only: hex BLAKE3(wrap AAD || wrapped bytes). Unkeyed: it detects damage, so a
    /// damaged file is not mistaken for a wrong passphrase. Authenticity comes from the AEAD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

/// Key file format written now.
pub const KEY_FILE_VERSION: u32 = 2;
const KEY_FILE_KDF: &str = "argon2id";
/// Largest key file `from_json` accepts (readers bound their read with it).
pub const KEY_FILE_MAX: usize = 64 * 1024;
pub(crate) const SALT_LEN: usize = 16;
pub(crate) const WRAP_NONCE_LEN: usize = 12;
/// nonce(12) || AES-256-GCM(64 key bytes) || tag(16)
pub(super) const WRAPPED_LEN: usize = WRAP_NONCE_LEN + 64 + 16;
/// Domain separation of the version 2 wrap AAD.
const WRAP_AAD_PREFIX: &[u8] = b"vmkeep 2026-11 key wrap v2";
/// Argon2 version 1.3 (0x13), bound into the version 2 wrap AAD.
const ARGON2_VERSION: u8 = 0x13;
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

    /// Argon2id version 0x13 (passphrase, salt; no secret, no associated data) -> 32-byte
    /// key-encryption key.
    pub(crate) fn derive(&self, passphrase: &[u8], salt: &[u8]) -> Result<Zeroizing<[u8; 32]>> {
        self.validate()?;
        let params = argon2::Params::new(self.m_cost_kib, self.t_cost, self.p_cost, Some(32))
            .map_err(|e| Error::Invalid {
                what: "key derivation parameters",
                reason: e.to_string(),
            })?;
        let kdf = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut kek = Zeroizing::new([0u8; 32]);
        kdf.hash_password_into(passphrase, salt, &mut kek[..])
            .map_err(|e| Error::Invalid {
                what: "key derivation input",
                reason: e.to_string(),
            })?;
        Ok(kek)
    }
}

/// The associated data of the key wrap. Version 2: "vmkeep 2026-11 key wrap v2" (26 ASCII bytes)
/// || Argon2 version u8 (0x13) || m_cost_kib u32 || t_cost u32 || p_cost u32 || salt (16).
/// The parameters and salt already shape the KEK; binding them again makes the wrap
/// self-describing and separates it from any other use of AES-GCM. Version 1: empty.
pub(crate) fn wrap_aad(version: u32, params: &KdfParams, salt: &[u8; SALT_LEN]) -> Vec<u8> {
    if version == 1 {
        return Vec::new();
    }
    let mut aad = Vec::with_capacity(WRAP_AAD_PREFIX.len() + 1 + 12 + SALT_LEN);
    aad.extend_from_slice(WRAP_AAD_PREFIX);
    aad.push(ARGON2_VERSION);
    aad.extend_from_slice(&params.m_cost_kib.to_le_bytes());
    aad.extend_from_slice(&params.t_cost.to_le_bytes());
    aad.extend_from_slice(&params.p_cost.to_le_bytes());
    aad.extend_from_slice(salt);
    aad
}

/// Version 2 checksum: BLAKE3(aad || wrapped bytes).
fn checksum(aad: &[u8], wrapped: &[u8]) -> blake3::Hash {
    blake3::Hasher::new().update(aad).update(wrapped).finalize()
}

impl KeyFile {
    /// Wrap `master` under `passphrase` (format version 2): KEK = Argon2id(passphrase, random
    /// 16-byte salt, params); wrapped = nonce(12) || AES-256-GCM(KEK, nonce, aad = [`wrap_aad`],
    /// id_key || data_key) || tag(16).
    pub fn wrap(master: &MasterKey, passphrase: &[u8], params: KdfParams) -> Result<KeyFile> {
        let mut salt = [0u8; SALT_LEN];
        getrandom::getrandom(&mut salt).expect("the OS random source failed");
        let mut nonce = [0u8; WRAP_NONCE_LEN];
        getrandom::getrandom(&mut nonce).expect("the OS random source failed");
        KeyFile::wrap_with(master, passphrase, params, salt, nonce)
    }

    /// [`KeyFile::wrap`] with a given salt and nonce (known-answer vectors fix them).
    pub(crate) fn wrap_with(
        master: &MasterKey,
        passphrase: &[u8],
        params: KdfParams,
        salt: [u8; SALT_LEN],
        nonce: [u8; WRAP_NONCE_LEN],
    ) -> Result<KeyFile> {
        let kek = params.derive(passphrase, &salt)?;
        let aad = wrap_aad(KEY_FILE_VERSION, &params, &salt);
        let mut in_out = Zeroizing::new(Vec::with_capacity(WRAPPED_LEN));
        in_out.extend_from_slice(&master.to_bytes()[..]);
        WipedAesKey::new(&kek)
            .get()
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(&aad[..]),
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
            checksum: Some(checksum(&aad, &wrapped).to_hex().to_string()),
            wrapped: hex::encode(wrapped),
            created: chrono::Utc::now(),
            hostname: None,
        })
    }

    /// Err(Error::WrongPassphrase) when the passphrase does not unlock it; Err(Corrupt) or
    /// Err(UnsupportedVersion) when the file is damaged or from a newer vmkeep.
    pub fn unwrap_key(&self, passphrase: &[u8]) -> Result<MasterKey> {
        let (salt, wrapped) = self.validate()?;
        let kek = self.params.derive(passphrase, &salt)?;
        let aad = wrap_aad(self.version, &self.params, &salt);
        let mut nonce = [0u8; WRAP_NONCE_LEN];
        nonce.copy_from_slice(&wrapped[..WRAP_NONCE_LEN]);
        let mut in_out = Zeroizing::new(wrapped[WRAP_NONCE_LEN..].to_vec());
        let key = WipedAesKey::new(&kek);
        let plain = key
            .get()
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(&aad[..]),
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

    /// Bounded (64 KiB) and validated, including the version 2 checksum: Err(Corrupt) for a
    /// damaged file, before any passphrase is tried.
    pub fn from_json(bytes: &[u8]) -> Result<KeyFile> {
        if bytes.len() > KEY_FILE_MAX {
            return Err(Error::TooLarge {
                kind: "key file",
                size: bytes.len() as u64,
                max: KEY_FILE_MAX as u64,
            });
        }
        let file: KeyFile =
            serde_json::from_slice(bytes).map_err(|e| corrupt_key_file(e.to_string()))?;
        file.validate()?;
        Ok(file)
    }

    /// Version, KDF name, KDF parameter bounds, salt and wrapped-key lengths, the fields of
    /// each version, and the version 2 checksum. Returns the decoded salt and wrapped key.
    fn validate(&self) -> Result<([u8; SALT_LEN], Vec<u8>)> {
        if !(1..=KEY_FILE_VERSION).contains(&self.version) {
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
        let mut salt = [0u8; SALT_LEN];
        hex::decode_to_slice(&self.salt, &mut salt)
            .map_err(|_| corrupt_key_file(format!("salt must be {} hex digits", 2 * SALT_LEN)))?;
        let wrapped = hex::decode(&self.wrapped)
            .ok()
            .filter(|w| w.len() == WRAPPED_LEN)
            .ok_or_else(|| {
                corrupt_key_file(format!(
                    "wrapped key must be {} hex digits",
                    2 * WRAPPED_LEN
                ))
            })?;
        match (self.version, &self.checksum, &self.hostname) {
            (1, None, _) => {}
            (1, Some(_), _) => {
                return Err(corrupt_key_file("a version 1 file has no checksum".into()))
            }
            (_, Some(sum), None) => {
                let mut found = [0u8; 32];
                hex::decode_to_slice(sum, &mut found)
                    .map_err(|_| corrupt_key_file("checksum must be 64 hex digits".into()))?;
                let aad = wrap_aad(self.version, &self.params, &salt);
                if checksum(&aad, &wrapped) != blake3::Hash::from_bytes(found) {
                    return Err(corrupt_key_file(
                        "checksum mismatch: the salt, parameters or wrapped key were damaged"
                            .into(),
                    ));
                }
            }
            (_, None, _) => return Err(corrupt_key_file("the checksum is missing".into())),
            (_, Some(_), Some(_)) => {
                return Err(corrupt_key_file(format!(
                    "a version {} file has no hostname",
                    self.version
                )))
            }
        }
        Ok((salt, wrapped))
    }
}

fn corrupt_key_file(reason: String) -> Error {
    Error::Corrupt {
        kind: "key file",
        reason,
    }
}

//! The repository config object (`config`): plain JSON, readable before any key is unlocked,
//! authenticated by a MAC under the master key in encrypted repositories. FORMAT.md "Config".
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::keys::Keys;

pub const CONFIG_MAGIC: &str = "vmkeep-repository";
pub const CONFIG_VERSION: u32 = 1;
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
pub const MAX_CHUNK_SIZE: u32 = 4 << 20;
pub const DEFAULT_CHUNK_SIZE: u32 = 64 << 10;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    pub magic: String,
    pub version: u32,
    /// 16 random bytes, hex.
    pub id: String,
    pub chunk_size: u32,
    pub encrypted: bool,
    /// Target size of pack objects in bytes.
    pub pack_size: u32,
    pub created: chrono::DateTime<chrono::Utc>,
    /// hex MAC over the config with `mac` set to None (encrypted repositories only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl RepoConfig {
    pub fn new(chunk_size: u32, encrypted: bool) -> Result<RepoConfig> {
        todo!()
    }

    /// Validates chunk size (power of two, multiple of 64 KiB, <= 4 MiB) and pack size.
    pub fn validate_chunk_size(chunk_size: u32) -> Result<()> {
        todo!()
    }

    /// Serialise, adding the MAC when `keys` is encrypted.
    pub fn to_json(&self, keys: &Keys) -> Vec<u8> {
        todo!()
    }

    /// Parse without verifying the MAC (the key is not unlocked yet). Bounded to 64 KiB.
    /// Err(BadMagic) for a JSON file that is not a vmkeep config.
    pub fn parse(bytes: &[u8]) -> Result<RepoConfig> {
        todo!()
    }

    /// Verify the MAC once keys are available (Err(Integrity) on mismatch).
    pub fn verify(&self, keys: &Keys) -> Result<()> {
        todo!()
    }
}

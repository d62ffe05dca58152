//! The repository config object (`config`): plain JSON, readable before any key is unlocked,
//! authenticated by a MAC under the master key in encrypted repositories. FORMAT.md "Config".
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::kind::ObjectKind;

pub const CONFIG_MAGIC: &str = "vmkeep-repository";
/// Version written now. Version 1 (earlier builds) differs only in the bytes the MAC covers and
/// is still read.
pub const CONFIG_VERSION: u32 = 2;
/// Domain separation of the version 2 MAC input.
const MAC_INPUT_PREFIX: &[u8] = b"vmkeep 2026-11 config v2";
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

/// Default target size of pack objects.
pub const DEFAULT_PACK_SIZE: u32 = 16 << 20;
pub const MIN_PACK_SIZE: u32 = 1 << 20;
pub const MAX_PACK_SIZE: u32 = 256 << 20;
const KIND: &str = "repository config";

impl RepoConfig {
    pub fn new(chunk_size: u32, encrypted: bool) -> Result<RepoConfig> {
        RepoConfig::validate_chunk_size(chunk_size)?;
        let mut id = [0u8; 16];
        getrandom::getrandom(&mut id).expect("the OS random source failed");
        Ok(RepoConfig {
            magic: CONFIG_MAGIC.to_string(),
            version: CONFIG_VERSION,
            id: hex::encode(id),
            chunk_size,
            encrypted,
            pack_size: DEFAULT_PACK_SIZE,
            created: chrono::Utc::now(),
            mac: None,
        })
    }

    /// Validates chunk size (power of two, multiple of 64 KiB, <= 4 MiB) and pack size.
    /// (A power of two of at least 64 KiB is a multiple of 64 KiB.)
    pub fn validate_chunk_size(chunk_size: u32) -> Result<()> {
        if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
        {
            return Err(Error::Invalid {
                what: "chunk size",
                reason: format!(
                    "chunk size must be a power of two between 64 KiB and 4 MiB, got {}",
                    describe_size(chunk_size as u64)
                ),
            });
        }
        Ok(())
    }

    /// Pack size within 1 MiB..=256 MiB.
    pub fn validate_pack_size(pack_size: u32) -> Result<()> {
        if !(MIN_PACK_SIZE..=MAX_PACK_SIZE).contains(&pack_size) {
            return Err(Error::Invalid {
                what: "pack size",
                reason: format!(
                    "pack size must be between 1 MiB and 256 MiB, got {}",
                    describe_size(pack_size as u64)
                ),
            });
        }
        Ok(())
    }

    /// The bytes the MAC covers (FORMAT.md §3), computed from the parsed values so the stored
    /// file's whitespace and field order do not matter. Version 2, 65 bytes:
    /// "vmkeep 2026-11 config v2" (24 ASCII bytes) || version u32 || id (16 bytes, the hex
    /// decoded) || chunk_size u32 || encrypted u8 (0 or 1) || pack_size u32 || created as Unix
    /// seconds i64 || created's nanoseconds u32 (little-endian). Version 1: compact serde JSON of
    /// the config without `mac`, which only this implementation reproduces reliably (chrono's
    /// choice of fractional digits), hence version 2.
    pub(crate) fn mac_input(&self) -> Vec<u8> {
        if self.version == 1 {
            let mut c = self.clone();
            c.mac = None;
            return serde_json::to_vec(&c).expect("a config always serialises");
        }
        let mut id = [0u8; 16];
        // parse() checked the id is 32 hex digits; a config built in memory has one too.
        hex::decode_to_slice(&self.id, &mut id).expect("the config id is 32 hex digits");
        let mut out = Vec::with_capacity(MAC_INPUT_PREFIX.len() + 41);
        out.extend_from_slice(MAC_INPUT_PREFIX);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&id);
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.push(self.encrypted as u8);
        out.extend_from_slice(&self.pack_size.to_le_bytes());
        out.extend_from_slice(&self.created.timestamp().to_le_bytes());
        out.extend_from_slice(&self.created.timestamp_subsec_nanos().to_le_bytes());
        out
    }

    /// Serialise, adding the MAC when `keys` is encrypted.
    pub fn to_json(&self, keys: &Keys) -> Vec<u8> {
        let mut c = self.clone();
        c.mac = keys.config_mac(&self.mac_input()).map(hex::encode);
        let mut out = serde_json::to_vec_pretty(&c).expect("a config always serialises");
        out.push(b'\n');
        out
    }

    /// Parse without verifying the MAC (the key is not unlocked yet). Bounded to 64 KiB.
    /// Err(BadMagic) for a JSON file that is not a vmkeep config.
    pub fn parse(bytes: &[u8]) -> Result<RepoConfig> {
        let max = ObjectKind::Config.max_size();
        if bytes.len() as u64 > max {
            return Err(Error::TooLarge {
                kind: KIND,
                size: bytes.len() as u64,
                max,
            });
        }
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|_| Error::BadMagic { kind: KIND })?;
        if value.get("magic").and_then(|m| m.as_str()) != Some(CONFIG_MAGIC) {
            return Err(Error::BadMagic { kind: KIND });
        }
        // Check the version before the fields: a newer version may add fields.
        if let Some(v) = value.get("version").and_then(|v| v.as_u64()) {
            if v > CONFIG_VERSION as u64 {
                return Err(Error::UnsupportedVersion {
                    kind: KIND,
                    version: u32::try_from(v).unwrap_or(u32::MAX),
                    supported: CONFIG_VERSION,
                });
            }
        }
        let corrupt = |reason: String| Error::Corrupt { kind: KIND, reason };
        let config: RepoConfig =
            serde_json::from_value(value).map_err(|e| corrupt(e.to_string()))?;
        if config.version == 0 {
            return Err(corrupt(format!("invalid version {}", config.version)));
        }
        // chrono represents a leap second (:60) as nanoseconds beyond 10^9; no writer produces
        // one, and refusing it keeps the MAC input's nanosecond field below 10^9.
        if config.created.timestamp_subsec_nanos() >= 1_000_000_000 {
            return Err(corrupt("created must not be a leap second".into()));
        }
        let id_ok = config.id.len() == 32
            && config
                .id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !id_ok {
            return Err(corrupt(format!(
                "id must be 32 lowercase hex digits, got {:?}",
                config.id
            )));
        }
        RepoConfig::validate_chunk_size(config.chunk_size).map_err(|e| corrupt(e.to_string()))?;
        RepoConfig::validate_pack_size(config.pack_size).map_err(|e| corrupt(e.to_string()))?;
        Ok(config)
    }

    /// Verify the MAC once keys are available (Err(Integrity) on mismatch).
    /// Plain keys: the config must say `encrypted: false` and carry no MAC (else Err(Corrupt)).
    /// Encrypted keys: the config must say `encrypted: true` and carry the right MAC.
    pub fn verify(&self, keys: &Keys) -> Result<()> {
        let Some(expected) = keys.config_mac(&self.mac_input()) else {
            if self.encrypted {
                return Err(Error::Corrupt {
                    kind: KIND,
                    reason: "the repository is encrypted, but no key was used to open it".into(),
                });
            }
            if self.mac.is_some() {
                return Err(Error::Corrupt {
                    kind: KIND,
                    reason: "a plain repository's config carries a MAC".into(),
                });
            }
            return Ok(());
        };
        let mut found = [0u8; 32];
        let ok = self.encrypted
            && self
                .mac
                .as_deref()
                .is_some_and(|m| hex::decode_to_slice(m, &mut found).is_ok())
            // blake3::Hash compares in constant time.
            && blake3::Hash::from_bytes(found) == blake3::Hash::from_bytes(expected);
        if !ok {
            return Err(Error::Integrity { kind: KIND });
        }
        Ok(())
    }
}

/// "64 KiB", "4 MiB" or a plain byte count.
fn describe_size(n: u64) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{} MiB ({n} bytes)", n >> 20)
    } else if n >= 1 << 10 && n % (1 << 10) == 0 {
        format!("{} KiB ({n} bytes)", n >> 10)
    } else {
        format!("{n} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::MasterKey;
    use proptest::prelude::*;

    #[test]
    fn new_defaults() {
        let c = RepoConfig::new(DEFAULT_CHUNK_SIZE, true).unwrap();
        assert_eq!(c.magic, CONFIG_MAGIC);
        assert_eq!(c.version, CONFIG_VERSION);
        assert_eq!(c.id.len(), 32);
        assert_ne!(c.id, RepoConfig::new(DEFAULT_CHUNK_SIZE, true).unwrap().id);
        assert_eq!(c.pack_size, 16 << 20);
        assert!(c.encrypted);
        assert_eq!(c.mac, None);
        assert!(RepoConfig::new(1000, false).is_err());
    }

    #[test]
    fn chunk_sizes() {
        for ok in [64 << 10, 128 << 10, 256 << 10, 1 << 20, 4 << 20] {
            RepoConfig::validate_chunk_size(ok).unwrap();
        }
        for bad in [
            0,
            1,
            4096,
            32 << 10,
            96 << 10,
            (64 << 10) + 1,
            8 << 20,
            u32::MAX,
        ] {
            let err = RepoConfig::validate_chunk_size(bad).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains("chunk size must be a power of two between 64 KiB and 4 MiB"),
                "{msg}"
            );
            assert!(msg.contains(&bad.to_string()), "{msg}");
        }
        assert!(RepoConfig::validate_chunk_size(96 << 10)
            .unwrap_err()
            .to_string()
            .contains("96 KiB"));
    }

    #[test]
    fn plain_round_trip() {
        let keys = Keys::plain();
        let c = RepoConfig::new(1 << 20, false).unwrap();
        let json = c.to_json(&keys);
        assert!(!String::from_utf8_lossy(&json).contains("mac"));
        let back = RepoConfig::parse(&json).unwrap();
        assert_eq!(back, c);
        back.verify(&keys).unwrap();
        // Wrong mode.
        let enc = Keys::encrypted(MasterKey::generate());
        assert!(matches!(back.verify(&enc), Err(Error::Integrity { .. })));
    }

    #[test]
    fn encrypted_round_trip_and_mac() {
        let keys = Keys::encrypted(MasterKey::generate());
        let c = RepoConfig::new(DEFAULT_CHUNK_SIZE, true).unwrap();
        let json = c.to_json(&keys);
        let back = RepoConfig::parse(&json).unwrap();
        assert_eq!(back.mac.as_ref().unwrap().len(), 64);
        assert_eq!(
            RepoConfig {
                mac: None,
                ..back.clone()
            },
            c
        );
        back.verify(&keys).unwrap();
        // Serialising again (with the mac set) gives the same mac.
        assert_eq!(RepoConfig::parse(&back.to_json(&keys)).unwrap(), back);
        // Reformatted JSON still verifies: the MAC covers values, not whitespace.
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let compact = serde_json::to_vec(&v).unwrap();
        RepoConfig::parse(&compact).unwrap().verify(&keys).unwrap();
        // Another key, or any edited field, fails.
        let other = Keys::encrypted(MasterKey::generate());
        assert!(matches!(back.verify(&other), Err(Error::Integrity { .. })));
        let edits: Vec<RepoConfig> = vec![
            RepoConfig {
                chunk_size: 128 << 10,
                ..back.clone()
            },
            RepoConfig {
                pack_size: 32 << 20,
                ..back.clone()
            },
            RepoConfig {
                encrypted: false,
                ..back.clone()
            },
            RepoConfig {
                id: "00".repeat(16),
                ..back.clone()
            },
            RepoConfig {
                mac: None,
                ..back.clone()
            },
            RepoConfig {
                mac: Some("zz".into()),
                ..back.clone()
            },
            RepoConfig {
                mac: Some("00".repeat(32)),
                ..back.clone()
            },
        ];
        for e in edits {
            assert!(
                matches!(e.verify(&keys), Err(Error::Integrity { .. })),
                "{e:?}"
            );
        }
        // Plain keys on an encrypted config.
        assert!(back.verify(&Keys::plain()).is_err());
        let mut plain_with_mac = RepoConfig::new(DEFAULT_CHUNK_SIZE, false).unwrap();
        plain_with_mac.mac = Some("00".repeat(32));
        assert!(plain_with_mac.verify(&Keys::plain()).is_err());
    }

    /// Version 2's MAC input is the documented fixed layout, whatever the JSON looks like.
    #[test]
    fn mac_input_layout() {
        let c = RepoConfig {
            magic: CONFIG_MAGIC.into(),
            version: 2,
            id: "000102030405060708090a0b0c0d0e0f".into(),
            chunk_size: 1 << 20,
            encrypted: true,
            pack_size: 16 << 20,
            created: "2026-11-02T04:04:05.5+01:00".parse().unwrap(),
            mac: Some("ignored".into()),
        };
        let input = c.mac_input();
        assert_eq!(input.len(), 65);
        assert_eq!(&input[..24], b"vmkeep 2026-11 config v2");
        assert_eq!(input[24..28], 2u32.to_le_bytes());
        assert_eq!(
            input[28..44],
            core::array::from_fn::<u8, 16, _>(|i| i as u8)
        );
        assert_eq!(input[44..48], (1u32 << 20).to_le_bytes());
        assert_eq!(input[48], 1);
        assert_eq!(input[49..53], (16u32 << 20).to_le_bytes());
        assert_eq!(input[53..61], 1_793_588_645i64.to_le_bytes());
        assert_eq!(input[61..65], 500_000_000u32.to_le_bytes());
    }

    /// Version 1 configs (earlier builds) keep verifying with their JSON MAC input, and a
    /// config cannot be moved between versions without the key.
    #[test]
    fn version_1_configs_still_verify() {
        let keys = Keys::encrypted(MasterKey::generate());
        let mut c = RepoConfig::new(DEFAULT_CHUNK_SIZE, true).unwrap();
        c.version = 1;
        assert!(c
            .mac_input()
            .starts_with(b"{\"magic\":\"vmkeep-repository\",\"version\":1,"));
        let back = RepoConfig::parse(&c.to_json(&keys)).unwrap();
        assert_eq!(back.version, 1);
        back.verify(&keys).unwrap();
        let bumped = RepoConfig {
            version: 2,
            ..back.clone()
        };
        assert!(matches!(bumped.verify(&keys), Err(Error::Integrity { .. })));
        let edited = RepoConfig {
            chunk_size: 128 << 10,
            ..back
        };
        assert!(matches!(edited.verify(&keys), Err(Error::Integrity { .. })));
    }

    #[test]
    fn parse_errors() {
        let c = RepoConfig::new(DEFAULT_CHUNK_SIZE, false).unwrap();
        let json = c.to_json(&Keys::plain());
        let edit = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v: serde_json::Value = serde_json::from_slice(&json).unwrap();
            f(&mut v);
            RepoConfig::parse(&serde_json::to_vec(&v).unwrap())
        };
        for not_ours in [
            &b"not json"[..],
            b"[]",
            b"{}",
            b"{\"magic\":\"restic\"}",
            b"42",
            b"",
        ] {
            assert!(matches!(
                RepoConfig::parse(not_ours),
                Err(Error::BadMagic {
                    kind: "repository config"
                })
            ));
        }
        assert!(matches!(
            edit(&|v| v["magic"] = "other".into()),
            Err(Error::BadMagic { .. })
        ));
        assert!(matches!(
            edit(&|v| {
                v["version"] = 3.into();
                v["new_field"] = 1.into();
            }),
            Err(Error::UnsupportedVersion {
                version: 3,
                supported: 2,
                ..
            })
        ));
        assert!(matches!(
            edit(&|v| v["version"] = 0.into()),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            edit(&|v| v["extra"] = 0.into()),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            edit(&|v| v["chunk_size"] = 1000.into()),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            edit(&|v| v["pack_size"] = (512u32 << 20).into()),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            edit(&|v| v["pack_size"] = 1000.into()),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            edit(&|v| v["id"] = "xyz".into()),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            edit(&|v| v
                .as_object_mut()
                .unwrap()
                .remove("created")
                .map(|_| ())
                .unwrap()),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            edit(&|v| v["created"] = "2026-12-31T23:59:60.5Z".into()),
            Err(Error::Corrupt { .. })
        ));
        assert!(edit(&|v| v["pack_size"] = (256u32 << 20).into()).is_ok());
        let mut big = json.clone();
        big.extend(std::iter::repeat_n(b' ', 64 * 1024));
        assert!(matches!(
            RepoConfig::parse(&big),
            Err(Error::TooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn prop_round_trip(shift in 0u32..=6, pack in (1u32 << 20)..=(256 << 20), enc in any::<bool>()) {
            let keys = if enc { Keys::encrypted(MasterKey::generate()) } else { Keys::plain() };
            let mut c = RepoConfig::new(MIN_CHUNK_SIZE << shift, enc).unwrap();
            c.pack_size = pack;
            let back = RepoConfig::parse(&c.to_json(&keys)).unwrap();
            back.verify(&keys).unwrap();
            prop_assert_eq!(RepoConfig { mac: None, ..back }, c);
        }

        #[test]
        fn prop_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = RepoConfig::parse(&bytes);
        }

        #[test]
        fn prop_parse_never_panics_on_json(text in "\\{\"magic\":\"vmkeep-repository\",[ -~]{0,200}") {
            if let Ok(c) = RepoConfig::parse(text.as_bytes()) {
                let _ = c.verify(&Keys::plain());
                let _ = c.verify(&Keys::encrypted(MasterKey::generate()));
            }
        }
    }
}

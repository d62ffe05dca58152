//! Typed ids. They print as lowercase hex; `Display` with `{:#}` prints the short (8 digit) form.
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

use crate::error::{Error, Result};

macro_rules! hex_id {
    ($(#[$doc:meta])* $name:ident, $len:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            pub const LEN: usize = $len;

            pub fn from_slice(bytes: &[u8]) -> Result<Self> {
                let arr: [u8; $len] = bytes.try_into().map_err(|_| Error::Invalid {
                    what: stringify!($name),
                    reason: format!("expected {} bytes, got {}", $len, bytes.len()),
                })?;
                Ok(Self(arr))
            }

            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }

            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }

            /// The first 8 hex digits, for humans.
            pub fn short(&self) -> String {
                hex::encode(&self.0[..4])
            }

            pub fn random() -> Self {
                let mut b = [0u8; $len];
                getrandom::getrandom(&mut b).expect("the OS random source failed");
                Self(b)
            }
        }

        impl std::str::FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                let v = hex::decode(s).map_err(|e| Error::Invalid {
                    what: stringify!($name),
                    reason: format!("{s:?} is not hex: {e}"),
                })?;
                Self::from_slice(&v)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                if f.alternate() {
                    f.write_str(&self.short())
                } else {
                    f.write_str(&self.to_hex())
                }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

hex_id!(
    /// Content address of a blob (a disk chunk, a stream chunk, an index tree node or a metadata
    /// blob): BLAKE3 of its plaintext, keyed in encrypted repositories. See FORMAT.md "Ids".
    BlobId,
    32
);
hex_id!(
    /// Name of a pack object: BLAKE3 of the pack's stored bytes.
    PackId,
    32
);
hex_id!(
    /// A restore point's id: 16 random bytes, fixed at creation and kept when the manifest is
    /// rewritten (forget merges change maps into a successor's manifest).
    SnapshotId,
    16
);

hex_id!(
    /// A lease's name (`locks/<id>`): 16 random bytes chosen by its holder.
    LeaseId,
    16
);
hex_id!(
    /// A GC record's name (`gc/<id>`): 16 random bytes chosen by the prune that wrote it.
    GcRecordId,
    16
);
hex_id!(
    /// A machine's vmkeep host id: 16 random bytes kept in a state file (FORMAT.md §13).
    HostId,
    16
);

impl BlobId {
    /// The id standing for an all-zero chunk, or a whole subtree of zero chunks in a disk index.
    /// Zero data is never stored.
    pub const ZERO: BlobId = BlobId([0u8; 32]);

    pub fn is_zero(&self) -> bool {
        self.0 == [0u8; 32]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_short_form() {
        let id = SnapshotId::random();
        let s = id.to_string();
        assert_eq!(s.len(), 32);
        assert_eq!(s.parse::<SnapshotId>().unwrap(), id);
        assert_eq!(format!("{id:#}"), s[..8]);
        assert!("zz".parse::<SnapshotId>().is_err());
        assert!("abcd".parse::<SnapshotId>().is_err());
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<SnapshotId>(&json).unwrap(), id);
    }
}

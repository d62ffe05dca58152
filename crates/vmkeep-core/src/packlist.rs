//! A restore point's pack list (`refs/<snapshot id>`, docs/PROTOCOL.md §5): plain JSON naming
//! its VM and every pack holding a blob it references. Served repositories keep one beside each
//! manifest so the server, which cannot read an encrypted manifest, can scope tokens to VMs.
use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::{PackId, SnapshotId};

pub const PACK_LIST_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackList {
    pub version: u32,
    pub snapshot: SnapshotId,
    pub vm: String,
    /// Ascending, each once.
    pub packs: BTreeSet<PackId>,
}

impl PackList {
    pub fn new(snapshot: SnapshotId, vm: &str, packs: BTreeSet<PackId>) -> PackList {
        PackList {
            version: PACK_LIST_VERSION,
            snapshot,
            vm: vm.to_string(),
            packs,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a pack list serialises")
    }

    /// Parse and validate (version, VM name). The caller bounds the bytes (16 MiB).
    pub fn from_json(bytes: &[u8]) -> Result<PackList> {
        let l: PackList = serde_json::from_slice(bytes).map_err(|e| Error::Corrupt {
            kind: "pack list",
            reason: e.to_string(),
        })?;
        if l.version != PACK_LIST_VERSION {
            return Err(Error::UnsupportedVersion {
                kind: "pack list",
                version: l.version,
                supported: PACK_LIST_VERSION,
            });
        }
        crate::manifest::validate_name("VM name", &l.vm)?;
        Ok(l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let l = PackList::new(
            SnapshotId([7; 16]),
            "web1",
            [PackId([1; 32]), PackId([2; 32])].into_iter().collect(),
        );
        assert_eq!(PackList::from_json(&l.to_json()).unwrap(), l);
        let bad_vm = String::from_utf8(l.to_json())
            .unwrap()
            .replace("web1", "../x");
        assert!(PackList::from_json(bad_vm.as_bytes()).is_err());
        let extra = String::from_utf8(l.to_json())
            .unwrap()
            .replace("{\"version\"", "{\"x\":1,\"version\"");
        assert!(PackList::from_json(extra.as_bytes()).is_err());
        assert!(PackList::from_json(b"{").is_err());
    }
}

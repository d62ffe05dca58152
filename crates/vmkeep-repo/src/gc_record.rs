//! Pending GC records (`gc/<name>`): packs condemned by a prune, deleted by a later sweep once
//! every backup that could have decided to reuse their blobs has ended. FORMAT.md "GC".
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use vmkeep_core::object::{self, ObjectKind};
use vmkeep_core::PackId;
use vmkeep_store::{Key, Kind};

use crate::error::{Error, Result};
use crate::Repository;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcRecord {
    pub created: DateTime<Utc>,
    pub host: String,
    pub pid: u32,
    pub condemned: Vec<PackId>,
}

pub fn load_all(repo: &Repository) -> Result<Vec<(Key, GcRecord)>> {
    let mut out = Vec::new();
    for meta in repo.store.list(Kind::Gc)? {
        let bytes = match repo
            .store
            .get(&meta.key, ObjectKind::GcRecord.max_size() as u64)
        {
            Ok(b) => b,
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        let rec = object::open(&repo.keys, ObjectKind::GcRecord, &bytes)
            .map_err(|e| Error::corrupt(meta.key.to_string(), e))
            .and_then(|body| {
                serde_json::from_slice::<GcRecord>(&body).map_err(|e| {
                    Error::corrupt(
                        meta.key.to_string(),
                        vmkeep_core::Error::Corrupt {
                            kind: "gc record",
                            reason: e.to_string(),
                        },
                    )
                })
            })?;
        out.push((meta.key, rec));
    }
    out.sort_by_key(|(_, r)| r.created);
    Ok(out)
}

pub fn write(repo: &Repository, rec: &GcRecord) -> Result<Key> {
    let body = serde_json::to_vec(rec).expect("gc records serialise");
    let key = Key::new(Kind::Gc, hex::encode(vmkeep_core::SnapshotId::random().0))?;
    repo.store
        .put(&key, &object::seal(&repo.keys, ObjectKind::GcRecord, &body))?;
    Ok(key)
}

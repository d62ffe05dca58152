//! GC records (`gc/<record id>`): packs condemned by a prune, deleted by a later sweep once
//! every backup that could have decided to reuse their blobs has ended. FORMAT.md §13.
//!
//! A record is written **unsealed** (`waiting: null`), then, once it has landed, the prune
//! lists the leases and rewrites it **sealed** with the ids of the live ones: exactly the
//! operations that might not have seen the record (a backup reads the records after its lease
//! landed, so one whose read missed the record had a lease in that listing). The record may be
//! swept when none of them is alive any more. A prune that dies between the two writes leaves
//! an unsealed record; the next prune seals it the same way (a later listing is a superset of
//! what is still running of the earlier one). No clocks are compared.
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use vmkeep_core::object::{self, ObjectKind};
use vmkeep_core::{GcRecordId, LeaseId, PackId};
use vmkeep_store::{Key, Kind};

use crate::error::{Error, Result};
use crate::lease::HostIdentity;
use crate::Repository;

pub const GC_RECORD_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcRecord {
    pub version: u32,
    /// When the prune wrote it (informational: nothing compares it).
    pub created: DateTime<Utc>,
    pub host: HostIdentity,
    pub pid: u32,
    pub condemned: Vec<PackId>,
    /// The leases listed after the record landed; None until then.
    pub waiting: Option<Vec<LeaseId>>,
}

pub(crate) fn record_key(id: &GcRecordId) -> Key {
    Key::new(Kind::Gc, id.to_hex()).expect("hex names are valid keys")
}

/// Every GC record, or the first unreadable one as an error: a damaged record could condemn
/// anything, so neither a backup nor a prune may proceed without knowing it (the message
/// says how to get past it).
pub fn load_all(repo: &Repository) -> Result<Vec<(GcRecordId, GcRecord)>> {
    let mut out = Vec::new();
    for meta in repo.store.list(Kind::Gc)? {
        let Ok(id) = meta.key.name.parse::<GcRecordId>() else {
            tracing::warn!(object = %meta.key, "ignoring a gc object whose name is not a record id");
            continue;
        };
        let bytes = match repo.store.get(&meta.key) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => continue, // swept meanwhile
            Err(e) => return Err(e.into()),
        };
        let rec = object::open(&repo.keys, ObjectKind::GcRecord, &bytes)
            .and_then(|body| {
                serde_json::from_slice::<GcRecord>(&body).map_err(|e| vmkeep_core::Error::Corrupt {
                    kind: "gc record",
                    reason: e.to_string(),
                })
            })
            .map_err(|e| Error::corrupt(meta.key.to_string(), e))?;
        out.push((id, rec));
    }
    out.sort_by_key(|(id, r)| (r.created, *id));
    Ok(out)
}

/// Write (or rewrite, to seal it) a record.
pub fn put(repo: &Repository, id: &GcRecordId, rec: &GcRecord) -> Result<()> {
    let body = serde_json::to_vec(rec).expect("gc records serialise");
    repo.store.put(
        &record_key(id),
        &object::seal(&repo.keys, ObjectKind::GcRecord, &body),
    )?;
    Ok(())
}

impl GcRecord {
    pub fn new(condemned: Vec<PackId>) -> GcRecord {
        GcRecord {
            version: GC_RECORD_VERSION,
            created: Utc::now(),
            host: HostIdentity::current().clone(),
            pid: std::process::id(),
            condemned,
            waiting: None,
        }
    }
}

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
use vmkeep_core::{object, ObjectKind};
use vmkeep_core::{GcRecordId, LeaseId, PackId};
use vmkeep_store::Key;

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
    Key::new(ObjectKind::GcRecord, id.to_hex()).expect("hex names are valid keys")
}

/// The GC records, read in one pass.
#[derive(Debug, Default)]
pub struct Records {
    pub records: Vec<(GcRecordId, GcRecord)>,
    /// Records that cannot be read. Nobody can sweep them (a sweep needs to read a record), so
    /// their packs stay: a backup may ignore them, and a prune replaces them (it condemns
    /// afresh whatever is still unreferenced, in a record of its own, then deletes them).
    pub damaged: Vec<(GcRecordId, Error)>,
}

impl Records {
    /// Packs condemned by the readable records.
    pub fn condemned(&self) -> std::collections::HashSet<PackId> {
        self.records
            .iter()
            .flat_map(|(_, r)| r.condemned.iter().copied())
            .collect()
    }

    pub fn warn_damaged(&self) {
        for (id, e) in &self.damaged {
            tracing::warn!(record = %id, error = %e, "ignoring a damaged GC record (the next prune replaces it)");
        }
    }
}

/// Every GC record, oldest first (bounded reads; damaged ones apart).
pub fn load_all(repo: &Repository) -> Result<Records> {
    let mut out = Records::default();
    for meta in repo.store.list(ObjectKind::GcRecord)? {
        let Ok(id) = meta.key.name.parse::<GcRecordId>() else {
            tracing::warn!(object = %meta.key, "ignoring a gc object whose name is not a record id");
            continue;
        };
        let bytes = match repo.store.get(&meta.key, ObjectKind::GcRecord.max_size()) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => continue, // swept meanwhile
            Err(e) if e.is_too_large() => {
                out.damaged.push((id, e.into()));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let rec = object::open(&repo.keys, ObjectKind::GcRecord, &bytes).and_then(|body| {
            serde_json::from_slice::<GcRecord>(&body).map_err(|e| vmkeep_core::Error::Corrupt {
                kind: "gc record",
                reason: e.to_string(),
            })
        });
        match rec {
            Ok(r) => out.records.push((id, r)),
            Err(e) => out
                .damaged
                .push((id, Error::corrupt(meta.key.to_string(), e))),
        }
    }
    out.records.sort_by_key(|(id, r)| (r.created, *id));
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

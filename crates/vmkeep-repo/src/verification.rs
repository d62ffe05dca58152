//! Verification records (FORMAT.md §9.1): what `vmkeep verify` found when it ran a restore
//! point in a sandbox, kept beside the restore point so `snapshots` shows which points were
//! proven to come back, and when.
//!
//! A record is one framed object `verified/<snapshot id>-<record id>`, written once with a
//! single put (a kill leaves it whole or absent). It references no data, so GC ignores it.
//! `forget` removes a restore point's records before its manifest (a served repository scopes
//! them by the restore point's pack list, which goes with the manifest); a record written for
//! a restore point being forgotten meanwhile is an orphan, which `prune` removes once it is
//! older than the temporaries' safe age (a replication may write a manifest after the prune
//! listed the restore points, and its records right after).
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::SystemTime;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use vmkeep_core::{object, ObjectKind, SnapshotId};
use vmkeep_store::Key;

use crate::error::{Error, Result};
use crate::lease::HostIdentity;
use crate::Repository;

pub const VERIFICATION_VERSION: u32 = 1;

/// Longest reason or evidence kept in a record (a QEMU error with its log tail can be long).
const TEXT_MAX: usize = 4096;

/// How a verified restore point started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerifyMode {
    /// Resumed from its memory state.
    Resume,
    /// Booted from its disks.
    Boot,
}

impl VerifyMode {
    pub fn name(self) -> &'static str {
        match self {
            VerifyMode::Resume => "resume",
            VerifyMode::Boot => "boot",
        }
    }
}

/// The console screenshot a verification took (the PNG itself stays on the verifying host).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScreenshotInfo {
    /// Its file name where it was saved.
    pub file: String,
    pub bytes: u64,
    /// BLAKE3 of the PNG, hex: ties a file to this record.
    pub blake3: String,
}

/// One verification of one restore point.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VerificationRecord {
    pub version: u32,
    pub snapshot: SnapshotId,
    pub vm: String,
    /// When the verification started.
    pub time: DateTime<Utc>,
    pub ok: bool,
    pub mode: VerifyMode,
    /// From the start of the verification to the evidence of life (or to the failure).
    pub seconds: f64,
    /// Why it failed; absent when it passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What showed the VM alive (e.g. "serial line 'login:'"); absent when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub screenshot: Option<ScreenshotInfo>,
    pub hostname: String,
    pub tool_version: String,
}

impl VerificationRecord {
    /// A record of a verification that started at `time` on this host.
    pub fn new(snapshot: SnapshotId, vm: &str, time: DateTime<Utc>, mode: VerifyMode) -> Self {
        VerificationRecord {
            version: VERIFICATION_VERSION,
            snapshot,
            vm: vm.to_string(),
            time,
            ok: false,
            mode,
            seconds: 0.0,
            reason: None,
            evidence: None,
            screenshot: None,
            hostname: HostIdentity::current().name.clone(),
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// The text cut to [`TEXT_MAX`] bytes (on a character boundary).
fn bounded(text: &str) -> String {
    if text.len() <= TEXT_MAX {
        return text.to_string();
    }
    let mut end = TEXT_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// `<snapshot>-<record>`, both 32 hex digits.
fn parse_name(name: &str) -> Option<SnapshotId> {
    let (snapshot, record) = name.split_once('-')?;
    record.parse::<SnapshotId>().ok()?;
    snapshot.parse().ok()
}

/// The records of a repository, by restore point, oldest first; and the names (with the
/// reason) of those that could not be read.
#[derive(Debug, Default)]
pub struct Verifications {
    pub by_snapshot: BTreeMap<SnapshotId, Vec<VerificationRecord>>,
    pub unreadable: Vec<(String, String)>,
}

impl Verifications {
    /// The newest record of a restore point.
    pub fn latest(&self, id: &SnapshotId) -> Option<&VerificationRecord> {
        self.by_snapshot.get(id).and_then(|v| v.last())
    }
}

impl Repository {
    /// Stores `rec` (its text fields bounded) as a new record of its restore point; returns
    /// the object's name.
    pub fn record_verification(&self, rec: &VerificationRecord) -> Result<String> {
        let mut rec = rec.clone();
        rec.reason = rec.reason.as_deref().map(bounded);
        rec.evidence = rec.evidence.as_deref().map(bounded);
        let name = format!(
            "{}-{}",
            rec.snapshot.to_hex(),
            SnapshotId::random().to_hex()
        );
        let key = Key::new(ObjectKind::Verification, name.clone())?;
        let body = serde_json::to_vec(&rec).expect("a record serialises");
        self.store.put(
            &key,
            &object::seal(&self.keys, ObjectKind::Verification, &body),
        )?;
        Ok(name)
    }

    /// Every verification record, read and checked (a record must name the restore point its
    /// name starts with).
    pub fn verifications(&self) -> Result<Verifications> {
        let mut out = Verifications::default();
        for meta in self.store.list(ObjectKind::Verification)? {
            let name = meta.key.name.clone();
            match self.read_verification(&meta.key) {
                Ok(rec) => out.by_snapshot.entry(rec.snapshot).or_default().push(rec),
                Err(reason) => out.unreadable.push((name, reason)),
            }
        }
        for records in out.by_snapshot.values_mut() {
            records.sort_by_key(|r| r.time);
        }
        Ok(out)
    }

    fn read_verification(&self, key: &Key) -> std::result::Result<VerificationRecord, String> {
        let named = parse_name(&key.name)
            .ok_or_else(|| "its name is not <snapshot id>-<record id>".to_string())?;
        let bytes = self
            .store
            .get(key, ObjectKind::Verification.max_size())
            .map_err(|e| e.to_string())?;
        let body = object::open(&self.keys, ObjectKind::Verification, &bytes)
            .map_err(|e| e.to_string())?;
        let rec: VerificationRecord =
            serde_json::from_slice(&body).map_err(|e| format!("not a record: {e}"))?;
        if rec.snapshot != named {
            return Err(format!("it is a record of restore point {}", rec.snapshot));
        }
        Ok(rec)
    }

    /// Every record's key, by restore point (forget removes a point's before its manifest).
    pub(crate) fn verification_keys(&self) -> Result<HashMap<SnapshotId, Vec<Key>>> {
        let mut out: HashMap<SnapshotId, Vec<Key>> = HashMap::new();
        for meta in self.store.list(ObjectKind::Verification)? {
            if let Some(s) = parse_name(&meta.key.name) {
                out.entry(s).or_default().push(meta.key);
            }
        }
        Ok(out)
    }

    /// Removes records whose restore point is gone, once they are older than the
    /// temporaries' safe age (prune, under its lease); returns how many.
    pub(crate) fn remove_orphan_verifications(&self) -> Result<usize> {
        let records = self.store.list(ObjectKind::Verification)?;
        if records.is_empty() {
            return Ok(0);
        }
        let present: HashSet<SnapshotId> = self
            .store
            .list(ObjectKind::Snapshot)?
            .into_iter()
            .filter_map(|m| m.key.name.parse().ok())
            .collect();
        let max_age = self.temporary_max_age();
        let mut removed = 0;
        for meta in records {
            let orphan = parse_name(&meta.key.name).is_none_or(|s| !present.contains(&s));
            let old = SystemTime::now()
                .duration_since(meta.modified)
                .is_ok_and(|age| age > max_age);
            if orphan && old {
                match self.store.delete(&meta.key) {
                    Ok(()) => removed += 1,
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(Error::from(e)),
                }
            }
        }
        if removed > 0 {
            tracing::info!(
                removed,
                "removed verification records of forgotten restore points"
            );
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_only_as_two_ids() {
        let s = SnapshotId::random();
        let r = SnapshotId::random();
        assert_eq!(
            parse_name(&format!("{}-{}", s.to_hex(), r.to_hex())),
            Some(s)
        );
        assert_eq!(parse_name(&s.to_hex()), None);
        assert_eq!(parse_name(&format!("{}-x", s.to_hex())), None);
    }

    #[test]
    fn long_text_is_cut_on_a_character_boundary() {
        let text = "é".repeat(TEXT_MAX);
        let cut = bounded(&text);
        assert!(cut.len() <= TEXT_MAX + "…".len());
        assert!(cut.ends_with('…'));
        assert_eq!(bounded("short"), "short");
    }
}

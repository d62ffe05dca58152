//! Pack lists (`refs/<snapshot id>`, docs/PROTOCOL.md §5) of served repositories: beside each
//! manifest, the VM and every pack holding a blob the restore point references, in plain JSON,
//! so a server that cannot read encrypted manifests can still scope tokens to VMs.
//!
//! Writers build them without reading anything: a session records the pack of every blob it
//! found already stored ([`PackTracker`]) and the packs its packer wrote; a backup adds its
//! parent's list, which covers the parts of a disk it took from the parent's tree. Prune and
//! `repair refs` rewrite, by walking the restore point, every list that is missing or names a
//! pack that no longer exists or is condemned (a repack moved its blobs).
use std::collections::{BTreeSet, HashSet};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use vmkeep_core::manifest::Manifest;
use vmkeep_core::packlist::PackList;
use vmkeep_core::{ObjectKind, PackId, SnapshotId};
use vmkeep_store::Key;

use crate::error::{Error, Result};
use crate::index::BlobIndex;
use crate::lease::LeaseKind;
use crate::walk::Walker;
use crate::Repository;

pub(crate) fn pack_list_key(id: &SnapshotId) -> Key {
    Key::new(ObjectKind::Refs, id.to_hex()).expect("hex names are valid keys")
}

/// The packs of the stored blobs a session referenced instead of writing them.
#[derive(Default)]
pub(crate) struct PackTracker {
    packs: Mutex<HashSet<PackId>>,
}

impl PackTracker {
    pub(crate) fn note(&self, pack: PackId) {
        self.packs.lock().unwrap().insert(pack);
    }

    pub(crate) fn packs(&self) -> HashSet<PackId> {
        self.packs.lock().unwrap().clone()
    }
}

/// What [`Repository::repair_pack_lists`] did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PackListRepair {
    /// Restore points whose list was looked at.
    pub checked: u64,
    /// Lists written (missing, stale, or naming the wrong VM).
    pub written: u64,
    /// Lists of restore points that no longer exist, removed.
    pub removed: u64,
}

impl Repository {
    /// Whether this repository keeps pack lists: it is served (its store says so), or lists
    /// are already there (a served repository's directory, maintained locally).
    pub fn keeps_pack_lists(&self) -> Result<bool> {
        Ok(self.store.needs_pack_lists() || !self.store.list(ObjectKind::Refs)?.is_empty())
    }

    /// The pack list of a restore point; None when it has none.
    pub fn load_pack_list(&self, id: &SnapshotId) -> Result<Option<PackList>> {
        let key = pack_list_key(id);
        match self.store.get(&key, ObjectKind::Refs.max_size()) {
            Ok(b) => {
                let l = PackList::from_json(&b).map_err(|e| Error::corrupt(key.to_string(), e))?;
                if l.snapshot != *id {
                    return Err(Error::corrupt(
                        key.to_string(),
                        vmkeep_core::Error::Corrupt {
                            kind: "pack list",
                            reason: format!("it names restore point {}", l.snapshot),
                        },
                    ));
                }
                Ok(Some(l))
            }
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) fn write_pack_list(&self, list: &PackList) -> Result<()> {
        self.store
            .put(&pack_list_key(&list.snapshot), &list.to_json())?;
        Ok(())
    }

    /// The exact pack list of `m`: walks it (reads its tree nodes and stream indexes).
    pub fn exact_pack_list(&self, index: &BlobIndex, m: &Manifest) -> Result<PackList> {
        let mut packs = BTreeSet::new();
        Walker::new(self).walk(index, m, &mut |r| {
            let loc = index
                .get(&r.id)
                .ok_or_else(|| Error::BlobMissing { id: r.id.to_hex() })?;
            packs.insert(loc.pack);
            Ok(())
        })?;
        Ok(PackList::new(m.id, &m.vm, packs))
    }

    /// `repair refs`: under a maintenance lease, write the pack list of every restore point
    /// that lacks one or whose list names a pack that no longer exists, a pack a GC record
    /// condemns (readers take its blobs from their new homes), or another VM (every list when
    /// `all`), and remove lists whose restore point is gone (older than the lease
    /// timeout plus the clock-skew allowance: a backup writes its list before its manifest).
    pub fn repair_pack_lists(&self, all: bool) -> Result<PackListRepair> {
        let lease = self.maintenance_lease(LeaseKind::RepairIndex)?;
        let out = self.repair_pack_lists_locked(all);
        if let Err(e) = lease.release() {
            tracing::warn!(error = %e, "could not remove the lease; the next prune removes it");
        }
        out
    }

    /// [`repair_pack_lists`](Self::repair_pack_lists) under a lease the caller holds (prune).
    pub(crate) fn repair_pack_lists_locked(&self, all: bool) -> Result<PackListRepair> {
        let mut out = PackListRepair::default();
        let index = BlobIndex::load(self)?;
        let manifests = self.snapshots()?;
        let live: HashSet<SnapshotId> = manifests.iter().map(|m| m.id).collect();
        for m in &manifests {
            out.checked += 1;
            let current = match self.load_pack_list(&m.id) {
                Ok(l) => l,
                Err(e) if e.is_damage() => None,
                Err(e) => return Err(e),
            };
            let fine = current.as_ref().is_some_and(|l| {
                l.vm == m.vm
                    && l.packs
                        .iter()
                        .all(|p| index.pack_exists(p) && !index.is_condemned(p))
            });
            if fine && !all {
                continue;
            }
            let exact = self.exact_pack_list(&index, m)?;
            if current.as_ref() != Some(&exact) {
                self.write_pack_list(&exact)?;
                out.written += 1;
            }
        }
        let grace = self.tuning().lease_timeout + self.tuning().clock_skew;
        let now = SystemTime::now();
        for meta in self.store.list(ObjectKind::Refs)? {
            let Ok(id) = meta.key.name.parse::<SnapshotId>() else {
                continue;
            };
            let age = now.duration_since(meta.modified).unwrap_or(Duration::ZERO);
            if !live.contains(&id)
                && age >= grace
                && matches!(self.load_manifest(&id), Err(Error::UnknownSnapshot { .. }))
            {
                self.store.delete(&meta.key)?;
                out.removed += 1;
            }
        }
        Ok(out)
    }
}

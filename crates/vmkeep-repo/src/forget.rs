//! `forget`: drop restore points. The successors of a forgotten point get its parent as theirs,
//! and their change maps become the union of both maps (a superset of what differs, which diff
//! confirms by comparing ids), so differentials between the remaining points stay exact.
//!
//! Crash story: the successor's manifest is rewritten first, the forgotten manifest deleted
//! second. A crash between leaves both; the successor's merged map is still a correct superset
//! relative to the forgotten point's parent, and rerunning forget finishes the job. A crash
//! after the deletion, before a successor that committed meanwhile was fixed, leaves that
//! successor naming a parent that is gone: the next forget or prune relinks it first thing.
use std::collections::HashMap;

use vmkeep_core::manifest::Manifest;
use vmkeep_core::SnapshotId;

use crate::error::Result;
use crate::hooks::kill_point;
use crate::lease::{Lease, LeaseKind};
use crate::snapshots::snapshot_key;
use crate::Repository;

/// Merge the forgotten point `gone` into its successor `succ` (whose parent it is).
pub fn merge_into_successor(gone: &Manifest, succ: &mut Manifest) {
    succ.parent = gone.parent;
    for d in &mut succ.disks {
        let Some(mc) = &d.changes else { continue };
        d.changes = match gone.disk(&d.name) {
            Some(g) if g.size == d.size => g.changes.as_ref().map(|mg| mg.union(mc)),
            _ => None,
        };
    }
}

impl Repository {
    /// Forget restore points (under the exclusive maintenance lease). Returns those forgotten.
    pub fn forget(&self, ids: &[SnapshotId]) -> Result<Vec<SnapshotId>> {
        let lease = self.maintenance_lease(LeaseKind::Forget)?;
        let done = self.forget_locked(&lease, ids)?;
        if let Err(e) = lease.release() {
            tracing::warn!(error = %e, "could not remove the lease; the next prune removes it");
        }
        Ok(done)
    }

    /// Forget under `lease`. A backup that committed while this runs may name a forgotten
    /// point as its parent: it checks that after its commit, and this re-lists the restore
    /// points after its deletions and fixes any such successor, so one of the two always sees
    /// the other (`relink.rs`).
    pub(crate) fn forget_locked(
        &self,
        lease: &Lease,
        ids: &[SnapshotId],
    ) -> Result<Vec<SnapshotId>> {
        let check = || lease.check();
        // First heal what a killed forget may have left.
        self.relink_orphans(&HashMap::new(), &check)?;
        let mut all = self.snapshots()?;
        let keeps_lists = self.keeps_pack_lists()?;
        let mut records = self.verification_keys()?;
        let mut order: Vec<&SnapshotId> = ids.iter().collect();
        order.sort_by_key(|id| all.iter().position(|m| m.id == **id));
        order.dedup();
        let mut done = Vec::new();
        let mut gone: HashMap<SnapshotId, Manifest> = HashMap::new();
        for id in order {
            let Some(pos) = all.iter().position(|m| m.id == *id) else {
                // Unreadable (damaged) manifest: its change maps are unknown, so its successors
                // are relinked after it is gone.
                let key = snapshot_key(id);
                if self.store.size(&key).is_ok() {
                    check()?;
                    self.store.flush()?;
                    self.store.delete(&key)?;
                    done.push(*id);
                }
                continue;
            };
            let g = all.remove(pos);
            for succ in all.iter_mut().filter(|m| m.parent == Some(g.id)) {
                merge_into_successor(&g, succ);
                check()?;
                self.write_manifest(succ)?;
            }
            self.store.flush()?;
            check()?;
            // Its verification records first: a served repository scopes them by the pack
            // list that goes with the manifest. A kill in between leaves the restore point
            // without its records, which the rerun forgets anyway.
            for key in records.remove(&g.id).unwrap_or_default() {
                self.store.delete(&key)?;
            }
            self.store.delete(&snapshot_key(&g.id))?;
            kill_point("after-forget-delete");
            // Its pack list (served repositories) goes with it; prune removes one left behind.
            if keeps_lists {
                if let Err(e) = self.store.delete(&crate::packlist::pack_list_key(&g.id)) {
                    tracing::warn!(snapshot = %g.id, error = %e, "could not remove the pack list; prune removes it");
                }
            }
            done.push(g.id);
            gone.insert(g.id, g);
        }
        self.store.flush()?;
        // Successors that committed meanwhile (not in the listing above).
        self.relink_orphans(&gone, &check)?;
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmkeep_core::changes::ChangeMap;
    use vmkeep_core::manifest::{BackupStats, DiskEntry};
    use vmkeep_core::BlobId;

    fn m(parent: Option<SnapshotId>, disks: Vec<(&str, u64, Option<Vec<u64>>)>) -> Manifest {
        Manifest {
            version: 1,
            id: SnapshotId::random(),
            vm: "vm".into(),
            time: chrono::Utc::now(),
            parent,
            hostname: "h".into(),
            tool_version: "t".into(),
            chunk_size: 65536,
            disks: disks
                .into_iter()
                .map(|(n, size, ch)| DiskEntry {
                    name: n.into(),
                    size,
                    root: BlobId::ZERO,
                    changes: ch.map(ChangeMap::from_sorted),
                    data_bytes: 0,
                    cbt: vmkeep_core::manifest::ChangeTracking::None,
                    cbt_reason: None,
                    checkpoint: None,
                    source_identity: None,
                })
                .collect(),
            streams: vec![],
            stats: BackupStats::default(),
            pause_ms: 0,
        }
    }

    #[test]
    fn merge_unions_maps_and_relinks_parent() {
        let a = m(None, vec![("d", 1 << 20, None)]);
        let b = m(
            Some(a.id),
            vec![
                ("d", 1 << 20, Some(vec![1, 2])),
                ("e", 1 << 20, Some(vec![0])),
            ],
        );
        let mut c = m(
            Some(b.id),
            vec![
                ("d", 1 << 20, Some(vec![2, 5])),
                ("e", 2 << 20, Some(vec![3])),
            ],
        );
        merge_into_successor(&b, &mut c);
        assert_eq!(c.parent, Some(a.id));
        assert_eq!(
            c.disks[0]
                .changes
                .as_ref()
                .unwrap()
                .iter()
                .collect::<Vec<_>>(),
            vec![1, 2, 5]
        );
        assert_eq!(
            c.disks[1].changes, None,
            "size changed: whole disk counts as changed"
        );
        let mut c2 = c.clone();
        merge_into_successor(&a, &mut c2);
        assert_eq!(c2.parent, None);
        assert_eq!(
            c2.disks[0].changes, None,
            "the first point's map covers everything"
        );
    }
}

//! `forget`: drop restore points. The successors of a forgotten point get its parent as theirs,
//! and their change maps become the union of both maps (a superset of what differs, which diff
//! confirms by comparing ids), so differentials between the remaining points stay exact.
//!
//! Crash story: the successor's manifest is rewritten first, the forgotten manifest deleted
//! second. A crash between leaves both; the successor's merged map is still a correct superset
//! relative to the forgotten point's parent, and rerunning forget finishes the job.
use vmkeep_core::manifest::Manifest;
use vmkeep_core::SnapshotId;

use crate::error::Result;
use crate::lease::Lease;
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
        let lease = self.maintenance_lease("forget")?;
        let r = self.forget_locked(ids);
        drop(lease);
        r
    }

    pub(crate) fn forget_locked(&self, ids: &[SnapshotId]) -> Result<Vec<SnapshotId>> {
        let mut all = self.snapshots()?;
        let mut order: Vec<&SnapshotId> = ids.iter().collect();
        order.sort_by_key(|id| all.iter().position(|m| m.id == **id));
        order.dedup();
        let mut done = Vec::new();
        for id in order {
            let Some(pos) = all.iter().position(|m| m.id == *id) else {
                // Unreadable (damaged) manifest: its change maps are unknown, so its successors
                // lose theirs (null = everything changed) and their parent link.
                let key = snapshot_key(id);
                if self.store.size(&key).is_ok() {
                    for succ in all.iter_mut().filter(|m| m.parent == Some(*id)) {
                        succ.parent = None;
                        for d in &mut succ.disks {
                            d.changes = None;
                        }
                        self.write_manifest(succ)?;
                    }
                    self.store.flush()?;
                    self.store.delete(&key)?;
                    done.push(*id);
                }
                continue;
            };
            let gone = all.remove(pos);
            for succ in all.iter_mut().filter(|m| m.parent == Some(gone.id)) {
                merge_into_successor(&gone, succ);
                self.write_manifest(succ)?;
            }
            self.store.flush()?;
            self.store.delete(&snapshot_key(&gone.id))?;
            done.push(gone.id);
        }
        self.store.flush()?;
        Ok(done)
    }

    /// The exclusive lease of prune and forget: fails if another live one holds it.
    pub(crate) fn maintenance_lease(&self, what: &'static str) -> Result<Lease> {
        let lease = Lease::acquire(self, "prune")?;
        let now = chrono::Utc::now();
        let mine = (lease.record().created, lease.name().to_string());
        for (key, rec) in crate::lease::list(self)? {
            if rec.kind != "prune" || key.name == lease.name() {
                continue;
            }
            if !crate::lease::holder_alive(&rec, now, self.tuning.lease_timeout) {
                continue;
            }
            if (rec.created, key.name.clone()) < mine {
                let holder = rec.describe();
                drop(lease);
                return Err(crate::Error::Locked { what, holder });
            }
        }
        Ok(lease)
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

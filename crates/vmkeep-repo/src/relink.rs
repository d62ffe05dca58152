//! Keeping parent links and change maps exact when restore points go away under a running
//! backup or a forget that was killed (FORMAT.md §10 "Forget keeps change maps exact").
//!
//! A restore point's change map is relative to its parent. Forget merges a forgotten point into
//! its successors (their maps become the union of both), which needs the forgotten manifest's
//! content; when that is gone (a backup committed while forget deleted its parent, and the
//! forget was killed before it could fix it), the point is **relinked** instead: to the newest
//! older restore point of its VM, with change maps computed exactly by comparing the two trees
//! (cost proportional to the change).
use std::collections::{HashMap, HashSet};

use vmkeep_core::changes::ChangeMap;
use vmkeep_core::manifest::Manifest;
use vmkeep_core::{tree, SnapshotId};

use crate::error::Result;
use crate::forget::merge_into_successor;
use crate::index::BlobIndex;
use crate::nodes::RepoNodes;
use crate::Repository;

/// Point `m` at the newest restore point of its VM older than it among `candidates`, with
/// change maps computed by comparing trees (a disk that is new or resized gets `null`).
pub(crate) fn relink(
    repo: &Repository,
    index: &BlobIndex,
    m: &mut Manifest,
    candidates: &[Manifest],
) -> Result<()> {
    let parent = candidates
        .iter()
        .filter(|c| c.vm == m.vm && c.id != m.id && (c.time, c.id) < (m.time, m.id))
        .max_by_key(|c| (c.time, c.id));
    m.parent = parent.map(|p| p.id);
    let nodes = RepoNodes::new(repo, index);
    let cs = repo.config.chunk_size as u64;
    for d in &mut m.disks {
        let base = parent
            .and_then(|p| p.disk(&d.name))
            .filter(|pd| pd.size == d.size);
        d.changes = match base {
            None => None,
            Some(pd) => {
                let chunks = d.size.div_ceil(cs);
                let changed = nodes.typed(
                    tree::changed_chunks(&nodes, &pd.root, &d.root, chunks),
                    || format!("index of restore point {} disk {}", m.id, d.name),
                )?;
                Some(ChangeMap::from_sorted(changed))
            }
        };
    }
    Ok(())
}

impl Repository {
    /// Fix every restore point whose parent no longer exists: merge the forgotten points in
    /// `gone` (their content is known) into it, or relink it. Returns the ids rewritten.
    /// `check_lease` runs before each write (the caller's lease must still hold).
    pub(crate) fn relink_orphans(
        &self,
        gone: &HashMap<SnapshotId, Manifest>,
        check_lease: &dyn Fn() -> Result<()>,
    ) -> Result<Vec<SnapshotId>> {
        let all = self.snapshots()?;
        let ids: HashSet<SnapshotId> = all.iter().map(|m| m.id).collect();
        let orphans: Vec<&Manifest> = all
            .iter()
            .filter(|m| m.parent.is_some_and(|p| !ids.contains(&p)))
            .collect();
        if orphans.is_empty() {
            return Ok(Vec::new());
        }
        let mut index: Option<BlobIndex> = None;
        let mut fixed = Vec::new();
        for o in orphans {
            let mut m = o.clone();
            // Merge forgotten points while their content is known.
            while let Some(g) = m.parent.and_then(|p| gone.get(&p)) {
                merge_into_successor(g, &mut m);
            }
            if m.parent.is_some_and(|p| !ids.contains(&p)) {
                if index.is_none() {
                    index = Some(BlobIndex::load(self)?);
                }
                relink(self, index.as_ref().expect("loaded"), &mut m, &all)?;
            }
            check_lease()?;
            self.write_manifest(&m)?;
            tracing::info!(snapshot = %m.id, parent = ?m.parent.map(|p| p.to_hex()), "relinked a restore point whose parent was forgotten");
            fixed.push(m.id);
        }
        self.store.flush()?;
        Ok(fixed)
    }
}

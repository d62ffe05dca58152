//! Mark: every blob the restore points reference, through the one walker (`walk.rs`). A mark is
//! incremental: marking again after more restore points appeared walks only the new ones
//! (restore points never change what they reference; forget, which rewrites manifests, only
//! changes parents and change maps, and cannot run beside a prune). The referenced ids go to
//! a sorted set on disk (`spill.rs`), so marking a repository of any size takes bounded memory.
use std::collections::HashSet;

use vmkeep_core::manifest::Manifest;
use vmkeep_core::SnapshotId;

use crate::error::{Error, Result};
use crate::index::BlobIndex;
use crate::spill::IdSpill;
use crate::walk::Walker;
use crate::Repository;

pub(crate) struct Mark<'r> {
    repo: &'r Repository,
    walker: Walker<'r>,
    marked: HashSet<SnapshotId>,
    pub referenced: IdSpill,
}

impl<'r> Mark<'r> {
    pub fn new(repo: &'r Repository) -> Result<Mark<'r>> {
        Ok(Mark {
            repo,
            walker: Walker::new(repo),
            marked: HashSet::new(),
            referenced: repo.new_spill()?,
        })
    }

    /// The restore points listed now that are not marked yet, except those in `skip` (about
    /// to be forgotten, for a dry run). A restore point whose manifest cannot be read still
    /// owns its data: then no GC may run.
    pub fn list_new(&self, skip: &HashSet<SnapshotId>) -> Result<Vec<Manifest>> {
        let (manifests, damaged) = self.repo.snapshots_with_damage()?;
        if let Some((name, why)) = damaged.into_iter().next() {
            return Err(Error::Invalid {
                what: "repository state",
                reason: format!(
                    "restore point {name} is unreadable ({why}); prune refuses to run so its data \
                     is not collected; run `vmkeep check`, then `vmkeep forget` it if it is \
                     beyond repair"
                ),
            });
        }
        Ok(manifests
            .into_iter()
            .filter(|m| !skip.contains(&m.id) && !self.marked.contains(&m.id))
            .collect())
    }

    /// Mark `manifests` (from [`Mark::list_new`]), reading through `index`, which must have
    /// been loaded after they were listed: a restore point's blobs are indexed before its
    /// manifest lands, so the index then names them all.
    pub fn add(&mut self, index: &BlobIndex, manifests: &[Manifest]) -> Result<()> {
        for m in manifests {
            if !self.marked.insert(m.id) {
                continue;
            }
            let referenced = &mut self.referenced;
            self.walker
                .walk(index, m, &mut |r| referenced.insert(r.id))?;
        }
        Ok(())
    }
}

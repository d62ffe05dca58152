//! Committing a backup: the manifest is the commit point, written only when everything it
//! references is stored and protected (FORMAT.md §12-§13).
//!
//! 1. The packer writes its last pack and index object; the store is flushed.
//! 2. The parent must still exist: a forget may have removed it while this backup ran; then
//!    the manifest is relinked to the newest older restore point of the VM (`relink.rs`).
//! 3. The lease must never have been lost. If it was (this process stopped, the machine slept
//!    or the store was unreachable for the lease timeout), a prune may have judged this backup
//!    dead and reclaimed data it reuses: the lease is written again, then every blob the new
//!    restore point references (disk nodes and chunks, stream indexes and chunks, through the
//!    one walker) must be in a pack that exists and no GC record condemns. If not, the backup
//!    fails ("run the backup again") instead of committing a restore point with missing data.
//! 4. The manifest is written and flushed. If the lease was lost during that write (a put that
//!    stalled), the check of step 3 runs again; a failure deletes the manifest.
//! 5. The parent is checked again: a forget that listed the restore points before this
//!    manifest landed may have deleted it since; then it is relinked and rewritten. (Forget
//!    also re-lists after its deletions, so one of the two sees the other.)
//! 6. The lease is released.
use chrono::Utc;
use std::collections::BTreeSet;
use vmkeep_core::manifest::{Manifest, MANIFEST_VERSION};

use vmkeep_core::packlist::PackList;
use vmkeep_core::{PackId, SnapshotId};

use super::BackupSession;
use crate::error::{Error, Result};
use crate::hooks::kill_point;
use crate::index::BlobIndex;
use crate::lease::{HostIdentity, LeaseKind};
use crate::walk::Walker;

fn lost() -> Error {
    Error::LeaseLost {
        kind: LeaseKind::Backup,
    }
}

impl BackupSession<'_> {
    /// Commit: write the remaining packs and indexes, flush, then the manifest (commit point).
    pub fn commit(mut self) -> Result<Manifest> {
        #[cfg(feature = "test-hooks")]
        if let Some(h) = &self.opts.hooks.before_commit {
            h();
        }
        let packer = self.packer.take().expect("session open");
        let pstats = packer.finish()?;
        kill_point("after-data");
        self.repo.store.flush()?;
        let mut stats = self.stats.clone();
        stats.stored_bytes = pstats.pack_bytes + pstats.index_bytes;
        stats.metadata_bytes = pstats.pack_bytes - pstats.data_blob_bytes + pstats.index_bytes;
        stats.seconds = self.started.elapsed().as_secs_f64();
        let mut m = Manifest {
            version: MANIFEST_VERSION,
            id: SnapshotId::random(),
            vm: self.opts.vm.clone(),
            time: Utc::now(),
            parent: self.parent.as_ref().map(|p| p.id),
            hostname: HostIdentity::current().name.clone(),
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            chunk_size: self.repo.config.chunk_size,
            disks: std::mem::take(&mut self.disks),
            streams: std::mem::take(&mut self.streams),
            stats,
            pause_ms: self.pause_ms,
        };
        // The manifest's own size counts as stored metadata; estimate it before writing.
        let estimate = vmkeep_core::object::seal(
            &self.repo.keys,
            vmkeep_core::ObjectKind::Snapshot,
            &m.to_json(),
        )
        .len() as u64;
        m.stats.stored_bytes += estimate;
        m.stats.metadata_bytes += estimate;
        self.publish(m, pstats.pack_ids)
    }

    /// Commit a restore point copied from another repository (`replicate`): `m` as it is
    /// there, its parent relinked when this repository lacks it. Every blob it references must
    /// be here or have been sent through this session.
    pub(crate) fn commit_replica(mut self, m: Manifest) -> Result<Manifest> {
        let packer = self.packer.take().expect("session open");
        let pstats = packer.finish()?;
        kill_point("after-data");
        self.repo.store.flush()?;
        self.publish(m, pstats.pack_ids)
    }

    /// Steps 2-6 for a manifest whose data is stored and flushed (`written`: the packs this
    /// session wrote).
    fn publish(self, mut m: Manifest, written: Vec<PackId>) -> Result<Manifest> {
        // Before anything reads the new restore point back (relink, recovery): a server lets a
        // token read the packs its VMs' lists name.
        self.write_pack_list(&m, written)?;
        self.relink_if_parent_gone(&mut m)?;
        if self.lease.is_lost() {
            self.recover(&m)?;
        }
        kill_point("before-manifest");
        // Checked again right before the put: a stall since the line above counts too.
        self.lease.check().or_else(|_| self.recover(&m))?;
        self.repo.write_manifest(&m)?;
        self.repo.store.flush()?;
        if self.lease.is_lost() {
            // The put itself outlasted the lease: make sure what it references survived.
            if let Err(e) = self.recover(&m) {
                tracing::warn!(snapshot = %m.id, "the restore point lost data while it was written; deleting it");
                let key = crate::snapshots::snapshot_key(&m.id);
                if let Err(d) = self
                    .repo
                    .store
                    .delete(&key)
                    .and_then(|_| self.repo.store.flush())
                {
                    // A served repository's append token may not delete: an admin must forget it.
                    tracing::warn!(snapshot = %m.id, error = %d, "could not delete the damaged restore point; forget it");
                }
                return Err(e);
            }
        }
        kill_point("after-manifest");
        self.relink_after_commit(&mut m)?;
        let lease = self.lease;
        if let Err(e) = lease.release() {
            tracing::warn!(error = %e, "could not remove the backup's lease; prune removes it later");
        }
        Ok(m)
    }

    /// The pack list of `m` (repositories that keep them): the packs this session wrote, the
    /// packs of the stored blobs it referenced, and the parent's list, which covers what the
    /// new trees took from the parent's. Without the parent's list the new restore point is
    /// walked.
    fn write_pack_list(&self, m: &Manifest, written: Vec<PackId>) -> Result<()> {
        let Some(tracked) = &self.dedup.packs else {
            return Ok(());
        };
        let list = match (&self.parent, &self.parent_packs) {
            // The index as it is now: it holds what this session wrote.
            (Some(_), None) => BlobIndex::load(self.repo)
                .and_then(|now| self.repo.exact_pack_list(&now, m))
                .map_err(|e| {
                tracing::warn!(error = %e, "the parent restore point has no pack list and walking the new one failed: run `vmkeep repair refs` with an admin token");
                e
            })?,
            (_, parent) => {
                let mut packs: BTreeSet<PackId> = tracked.packs().into_iter().collect();
                packs.extend(written);
                // All of it, packs since removed included: a list naming a pack that is gone
                // is how prune finds the lists it must rewrite (a repack moved blobs the new
                // tree shares with the parent's to packs this list would otherwise lack).
                if let Some(pp) = parent {
                    packs.extend(pp.iter().copied());
                }
                PackList::new(m.id, &m.vm, packs)
            }
        };
        self.repo.write_pack_list(&list)
    }

    /// Step 2: the parent chosen at the start was forgotten meanwhile.
    fn relink_if_parent_gone(&self, m: &mut Manifest) -> Result<bool> {
        let Some(p) = m.parent else {
            return Ok(false);
        };
        // Asked without reading it (a HEAD on object stores).
        match self.repo.store.size(&crate::snapshots::snapshot_key(&p)) {
            Err(e) if e.is_not_found() => {}
            _ => return Ok(false),
        }
        let index = BlobIndex::load(self.repo)?;
        let all = self.repo.snapshots()?;
        crate::relink::relink(self.repo, &index, m, &all)?;
        tracing::info!(
            forgotten = %p,
            parent = ?m.parent.map(|p| p.to_hex()),
            "the restore point this backup started from was forgotten; relinked"
        );
        Ok(true)
    }

    /// Step 5: a forget deleted the parent while the manifest was being written.
    fn relink_after_commit(&self, m: &mut Manifest) -> Result<()> {
        for _ in 0..16 {
            if !self.relink_if_parent_gone(m)? {
                return Ok(());
            }
            if let Err(e) = self.repo.write_manifest(m) {
                if !self.repo.store.needs_pack_lists() {
                    return Err(e);
                }
                // Served with an append token, which may not replace a manifest: the restore
                // point is complete; the next forget or prune (admin) relinks it.
                tracing::warn!(snapshot = %m.id, error = %e, "could not relink the new restore point; the next prune does");
                return Ok(());
            }
            self.repo.store.flush()?;
        }
        tracing::warn!(snapshot = %m.id, "parents keep disappearing; the next prune relinks this restore point");
        Ok(())
    }

    /// Step 3: the lease was lost. Write it again, then verify that every blob `m` references
    /// is usable (in an existing, uncondemned pack). Ok clears the lost mark.
    fn recover(&self, m: &Manifest) -> Result<()> {
        tracing::warn!(
            "the backup's lease may have expired; verifying the data it references still exists"
        );
        let since = self.lease.refresh_now()?;
        let index = BlobIndex::load(self.repo)?;
        let mut missing = None;
        let walked = Walker::new(self.repo).walk(&index, m, &mut |r| {
            if index.usable(&r.id) {
                Ok(())
            } else {
                missing = Some(r.id);
                Err(lost())
            }
        });
        match walked {
            Ok(()) => {}
            Err(e) if e.is_damage() || matches!(e, Error::LeaseLost { .. }) => {
                tracing::warn!(blob = ?missing.map(|b| b.to_hex()), error = %e, "data this backup references was reclaimed");
                return Err(lost());
            }
            Err(e) => return Err(e),
        }
        if self.lease.recovered(since) {
            Ok(())
        } else {
            Err(lost())
        }
    }
}

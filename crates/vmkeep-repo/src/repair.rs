//! `repair index`: rebuild the index objects from the packs themselves (every pack describes
//! itself in its header, FORMAT.md §6), as restic's `repair index` does. For a lost or damaged
//! index object, or index entries that name packs which are gone.
//!
//! Under the exclusive maintenance lease (no prune deletes packs meanwhile). Order: list the
//! old index objects, list the packs, read each pack's header, write new index objects for
//! every readable pack, flush, then delete the old index objects. A backup running beside it
//! keeps working: its packs are either listed here (written before its index object, which was
//! listed before) or named by its own index objects written after the listing, which are kept.
//! Killed at any instant, the repository has the old objects, or the old and some new ones
//! (duplicate entries are harmless), or the new ones. Memory: one new index object's packs at a
//! time (written as they fill), plus the old entries of unreadable packs (`scan.rs`).
use std::collections::HashSet;

use serde::Serialize;
use vmkeep_core::pack::{self, IndexFile, PackEntry};
use vmkeep_core::PackId;
use vmkeep_core::{object, ObjectKind};
use vmkeep_store::Key;

use crate::error::{Error, Result};
use crate::index::pack_key;
use crate::lease::LeaseKind;
use crate::progress::Progress;
use crate::scan::RepoScan;
use crate::Repository;

/// Packs named per new index object.
const PACKS_PER_INDEX: usize = 256;

#[derive(Clone, Debug, Default, Serialize)]
pub struct RepairIndexStats {
    pub packs_read: u64,
    pub blobs_indexed: u64,
    pub index_objects_written: u64,
    pub index_objects_removed: u64,
    /// Packs whose header could not be read (and why). Those the old index objects named keep
    /// their old entries (counted in `packs_kept_from_old_index`); the others' blobs are not
    /// indexed, and `check` reports the restore points that need them.
    pub packs_unreadable: Vec<(PackId, String)>,
    pub packs_kept_from_old_index: u64,
}

impl Repository {
    pub fn repair_index(&self, progress: &dyn Progress) -> Result<RepairIndexStats> {
        let lease = self.maintenance_lease(LeaseKind::RepairIndex)?;
        let mut stats = RepairIndexStats::default();
        // The old index objects (through the cache: for packs whose header cannot be read,
        // their blobs may still be intact, so their old entries are kept), then the packs.
        let scan = RepoScan::load(self, HashSet::new())?;
        let old: Vec<Key> = scan
            .objects()?
            .into_iter()
            .chain(scan.damaged.iter().map(|(k, _)| k.clone()))
            .collect();
        let mut packs: Vec<(PackId, u64)> = scan.sizes.iter().map(|(p, s)| (*p, *s)).collect();
        packs.sort();
        progress.phase("read pack headers", packs.len() as u64);
        // Written as they fill, so memory holds one index object's packs.
        let mut written: HashSet<String> = HashSet::new();
        let mut batch: Vec<(PackId, Vec<PackEntry>)> = Vec::new();
        let mut unreadable: HashSet<PackId> = HashSet::new();
        for (p, size) in &packs {
            match self.read_pack_header(p, *size) {
                Ok(entries) => {
                    stats.blobs_indexed += entries.len() as u64;
                    batch.push((*p, entries));
                    if batch.len() >= PACKS_PER_INDEX {
                        self.write_index_object(&lease, &mut batch, &mut written, &mut stats)?;
                    }
                }
                Err(e) if e.is_damage() => {
                    unreadable.insert(*p);
                    stats.packs_unreadable.push((*p, e.to_string()));
                }
                Err(e) => return Err(e),
            }
            stats.packs_read += 1;
            progress.advance(1);
        }
        progress.finish_phase();
        if !unreadable.is_empty() {
            let mut kept = scan.entries_of(&unreadable)?;
            kept.sort_by_key(|(p, _)| *p);
            for (p, entries) in kept {
                stats.blobs_indexed += entries.len() as u64;
                stats.packs_kept_from_old_index += 1;
                batch.push((p, entries));
                if batch.len() >= PACKS_PER_INDEX {
                    self.write_index_object(&lease, &mut batch, &mut written, &mut stats)?;
                }
            }
        }
        self.write_index_object(&lease, &mut batch, &mut written, &mut stats)?;
        self.store.flush()?;
        crate::hooks::kill_point("after-index-rebuilt");
        for key in old {
            if written.contains(&key.name) {
                continue; // rebuilt identically
            }
            lease.check()?;
            self.store.delete(&key)?;
            stats.index_objects_removed += 1;
        }
        self.store.flush()?;
        if let Err(e) = lease.release() {
            tracing::warn!(error = %e, "could not remove the lease; the next prune removes it");
        }
        Ok(stats)
    }

    /// Write the packs of `batch` as one index object (none when empty).
    fn write_index_object(
        &self,
        lease: &crate::lease::Lease,
        batch: &mut Vec<(PackId, Vec<PackEntry>)>,
        written: &mut HashSet<String>,
        stats: &mut RepairIndexStats,
    ) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let file = IndexFile {
            packs: std::mem::take(batch),
        };
        let sealed = object::seal(&self.keys, ObjectKind::Index, &file.encode());
        let name = blake3::hash(&sealed).to_hex().to_string();
        lease.check()?;
        self.store
            .put(&Key::new(ObjectKind::Index, name.clone())?, &sealed)?;
        written.insert(name);
        stats.index_objects_written += 1;
        Ok(())
    }

    /// A pack's entries, from its header (bounded: at most the header size limit is read).
    fn read_pack_header(&self, p: &PackId, size: u64) -> Result<Vec<PackEntry>> {
        let key = pack_key(p);
        let want = size.min(pack::MAX_HEADER as u64 + 4);
        let tail = match self.store.get_range(&key, size - want, want) {
            Ok(t) => t,
            Err(vmkeep_store::Error::ShortRead { .. }) => {
                return Err(Error::corrupt(
                    key.to_string(),
                    vmkeep_core::Error::Corrupt {
                        kind: "pack",
                        reason: "shorter than listed".into(),
                    },
                ))
            }
            Err(e) => return Err(e.into()),
        };
        pack::read_header(&self.keys, size, &tail).map_err(|e| Error::corrupt(key.to_string(), e))
    }
}

//! Garbage collection: reclaim packs no restore point needs, without ever deleting one a
//! running backup may reference (FORMAT.md §13; the protocol is checked in [`model`]).
//!
//! One prune's GC, under the exclusive maintenance lease:
//! 1. **seal** GC records a killed prune left unsealed (list the live leases, write them in);
//! 2. **mark** every restore point (`mark.rs`, through the one walker);
//! 3. **condemn** ([`plan::condemn`]): packs home to no referenced blob, and sparse
//!    packs once their live blobs were copied into new packs (repack), go into a new GC
//!    record, written unsealed, then sealed with the leases listed after it landed;
//! 4. **sweep** ([`plan::sweep`]): list the leases; a sealed record none of whose
//!    leases is still alive is swept: mark again (only restore points that appeared since),
//!    then delete each of its packs that holds no referenced blob lacking another live copy,
//!    rewrite the index objects without them, delete the record.
//!
//! A backup reads the records after its lease landed and never reuses blobs of condemned
//! packs; one whose read missed a record had its lease listed when the record was sealed, and
//! the record waits for it. One that finished before the sweep's lease listing is in the
//! second mark. So a pack is deleted only when no restore point, committed or to come, needs it.
//!
//! Every destructive step first checks that the prune's own lease was never lost (a prune
//! stopped past the lease timeout may have been judged dead, and another prune may have begun).
use std::collections::HashSet;

use serde::Serialize;
use vmkeep_core::pack::{IndexFile, PackEntry};
use vmkeep_core::{object, ObjectKind};
use vmkeep_core::{GcRecordId, LeaseId, PackId, SnapshotId};
use vmkeep_store::Key;

use crate::error::Result;
use crate::hooks::kill_point;
use crate::index::{fetch_index_object, pack_key, Fetched, Location};
use crate::lease::Lease;
use crate::packer::Packer;
use crate::progress::Progress;
use crate::scan::RepoScan;
use crate::Repository;

mod mark;
#[cfg(test)]
mod model;
#[cfg(test)]
mod oracle;
pub mod plan;
pub mod record;

use mark::Mark;
use plan::{CondemnPlan, CondemnReason, Packs, RecordView, SweepPlan};
use record::GcRecord;

#[derive(Clone, Debug, Default, Serialize)]
pub struct GcStats {
    pub packs_deleted: u64,
    /// Bytes of the packs deleted.
    pub reclaimed_bytes: u64,
    pub packs_condemned: u64,
    pub packs_repacked: u64,
    /// Bytes of live blobs copied into new packs by repacking.
    pub bytes_repacked: u64,
    /// Condemned packs whose deletion waits for running operations (a later prune reclaims them).
    pub packs_waiting: u64,
    pub bytes_waiting: u64,
    /// Condemned packs kept because a backup that predates their record reused their data.
    pub packs_reprieved: u64,
    pub records_sealed: u64,
    pub records_swept: u64,
    /// Unreadable GC records replaced by this prune's own.
    pub records_damaged_removed: u64,
    pub index_objects_rewritten: u64,
}

/// What a prune would do now, without doing it (`prune --dry-run`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct GcPreview {
    pub condemn: CondemnPlan,
    pub sweep: SweepPlan,
    /// Operations whose leases are alive (they hold condemned packs back).
    pub live_leases: usize,
    pub reclaimed_bytes: u64,
    pub bytes_to_repack: u64,
}

/// The repository as GC sees it at one moment (index, packs), or the first damaged index
/// object as an error: GC must not decide what is unreferenced while part of the index is
/// unreadable.
fn intact_scan(repo: &Repository, pending: &HashSet<PackId>) -> Result<RepoScan> {
    let mut scan = RepoScan::load(repo, pending.clone())?;
    match scan.damaged.pop() {
        Some((key, e)) => Err(crate::Error::Invalid {
            what: "repository state",
            reason: format!(
                "index object {key} is damaged ({e}); prune refuses to decide what is garbage \
                 without the whole index: run `vmkeep repair index`, then prune again"
            ),
        }),
        None => Ok(scan),
    }
}

impl Repository {
    /// GC under the exclusive maintenance lease `lease`.
    pub(crate) fn gc_locked(&self, lease: &Lease, progress: &dyn Progress) -> Result<GcStats> {
        let mut stats = GcStats::default();
        // 1. Seal what a killed prune left unsealed: one lease listing, made after all of
        //    them landed, serves them all.
        let mut loaded = record::load_all(self)?;
        loaded.warn_damaged();
        let mut unsealed = loaded
            .records
            .iter_mut()
            .filter(|(_, r)| r.waiting.is_none())
            .peekable();
        if unsealed.peek().is_some() {
            let waiting = self.live_leases_except(lease.id())?;
            for (id, rec) in unsealed {
                lease.check()?;
                rec.waiting = Some(waiting.clone());
                record::put(self, id, rec)?;
                stats.records_sealed += 1;
            }
        }
        self.store.flush()?;

        // 2. Mark.
        progress.phase("mark", 0);
        let mut mark = Mark::new(self)?;
        let condemned_before = loaded.condemned();
        let listed = mark.list_new(&HashSet::new())?;
        let scan = intact_scan(self, &condemned_before)?;
        mark.add(&scan.index, &listed)?;
        progress.finish_phase();

        // 3. Condemn (and repack).
        progress.phase("plan", 0);
        let packs = Packs {
            sizes: &scan.sizes,
            pending: &condemned_before,
        };
        let (plan, _) = plan::condemn(&packs, &mut |f| scan.pass(&mut mark.referenced, f))?;
        progress.finish_phase();
        drop(scan);
        let mut condemn: Vec<(PackId, CondemnReason)> =
            plan.condemn.iter().map(|c| (c.pack, c.reason)).collect();
        if !plan.repack.is_empty() {
            let written = self.repack(lease, &plan, &mut stats, progress)?;
            // A pack condemned as unindexed (a dead repack's output) may just have been
            // written again, same bytes and name, by this repack: it is a live home now.
            condemn.retain(|(p, why)| *why != CondemnReason::Unindexed || !written.contains(p));
            condemn.extend(
                plan.repack
                    .iter()
                    .map(|r| (r.pack, CondemnReason::Repacked)),
            );
        }
        let mut condemn: Vec<PackId> = condemn.into_iter().map(|(p, _)| p).collect();
        if !condemn.is_empty() {
            condemn.sort();
            stats.packs_condemned = condemn.len() as u64;
            self.write_sealed_record(lease, condemn)?;
        }
        // Damaged records are replaced by the one just written (see `record::Records`).
        for (id, _) in &loaded.damaged {
            lease.check()?;
            self.store.delete(&record::record_key(id))?;
            stats.records_damaged_removed += 1;
        }

        // 4. Sweep.
        self.sweep(lease, &mut mark, &mut stats, progress)?;
        Ok(stats)
    }

    /// Copy the live blobs of the packs to repack into new packs; returns the packs written.
    fn repack(
        &self,
        lease: &Lease,
        plan: &CondemnPlan,
        stats: &mut GcStats,
        progress: &dyn Progress,
    ) -> Result<HashSet<PackId>> {
        progress.phase("repack", plan.repack.iter().map(|r| r.live_bytes).sum());
        lease.check()?;
        let packer = Packer::start(
            self.store.clone(),
            self.keys.clone(),
            self.config.pack_size as usize,
        )?;
        let tx = packer.sender();
        for r in &plan.repack {
            for e in &r.live {
                let data = self.read_blob_at(&e.id, &Location::from_entry(r.pack, e))?;
                let encoded = vmkeep_core::blob::encode(&self.keys, e.kind, &e.id, &data);
                stats.bytes_repacked += e.length as u64;
                progress.advance(e.length as u64);
                let msg = crate::packer::EncodedBlob {
                    kind: e.kind,
                    id: e.id,
                    raw_len: e.raw_len,
                    data: encoded,
                };
                if tx.send(msg).is_err() {
                    drop(tx);
                    return Err(packer.failure());
                }
            }
            stats.packs_repacked += 1;
        }
        drop(tx);
        let written = packer.finish()?.pack_ids.into_iter().collect();
        self.store.flush()?;
        progress.finish_phase();
        Ok(written)
    }

    /// Write a record unsealed, then seal it with the leases listed once it landed.
    fn write_sealed_record(&self, lease: &Lease, condemn: Vec<PackId>) -> Result<()> {
        let id = GcRecordId::random();
        let mut rec = GcRecord::new(condemn);
        lease.check()?;
        record::put(self, &id, &rec)?;
        self.store.flush()?;
        kill_point("after-gc-record");
        rec.waiting = Some(self.live_leases_except(lease.id())?);
        lease.check()?;
        record::put(self, &id, &rec)?;
        self.store.flush()?;
        Ok(())
    }

    fn sweep(
        &self,
        lease: &Lease,
        mark: &mut Mark,
        stats: &mut GcStats,
        progress: &dyn Progress,
    ) -> Result<()> {
        let loaded = record::load_all(self)?;
        let live: HashSet<LeaseId> = self.live_leases_except(lease.id())?.into_iter().collect();
        // After the lease listing: every restore point committed by an operation that is not
        // listed any more is visible now.
        let pending = loaded.condemned();
        let records = loaded.records;
        let listed = mark.list_new(&HashSet::new())?;
        let scan = intact_scan(self, &pending)?;
        progress.phase("mark", 0);
        mark.add(&scan.index, &listed)?;
        progress.finish_phase();
        let views: Vec<RecordView> = records
            .iter()
            .map(|(id, r)| RecordView {
                id: *id,
                condemned: &r.condemned,
                sweepable: r
                    .waiting
                    .as_ref()
                    .is_some_and(|w| w.iter().all(|l| !live.contains(l))),
            })
            .collect();
        let plan = plan::sweep(
            &Packs {
                sizes: &scan.sizes,
                pending: &pending,
            },
            &views,
            &|_| false,
            &mut |f| scan.pass(&mut mark.referenced, f),
        )?;
        stats.packs_waiting = plan.waiting.len() as u64;
        stats.bytes_waiting = plan.waiting.iter().map(|(_, b)| b).sum();
        stats.packs_reprieved = plan.reprieved.len() as u64;
        if !plan.reprieved.is_empty() {
            tracing::info!(
                packs = plan.reprieved.len(),
                "condemned packs are referenced again (by a backup that predates their record); kept"
            );
        }
        progress.phase("sweep", plan.reclaimed_bytes());
        for (p, bytes) in &plan.delete {
            lease.check()?;
            self.store.delete(&pack_key(p))?;
            kill_point("after-pack-delete");
            stats.packs_deleted += 1;
            stats.reclaimed_bytes += bytes;
            progress.advance(*bytes);
        }
        progress.finish_phase();
        self.store.flush()?;
        let dropped: HashSet<PackId> = plan
            .delete
            .iter()
            .map(|(p, _)| *p)
            .chain(plan.gone.iter().copied())
            .collect();
        stats.index_objects_rewritten = self.drop_from_index(lease, &scan, &dropped)?;
        for id in &plan.records {
            lease.check()?;
            self.store.delete(&record::record_key(id))?;
            stats.records_swept += 1;
        }
        self.store.flush()?;
        Ok(())
    }

    /// Rewrite every index object that names a pack in `dropped` without it: the new object
    /// first, then (after a flush) the old one goes. Returns how many were rewritten.
    fn drop_from_index(
        &self,
        lease: &Lease,
        scan: &RepoScan,
        dropped: &HashSet<PackId>,
    ) -> Result<u64> {
        if dropped.is_empty() {
            return Ok(0);
        }
        let mut n = 0;
        for key in scan.objects_naming(dropped)? {
            let file = match fetch_index_object(self, &key)? {
                Fetched::Read(f) => f,
                // Rewritten by a prune before this one was judged dead (its lease check fails
                // next), or damaged since the scan: either way not this prune's to rewrite.
                Fetched::Gone => continue,
                Fetched::Damaged(e) => {
                    return Err(crate::Error::corrupt(format!("index object {key}"), e))
                }
            };
            lease.check()?;
            let keep: Vec<(PackId, Vec<PackEntry>)> = file
                .packs
                .into_iter()
                .filter(|(p, _)| !dropped.contains(p))
                .collect();
            if !keep.is_empty() {
                let file = IndexFile { packs: keep };
                let sealed = object::seal(&self.keys, ObjectKind::Index, &file.encode());
                let new_name = blake3::hash(&sealed).to_hex().to_string();
                if new_name != key.name {
                    self.store
                        .put(&Key::new(ObjectKind::Index, new_name)?, &sealed)?;
                }
            }
            self.store.flush()?;
            self.store.delete(&key)?;
            n += 1;
        }
        self.store.flush()?;
        Ok(n)
    }

    /// What a prune would do now if it first forgot `forgotten` (a dry run: nothing is
    /// written). On a repository nothing else changes meanwhile, the real prune does exactly
    /// this.
    pub fn gc_preview(
        &self,
        forgotten: &HashSet<SnapshotId>,
        progress: &dyn Progress,
    ) -> Result<GcPreview> {
        let loaded = record::load_all(self)?;
        let live: HashSet<LeaseId> = self.live_leases(None)?.into_iter().collect();
        let mut pending = loaded.condemned();
        let records = loaded.records;
        let mut mark = Mark::new(self)?;
        let listed = mark.list_new(forgotten)?;
        let scan = RepoScan::load(self, pending.clone())?;
        progress.phase("mark", 0);
        mark.add(&scan.index, &listed)?;
        progress.finish_phase();
        let before = pending.clone();
        let packs = Packs {
            sizes: &scan.sizes,
            pending: &before,
        };
        let (condemn, tally) = plan::condemn(&packs, &mut |f| scan.pass(&mut mark.referenced, f))?;
        // Repacked blobs as the real run would store them: in new packs, so the old packs'
        // blobs have a live copy.
        let repacked: HashSet<PackId> = condemn.repack.iter().map(|r| r.pack).collect();
        let new_record: Vec<PackId> = condemn
            .condemn
            .iter()
            .map(|c| c.pack)
            .chain(condemn.repack.iter().map(|r| r.pack))
            .collect();
        pending.extend(new_record.iter().copied());
        let new_id = GcRecordId([0; 16]);
        let mut views: Vec<RecordView> = records
            .iter()
            .map(|(id, r)| RecordView {
                id: *id,
                condemned: &r.condemned,
                // An unsealed record would be sealed with the leases alive now.
                sweepable: match &r.waiting {
                    Some(w) => w.iter().all(|l| !live.contains(l)),
                    None => live.is_empty(),
                },
            })
            .collect();
        views.push(RecordView {
            id: new_id,
            condemned: &new_record,
            sweepable: live.is_empty(),
        });
        let mut sweep = plan::sweep(
            &Packs {
                sizes: &scan.sizes,
                pending: &pending,
            },
            &views,
            &|g| {
                tally
                    .home(&packs, g)
                    .is_some_and(|h| repacked.contains(&h.pack))
            },
            &mut |f| scan.pass(&mut mark.referenced, f),
        )?;
        sweep.records.retain(|id| *id != new_id);
        Ok(GcPreview {
            reclaimed_bytes: sweep.reclaimed_bytes(),
            bytes_to_repack: condemn.repack.iter().map(|r| r.live_bytes).sum(),
            live_leases: live.len(),
            condemn,
            sweep,
        })
    }
}

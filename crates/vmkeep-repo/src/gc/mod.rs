//! Garbage collection: reclaim packs no restore point needs, without ever deleting one a
//! running backup may reference (FORMAT.md §13; the protocol is checked in [`model`]).
//!
//! One prune's GC, under the exclusive maintenance lease:
//! 1. **seal** GC records a killed prune left unsealed (list the live leases, write them in);
//! 2. **mark** every restore point (`mark.rs`, through the one walker);
//! 3. **condemn** ([`plan::plan_condemn`]): packs home to no referenced blob, and sparse
//!    packs once their live blobs were copied into new packs (repack), go into a new GC
//!    record, written unsealed, then sealed with the leases listed after it landed;
//! 4. **sweep** ([`plan::plan_sweep`]): list the leases; a sealed record none of whose
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
use std::collections::{HashMap, HashSet};

use serde::Serialize;
use vmkeep_core::pack::{IndexFile, PackEntry};
use vmkeep_core::{object, ObjectKind};
use vmkeep_core::{GcRecordId, LeaseId, PackId, SnapshotId};
use vmkeep_store::Key;

use crate::error::Result;
use crate::hooks::kill_point;
use crate::index::{pack_key, pack_sizes, BlobIndex, Location, RawIndex};
use crate::lease::Lease;
use crate::packer::Packer;
use crate::progress::Progress;
use crate::Repository;

mod mark;
#[cfg(test)]
mod model;
pub mod plan;
pub mod record;

use mark::Mark;
use plan::{CondemnPlan, CondemnReason, GcView, RecordView, SweepPlan};
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

/// Every index object, or the first damaged one as an error: GC must not decide what is
/// unreferenced while part of the index is unreadable.
fn intact_index(repo: &Repository) -> Result<RawIndex> {
    let mut raw = RawIndex::load(repo)?;
    match raw.damaged.pop() {
        Some((key, e)) => Err(crate::Error::Invalid {
            what: "repository state",
            reason: format!(
                "index object {key} is damaged ({e}); prune refuses to decide what is garbage \
                 without the whole index: run `vmkeep repair index`, then prune again"
            ),
        }),
        None => Ok(raw),
    }
}

/// The repository as GC sees it at one moment: index, packs, and the lookup table over them.
struct Snapshot {
    raw: RawIndex,
    sizes: HashMap<PackId, u64>,
    index: BlobIndex,
}

impl Snapshot {
    fn load(repo: &Repository, pending: &HashSet<PackId>) -> Result<Snapshot> {
        let raw = intact_index(repo)?;
        let sizes = pack_sizes(repo)?;
        let index = BlobIndex::from_raw(&raw, pending.clone(), sizes.keys().copied().collect());
        Ok(Snapshot { raw, sizes, index })
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
        let mut mark = Mark::new(self);
        let condemned_before = loaded.condemned();
        let listed = mark.list_new(&HashSet::new())?;
        let snap = Snapshot::load(self, &condemned_before)?;
        mark.add(&snap.index, &listed)?;
        progress.finish_phase();

        // 3. Condemn (and repack).
        let plan = plan::plan_condemn(&GcView {
            by_pack: &snap.raw.by_pack,
            pack_sizes: &snap.sizes,
            referenced: &mark.referenced,
            pending: &condemned_before,
        });
        let mut condemn: Vec<PackId> = plan.condemn.iter().map(|c| c.pack).collect();
        if !plan.repack.is_empty() {
            self.repack(lease, &plan, &mut stats, progress)?;
            // A pack condemned as unindexed (a dead repack's output) may just have been
            // written again, same bytes and name, by this repack: it is a live home now.
            let after = intact_index(self)?;
            condemn.retain(|p| snap.raw.by_pack.contains_key(p) || !after.by_pack.contains_key(p));
            condemn.extend(plan.repack.iter().map(|r| r.pack));
        }
        drop(snap);
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

    fn repack(
        &self,
        lease: &Lease,
        plan: &CondemnPlan,
        stats: &mut GcStats,
        progress: &dyn Progress,
    ) -> Result<()> {
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
        packer.finish()?;
        self.store.flush()?;
        progress.finish_phase();
        Ok(())
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
        let snap = Snapshot::load(self, &pending)?;
        progress.phase("mark", 0);
        mark.add(&snap.index, &listed)?;
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
        let plan = plan::plan_sweep(
            &GcView {
                by_pack: &snap.raw.by_pack,
                pack_sizes: &snap.sizes,
                referenced: &mark.referenced,
                pending: &pending,
            },
            &views,
        );
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
        stats.index_objects_rewritten = self.drop_from_index(lease, &snap.raw, &dropped)?;
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
        raw: &RawIndex,
        dropped: &HashSet<PackId>,
    ) -> Result<u64> {
        let mut n = 0;
        for (name, packs) in &raw.files {
            if !packs.iter().any(|p| dropped.contains(p)) {
                continue;
            }
            lease.check()?;
            let keep: Vec<(PackId, Vec<PackEntry>)> = packs
                .iter()
                .filter(|p| !dropped.contains(p))
                .map(|p| (*p, raw.entries_of(p)))
                .collect();
            if !keep.is_empty() {
                let file = IndexFile { packs: keep };
                let sealed = object::seal(&self.keys, ObjectKind::Index, &file.encode());
                let new_name = blake3::hash(&sealed).to_hex().to_string();
                if new_name != *name {
                    self.store
                        .put(&Key::new(ObjectKind::Index, new_name)?, &sealed)?;
                }
            }
            self.store.flush()?;
            self.store
                .delete(&Key::new(ObjectKind::Index, name.clone())?)?;
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
        let mut mark = Mark::new(self);
        let listed = mark.list_new(forgotten)?;
        let snap = Snapshot::load(self, &pending)?;
        progress.phase("mark", 0);
        mark.add(&snap.index, &listed)?;
        progress.finish_phase();
        let condemn = plan::plan_condemn(&GcView {
            by_pack: &snap.raw.by_pack,
            pack_sizes: &snap.sizes,
            referenced: &mark.referenced,
            pending: &pending,
        });
        // Repacked blobs as the real run would store them: in new packs (named here by a hash
        // of the old one), so the old packs' blobs have a live copy.
        let mut by_pack = snap.raw.by_pack.clone();
        let mut sizes = snap.sizes.clone();
        let mut new_record: Vec<PackId> = condemn
            .condemn
            .iter()
            .filter(|c| c.reason != CondemnReason::Repacked)
            .map(|c| c.pack)
            .collect();
        for r in &condemn.repack {
            let copy = PackId(
                *blake3::hash(&[b"dry-run repack".as_slice(), r.pack.as_bytes()].concat())
                    .as_bytes(),
            );
            by_pack.insert(copy, r.live.clone());
            sizes.insert(copy, r.live_bytes);
            new_record.push(r.pack);
        }
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
        let mut sweep = plan::plan_sweep(
            &GcView {
                by_pack: &by_pack,
                pack_sizes: &sizes,
                referenced: &mark.referenced,
                pending: &pending,
            },
            &views,
        );
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

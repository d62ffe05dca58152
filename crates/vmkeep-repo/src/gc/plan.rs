//! GC decisions as pure functions of what was read: which packs to condemn (and repack), and
//! which condemned packs a sweep may delete. No I/O here: `prune --dry-run` prints these plans
//! with the real figures, and the apply step (`gc/mod.rs`) carries them out.
use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;
use vmkeep_core::pack::PackEntry;
use vmkeep_core::{BlobId, GcRecordId, PackId};

/// Repack a pack when less than this fraction of its bytes is still referenced.
pub const REPACK_BELOW_USED: f64 = 0.8;

/// What GC knows of the repository when it decides.
pub struct GcView<'a> {
    /// Index entries per pack (every index object's entries, duplicates included).
    pub by_pack: &'a HashMap<PackId, Vec<PackEntry>>,
    /// Packs that exist, with their sizes.
    pub pack_sizes: &'a HashMap<PackId, u64>,
    /// Every blob a restore point references.
    pub referenced: &'a HashSet<BlobId>,
    /// Packs condemned by GC records (any, sweepable or not).
    pub pending: &'a HashSet<PackId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CondemnReason {
    /// No blob in it is referenced.
    Unreferenced,
    /// Its referenced blobs all have a better home in another pack.
    Duplicate,
    /// No index object names it (left by a backup that died before its index).
    Unindexed,
    /// Its referenced blobs were copied into a new pack (it was mostly garbage).
    Repacked,
}

#[derive(Clone, Debug, Serialize)]
pub struct Condemned {
    pub pack: PackId,
    pub bytes: u64,
    pub reason: CondemnReason,
}

#[derive(Clone, Debug, Serialize)]
pub struct Repack {
    pub pack: PackId,
    pub bytes: u64,
    /// Its blobs to copy (the ones it is the home of).
    #[serde(skip)]
    pub live: Vec<PackEntry>,
    pub live_bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct CondemnPlan {
    /// Packs to condemn now (repacked ones are added once their copies are stored).
    pub condemn: Vec<Condemned>,
    pub repack: Vec<Repack>,
}

/// Choose one home pack per referenced blob (of the packs that exist, are indexed and not
/// already condemned, the one with the largest referenced fraction; ties by id), then condemn
/// packs that are home to nothing, and repack packs whose home blobs fill less than
/// [`REPACK_BELOW_USED`] of them.
pub fn plan_condemn(v: &GcView) -> CondemnPlan {
    let candidates = |p: &PackId| v.pack_sizes.contains_key(p) && !v.pending.contains(p);
    let mut used: HashMap<PackId, u64> = HashMap::new();
    for (p, es) in v.by_pack.iter().filter(|(p, _)| candidates(p)) {
        let mut ids = HashSet::new();
        let u = es
            .iter()
            .filter(|e| v.referenced.contains(&e.id) && ids.insert(e.id))
            .map(|e| e.length as u64)
            .sum();
        used.insert(*p, u);
    }
    let frac = |p: &PackId| used[p] as f64 / v.pack_sizes[p].max(1) as f64;
    let mut home: HashMap<BlobId, PackId> = HashMap::new();
    for (p, es) in v.by_pack.iter().filter(|(p, _)| candidates(p)) {
        for e in es.iter().filter(|e| v.referenced.contains(&e.id)) {
            let better = match home.get(&e.id) {
                None => true,
                Some(h) => (frac(p), std::cmp::Reverse(*p)) > (frac(h), std::cmp::Reverse(*h)),
            };
            if better {
                home.insert(e.id, *p);
            }
        }
    }
    // Each pack's home entries, one per blob id.
    let mut homed: BTreeMap<PackId, Vec<PackEntry>> = BTreeMap::new();
    for (p, es) in v.by_pack {
        let mut ids = HashSet::new();
        for e in es {
            if home.get(&e.id) == Some(p) && ids.insert(e.id) {
                homed.entry(*p).or_default().push(*e);
            }
        }
    }
    let mut plan = CondemnPlan::default();
    let mut packs: Vec<(&PackId, &u64)> = v.pack_sizes.iter().collect();
    packs.sort();
    for (p, &bytes) in packs {
        if v.pending.contains(p) {
            continue;
        }
        match homed.get(p) {
            Some(es) => {
                let live: u64 = es.iter().map(|e| e.length as u64).sum();
                if (live as f64) < REPACK_BELOW_USED * bytes as f64 {
                    plan.repack.push(Repack {
                        pack: *p,
                        bytes,
                        live: es.clone(),
                        live_bytes: live,
                    });
                }
            }
            None => {
                let reason = match v.by_pack.get(p) {
                    None => CondemnReason::Unindexed,
                    Some(es) if es.iter().any(|e| v.referenced.contains(&e.id)) => {
                        CondemnReason::Duplicate
                    }
                    Some(_) => CondemnReason::Unreferenced,
                };
                plan.condemn.push(Condemned {
                    pack: *p,
                    bytes,
                    reason,
                });
            }
        }
    }
    plan
}

/// A GC record as the sweep sees it.
pub struct RecordView<'a> {
    pub id: GcRecordId,
    pub condemned: &'a [PackId],
    /// Sealed, and none of the leases it waits for is alive.
    pub sweepable: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct SweepPlan {
    /// Condemned packs to delete now.
    pub delete: Vec<(PackId, u64)>,
    /// Condemned packs kept: each holds a referenced blob with no other copy (a backup that
    /// predates the record reused it). Their record goes, so they are live again.
    pub reprieved: Vec<(PackId, BlobId)>,
    /// Condemned packs already gone (a sweep killed midway): only their index entries go.
    pub gone: Vec<PackId>,
    /// Records swept (deleted once their packs are).
    pub records: Vec<GcRecordId>,
    /// Packs of records that still wait for running operations.
    pub waiting: Vec<(PackId, u64)>,
}

impl SweepPlan {
    pub fn reclaimed_bytes(&self) -> u64 {
        self.delete.iter().map(|(_, b)| b).sum()
    }
}

/// Which condemned packs of the sweepable records may go: those holding no referenced blob
/// that lacks a copy in a pack that exists, is not condemned by any record and is not being
/// deleted.
pub fn plan_sweep(v: &GcView, records: &[RecordView]) -> SweepPlan {
    let mut copies: HashMap<BlobId, Vec<PackId>> = HashMap::new();
    for (p, es) in v.by_pack {
        for e in es.iter().filter(|e| v.referenced.contains(&e.id)) {
            copies.entry(e.id).or_default().push(*p);
        }
    }
    let mut plan = SweepPlan::default();
    let mut deleted: HashSet<PackId> = HashSet::new();
    let mut seen: HashSet<PackId> = HashSet::new();
    for r in records {
        if !r.sweepable {
            for p in r.condemned {
                if let Some(&b) = v.pack_sizes.get(p) {
                    plan.waiting.push((*p, b));
                }
            }
            continue;
        }
        plan.records.push(r.id);
        for p in r.condemned {
            if !seen.insert(*p) {
                continue;
            }
            let Some(&bytes) = v.pack_sizes.get(p) else {
                plan.gone.push(*p);
                continue;
            };
            let orphan = v.by_pack.get(p).into_iter().flatten().find(|e| {
                v.referenced.contains(&e.id)
                    && !copies.get(&e.id).is_some_and(|qs| {
                        qs.iter().any(|q| {
                            q != p
                                && v.pack_sizes.contains_key(q)
                                && !v.pending.contains(q)
                                && !deleted.contains(q)
                        })
                    })
            });
            match orphan {
                Some(e) => plan.reprieved.push((*p, e.id)),
                None => {
                    deleted.insert(*p);
                    plan.delete.push((*p, bytes));
                }
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmkeep_core::keys::BlobKind;

    fn id(n: u8) -> BlobId {
        BlobId([n; 32])
    }
    fn pack(n: u8) -> PackId {
        PackId([n; 32])
    }
    fn entry(n: u8, offset: u32, length: u32) -> PackEntry {
        PackEntry {
            kind: BlobKind::Data,
            id: id(n),
            offset,
            length,
            raw_len: length,
        }
    }

    struct World {
        by_pack: HashMap<PackId, Vec<PackEntry>>,
        sizes: HashMap<PackId, u64>,
        referenced: HashSet<BlobId>,
        pending: HashSet<PackId>,
    }

    impl World {
        fn view(&self) -> GcView<'_> {
            GcView {
                by_pack: &self.by_pack,
                pack_sizes: &self.sizes,
                referenced: &self.referenced,
                pending: &self.pending,
            }
        }
    }

    /// Pack 1 holds blobs 1, 2 (both referenced); pack 2 holds 2 (a duplicate) and 3
    /// (unreferenced); pack 3 holds 4 (unreferenced); pack 4 is not indexed; pack 5 holds 5
    /// (referenced, 10% of the pack).
    fn world() -> World {
        let mut by_pack = HashMap::new();
        by_pack.insert(pack(1), vec![entry(1, 0, 100), entry(2, 100, 100)]);
        by_pack.insert(pack(2), vec![entry(2, 0, 100), entry(3, 100, 100)]);
        by_pack.insert(pack(3), vec![entry(4, 0, 100)]);
        by_pack.insert(pack(5), vec![entry(5, 0, 10)]);
        let sizes = [(1, 200), (2, 200), (3, 100), (4, 50), (5, 100)]
            .into_iter()
            .map(|(p, s)| (pack(p), s))
            .collect();
        World {
            by_pack,
            sizes,
            referenced: [1, 2, 5].into_iter().map(id).collect(),
            pending: HashSet::new(),
        }
    }

    #[test]
    fn condemn_chooses_homes_and_reasons() {
        let w = world();
        let plan = plan_condemn(&w.view());
        let got: Vec<(PackId, CondemnReason)> =
            plan.condemn.iter().map(|c| (c.pack, c.reason)).collect();
        assert_eq!(
            got,
            vec![
                (pack(2), CondemnReason::Duplicate),
                (pack(3), CondemnReason::Unreferenced),
                (pack(4), CondemnReason::Unindexed),
            ]
        );
        assert_eq!(plan.repack.len(), 1);
        assert_eq!(plan.repack[0].pack, pack(5));
        assert_eq!(plan.repack[0].live_bytes, 10);
    }

    #[test]
    fn packs_already_condemned_are_left_to_their_record() {
        let mut w = world();
        w.pending.insert(pack(3));
        let plan = plan_condemn(&w.view());
        assert!(plan.condemn.iter().all(|c| c.pack != pack(3)));
    }

    #[test]
    fn sweep_keeps_the_last_copy_of_a_referenced_blob() {
        let mut w = world();
        // Both copies of blob 2 condemned, in two records: neither may go while the other is
        // condemned too (a sweep never counts on a copy that is itself condemned).
        w.pending = [pack(1), pack(2), pack(3)].into_iter().collect();
        let r1 = [pack(1), pack(3)];
        let r2 = [pack(2)];
        let records = [
            RecordView {
                id: GcRecordId([1; 16]),
                condemned: &r1,
                sweepable: true,
            },
            RecordView {
                id: GcRecordId([2; 16]),
                condemned: &r2,
                sweepable: false,
            },
        ];
        let plan = plan_sweep(&w.view(), &records);
        assert_eq!(plan.delete, vec![(pack(3), 100)]);
        assert_eq!(plan.reprieved.len(), 1);
        assert_eq!(plan.reprieved[0].0, pack(1));
        assert_eq!(plan.waiting, vec![(pack(2), 200)]);
        assert_eq!(plan.records, vec![GcRecordId([1; 16])]);
        assert_eq!(plan.reclaimed_bytes(), 100);
    }

    #[test]
    fn sweep_deletes_a_duplicate_whose_blob_lives_elsewhere() {
        let mut w = world();
        w.pending = [pack(2), pack(6)].into_iter().collect();
        let r = [pack(2), pack(6)];
        let records = [RecordView {
            id: GcRecordId([1; 16]),
            condemned: &r,
            sweepable: true,
        }];
        let plan = plan_sweep(&w.view(), &records);
        assert_eq!(plan.delete, vec![(pack(2), 200)]);
        assert_eq!(plan.gone, vec![pack(6)], "pack 6 no longer exists");
    }
}

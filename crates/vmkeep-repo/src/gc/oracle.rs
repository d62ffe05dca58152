//! The planner GC used while it held the whole index in memory, kept as the tests' oracle:
//! the streaming planner (`plan.rs`) must take the same decisions on every input.
use std::collections::{BTreeMap, HashMap, HashSet};

use vmkeep_core::pack::PackEntry;
use vmkeep_core::{BlobId, PackId};

use super::plan::{
    CondemnPlan, CondemnReason, Condemned, RecordView, Repack, SweepPlan, REPACK_BELOW_USED,
};

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

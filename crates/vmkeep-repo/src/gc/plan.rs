//! GC decisions as functions of what was read: which packs to condemn (and repack), and which
//! condemned packs a sweep may delete. No I/O here: `prune --dry-run` prints these plans with
//! the real figures, and the apply step (`gc/mod.rs`) carries them out.
//!
//! The index is seen one blob id at a time ([`Group`]: the id, every location the index gives
//! it, whether a restore point references it), in passes over the whole index ([`Pass`]). What
//! is kept between passes is per pack (a few counters for each of the repository's packs), so
//! the decisions take memory in proportion to the packs, not to the blobs: a prune of a 10 TiB
//! repository streams its 160 million entries from the local cache (`scan.rs`). The tests
//! compare every decision with the former in-memory planner (`oracle.rs`).
use std::collections::{HashMap, HashSet};

use serde::Serialize;
use vmkeep_core::pack::PackEntry;
use vmkeep_core::{BlobId, GcRecordId, PackId};

use crate::error::Result;
use crate::index::Location;

/// Repack a pack when less than this fraction of its bytes is still referenced.
pub const REPACK_BELOW_USED: f64 = 0.8;

/// One blob id as the index and the mark see it.
pub struct Group<'a> {
    pub id: BlobId,
    /// Every location the index gives it, each (pack, offset) once (empty: not indexed).
    pub copies: &'a [Location],
    /// A restore point references it.
    pub referenced: bool,
}

/// What a pass calls for each group.
pub type Visit<'v> = dyn FnMut(&Group) -> Result<()> + 'v;

/// One pass over the groups, ids ascending: calls its argument for each.
pub type Pass<'p> = dyn FnMut(&mut Visit) -> Result<()> + 'p;

/// What GC knows of the packs when it decides.
pub struct Packs<'a> {
    /// Packs that exist, with their sizes.
    pub sizes: &'a HashMap<PackId, u64>,
    /// Packs condemned by GC records (any, sweepable or not).
    pub pending: &'a HashSet<PackId>,
}

impl Packs<'_> {
    /// May be a blob's home: exists, not condemned.
    fn live(&self, p: &PackId) -> bool {
        self.sizes.contains_key(p) && !self.pending.contains(p)
    }
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
    /// Its blobs to copy (the ones it is the home of), by offset.
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

/// The first pass's per-pack figures.
#[derive(Default)]
pub struct Tally {
    /// Packs some index entry names.
    indexed: HashSet<PackId>,
    /// Packs holding a referenced blob.
    with_referenced: HashSet<PackId>,
    /// Referenced bytes (each blob once) of each live pack.
    used: HashMap<PackId, u64>,
}

/// The first location in each pack (a pack may list a blob twice; it counts once).
fn per_pack(copies: &[Location]) -> impl Iterator<Item = &Location> {
    copies
        .iter()
        .enumerate()
        .filter(|(i, l)| !copies[..*i].iter().any(|m| m.pack == l.pack))
        .map(|(_, l)| l)
}

impl Tally {
    fn add(&mut self, packs: &Packs, g: &Group) {
        for l in per_pack(g.copies) {
            self.indexed.insert(l.pack);
            if g.referenced {
                self.with_referenced.insert(l.pack);
                if packs.live(&l.pack) {
                    *self.used.entry(l.pack).or_default() += l.length as u64;
                }
            }
        }
    }

    fn fraction(&self, packs: &Packs, p: &PackId) -> f64 {
        self.used.get(p).copied().unwrap_or(0) as f64 / packs.sizes[p].max(1) as f64
    }

    /// The home of a referenced blob: of its live packs, the one with the largest referenced
    /// fraction (ties by the smaller id).
    pub fn home<'g>(&self, packs: &Packs, g: &Group<'g>) -> Option<&'g Location> {
        if !g.referenced {
            return None;
        }
        per_pack(g.copies)
            .filter(|l| packs.live(&l.pack))
            .max_by(|a, b| {
                let ka = (self.fraction(packs, &a.pack), std::cmp::Reverse(a.pack));
                let kb = (self.fraction(packs, &b.pack), std::cmp::Reverse(b.pack));
                ka.partial_cmp(&kb).expect("fractions are finite")
            })
    }
}

fn entry(id: BlobId, l: &Location) -> PackEntry {
    PackEntry {
        kind: l.kind,
        id,
        offset: l.offset,
        length: l.length,
        raw_len: l.raw_len,
    }
}

/// Choose one home pack per referenced blob ([`Tally::home`]), then condemn packs that are
/// home to nothing, and repack packs whose home blobs fill less than [`REPACK_BELOW_USED`] of
/// them. Two passes, and a third to gather the blobs to repack when there are some. Returns
/// the plan and the first pass's tally (which gives each blob's home).
pub fn condemn(packs: &Packs, pass: &mut Pass) -> Result<(CondemnPlan, Tally)> {
    let mut tally = Tally::default();
    pass(&mut |g| {
        tally.add(packs, g);
        Ok(())
    })?;
    let mut homed: HashMap<PackId, u64> = HashMap::new();
    pass(&mut |g| {
        if let Some(h) = tally.home(packs, g) {
            *homed.entry(h.pack).or_default() += h.length as u64;
        }
        Ok(())
    })?;
    let mut plan = CondemnPlan::default();
    let mut sorted: Vec<(&PackId, &u64)> = packs.sizes.iter().collect();
    sorted.sort();
    for (p, &bytes) in sorted {
        if packs.pending.contains(p) {
            continue;
        }
        match homed.get(p) {
            Some(&live) => {
                if (live as f64) < REPACK_BELOW_USED * bytes as f64 {
                    plan.repack.push(Repack {
                        pack: *p,
                        bytes,
                        live: Vec::new(),
                        live_bytes: live,
                    });
                }
            }
            None => {
                let reason = if !tally.indexed.contains(p) {
                    CondemnReason::Unindexed
                } else if tally.with_referenced.contains(p) {
                    CondemnReason::Duplicate
                } else {
                    CondemnReason::Unreferenced
                };
                plan.condemn.push(Condemned {
                    pack: *p,
                    bytes,
                    reason,
                });
            }
        }
    }
    if !plan.repack.is_empty() {
        let slot: HashMap<PackId, usize> = plan
            .repack
            .iter()
            .enumerate()
            .map(|(i, r)| (r.pack, i))
            .collect();
        pass(&mut |g| {
            if let Some(h) = tally.home(packs, g) {
                if let Some(&i) = slot.get(&h.pack) {
                    plan.repack[i].live.push(entry(g.id, h));
                }
            }
            Ok(())
        })?;
        // In pack order, as written: a restore reads neighbours together.
        for r in &mut plan.repack {
            r.live.sort_by_key(|e| e.offset);
        }
    }
    Ok((plan, tally))
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
/// that lacks a copy in a live pack (one that exists and no record condemns; every pack a
/// record names is in `packs.pending`, so a pack being deleted is never counted as a copy).
/// `new_copy` says a blob will have a live copy the index does not show yet (a dry run's
/// repack). One pass.
pub fn sweep(
    packs: &Packs,
    records: &[RecordView],
    new_copy: &dyn Fn(&Group) -> bool,
    pass: &mut Pass,
) -> Result<SweepPlan> {
    let mut plan = SweepPlan::default();
    // Candidates in record order, each pack once.
    let mut candidates: Vec<(PackId, u64)> = Vec::new();
    let mut seen: HashSet<PackId> = HashSet::new();
    for r in records {
        if !r.sweepable {
            for p in r.condemned {
                if let Some(&b) = packs.sizes.get(p) {
                    plan.waiting.push((*p, b));
                }
            }
            continue;
        }
        plan.records.push(r.id);
        for p in r.condemned {
            debug_assert!(packs.pending.contains(p), "a record's packs are pending");
            if !seen.insert(*p) {
                continue;
            }
            match packs.sizes.get(p) {
                Some(&bytes) => candidates.push((*p, bytes)),
                None => plan.gone.push(*p),
            }
        }
    }
    let wanted: HashSet<PackId> = candidates.iter().map(|(p, _)| *p).collect();
    let mut reprieve: HashMap<PackId, BlobId> = HashMap::new();
    if !wanted.is_empty() {
        pass(&mut |g| {
            if !g.referenced || g.copies.iter().any(|l| packs.live(&l.pack)) || new_copy(g) {
                return Ok(());
            }
            for l in g.copies.iter().filter(|l| wanted.contains(&l.pack)) {
                reprieve.entry(l.pack).or_insert(g.id);
            }
            Ok(())
        })?;
    }
    for (p, bytes) in candidates {
        match reprieve.get(&p) {
            Some(id) => plan.reprieved.push((p, *id)),
            None => plan.delete.push((p, bytes)),
        }
    }
    Ok(plan)
}

/// Passes over an index held in memory (tests, and the oracle comparison).
#[cfg(test)]
pub(crate) fn memory_groups(
    by_pack: &HashMap<PackId, Vec<PackEntry>>,
    referenced: &HashSet<BlobId>,
) -> Vec<(BlobId, Vec<Location>, bool)> {
    let mut all: std::collections::BTreeMap<BlobId, Vec<Location>> = Default::default();
    for (p, es) in by_pack {
        for e in es {
            let l = Location::from_entry(*p, e);
            let v = all.entry(e.id).or_default();
            if !v.iter().any(|m| m.pack == l.pack && m.offset == l.offset) {
                v.push(l);
            }
        }
    }
    for id in referenced {
        all.entry(*id).or_default();
    }
    all.into_iter()
        .map(|(id, mut v)| {
            v.sort_by_key(|l| (l.pack, l.offset));
            let r = referenced.contains(&id);
            (id, v, r)
        })
        .collect()
}

#[cfg(test)]
pub(crate) fn memory_pass(
    groups: &[(BlobId, Vec<Location>, bool)],
) -> impl FnMut(&mut Visit) -> Result<()> + '_ {
    move |f| {
        for (id, copies, referenced) in groups {
            f(&Group {
                id: *id,
                copies,
                referenced: *referenced,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

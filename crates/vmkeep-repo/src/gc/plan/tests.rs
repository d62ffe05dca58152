use std::collections::{HashMap, HashSet};

use proptest::prelude::*;
use vmkeep_core::keys::BlobKind;
use vmkeep_core::pack::PackEntry;
use vmkeep_core::{BlobId, GcRecordId, PackId};

use super::*;
use crate::gc::oracle;

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

#[derive(Clone, Debug)]
struct World {
    by_pack: HashMap<PackId, Vec<PackEntry>>,
    sizes: HashMap<PackId, u64>,
    referenced: HashSet<BlobId>,
    pending: HashSet<PackId>,
}

impl World {
    fn packs(&self) -> Packs<'_> {
        Packs {
            sizes: &self.sizes,
            pending: &self.pending,
        }
    }

    fn oracle(&self) -> oracle::GcView<'_> {
        oracle::GcView {
            by_pack: &self.by_pack,
            pack_sizes: &self.sizes,
            referenced: &self.referenced,
            pending: &self.pending,
        }
    }

    fn condemn(&self) -> CondemnPlan {
        let groups = memory_groups(&self.by_pack, &self.referenced);
        let mut pass = memory_pass(&groups);
        let plan = condemn(&self.packs(), &mut pass).unwrap().0;
        plan
    }

    fn sweep(&self, records: &[RecordView]) -> SweepPlan {
        let groups = memory_groups(&self.by_pack, &self.referenced);
        let mut pass = memory_pass(&groups);
        let plan = sweep(&self.packs(), records, &|_| false, &mut pass).unwrap();
        plan
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
    let plan = w.condemn();
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
    assert_eq!(plan.repack[0].live, vec![entry(5, 0, 10)]);
}

#[test]
fn packs_already_condemned_are_left_to_their_record() {
    let mut w = world();
    w.pending.insert(pack(3));
    let plan = w.condemn();
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
    let plan = w.sweep(&records);
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
    let plan = w.sweep(&records);
    assert_eq!(plan.delete, vec![(pack(2), 200)]);
    assert_eq!(plan.gone, vec![pack(6)], "pack 6 no longer exists");
}

/// A small random repository: up to 8 packs (some missing, some unindexed), up to 12 blobs
/// with copies in several packs, some referenced, some packs pending; records over the
/// pending packs, some sweepable.
fn arb_world() -> impl Strategy<Value = (World, Vec<(Vec<PackId>, bool)>)> {
    let packs = proptest::collection::vec(
        (
            proptest::collection::vec((0u8..12, 1u32..60), 0..6),
            proptest::option::weighted(0.85, 50u64..400),
            any::<bool>(),
        ),
        1..8,
    );
    (
        packs,
        proptest::collection::hash_set(0u8..12, 0..12),
        proptest::collection::vec(
            (proptest::collection::vec(0u8..8, 0..4), any::<bool>()),
            0..3,
        ),
    )
        .prop_map(|(packs, referenced, records)| {
            let mut by_pack = HashMap::new();
            let mut sizes = HashMap::new();
            for (i, (blobs, size, _)) in packs.iter().enumerate() {
                let p = pack(i as u8 + 1);
                if let Some(s) = size {
                    sizes.insert(p, *s);
                }
                let mut offset = 0;
                let mut es = Vec::new();
                for (b, _) in blobs {
                    // A blob's stored length is the same wherever it is.
                    let len = 10 + *b as u32 * 3;
                    es.push(entry(*b, offset, len));
                    offset += len;
                }
                // An index object never names a pack without entries.
                if !es.is_empty() {
                    by_pack.insert(p, es);
                }
            }
            let n = packs.len() as u8;
            let records: Vec<(Vec<PackId>, bool)> = records
                .into_iter()
                .map(|(ps, s)| {
                    let mut ps: Vec<PackId> = ps.into_iter().map(|p| pack(p % n + 1)).collect();
                    ps.dedup();
                    (ps, s)
                })
                .collect();
            let mut pending: HashSet<PackId> =
                records.iter().flat_map(|(ps, _)| ps.clone()).collect();
            for (i, (_, _, extra)) in packs.iter().enumerate() {
                if *extra && i % 3 == 0 {
                    pending.insert(pack(i as u8 + 1));
                }
            }
            let w = World {
                by_pack,
                sizes,
                referenced: referenced.into_iter().map(id).collect(),
                pending,
            };
            (w, records)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// The streaming planner takes exactly the former in-memory planner's decisions.
    #[test]
    fn streaming_decisions_are_the_oracles((w, recs) in arb_world()) {
        let old = oracle::plan_condemn(&w.oracle());
        let new = w.condemn();
        let key = |c: &Condemned| (c.pack, c.bytes, c.reason);
        prop_assert_eq!(old.condemn.iter().map(key).collect::<Vec<_>>(),
            new.condemn.iter().map(key).collect::<Vec<_>>());
        let rkey = |r: &Repack| {
            let mut live = r.live.clone();
            live.sort_by_key(|e| (e.offset, e.id));
            (r.pack, r.bytes, r.live_bytes, live)
        };
        prop_assert_eq!(old.repack.iter().map(rkey).collect::<Vec<_>>(),
            new.repack.iter().map(rkey).collect::<Vec<_>>());

        let views: Vec<RecordView> = recs
            .iter()
            .enumerate()
            .map(|(i, (ps, s))| RecordView { id: GcRecordId([i as u8; 16]), condemned: ps, sweepable: *s })
            .collect();
        let old = oracle::plan_sweep(&w.oracle(), &views);
        let new = w.sweep(&views);
        prop_assert_eq!(&old.delete, &new.delete);
        prop_assert_eq!(&old.gone, &new.gone);
        prop_assert_eq!(&old.records, &new.records);
        prop_assert_eq!(&old.waiting, &new.waiting);
        let packs = |v: &[(PackId, BlobId)]| v.iter().map(|(p, _)| *p).collect::<Vec<_>>();
        prop_assert_eq!(packs(&old.reprieved), packs(&new.reprieved));
        // Each reprieve names a referenced blob of that pack with no live copy.
        for (p, b) in &new.reprieved {
            prop_assert!(w.referenced.contains(b));
            prop_assert!(w.by_pack[p].iter().any(|e| e.id == *b));
            let live_copy = w.by_pack.iter().any(|(q, es)| {
                w.sizes.contains_key(q) && !w.pending.contains(q) && es.iter().any(|e| e.id == *b)
            });
            prop_assert!(!live_copy);
        }
    }
}

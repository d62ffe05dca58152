//! Pack lists (docs/PROTOCOL.md §5) over random histories of two VMs that share data: backups
//! (each list built without reading anything: the session's packs, the packs of the stored
//! blobs it reused, the parent's list), backups that take the parent's whole tree without
//! reading (an unchanged image), forgets and prunes that repack. After every step each
//! restore point's list either covers every pack a reader reads its blobs from, or names a pack
//! that is gone or condemned (the mark the next prune rewrites by); after every prune every
//! list covers exactly. A list of a forgotten point goes with it.
mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use vmkeep_core::packlist::PackList;
use vmkeep_core::PackId;
use vmkeep_repo::index::BlobIndex;
use vmkeep_repo::{Manifest, PruneOptions, Repository};
use vmkeep_store::{Key, LocalStore, ObjectKind, ObjectMeta, Store};

/// A local store that says it is served: writers keep pack lists.
#[derive(Debug)]
struct Served(LocalStore);

impl Store for Served {
    fn location(&self) -> String {
        self.0.location()
    }
    fn get(&self, key: &Key, max_len: u64) -> vmkeep_store::Result<Vec<u8>> {
        self.0.get(key, max_len)
    }
    fn get_range(&self, key: &Key, offset: u64, len: u64) -> vmkeep_store::Result<Vec<u8>> {
        self.0.get_range(key, offset, len)
    }
    fn size(&self, key: &Key) -> vmkeep_store::Result<u64> {
        self.0.size(key)
    }
    fn put(&self, key: &Key, data: &[u8]) -> vmkeep_store::Result<()> {
        self.0.put(key, data)
    }
    fn put_if_absent(&self, key: &Key, data: &[u8]) -> vmkeep_store::Result<bool> {
        self.0.put_if_absent(key, data)
    }
    fn list(&self, kind: ObjectKind) -> vmkeep_store::Result<Vec<ObjectMeta>> {
        self.0.list(kind)
    }
    fn delete(&self, key: &Key) -> vmkeep_store::Result<()> {
        self.0.delete(key)
    }
    fn flush(&self) -> vmkeep_store::Result<()> {
        self.0.flush()
    }
    fn needs_pack_lists(&self) -> bool {
        true
    }
}

/// Some of the chunks changed at random (a few reverted to what the other VM holds, so the
/// two VMs share blobs).
fn change(spec: &Spec, other: &Spec, rng: &mut Rng) -> Spec {
    let mut s = spec.clone();
    for (i, c) in s.chunks.iter_mut().enumerate() {
        match rng.below(100) {
            0..=9 => *c = Chunk::Random(rng.next_u64()),
            10..=13 => *c = other.chunks.get(i).copied().unwrap_or(Chunk::Hole),
            14..=15 => *c = Chunk::Hole,
            _ => {}
        }
    }
    s
}

/// The packs a reader takes `m`'s blobs from (the index's preferred copy of each).
fn read_from(repo: &Repository, index: &BlobIndex, m: &Manifest) -> BTreeSet<PackId> {
    repo.exact_pack_list(index, m).unwrap().packs
}

fn list_of(repo: &Repository, m: &Manifest) -> PackList {
    repo.load_pack_list(&m.id)
        .unwrap()
        .unwrap_or_else(|| panic!("restore point {} has no pack list", m.id))
}

/// Every list names its VM and covers what readers read, or carries the stale mark.
fn check_lists(repo: &Repository, exact_required: bool, ctx: &str) {
    let index = BlobIndex::load(repo).unwrap();
    for m in repo.snapshots().unwrap() {
        let list = list_of(repo, &m);
        assert_eq!(list.vm, m.vm, "{ctx}");
        let need = read_from(repo, &index, &m);
        let missing: Vec<_> = need.difference(&list.packs).collect();
        if missing.is_empty() {
            continue;
        }
        let marked = list
            .packs
            .iter()
            .any(|p| !index.pack_exists(p) || index.is_condemned(p));
        assert!(
            marked && !exact_required,
            "{ctx}: the list of {} lacks {missing:?} and {}",
            m.id,
            if exact_required {
                "a prune just ran"
            } else {
                "names no pack that is gone or condemned"
            }
        );
    }
}

#[test]
fn pack_lists_cover_every_restore_point_through_backups_forgets_and_prunes() {
    for seed in 0..4u64 {
        let encrypted = seed % 2 == 0;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let root = dir.join("repo");
        init_repo(&root, encrypted);
        let store: Arc<dyn Store> = Arc::new(Served(LocalStore::open(&root).unwrap()));
        let repo = open_store(store, encrypted, 2);
        let mut rng = Rng::new(7100 + seed);
        let size = 48 * CS;
        let mut specs = [Spec::mixed(size, &mut rng), Spec::mixed(size, &mut rng)];
        let vms = ["a", "b"];
        let mut forgotten = Vec::new();
        for step in 0..14 {
            let ctx = format!("seed {seed} step {step}");
            match rng.below(12) {
                10 | 11 => {
                    // The same image again, unchanged since its ctime is a second old: its
                    // tree is the parent's, taken without reading a chunk (source identity),
                    // so only the parent's list can say where its blobs are.
                    let v = rng.below(2) as usize;
                    let img = dir.join(format!("{}.img", vms[v]));
                    if !img.exists() {
                        continue;
                    }
                    // Once a second old, a backup records the file's identity; the next one
                    // finds it unchanged.
                    std::thread::sleep(Duration::from_millis(1100));
                    backup(&repo, vms[v], &disks(&[("vda", &img)])).unwrap();
                    let m = backup(&repo, vms[v], &disks(&[("vda", &img)])).unwrap();
                    assert!(m.stats.read_bytes == 0, "{ctx}: {:?}", m.stats);
                    let index = BlobIndex::load(&repo).unwrap();
                    let need = read_from(&repo, &index, &m);
                    let list = list_of(&repo, &m).packs;
                    let marked = list
                        .iter()
                        .any(|p| !index.pack_exists(p) || index.is_condemned(p));
                    assert!(need.is_subset(&list) || marked, "{ctx}");
                }
                0..=6 => {
                    let v = rng.below(2) as usize;
                    specs[v] = change(&specs[v], &specs[1 - v], &mut rng);
                    let img = specs[v].write(&dir.join(format!("{}.img", vms[v])));
                    let m = backup(&repo, vms[v], &disks(&[("vda", &img)])).unwrap();
                    // Built without reading: from the session and the parent's list.
                    let index = BlobIndex::load(&repo).unwrap();
                    let need = read_from(&repo, &index, &m);
                    assert!(need.is_subset(&list_of(&repo, &m).packs), "{ctx}");
                }
                7 => {
                    let all = repo.snapshots().unwrap();
                    if all.len() > 2 {
                        let victim = all[rng.below(all.len() as u64 - 1) as usize].id;
                        repo.forget(&[victim]).unwrap();
                        forgotten.push(victim);
                    }
                }
                _ => {
                    let plan = repo.prune_plan(&PruneOptions::default()).unwrap();
                    let st = repo.prune(&plan, &vmkeep_repo::NoProgress).unwrap();
                    assert!(st.pack_lists.is_some(), "{ctx}");
                    check_lists(&repo, true, &ctx);
                }
            }
            check_lists(&repo, false, &ctx);
            for f in &forgotten {
                assert!(repo.load_pack_list(f).unwrap().is_none(), "{ctx}: {f}");
            }
        }
        // A final prune leaves every list covering; lists may name more (a backup takes its
        // parent's whole list), which `repair refs --all` trims to exactly what is read.
        let plan = repo.prune_plan(&PruneOptions::default()).unwrap();
        repo.prune(&plan, &vmkeep_repo::NoProgress).unwrap();
        check_lists(&repo, true, &format!("seed {seed} end"));
        repo.repair_pack_lists(true).unwrap();
        let index = BlobIndex::load(&repo).unwrap();
        for m in repo.snapshots().unwrap() {
            assert_eq!(
                list_of(&repo, &m).packs,
                read_from(&repo, &index, &m),
                "seed {seed}"
            );
        }
    }
}

#[test]
fn repair_writes_missing_lists_and_removes_orphans() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let root = dir.join("repo");
    init_repo(&root, true);
    // Made locally (no lists), then served.
    let local = open_local(&root, true, 2);
    let mut rng = Rng::new(99);
    let spec = Spec::mixed(32 * CS, &mut rng);
    let img = spec.write(&dir.join("x.img"));
    let m1 = backup(&local, "x", &disks(&[("vda", &img)])).unwrap();
    assert!(local.load_pack_list(&m1.id).unwrap().is_none());
    let store: Arc<dyn Store> = Arc::new(Served(LocalStore::open(&root).unwrap()));
    let repo = open_store(store.clone(), true, 2);
    // A backup whose parent has no list walks the new restore point.
    let spec2 = change(&spec, &spec, &mut rng);
    let m2 = backup(&repo, "x", &disks(&[("vda", &spec2.write(&img))])).unwrap();
    let index = BlobIndex::load(&repo).unwrap();
    assert_eq!(
        repo.load_pack_list(&m2.id).unwrap().unwrap(),
        repo.exact_pack_list(&index, &m2).unwrap()
    );
    // An orphan list (a backup killed between its list and its manifest).
    let orphan = PackList::new(vmkeep_core::SnapshotId([9; 16]), "x", BTreeSet::new());
    store
        .put(
            &Key::new(ObjectKind::Refs, orphan.snapshot.to_hex()).unwrap(),
            &orphan.to_json(),
        )
        .unwrap();
    // Orphans are removed once older than the lease timeout and the skew allowance: zero here.
    let mut quick = tuning(2);
    quick.lease_timeout = Duration::ZERO;
    quick.clock_skew = Duration::ZERO;
    let st = open_store(store.clone(), true, 2)
        .with_tuning(quick)
        .repair_pack_lists(false)
        .unwrap();
    assert_eq!((st.checked, st.written, st.removed), (2, 1, 1), "{st:?}");
    check_lists(&repo, true, "after repair");
}

//! The local cache (FORMAT.md §17): a warm cache reads no index object, its answers equal the
//! in-memory index's in every state a prune or a loss can leave, a swept or lost pack is never
//! reused through it, and a damaged or deleted cache costs a rebuild, never data.
mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use common::*;
use vmkeep_core::{BlobId, ObjectKind};
use vmkeep_repo::index::BlobIndex;
use vmkeep_repo::walk::Walker;
use vmkeep_repo::{CacheOptions, NoProgress, PruneOptions, Repository};
use vmkeep_store::{LocalStore, Store};
use vmkeep_testkit::store::{CountingStore, Op};

fn open_with(store: Arc<dyn Store>, cache: Option<&Path>, list_packs_up_to: usize) -> Repository {
    let mut t = tuning(2);
    t.list_packs_up_to = list_packs_up_to;
    Repository::open(store, None)
        .unwrap()
        .with_tuning(t)
        .with_cache(cache.map(|c| CacheOptions::new(c.to_path_buf())).as_ref())
        .unwrap()
}

fn local(root: &Path) -> Arc<dyn Store> {
    Arc::new(LocalStore::open(root).unwrap())
}

/// Every blob id the restore points reference.
fn referenced(repo: &Repository) -> HashSet<BlobId> {
    let index = BlobIndex::load(repo).unwrap();
    let mut ids = HashSet::new();
    let mut w = Walker::new(repo);
    for m in repo.snapshots().unwrap() {
        w.walk(&index, &m, &mut |r| {
            ids.insert(r.id);
            Ok(())
        })
        .unwrap();
    }
    ids
}

/// The cached index answers as the in-memory one does, for referenced and unknown ids.
fn assert_same_answers(root: &Path, cache: &Path, ids: &HashSet<BlobId>, context: &str) {
    let memory = BlobIndex::load(&open_with(local(root), None, 0)).unwrap();
    for probe in [10_000, 0] {
        let cached = BlobIndex::load(&open_with(local(root), Some(cache), probe)).unwrap();
        for id in ids.iter().chain([BlobId([0xab; 32])].iter()) {
            assert_eq!(
                cached.usable(id),
                memory.usable(id),
                "{context}: usable({id}) (packs listed up to {probe})"
            );
            assert_eq!(
                cached.get(id),
                memory.get(id),
                "{context}: get({id}) (packs listed up to {probe})"
            );
        }
        assert!(cached.failure().is_none());
    }
}

#[test]
fn a_warm_cache_reads_no_index_object_and_no_tree_node_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let cache = dir.path().join("cache");
    init_repo(&root, false);
    let mut rng = Rng::new(7);
    let spec = Spec::mixed(24 * CS, &mut rng);
    let img = spec.write(&dir.path().join("a.raw"));
    let d = disks(&[("vda", &img)]);
    let counting = Arc::new(CountingStore::new(local(&root)));
    let repo = open_with(counting.clone(), Some(&cache), 10_000);
    let first = backup(&repo, "vm", &d).unwrap();
    let cold = counting.take();
    assert!(cold.of(Op::List, ObjectKind::Index) >= 1);

    // Another process (a new Repository) with the same cache: the index objects the first
    // backup wrote are read once, into the cache; the next backup reads none.
    let counting = Arc::new(CountingStore::new(local(&root)));
    let repo = open_with(counting.clone(), Some(&cache), 10_000);
    let second = backup(&repo, "vm", &d).unwrap();
    let c = counting.take();
    assert_eq!(
        c.of(Op::Get, ObjectKind::Index),
        1,
        "the first backup's index object"
    );
    assert_eq!(second.stats.new_bytes, 0);
    let third = backup(&repo, "vm", &d).unwrap();
    let c = counting.take();
    assert_eq!(
        c.of(Op::Get, ObjectKind::Index),
        0,
        "the second backup stored nothing new, so there is nothing to read: {c:?}"
    );
    assert_eq!(
        c.of(Op::Get, ObjectKind::Snapshot),
        1,
        "of the manifests, only the second backup's (written by it, read once) is read: {c:?}"
    );
    backup(&repo, "vm", &d).unwrap();
    let c = counting.take();
    assert_eq!(c.of(Op::Get, ObjectKind::Snapshot), 1, "the third's: {c:?}");
    // The backups kept the tree nodes they wrote: a restore reads none from the store; with
    // the cached nodes deleted it reads them, and keeps them again.
    assert_restores(&repo, &first, &d);
    let warm = counting.take().of(Op::GetRange, ObjectKind::Pack);
    std::fs::remove_dir_all(repo.cache_dir().unwrap().join("objects")).unwrap();
    assert_restores(&repo, &third, &d);
    let cold = counting.take().of(Op::GetRange, ObjectKind::Pack);
    assert_restores(&repo, &third, &d);
    let again = counting.take().of(Op::GetRange, ObjectKind::Pack);
    assert!(
        warm < cold && again == warm,
        "pack reads: {warm} with the nodes cached, {cold} without, {again} after"
    );
    assert_check_ok(&repo, "after cached backups");
}

#[test]
fn answers_equal_the_in_memory_index_through_prunes_and_losses() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let cache = dir.path().join("cache");
    init_repo(&root, false);
    let mut rng = Rng::new(11);
    let mut spec = Spec::mixed(40 * CS, &mut rng);
    let mut all_ids = HashSet::new();
    for round in 0..4 {
        let img = spec.write(&dir.path().join(format!("r{round}.raw")));
        let repo = open_with(local(&root), Some(&cache), 10_000);
        backup(&repo, "vm", &disks(&[("vda", &img)])).unwrap();
        all_ids.extend(referenced(&repo));
        assert_same_answers(&root, &cache, &all_ids, &format!("after backup {round}"));
        // Keep the last one: the others' blobs are condemned and swept, index objects rewritten.
        let plan = repo
            .prune_plan(&PruneOptions {
                vm: None,
                policy: vmkeep_core::retention::RetentionPolicy {
                    last: Some(1),
                    ..Default::default()
                },
            })
            .unwrap();
        repo.prune(&plan, &NoProgress).unwrap();
        assert_same_answers(&root, &cache, &all_ids, &format!("after prune {round}"));
        spec = spec.mutate(30, &mut rng);
    }
    // A pack lost by hand: neither index may call its blobs usable.
    let repo = open_with(local(&root), None, 0);
    let lost = repo.store().list(ObjectKind::Pack).unwrap()[0].key.clone();
    repo.store().delete(&lost).unwrap();
    assert_same_answers(&root, &cache, &all_ids, "after a pack was lost");
}

/// An index object deleted by hand: its packs' blobs are no longer indexed, so not usable,
/// although the cache still holds their entries (from a source no longer listed, in a run
/// most of whose sources are still listed, so not rewritten).
#[test]
fn blobs_of_a_deleted_index_object_are_not_usable_through_the_cache() {
    unindexed_through_the_cache(false);
}

/// The same, with one byte of the index object changed in place (its name no longer matches
/// its bytes: damaged): the listing shows another time, so the cache reads it again.
#[test]
fn an_index_object_replaced_under_its_name_is_read_again() {
    unindexed_through_the_cache(true);
}

fn unindexed_through_the_cache(replace: bool) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let cache = dir.path().join("cache");
    init_repo(&root, false);
    let mut rng = Rng::new(13);
    let images: Vec<Disks> = (0..6)
        .map(|i| {
            let spec = Spec::random(8 * CS, &mut rng);
            disks(&[("vda", &spec.write(&dir.path().join(format!("{i}.raw"))))])
        })
        .collect();
    for (i, d) in images.iter().enumerate() {
        let repo = open_with(local(&root), Some(&cache), 10_000);
        backup(&repo, &format!("vm{i}"), d).unwrap();
    }
    let repo = open_with(local(&root), Some(&cache), 10_000);
    let ids = referenced(&repo);
    assert!(count(&repo, ObjectKind::Index) >= 6);
    let index = BlobIndex::load(&repo).unwrap();
    // The index object naming the pack of the first VM's first chunk.
    let head = std::fs::read(&images[0][0].1).unwrap()[..CS as usize].to_vec();
    let loc = index.get(&chunk_id(&repo, &head)).unwrap();
    drop(index);
    let raw = vmkeep_repo::index::RawIndex::load(&repo).unwrap();
    let (name, _) = raw
        .files
        .iter()
        .find(|(_, packs)| packs.contains(&loc.pack))
        .unwrap();
    let key = vmkeep_store::Key::new(ObjectKind::Index, name.clone()).unwrap();
    if replace {
        // Same size, one byte different: only the listed time tells the cache.
        let mut bytes = repo.store().get(&key, 1 << 30).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        repo.store().put(&key, &bytes).unwrap();
    } else {
        repo.store().delete(&key).unwrap();
    }
    assert_same_answers(
        &root,
        &cache,
        &ids,
        "after an index object was deleted or replaced",
    );
    let again = backup(&repo, "vm0", &images[0]).unwrap();
    assert!(
        again.stats.new_bytes > 0,
        "the unindexed blobs are written again"
    );
    let report = check(&repo);
    assert!(
        report
            .damaged
            .iter()
            .all(|d| d.snapshot != again.id.to_hex()),
        "the new restore point is whole: {:#?}",
        report.damaged
    );
    assert_restores(&repo, &again, &images[0]);
}

/// A backup through a warm cache after its blobs' packs were swept, or lost, writes them again:
/// the cache still holds their old entries, but their sources are no longer listed (swept) or
/// their pack does not exist (lost). Both ways of knowing which packs exist are tried.
#[test]
fn swept_and_lost_packs_are_never_reused_through_the_cache() {
    for probe in [10_000usize, 0] {
        for lose_by_hand in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("repo");
            let cache = dir.path().join("cache");
            init_repo(&root, false);
            let mut rng = Rng::new(3);
            let spec = Spec::random(16 * CS, &mut rng);
            let img = spec.write(&dir.path().join("a.raw"));
            let d = disks(&[("vda", &img)]);
            let repo = open_with(local(&root), Some(&cache), probe);
            let m = backup(&repo, "vm", &d).unwrap();
            let _ = BlobIndex::load(&repo).unwrap(); // the cache now holds every entry
            if lose_by_hand {
                for p in repo.store().list(ObjectKind::Pack).unwrap() {
                    repo.store().delete(&p.key).unwrap();
                }
            } else {
                repo.forget(&[m.id]).unwrap();
                let plan = repo.prune_plan(&PruneOptions::default()).unwrap();
                repo.prune(&plan, &NoProgress).unwrap();
                assert_eq!(count(&repo, ObjectKind::Pack), 0, "everything was swept");
            }
            let repo = open_with(local(&root), Some(&cache), probe);
            let again = backup(&repo, "vm", &d).unwrap();
            assert!(
                again.stats.new_bytes > 0,
                "probe {probe}, lost by hand {lose_by_hand}: the data is written again"
            );
            if !lose_by_hand {
                assert_check_ok(&repo, "after the backup through the stale cache");
            }
            assert_restores(&repo, &again, &d);
        }
    }
}

fn runs(cache: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(cache).unwrap().flatten() {
        let sub = e.path();
        if sub.is_dir() {
            for f in std::fs::read_dir(&sub).unwrap().flatten() {
                if f.file_name().to_string_lossy().ends_with(".vkr") {
                    out.push(f.path());
                }
            }
        }
    }
    out
}

#[test]
fn a_damaged_or_deleted_cache_costs_a_rebuild_never_data() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let cache = dir.path().join("cache");
    init_repo(&root, false);
    let mut rng = Rng::new(5);
    let spec = Spec::random(32 * CS, &mut rng);
    let img = spec.write(&dir.path().join("a.raw"));
    let d = disks(&[("vda", &img)]);
    let repo = open_with(local(&root), Some(&cache), 10_000);
    backup(&repo, "vm", &d).unwrap();
    let _ = BlobIndex::load(&repo).unwrap();
    let files = runs(&cache);
    assert_eq!(files.len(), 1, "{files:?}");
    // Flip a byte in every entry of the run: every lookup fails its bucket checksum.
    let len = std::fs::metadata(&files[0]).unwrap().len();
    for at in (len - 53 * 32..len).step_by(53) {
        flip_byte(&files[0], at + 40);
    }
    let repo = open_with(local(&root), Some(&cache), 10_000);
    let m = backup(&repo, "vm", &d).unwrap();
    assert!(
        m.stats.new_bytes > 0,
        "a damaged cache answers 'not stored': the data is written again"
    );
    assert!(
        runs(&cache).iter().all(|r| r != &files[0]),
        "the damaged run is gone"
    );
    assert_check_ok(&repo, "after a backup through a damaged cache");
    assert_restores(&repo, &m, &d);
    // A run whose header is damaged is not opened: it is removed and the catalog no longer
    // names it (the next load rebuilds the entries it held).
    let _ = BlobIndex::load(&repo).unwrap();
    let run = runs(&cache).pop().unwrap();
    flip_byte(&run, 10);
    let _ = BlobIndex::load(&open_with(local(&root), Some(&cache), 10_000)).unwrap();
    let name = run.file_name().unwrap().to_string_lossy().into_owned();
    let catalog = std::fs::read_to_string(run.with_file_name("catalog")).unwrap();
    assert!(!catalog.contains(&name), "{catalog}");
    assert!(!run.exists());
    // Deleted outright between two runs: rebuilt.
    std::fs::remove_dir_all(&cache).unwrap();
    let repo = open_with(local(&root), Some(&cache), 10_000);
    let m = backup(&repo, "vm", &d).unwrap();
    assert_eq!(m.stats.new_bytes, 0, "the rebuilt cache knows every blob");
    assert_restores(&repo, &m, &d);
}

#[test]
fn processes_sharing_a_cache_back_up_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let cache = dir.path().join("cache");
    init_repo(&root, false);
    let mut rng = Rng::new(9);
    let images: Vec<Disks> = (0..4)
        .map(|i| {
            let spec = Spec::mixed(24 * CS, &mut rng);
            disks(&[("vda", &spec.write(&dir.path().join(format!("{i}.raw"))))])
        })
        .collect();
    for round in 0..3 {
        std::thread::scope(|s| {
            for (i, d) in images.iter().enumerate() {
                let (root, cache) = (&root, &cache);
                s.spawn(move || {
                    let repo = open_with(local(root), Some(cache), 10_000);
                    backup(&repo, &format!("vm{i}"), d)
                        .unwrap_or_else(|e| panic!("round {round} vm{i}: {e}"));
                });
            }
        });
    }
    let repo = open_with(local(&root), Some(&cache), 10_000);
    assert_check_ok(&repo, "after concurrent backups sharing a cache");
    for m in repo.snapshots().unwrap() {
        let i: usize = m.vm[2..].parse().unwrap();
        assert_restores(&repo, &m, &images[i]);
    }
    let ids = referenced(&repo);
    assert_same_answers(&root, &cache, &ids, "after concurrent backups");
}

/// A process stopped while it holds the cache lock (SIGSTOP, a debugger) must not stall every
/// backup on the host: after the wait, a backup goes on with the index in memory.
#[test]
fn a_cache_locked_too_long_is_done_without() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let cache = dir.path().join("cache");
    init_repo(&root, false);
    let mut rng = Rng::new(17);
    let spec = Spec::mixed(16 * CS, &mut rng);
    let img = spec.write(&dir.path().join("a.raw"));
    let d = disks(&[("vda", &img)]);
    let mut opts = CacheOptions::new(cache.clone());
    opts.lock_wait = std::time::Duration::from_millis(300);
    let open = || {
        Repository::open(local(&root), None)
            .unwrap()
            .with_tuning(tuning(2))
            .with_cache(Some(&opts))
            .unwrap()
    };
    let repo = open();
    backup(&repo, "vm", &d).unwrap();
    // Another "process" holds the lock (flock locks belong to open files, so a second open
    // file description conflicts even within this process).
    let held = std::fs::File::open(repo.cache_dir().unwrap().join("lock")).unwrap();
    assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX) }, 0);
    let start = std::time::Instant::now();
    let m = backup(&open(), "vm", &d).unwrap();
    assert!(start.elapsed() < std::time::Duration::from_secs(10));
    assert_eq!(
        m.stats.new_bytes, 0,
        "deduplicated through the in-memory index"
    );
    drop(held);
    assert_restores(&repo, &m, &d);
}

/// Bit rot in an index object keeps its name, size and time, so the cache (which knows the
/// object by them) still holds its entries as read when it was whole. `check` verifies the
/// repository, not the cache: it reads every index object again and reports the rotten one,
/// and the blobs only it indexed as unindexed, exactly as without a cache.
#[test]
fn check_finds_an_index_object_rotten_after_it_was_cached() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let cache = dir.path().join("cache");
    init_repo(&root, false);
    let mut rng = Rng::new(11);
    let img = Spec::mixed(16 * CS, &mut rng).write(&dir.path().join("a.raw"));
    let d = disks(&[("vda", &img)]);
    let repo = open_with(local(&root), Some(&cache), 10_000);
    backup(&repo, "vm", &d).unwrap();
    assert_check_ok(&repo, "before the rot");
    let objects: Vec<std::path::PathBuf> = std::fs::read_dir(root.join("index"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(objects.len(), 1);
    let path = &objects[0];
    let modified = std::fs::metadata(path).unwrap().modified().unwrap();
    flip_byte(path, 40);
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    for read_data in [false, true] {
        let opts = vmkeep_repo::CheckOptions { read_data };
        let report = repo.check(&opts, &NoProgress).unwrap();
        assert!(
            !report.ok,
            "read_data {read_data}: the blobs it indexed are unindexed now: {report:?}"
        );
        assert!(
            report
                .warnings
                .iter()
                .any(|w| w.contains("index object") && w.contains("damaged")),
            "read_data {read_data}: the rotten object is named: {:?}",
            report.warnings
        );
        assert!(report
            .damaged
            .iter()
            .all(|d| d.kind == vmkeep_repo::check::DamageKind::BlobNotIndexed
                || d.kind == vmkeep_repo::check::DamageKind::Index));
    }
}

/// A cache run damaged under a prune: the prune stops before deciding anything, names the
/// file, discards it, and the next prune (rebuilding the cache from the repository) runs.
/// (The restore point is forgotten first, so the mark reads nothing through the cache and the
/// damage is met by the pass over the index.)
#[test]
fn a_damaged_run_stops_a_prune_which_then_runs_again() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let cache = dir.path().join("cache");
    init_repo(&root, false);
    let mut rng = Rng::new(13);
    let img = Spec::mixed(16 * CS, &mut rng).write(&dir.path().join("a.raw"));
    let d = disks(&[("vda", &img)]);
    let repo = open_with(local(&root), Some(&cache), 10_000);
    let m = backup(&repo, "vm", &d).unwrap();
    backup(&repo, "vm", &d).unwrap();
    let files = runs(&cache);
    assert_eq!(files.len(), 1);
    let len = std::fs::metadata(&files[0]).unwrap().len();
    flip_byte(&files[0], len - 10);
    std::fs::remove_file(snapshot_path(&root, &m.id)).unwrap();
    let forgotten: HashSet<_> = repo.snapshots().unwrap().iter().map(|m| m.id).collect();
    let e = repo
        .gc_preview(&forgotten, &NoProgress)
        .expect_err("a damaged run is not believed");
    assert!(matches!(e, vmkeep_repo::Error::CacheDamaged { .. }), "{e}");
    assert!(!files[0].exists(), "the damaged run was discarded");
    let preview = repo.gc_preview(&forgotten, &NoProgress).unwrap();
    assert!(preview.reclaimed_bytes > 0, "{preview:?}");
}

/// `forget` rewrites the successor of a forgotten point in place (its parent and change
/// maps): a manifest cached before is not used after, because the listing shows another
/// version of it. Every process sees the same restore points as one reading the store.
#[test]
fn a_manifest_rewritten_by_forget_is_read_again() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let cache = dir.path().join("cache");
    init_repo(&root, false);
    let mut rng = Rng::new(17);
    let spec = Spec::mixed(16 * CS, &mut rng);
    let img = spec.write(&dir.path().join("a.raw"));
    let d = disks(&[("vda", &img)]);
    let repo = open_with(local(&root), Some(&cache), 10_000);
    let a = backup(&repo, "vm", &d).unwrap();
    spec.mutate(30, &mut rng).write(&img);
    let b = backup(&repo, "vm", &d).unwrap();
    spec.mutate(30, &mut rng).write(&img);
    let c = backup(&repo, "vm", &d).unwrap();
    let cached = repo.snapshots().unwrap();
    assert_eq!(cached.last().unwrap().parent, Some(b.id));
    // Another process forgets b: c now names a as its parent.
    let other = open_with(local(&root), None, 10_000);
    other.forget(&[b.id]).unwrap();
    let plain = other.snapshots().unwrap();
    let seen = repo.snapshots().unwrap();
    assert_eq!(seen, plain, "the cache gives what the store holds");
    assert_eq!(seen.last().unwrap().id, c.id);
    assert_eq!(seen.last().unwrap().parent, Some(a.id));
    // A cached manifest damaged on disk is dropped and read again.
    let file = repo
        .cache_dir()
        .unwrap()
        .join("objects/manifest")
        .join(c.id.to_hex());
    let len = std::fs::metadata(&file).unwrap().len();
    flip_byte(&file, len - 3);
    assert_eq!(repo.snapshots().unwrap(), plain);
}

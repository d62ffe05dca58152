//! What operations cost in store requests (on object storage, requests are the time): a
//! restore reads neighbouring blobs of a pack with one ranged read, and a backup of an unchanged
//! image through a warm cache makes a few dozen requests whatever the repository holds.
mod common;

use std::sync::Arc;

use common::*;
use vmkeep_core::ObjectKind;
use vmkeep_repo::{CacheOptions, Repository};
use vmkeep_store::{LocalStore, Store};
use vmkeep_testkit::store::{CountingStore, Op};

fn counted(
    root: &std::path::Path,
    cache: &std::path::Path,
    encrypted: bool,
) -> (Repository, Arc<CountingStore>) {
    counted_with(root, cache, encrypted, 2)
}

fn counted_with(
    root: &std::path::Path,
    cache: &std::path::Path,
    encrypted: bool,
    threads: usize,
) -> (Repository, Arc<CountingStore>) {
    let counting = Arc::new(CountingStore::new(Arc::new(
        LocalStore::open(root).unwrap(),
    )));
    let repo = Repository::open(
        counting.clone() as Arc<dyn Store>,
        encrypted.then_some(PASS),
    )
    .unwrap()
    .with_tuning(tuning(threads))
    .with_cache(Some(&CacheOptions::new(cache.to_path_buf())))
    .unwrap();
    (repo, counting)
}

#[test]
fn a_restore_reads_neighbouring_blobs_with_one_request() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    init_repo(&root, true);
    let mut rng = Rng::new(21);
    let chunks = 256u64;
    let spec = Spec::random(chunks * CS, &mut rng);
    let img = spec.write(&dir.path().join("a.raw"));
    let d = disks(&[("vda", &img)]);
    // One hashing thread: the packs hold the chunks in disk order, as a full backup's mostly
    // do (with two, the order in which they finish chunks decides, and so the count below).
    let (writer, _) = counted_with(&root, &dir.path().join("cache"), true, 1);
    let m = backup(&writer, "vm", &d).unwrap();
    let packs = count(&writer, ObjectKind::Pack) as u64;
    let (repo, counting) = counted(&root, &dir.path().join("cache"), true);
    assert_restores(&repo, &m, &d);
    let reads = counting.take().of(Op::GetRange, ObjectKind::Pack);
    println!("restore of {chunks} chunks in {packs} packs: {reads} ranged reads");
    // One read per blob would be 256; in disk order, a window of 64 chunks spans 5 packs.
    assert!(
        reads <= chunks / 64 * 5 + 2,
        "{reads} ranged reads for {chunks} chunks in {packs} packs"
    );
}

#[test]
fn an_unchanged_backup_through_a_warm_cache_makes_few_requests() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    init_repo(&root, false);
    let mut rng = Rng::new(22);
    let cache = dir.path().join("cache");
    // A repository of several VMs and restore points, so listing sizes would show.
    for vm in 0..4 {
        let spec = Spec::mixed(32 * CS, &mut rng);
        let img = spec.write(&dir.path().join(format!("{vm}.raw")));
        let (repo, _) = counted(&root, &cache, false);
        for _ in 0..3 {
            backup(&repo, &format!("vm{vm}"), &disks(&[("vda", &img)])).unwrap();
        }
    }
    let img = dir.path().join("0.raw");
    let (repo, counting) = counted(&root, &cache, false);
    let m = backup(&repo, "vm0", &disks(&[("vda", &img)])).unwrap();
    let c = counting.take();
    let total: u64 = c.calls.values().sum();
    println!("unchanged backup: {total} requests: {:?}", c.calls);
    assert_eq!(m.stats.new_bytes, 0);
    assert_eq!(c.of(Op::Get, ObjectKind::Index), 0, "no index object read");
    assert_eq!(c.of(Op::GetRange, ObjectKind::Pack), 0, "no pack read");
    assert!(total < 100, "{total} requests");
}

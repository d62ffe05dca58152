//! Crash matrices: every mutating store operation of a backup, a prune (forget + GC with
//! repacking) and a forget is made to fail in turn, as if the process died right there (the
//! failing write and every later one fail). Afterwards, with faults off and the dead process's
//! leases recognised as stale, the repository must check clean, every restore point must
//! restore byte-identical, rerunning the operation must succeed, and the next backup must work.
//! Each matrix runs for a plain and an encrypted repository, and over a store that ignores
//! conditional writes.
mod common;

use std::path::{Path, PathBuf};

use common::*;
use vmkeep_core::keys::BlobKind;
use vmkeep_core::retention::RetentionPolicy;
use vmkeep_core::SnapshotId;
use vmkeep_repo::{Manifest, NoProgress, PruneOptions, PruneStats, Repository};
use vmkeep_store::ObjectKind;

const VM: &str = "vm1";

/// Images of four successive restore points of one VM (disks "sys" and "data"), designed so that
/// forgetting the first leaves whole packs unreferenced (its first 2 MiB are random and rewritten
/// by the second) and other packs partly referenced (scattered changes): prune then deletes some
/// packs and repacks others.
struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    points: Vec<Disks>,
    sys: Vec<Spec>,
}

impl Fixture {
    fn new(seed: u64) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut rng = Rng::new(seed);
        let mut s1 = Spec::mixed(4 << 20, &mut rng);
        for c in &mut s1.chunks[..32] {
            *c = Chunk::Random(rng.next_u64());
        }
        let s2 = s1.rewrite(0..32, &mut rng).mutate(30, &mut rng);
        let s3 = s2.rewrite(40..56, &mut rng).mutate(15, &mut rng);
        let s4 = s3.mutate(20, &mut rng);
        let d1 = Spec::mixed((1 << 20) + 12345, &mut rng);
        let d3 = d1.mutate(30, &mut rng);
        let sys = vec![s1, s2, s3, s4];
        let data = [&d1, &d1, &d3, &d3];
        let mut points = Vec::new();
        for (i, (s, d)) in sys.iter().zip(data).enumerate() {
            let sp = s.write(&dir.join(format!("sys{}.img", i + 1)));
            let dp = d.write(&dir.join(format!("data{}.img", i + 1)));
            points.push(disks(&[("sys", &sp), ("data", &dp)]));
        }
        Fixture {
            _tmp: tmp,
            dir,
            points,
            sys,
        }
    }

    /// A repository holding the first `n` restore points.
    fn base(&self, n: usize, encrypted: bool) -> (PathBuf, Refs, Vec<Manifest>) {
        let root = self.dir.join(format!("base{n}"));
        init_repo(&root, encrypted);
        let repo = open_local(&root, encrypted, 1);
        let mut refs = Refs::default();
        let mut ms = Vec::new();
        for d in &self.points[..n] {
            let m = backup(&repo, VM, d).unwrap();
            refs.add(&m, d);
            ms.push(m);
        }
        assert_check_ok(&repo, "base");
        (root, refs, ms)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// Back up the third restore point on top of the first two.
    Backup,
    /// Forget the oldest of three points (keep-last 2) and collect garbage, repacking included.
    Prune,
    /// Forget the middle one of three points.
    Forget,
}

enum Outcome {
    Backup(Manifest),
    Prune(PruneStats),
    Forget(Vec<SnapshotId>),
}

fn prune_keep_last(repo: &Repository, n: u32) -> vmkeep_repo::Result<PruneStats> {
    let plan = repo.prune_plan(&PruneOptions {
        vm: Some(VM.into()),
        policy: RetentionPolicy {
            last: Some(n),
            ..Default::default()
        },
    })?;
    repo.prune(&plan, &NoProgress)
}

fn prune_nothing(repo: &Repository) -> PruneStats {
    let plan = repo.prune_plan(&PruneOptions::default()).unwrap();
    assert!(plan.forgotten().is_empty());
    repo.prune(&plan, &NoProgress).unwrap()
}

fn run_op(
    op: Op,
    repo: &Repository,
    fx: &Fixture,
    ms: &[Manifest],
) -> vmkeep_repo::Result<Outcome> {
    match op {
        Op::Backup => backup(repo, VM, &fx.points[2]).map(Outcome::Backup),
        Op::Prune => prune_keep_last(repo, 2).map(Outcome::Prune),
        Op::Forget => repo.forget(&[ms[1].id]).map(Outcome::Forget),
    }
}

/// Every change map that has a parent in the repository covers the chunks whose content differs
/// between the parent's image and the point's own (exactly, unless a forget merged maps).
fn assert_change_maps_cover(repo: &Repository, refs: &Refs, exact: bool) {
    let all = repo.snapshots().unwrap();
    for m in &all {
        let Some(pid) = m.parent else {
            for d in &m.disks {
                assert_eq!(d.changes, None, "{}: no parent, no change map", m.id);
            }
            continue;
        };
        let Some(parent_refs) = refs.0.get(&pid) else {
            continue; // the parent was forgotten in a concurrent step; nothing to compare
        };
        let own = &refs.0[&m.id];
        for d in &m.disks {
            let old = &parent_refs.iter().find(|(n, _)| *n == d.name).unwrap().1;
            let new = &own.iter().find(|(n, _)| *n == d.name).unwrap().1;
            let truth = differing_chunks(old, new);
            let map: Vec<u64> = d.changes.as_ref().expect("change map").iter().collect();
            if exact {
                assert_eq!(map, truth, "{} disk {}: change map", m.id, d.name);
            } else {
                assert!(
                    truth.iter().all(|i| map.contains(i)),
                    "{} disk {}: change map {map:?} misses some of {truth:?}",
                    m.id,
                    d.name
                );
            }
        }
    }
}

struct Clean {
    writes: u64,
    pack_bytes: u64,
}

/// Run the operation once without faults on a copy of the base, to count its writes and check
/// the scenario is what the matrix means to cover.
fn clean_run(
    op: Op,
    fx: &Fixture,
    base: &Path,
    ms: &[Manifest],
    encrypted: bool,
    stack: Stack,
) -> Clean {
    let root = fx.dir.join("clean");
    copy_dir(base, &root);
    let (repo, fault) = open_faulty(&root, encrypted, stack, 1);
    fault.fail_from(0);
    let out = run_op(op, &repo, fx, ms).unwrap_or_else(|e| panic!("clean {op:?}: {e}"));
    let writes = fault.writes();
    match &out {
        Outcome::Backup(m) => {
            assert!(m.stats.chunks_new > 0 && m.stats.chunks_reused > 0);
        }
        Outcome::Prune(s) => {
            assert_eq!(s.forgotten, vec![ms[0].id]);
            assert!(
                s.gc.packs_deleted >= 2,
                "clean prune deletes packs: {:?}",
                s.gc
            );
            assert!(s.gc.packs_repacked >= 1, "clean prune repacks: {:?}", s.gc);
            assert!(s.gc.reclaimed_bytes > 0);
            assert_eq!(s.gc.packs_waiting, 0);
        }
        Outcome::Forget(ids) => assert_eq!(ids, &vec![ms[1].id]),
    }
    let r = assert_check_ok(&repo, "clean run");
    // Forget leaves the forgotten point's own packs for the next prune; nothing else.
    let unexpected: Vec<&String> = r
        .warnings
        .iter()
        .filter(|w| !(op == Op::Forget && w.contains("holds no referenced data")))
        .collect();
    assert!(
        unexpected.is_empty(),
        "clean run leaves no garbage: {unexpected:?}"
    );
    let pack_bytes = pack_bytes(&repo);
    drop(repo);
    std::fs::remove_dir_all(&root).unwrap();
    Clean { writes, pack_bytes }
}

fn matrix(op: Op, encrypted: bool, stack: Stack) {
    let started = std::time::Instant::now();
    let fx = Fixture::new(match op {
        Op::Backup => 11,
        Op::Prune => 22,
        Op::Forget => 33,
    });
    let n_base = if op == Op::Backup { 2 } else { 3 };
    let (base, base_refs, ms) = fx.base(n_base, encrypted);
    let clean = clean_run(op, &fx, &base, &ms, encrypted, stack);
    let total = clean.writes;
    assert!(total >= 4, "{op:?} does several writes ({total})");
    let (mut failed, mut succeeded) = (0, 0);
    for n in 1..=total + 1 {
        let ctx = format!("{op:?} encrypted={encrypted} {stack:?} fault at write {n}/{total}");
        let root = fx.dir.join(format!("n{n}"));
        copy_dir(&base, &root);

        // The faulted run: write n and every later one fail.
        let (repo, fault) = open_faulty(&root, encrypted, stack, 1);
        fault.fail_from(n);
        let result = run_op(op, &repo, &fx, &ms);
        let attempted = fault.writes();
        fault.fail_from(0);
        if n <= total {
            assert!(
                attempted >= n,
                "{ctx}: the fault was reached ({attempted} writes)"
            );
        }
        // The last write of each operation is its lease's removal, whose failure is only a
        // warning (the lease goes stale and is removed later): every earlier fault is an error.
        if n < total {
            assert!(result.is_err(), "{ctx}: the operation reports the fault");
        } else {
            assert!(result.is_ok(), "{ctx}: {:?}", result.err());
        }
        match &result {
            Ok(_) => succeeded += 1,
            Err(e) => {
                failed += 1;
                assert!(
                    matches!(e, vmkeep_repo::Error::Store(s) if is_injected(s)),
                    "{ctx}: the injected fault is reported, not something else: {e}"
                );
            }
        }
        simulate_death(&repo);
        drop(repo);

        // A new process, without faults.
        let repo = open_local(&root, encrypted, 2);
        let mut refs = base_refs.clone();
        if let Ok(Outcome::Backup(m)) = &result {
            refs.add(m, &fx.points[2]);
        }
        assert_check_ok(&repo, &ctx);
        let listed = refs.verify_all(&repo, &ctx);
        match op {
            Op::Backup => {
                assert_eq!(listed, if result.is_ok() { 3 } else { 2 }, "{ctx}");
                assert_change_maps_cover(&repo, &refs, true);
            }
            Op::Prune | Op::Forget => {
                assert!(listed == 2 || listed == 3, "{ctx}");
                assert_change_maps_cover(&repo, &refs, false);
            }
        }

        // Rerun / finish the operation.
        match op {
            Op::Backup => {
                let m = backup(&repo, VM, &fx.points[2])
                    .unwrap_or_else(|e| panic!("{ctx}: rerun: {e}"));
                let parent = match &result {
                    Ok(Outcome::Backup(crashed)) => crashed.id,
                    _ => ms[1].id,
                };
                assert_eq!(m.parent, Some(parent), "{ctx}");
                assert_restores(&repo, &m, &fx.points[2]);
                refs.add(&m, &fx.points[2]);
                // Reclaim what the crash left (unindexed packs, the crashed run's restore
                // point is kept as it is a valid one).
                let s = prune_nothing(&repo);
                if result.is_ok() {
                    assert_eq!(s.gc.packs_deleted, 0, "{ctx}: nothing to reclaim");
                }
            }
            Op::Prune => {
                let s = prune_keep_last(&repo, 2).unwrap_or_else(|e| panic!("{ctx}: rerun: {e}"));
                assert_eq!(
                    s.gc.packs_waiting, 0,
                    "{ctx}: the dead prune does not block"
                );
                let ids: Vec<_> = repo.snapshots().unwrap().iter().map(|m| m.id).collect();
                assert_eq!(ids, vec![ms[1].id, ms[2].id], "{ctx}");
                assert_eq!(
                    count(&repo, ObjectKind::GcRecord),
                    0,
                    "{ctx}: every gc record swept"
                );
                assert_eq!(
                    count(&repo, ObjectKind::Lock),
                    0,
                    "{ctx}: stale leases removed"
                );
                assert!(
                    pack_bytes(&repo) <= clean.pack_bytes + (64 << 10),
                    "{ctx}: the rerun reclaims as much as a clean prune ({} vs {})",
                    pack_bytes(&repo),
                    clean.pack_bytes
                );
                let again = prune_nothing(&repo);
                assert_eq!(
                    (
                        again.gc.packs_condemned,
                        again.gc.packs_deleted,
                        again.gc.packs_repacked
                    ),
                    (0, 0, 0),
                    "{ctx}: a further prune finds nothing to do"
                );
            }
            Op::Forget => {
                repo.forget(&[ms[1].id])
                    .unwrap_or_else(|e| panic!("{ctx}: rerun: {e}"));
                let all = repo.snapshots().unwrap();
                let ids: Vec<_> = all.iter().map(|m| m.id).collect();
                assert_eq!(ids, vec![ms[0].id, ms[2].id], "{ctx}");
                assert_eq!(
                    all[1].parent,
                    Some(ms[0].id),
                    "{ctx}: relinked to the forgotten one's parent"
                );
                assert_change_maps_cover(&repo, &refs, false);
            }
        }
        let r = assert_check_ok(&repo, &ctx);
        if op != Op::Forget {
            assert!(
                r.warnings.is_empty(),
                "{ctx}: leftovers reclaimed: {:?}",
                r.warnings
            );
            let dangling = dangling_index_packs(&repo);
            assert!(
                dangling.is_empty(),
                "{ctx}: index entries of deleted packs: {dangling:?}"
            );
        }

        // The next backup works and restores.
        let next = &fx.points[3];
        let m = backup(&repo, VM, next).unwrap_or_else(|e| panic!("{ctx}: next backup: {e}"));
        assert_restores(&repo, &m, next);
        refs.add(&m, next);
        assert_check_ok(&repo, &ctx);
        if op == Op::Backup {
            // After the reclaiming prune, every earlier point still restores.
            refs.verify_all(&repo, &ctx);
        }
        drop(repo);
        std::fs::remove_dir_all(&root).unwrap();
    }
    assert!(failed > 0 && succeeded > 0);
    println!(
        "crash matrix {op:?} ({}, {stack:?}): {} fault points exercised (N = 1..={}; {failed} failed runs, {succeeded} completed), {} writes in a clean run, {:.1} s",
        if encrypted { "encrypted" } else { "plain" },
        total + 1,
        total + 1,
        total,
        started.elapsed().as_secs_f64()
    );
    let _ = fx.sys.len();
}

#[test]
fn crash_matrix_backup_plain() {
    matrix(Op::Backup, false, Stack::Fault);
}

#[test]
fn crash_matrix_backup_encrypted() {
    matrix(Op::Backup, true, Stack::Fault);
}

#[test]
fn crash_matrix_backup_ignore_conditional() {
    matrix(Op::Backup, false, Stack::IgnoreConditional);
}

#[test]
fn crash_matrix_prune_plain() {
    matrix(Op::Prune, false, Stack::Fault);
}

#[test]
fn crash_matrix_prune_encrypted() {
    matrix(Op::Prune, true, Stack::Fault);
}

#[test]
fn crash_matrix_prune_ignore_conditional() {
    matrix(Op::Prune, false, Stack::IgnoreConditional);
}

#[test]
fn crash_matrix_forget_plain() {
    matrix(Op::Forget, false, Stack::Fault);
}

#[test]
fn crash_matrix_forget_encrypted() {
    matrix(Op::Forget, true, Stack::Fault);
}

#[test]
fn crash_matrix_forget_ignore_conditional() {
    matrix(Op::Forget, false, Stack::IgnoreConditional);
}

/// A backup interrupted after it wrote its first index object (8 packs) and part of the next
/// packs: the rerun reuses exactly the indexed blobs and writes only the rest; interrupted at its
/// manifest, the rerun writes no data at all. Unindexed packs of the dead run are reclaimed.
#[test]
fn rerun_after_fault_reuses_written_data() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(7);
    // 12 MiB of incompressible chunks: 12+ packs of 1 MiB, an index after the 8th.
    let spec = Spec::random(12 << 20, &mut rng);
    let img = spec.write(&tmp.path().join("big.img"));
    let d = disks(&[("sys", &img)]);
    let base = tmp.path().join("base");
    init_repo(&base, true);

    // Clean run: count writes and new chunks.
    let clean_root = tmp.path().join("clean");
    copy_dir(&base, &clean_root);
    let (repo, fault) = open_faulty(&clean_root, true, Stack::Fault, 1);
    fault.fail_from(0);
    let clean = backup(&repo, VM, &d).unwrap();
    let total = fault.writes();
    assert_eq!(clean.stats.chunks_new, 192);
    assert!(
        count(&repo, ObjectKind::Index) >= 2,
        "an index object before the last pack"
    );
    drop(repo);

    // Writes: 1 lease, 2..=9 packs, 10 index, 11.. packs, last index, manifest, lease removal.
    for (n, what) in [
        (12, "after the first index and one more pack"),
        (total - 1, "at the manifest"),
    ] {
        let root = tmp.path().join(format!("n{n}"));
        copy_dir(&base, &root);
        let (repo, fault) = open_faulty(&root, true, Stack::Fault, 1);
        fault.fail_from(n);
        assert!(backup(&repo, VM, &d).is_err(), "fault {what}");
        fault.fail_from(0);
        simulate_death(&repo);
        drop(repo);

        let repo = open_local(&root, true, 2);
        let indexed_data = vmkeep_repo::index::RawIndex::load(&repo)
            .unwrap()
            .by_pack
            .values()
            .flatten()
            .filter(|e| e.kind == BlobKind::Data)
            .count() as u64;
        assert!(
            indexed_data > 0,
            "{what}: some data was indexed before the fault"
        );
        let report = assert_check_ok(&repo, what);
        let unindexed = report
            .warnings
            .iter()
            .filter(|w| w.contains("not indexed"))
            .count();
        let rerun = backup(&repo, VM, &d).unwrap();
        println!(
            "rerun {what}: chunks_new {} (clean {}), chunks_reused {}, unindexed packs left {unindexed}",
            rerun.stats.chunks_new, clean.stats.chunks_new, rerun.stats.chunks_reused
        );
        assert!(
            rerun.stats.chunks_new < clean.stats.chunks_new,
            "{what}: the rerun reuses"
        );
        assert_eq!(
            rerun.stats.chunks_reused, indexed_data,
            "{what}: every indexed chunk reused"
        );
        assert_eq!(rerun.stats.chunks_new + rerun.stats.chunks_reused, 192);
        if n == total - 1 {
            assert_eq!(
                rerun.stats.chunks_new, 0,
                "everything was written and indexed"
            );
        } else {
            assert!(
                unindexed >= 1,
                "the pack written after the index is not indexed"
            );
        }
        assert_restores(&repo, &rerun, &d);
        let s = prune_nothing(&repo);
        assert_eq!(
            s.gc.packs_deleted as usize, unindexed,
            "unindexed packs reclaimed"
        );
        let r = assert_check_ok(&repo, what);
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        assert_restores(&repo, &rerun, &d);
    }
}

/// A prune dies right after its repack wrote the new pack, before the index naming it: that pack
/// is left unindexed. In a plain repository packs are named by their content, so the rerun's
/// repack (same live blobs, same order) writes the very same pack again, while also condemning
/// the name as "unindexed garbage" it listed at its start. The rerun must keep that pack (it is
/// the live home of the repacked blobs now): deleting it loses data.
#[test]
fn prune_rerun_rewrites_the_orphan_of_a_dead_repack() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rng = Rng::new(99);
    // 24 random chunks: pack 1 holds chunks 0..16 (1 MiB), pack 2 the rest and the tree node.
    let s1 = Spec::random(24 * CS, &mut rng);
    // Rewriting chunks 0..6 leaves pack 1 with 10/16 live: it is repacked (the only one).
    let s2 = s1.rewrite(0..6, &mut rng);
    let d1 = disks(&[("sys", &s1.write(&dir.join("s1.img")))]);
    let d2 = disks(&[("sys", &s2.write(&dir.join("s2.img")))]);
    let base = dir.join("base");
    init_repo(&base, false);
    let mut refs = Refs::default();
    {
        let repo = open_local(&base, false, 1);
        let m1 = backup(&repo, VM, &d1).unwrap();
        refs.add(&m1, &d1);
        let m2 = backup(&repo, VM, &d2).unwrap();
        refs.add(&m2, &d2);
    }

    // Clean prune: exactly one pack repacked, into one new pack; count its writes.
    let clean_root = dir.join("clean");
    copy_dir(&base, &clean_root);
    let (repo, fault) = open_faulty(&clean_root, false, Stack::Fault, 1);
    let packs_before: std::collections::HashSet<String> = repo
        .store()
        .list(ObjectKind::Pack)
        .unwrap()
        .into_iter()
        .map(|m| m.key.name)
        .collect();
    fault.fail_from(0);
    let s = prune_keep_last(&repo, 1).unwrap();
    assert_eq!(
        (s.gc.packs_repacked, s.gc.packs_deleted),
        (1, 1),
        "{:?}",
        s.gc
    );
    let new_packs: Vec<String> = repo
        .store()
        .list(ObjectKind::Pack)
        .unwrap()
        .into_iter()
        .map(|m| m.key.name)
        .filter(|n| !packs_before.contains(n))
        .collect();
    assert_eq!(new_packs.len(), 1, "the repack wrote one pack");
    drop(repo);

    // Writes: 1 lease, 2 successor manifest, 3 forgotten manifest deleted, 4 repacked pack,
    // 5 its index. Die at 5.
    let root = dir.join("crashed");
    copy_dir(&base, &root);
    let (repo, fault) = open_faulty(&root, false, Stack::Fault, 1);
    fault.fail_from(5);
    assert!(prune_keep_last(&repo, 1).is_err());
    fault.fail_from(0);
    simulate_death(&repo);
    drop(repo);
    let repo = open_local(&root, false, 2);
    let orphan = &new_packs[0];
    assert!(
        repo.store()
            .list(ObjectKind::Pack)
            .unwrap()
            .iter()
            .any(|m| &m.key.name == orphan),
        "the dead prune left the repacked pack, unindexed"
    );
    let r = assert_check_ok(&repo, "after the dead prune");
    assert!(
        r.warnings.iter().any(|w| w.contains("not indexed")),
        "{:?}",
        r.warnings
    );

    let s = prune_keep_last(&repo, 1).unwrap();
    println!("rerun after a dead repack: {:?}", s.gc);
    assert_eq!(s.gc.packs_repacked, 1);
    let r = assert_check_ok(&repo, "after the rerun");
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert!(
        repo.store()
            .list(ObjectKind::Pack)
            .unwrap()
            .iter()
            .any(|m| &m.key.name == orphan),
        "the rewritten pack is the live home of the repacked blobs"
    );
    assert!(
        dangling_index_packs(&repo).is_empty(),
        "no index entry names a deleted pack"
    );
    assert_eq!(refs.verify_all(&repo, "after the rerun"), 1);
    let again = prune_nothing(&repo);
    assert_eq!(
        (again.gc.packs_condemned, again.gc.packs_deleted),
        (0, 0),
        "{:?}",
        again.gc
    );
}

//! The crash matrices of a backup, a prune and a forget, on a real distributed store: a 3-node Garage
//! cluster (replication factor 3, conditional writes ignored), as `crash_faults.rs` runs them on
//! a local folder. Every mutating store operation fails in turn, as if the process died right
//! there (that write and every later one fail); then, with faults off and the dead process's
//! leases recognised as stale, the repository checks clean (`--read-data`), every restore point
//! restores byte-identical, and the operation runs again successfully.
//!
//! Each fault point gets its own bucket, a copy of the base (copied object by object, so the
//! copies share the repository id): all of them share one local cache, which must not let one
//! copy's state leak into another's (its entries count only for objects listed with the same
//! name, size and time).
//!
//! Also the GC protocol's two data-loss windows of issue 6 (`races.rs`), replayed on Garage:
//! a gate stops the prune at its GC record's put while a backup that reuses the garbage runs.
mod common;
mod gate;

use std::path::Path;
use std::sync::Arc;

use common::*;
use gate::{GateStore, Op, When};
use vmkeep_core::retention::RetentionPolicy;
use vmkeep_repo::{CacheOptions, Manifest, NoProgress, PruneOptions, Repository};
use vmkeep_store::{Key, ObjectKind, S3Options, S3Store, Store};
use vmkeep_testkit::s3::Garage;
use vmkeep_testkit::store::FaultStore;

const VM: &str = "vm1";

fn bucket(garage: &Garage, name: &str) -> Arc<dyn Store> {
    garage.bucket(name);
    Arc::new(
        S3Store::open_with(
            &format!("s3://{name}"),
            garage.s3.config(),
            S3Options::default(),
        )
        .unwrap(),
    )
}

fn open(store: Arc<dyn Store>, cache: &Path) -> Repository {
    Repository::open(store, Some(PASS))
        .unwrap()
        .with_tuning(tuning(2))
        .with_cache(Some(&CacheOptions::new(cache.to_path_buf())))
        .unwrap()
}

/// An encrypted repository with 1 MiB packs (as `init_repo` makes them locally).
fn init(store: Arc<dyn Store>) {
    let repo = Repository::init(
        store.clone(),
        vmkeep_repo::InitOptions {
            chunk_size: CS as u32,
            passphrase: Some(PASS.to_vec().into()),
            kdf: kdf(),
        },
    )
    .unwrap();
    let mut config = repo.config().clone();
    config.pack_size = PACK_SIZE;
    store
        .put(&Key::config(), &config.to_json(repo.keys()))
        .unwrap();
}

fn copy(from: &dyn Store, to: &dyn Store) {
    for kind in ObjectKind::ALL {
        for m in from.list(kind).unwrap() {
            to.put(&m.key, &from.get(&m.key, 1 << 30).unwrap()).unwrap();
        }
    }
}

/// Four restore points of one VM: the first's packs become garbage when it is forgotten (its
/// first 2 MiB are rewritten by the second), others are partly referenced (scattered changes).
fn points(dir: &Path) -> Vec<Disks> {
    let mut rng = Rng::new(71);
    let mut s1 = Spec::mixed(3 << 20, &mut rng);
    for c in &mut s1.chunks[..32] {
        *c = Chunk::Random(rng.next_u64());
    }
    let s2 = s1.rewrite(0..32, &mut rng).mutate(30, &mut rng);
    let s3 = s2.rewrite(36..44, &mut rng).mutate(15, &mut rng);
    [s1, s2, s3]
        .iter()
        .enumerate()
        .map(|(i, s)| disks(&[("sys", &s.write(&dir.join(format!("sys{i}.img"))))]))
        .collect()
}

fn prune_keep_last_2(repo: &Repository, _: &[Manifest]) -> vmkeep_repo::Result<()> {
    let plan = repo.prune_plan(&PruneOptions {
        vm: None,
        policy: RetentionPolicy {
            last: Some(2),
            ..Default::default()
        },
    })?;
    repo.prune(&plan, &NoProgress).map(|_| ())
}

/// Run `op` on a copy of `base` with the store failing from write `n` on (0: never); returns
/// the writes it made and the copy's store.
fn faulted(
    garage: &Garage,
    base: &dyn Store,
    name: &str,
    n: u64,
    cache: &Path,
    op: &dyn Fn(&Repository, &[Manifest]) -> vmkeep_repo::Result<()>,
    ms: &[Manifest],
) -> (u64, Arc<dyn Store>, bool) {
    let store = bucket(garage, name);
    copy(base, store.as_ref());
    let fault = Arc::new(FaultStore::new(store.clone()));
    fault.fail_from(n);
    let repo = open(fault.clone(), cache);
    let ok = op(&repo, ms).is_ok();
    let writes = fault.writes();
    fault.fail_from(0);
    simulate_death(&repo);
    (writes, store, ok)
}

fn matrix(
    garage: &Garage,
    tag: &str,
    base_points: usize,
    op: &dyn Fn(&Repository, &[Manifest]) -> vmkeep_repo::Result<()>,
) {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let pts = points(tmp.path());
    let base = bucket(garage, &format!("{tag}-base"));
    init(base.clone());
    let mut refs = Refs::default();
    let mut ms = Vec::new();
    {
        let repo = open(base.clone(), &cache);
        for d in &pts[..base_points] {
            let m: Manifest = backup(&repo, VM, d).unwrap();
            refs.add(&m, d);
            ms.push(m);
        }
    }
    let (writes, _, ok) = faulted(
        garage,
        base.as_ref(),
        &format!("{tag}-clean"),
        0,
        &cache,
        op,
        &ms,
    );
    assert!(
        ok && writes > 3,
        "{tag}: the clean run made {writes} writes"
    );
    let mut failed = 0;
    for n in 1..=writes {
        let (_, store, ok) = faulted(
            garage,
            base.as_ref(),
            &format!("{tag}-{n}"),
            n,
            &cache,
            op,
            &ms,
        );
        // Only the last write, the lease's removal, may fail without failing the operation
        // (the next prune removes a lease left behind).
        assert!(
            !ok || n == writes,
            "{tag}: fault at write {n} of {writes} went unnoticed"
        );
        failed += u64::from(!ok);
        let repo = open(store, &cache);
        let what = format!("{tag}: fault at write {n} of {writes}");
        assert_check_ok(&repo, &what);
        let mut known = refs.clone();
        // A backup killed after its manifest landed committed its restore point.
        for m in repo.snapshots().unwrap() {
            if !known.0.contains_key(&m.id) {
                known.add(&m, &pts[base_points]);
            }
        }
        known.verify_all(&repo, &what);
        op(&repo, &ms).unwrap_or_else(|e| panic!("{what}: the rerun failed: {e}"));
        assert_check_ok(&repo, &format!("{what}, after the rerun"));
    }
    println!("{tag}: {writes} fault points ({failed} failed the operation), each checked clean and rerun");
}

#[test]
fn crash_at_every_write_of_a_backup_a_prune_and_a_forget_on_garage() {
    let garage = Garage::start(3);
    let tmp = tempfile::tempdir().unwrap();
    let third = points(tmp.path()).pop().unwrap();
    matrix(&garage, "backup", 2, &|repo, _| {
        backup(repo, VM, &third).map(|_| ())
    });
    matrix(&garage, "prune", 3, &prune_keep_last_2);
    // The middle point: its successor is rewritten with its parent and merged change maps.
    matrix(&garage, "forget", 3, &|repo, ms| {
        repo.forget(&[ms[1].id]).map(|_| ())
    });
}

/// The races of `races.rs` (`backup_finishing_during_prune_mark_keeps_its_data`,
/// `backup_starting_while_the_gc_record_is_written_keeps_its_data`) on Garage: a forgotten
/// restore point's packs are garbage; prune is stopped just before its GC record's put while a
/// backup of the same image reuses them, committing before the record lands (1) or deciding to
/// reuse before it lands and committing after the prune ended (2). Nothing is lost either way.
#[test]
fn the_gc_record_races_on_garage() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;
    use vmkeep_repo::{BackupOptions, Hooks};
    let garage = Garage::start(3);
    let tmp = tempfile::tempdir().unwrap();
    let d = points(tmp.path()).remove(0);
    for (case, commit_early) in [("race-early", true), ("race-late", false)] {
        let store = bucket(&garage, case);
        init(store.clone());
        let cache = tmp.path().join(format!("{case}.cache"));
        let repo = open(store.clone(), &cache);
        let m1 = backup(&repo, VM, &d).unwrap();
        repo.forget(&[m1.id]).unwrap();
        let gates = GateStore::new(store.clone());
        let gated: Arc<dyn Store> = gates.clone();
        let prune_repo = open(gated, &tmp.path().join(format!("{case}.prune-cache")));
        let record = gates.arm(Op::Put, ObjectKind::GcRecord, When::Before, 0);
        let (reused_tx, reused_rx) = crossbeam_channel::bounded::<()>(1);
        let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(1);
        let first = Arc::new(AtomicBool::new(false));
        let hooks = Hooks {
            after_reuse_decision: (!commit_early).then(|| {
                let f: vmkeep_repo::hooks::BlobHook = Arc::new(move |_| {
                    if !first.swap(true, Ordering::SeqCst) {
                        let _ = reused_tx.send(());
                        let _ = go_rx.recv_timeout(Duration::from_secs(60));
                    }
                });
                f
            }),
            before_commit: None,
        };
        let prune = || {
            let plan = prune_repo.prune_plan(&PruneOptions::default())?;
            prune_repo.prune(&plan, &NoProgress)
        };
        let m2 = std::thread::scope(|s| {
            let p = s.spawn(prune);
            record.wait();
            let opts = BackupOptions {
                vm: VM.into(),
                hooks,
                ..Default::default()
            };
            if commit_early {
                let m2 = backup_with(&repo, opts, &d).expect("the backup commits");
                record.release();
                p.join().unwrap().expect("prune runs");
                m2
            } else {
                let b = s.spawn(|| backup_with(&repo, opts, &d));
                reused_rx
                    .recv_timeout(Duration::from_secs(60))
                    .expect("the backup reached a reuse decision");
                record.release();
                p.join().unwrap().expect("prune runs");
                go_tx.send(()).unwrap();
                b.join().unwrap().expect("the backup commits")
            }
        });
        assert!(m2.stats.chunks_reused > 0, "{case}: it reused the garbage");
        // A later prune (the race's record now sweepable) must keep everything m2 needs.
        let plan = repo.prune_plan(&PruneOptions::default()).unwrap();
        repo.prune(&plan, &NoProgress).unwrap();
        assert_check_ok(&repo, case);
        assert_restores(&repo, &m2, &d);
    }
}

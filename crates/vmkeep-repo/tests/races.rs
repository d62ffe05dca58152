//! Regression tests for the data-loss windows of the GC / lease / forget protocol (issue 6),
//! each a deterministic interleaving of real repository operations: a [`gate::GateStore`] stops
//! one process at a chosen store call while the other runs. Each test failed on the code before
//! its fix (named in its doc comment).
mod common;
mod gate;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use crossbeam_channel::bounded;
use gate::{GateStore, Op, When};
use vmkeep_repo::{BackupOptions, Hooks, NoProgress, PruneOptions, PruneStats, Repository};
use vmkeep_store::{LocalStore, ObjectKind, Store};

fn prune(repo: &Repository) -> vmkeep_repo::Result<PruneStats> {
    let plan = repo.prune_plan(&PruneOptions::default())?;
    repo.prune(&plan, &NoProgress)
}

/// A repository holding one restore point of a 2 MiB image, just forgotten: its packs are
/// garbage to a prune, and a new backup of the same image would reuse them.
struct Forgotten {
    _tmp: tempfile::TempDir,
    root: std::path::PathBuf,
    repo: Repository,
    d: Disks,
}

fn forgotten_point(seed: u64, encrypted: bool) -> Forgotten {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rng = Rng::new(seed);
    let image = Spec::mixed(2 << 20, &mut rng);
    let d = disks(&[("sys", &image.write(&dir.join("a.img")))]);
    let root = dir.join("repo");
    init_repo(&root, encrypted);
    let repo = open_local(&root, encrypted, 2);
    let m1 = backup(&repo, "vm", &d).unwrap();
    repo.forget(&[m1.id]).unwrap();
    Forgotten {
        _tmp: tmp,
        root,
        repo,
        d,
    }
}

/// A second handle on the repository at `root` whose store calls pass through a gate store.
fn gated(root: &std::path::Path, encrypted: bool) -> (Repository, Arc<GateStore>) {
    let g = GateStore::new(Arc::new(LocalStore::open(root).unwrap()));
    let store: Arc<dyn Store> = g.clone();
    (open_store(store, encrypted, 2), g)
}

/// Defect 1: a backup that loads the index before prune's GC record exists and finishes
/// (manifest written, lease deleted) before prune lists leases was in neither of prune's lists,
/// and prune swept the packs its new restore point reuses. Here prune is stopped as it is about
/// to write its record; the whole backup runs meanwhile.
#[test]
fn backup_finishing_during_prune_mark_keeps_its_data() {
    for encrypted in [false, true] {
        let Forgotten {
            _tmp,
            root,
            repo,
            d,
        } = forgotten_point(1 + encrypted as u64, encrypted);

        let (prune_repo, gates) = gated(&root, encrypted);
        let record = gates.arm(Op::Put, ObjectKind::GcRecord, When::Before, 0);
        let m2 = std::thread::scope(|s| {
            let p = s.spawn(|| prune(&prune_repo));
            record.wait();
            let m2 = backup(&repo, "vm", &d).expect("the backup commits");
            assert!(
                m2.stats.chunks_reused > 0,
                "it reused the forgotten point's data"
            );
            record.release();
            p.join().unwrap().expect("prune runs");
            m2
        });
        assert_check_ok(&repo, "after the race");
        assert_restores(&repo, &m2, &d);
    }
}

/// Defect 3: the GC record's time was taken before its put; a backup whose lease landed while
/// the put was in flight neither saw the record nor blocked the sweep (same-host leases had no
/// margin). Prune is stopped inside its record write; the backup starts, loads the index (the
/// record is not visible yet) and decides to reuse; then prune finishes; then the backup
/// commits.
#[test]
fn backup_starting_while_the_gc_record_is_written_keeps_its_data() {
    for encrypted in [false, true] {
        let Forgotten {
            _tmp,
            root,
            repo,
            d,
        } = forgotten_point(10 + encrypted as u64, encrypted);

        let (prune_repo, gates) = gated(&root, encrypted);
        let record = gates.arm(Op::Put, ObjectKind::GcRecord, When::Before, 0);
        let (reused_tx, reused_rx) = bounded::<()>(1);
        let (go_tx, go_rx) = bounded::<()>(1);
        let first = Arc::new(AtomicBool::new(false));
        let hooks = Hooks {
            after_reuse_decision: Some(Arc::new(move |_| {
                if !first.swap(true, Ordering::SeqCst) {
                    let _ = reused_tx.send(());
                    let _ = go_rx.recv_timeout(Duration::from_secs(60));
                }
            })),
            before_commit: None,
        };
        let m2 = std::thread::scope(|s| {
            let p = s.spawn(|| prune(&prune_repo));
            record.wait();
            // The record's time is taken; its put has not landed. The backup starts now.
            let b = s.spawn(|| {
                backup_with(
                    &repo,
                    BackupOptions {
                        vm: "vm".into(),
                        hooks,
                        ..Default::default()
                    },
                    &d,
                )
            });
            reused_rx
                .recv_timeout(Duration::from_secs(60))
                .expect("the backup reached a reuse decision");
            record.release();
            let st = p.join().unwrap().expect("prune runs");
            println!(
                "prune beside the backup (encrypted={encrypted}): {:?}",
                st.gc
            );
            go_tx.send(()).unwrap();
            b.join().unwrap()
        });
        let m2 = m2.expect("the backup commits");
        assert_check_ok(&repo, "after the race");
        assert_restores(&repo, &m2, &d);
    }
}

/// Defect 6: forget during a running backup left the new restore point with a parent that no
/// longer exists and a change map relative to it. The backup is stopped before its commit while
/// its parent is forgotten.
#[test]
fn forget_of_the_parent_during_a_backup_relinks_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rng = Rng::new(20);
    let a = Spec::mixed(2 << 20, &mut rng);
    let b = a.mutate(10, &mut rng);
    let c = b.mutate(10, &mut rng);
    let da = disks(&[("sys", &a.write(&dir.join("a.img")))]);
    let db = disks(&[("sys", &b.write(&dir.join("b.img")))]);
    let dc = disks(&[("sys", &c.write(&dir.join("c.img")))]);
    let root = dir.join("repo");
    init_repo(&root, false);
    let repo = open_local(&root, false, 2);
    let m0 = backup(&repo, "vm", &da).unwrap();
    let m1 = backup(&repo, "vm", &db).unwrap();
    assert_eq!(m1.parent, Some(m0.id));

    let (at_commit_tx, at_commit_rx) = bounded::<()>(1);
    let (go_tx, go_rx) = bounded::<()>(1);
    let hooks = Hooks {
        after_reuse_decision: None,
        before_commit: Some(Arc::new(move || {
            let _ = at_commit_tx.send(());
            let _ = go_rx.recv_timeout(Duration::from_secs(60));
        })),
    };
    let m2 = std::thread::scope(|s| {
        let bk = s.spawn(|| {
            backup_with(
                &repo,
                BackupOptions {
                    vm: "vm".into(),
                    hooks,
                    ..Default::default()
                },
                &dc,
            )
        });
        at_commit_rx.recv_timeout(Duration::from_secs(60)).unwrap();
        repo.forget(&[m1.id]).unwrap();
        go_tx.send(()).unwrap();
        bk.join().unwrap().unwrap()
    });
    assert_parent_links_exact(&repo, &m2.id, &[(&db, &dc)]);
    assert_check_ok(&repo, "after the race");
}

/// Defect 6, other order: forget has listed the restore points (the new one is not committed
/// yet) and is about to delete the parent when the backup commits.
#[test]
fn backup_committing_while_forget_deletes_its_parent_is_relinked() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rng = Rng::new(30);
    let a = Spec::mixed(2 << 20, &mut rng);
    let b = a.mutate(10, &mut rng);
    let c = b.mutate(10, &mut rng);
    let da = disks(&[("sys", &a.write(&dir.join("a.img")))]);
    let db = disks(&[("sys", &b.write(&dir.join("b.img")))]);
    let dc = disks(&[("sys", &c.write(&dir.join("c.img")))]);
    let root = dir.join("repo");
    init_repo(&root, false);
    let repo = open_local(&root, false, 2);
    backup(&repo, "vm", &da).unwrap();
    let m1 = backup(&repo, "vm", &db).unwrap();

    let (forget_repo, gates) = gated(&root, false);
    let delete = gates.arm(Op::Delete, ObjectKind::Snapshot, When::Before, 0);
    let m2 = std::thread::scope(|s| {
        let f = s.spawn(|| forget_repo.forget(&[m1.id]));
        delete.wait();
        let m2 = backup(&repo, "vm", &dc).unwrap();
        delete.release();
        f.join().unwrap().unwrap();
        m2
    });
    assert_parent_links_exact(&repo, &m2.id, &[(&db, &dc)]);
    assert_check_ok(&repo, "after the race");
}

/// The stored manifest of `id` names a parent that exists (or none), and its change map covers
/// every chunk that differs from that parent. `pairs` are (image of the forgotten parent,
/// image of `id`), only used for messages.
fn assert_parent_links_exact(
    repo: &Repository,
    id: &vmkeep_core::SnapshotId,
    _pairs: &[(&Disks, &Disks)],
) {
    let m = repo.load_manifest(id).unwrap();
    let Some(p) = m.parent else {
        assert!(
            m.disks.iter().all(|d| d.changes.is_none()),
            "no parent, so every change map must be null"
        );
        return;
    };
    let parent = repo.load_manifest(&p).unwrap_or_else(|e| {
        panic!(
            "restore point {} names parent {p}, which is gone: {e}",
            m.id
        )
    });
    let dir = tempfile::tempdir().unwrap();
    for (who, man) in [("parent", &parent), ("child", &m)] {
        repo.restore(
            man,
            &vmkeep_repo::RestoreOptions {
                target: dir.path().join(who),
                disk: None,
            },
            &NoProgress,
        )
        .unwrap();
    }
    for d in &m.disks {
        let Some(changes) = &d.changes else { continue };
        let pd = parent
            .disk(&d.name)
            .expect("a change map implies the parent has the disk");
        assert_eq!(pd.size, d.size);
        let differing = differing_chunks(
            &dir.path().join("parent").join(format!("{}.raw", d.name)),
            &dir.path().join("child").join(format!("{}.raw", d.name)),
        );
        for c in differing {
            assert!(
                changes.iter().any(|x| x == c),
                "chunk {c} differs from the parent but is not in the change map"
            );
        }
    }
}

/// Defect 7: a lost pack was never healed: the index kept naming it, a full backup reused its
/// blobs (new 0) and every new restore point was damaged too.
#[test]
fn a_lost_pack_is_healed_by_the_next_full_backup() {
    for encrypted in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut rng = Rng::new(40 + encrypted as u64);
        let image = Spec::mixed(3 << 20, &mut rng);
        let d = disks(&[("sys", &image.write(&dir.join("a.img")))]);
        let root = dir.join("repo");
        init_repo(&root, encrypted);
        let repo = open_local(&root, encrypted, 2);
        let m1 = backup(&repo, "vm", &d).unwrap();
        let victim = repo.store().list(ObjectKind::Pack).unwrap()[0].key.clone();
        repo.store().delete(&victim).unwrap();
        assert!(!check(&repo).ok, "the lost pack damages the first point");

        let m2 = backup_with(
            &repo,
            BackupOptions {
                vm: "vm".into(),
                no_parent: true,
                ..Default::default()
            },
            &d,
        )
        .unwrap();
        assert!(
            m2.stats.chunks_new > 0,
            "blobs of the lost pack are written again"
        );
        assert_check_ok(&repo, "the full backup healed both points");
        assert_restores(&repo, &m2, &d);
        assert_restores(&repo, &m1, &d);
    }
}

/// Defect 13 (`verify_after_stall` checked stream index blobs but not stream chunks): a backup
/// whose lease expired while it was stopped commits a stream whose chunks a prune reclaimed
/// meanwhile. The lease refresh is disabled (as when the process is stopped) and the timeout is
/// one second.
#[test]
fn stalled_backup_never_commits_reclaimed_stream_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let root = dir.join("repo");
    init_repo(&root, false);
    let mut t = tuning(2);
    t.lease_timeout = Duration::from_secs(1);
    t.lease_refresh = Duration::from_secs(3600);
    let repo = open_local(&root, false, 2).with_tuning(t);
    let mut rng = Rng::new(50);
    let mut memory = vec![0u8; 3 << 20];
    rng.fill(&mut memory);
    let params = vmkeep_core::stream::CdcParams::MEMORY;
    let mut s = repo
        .begin_backup(BackupOptions {
            vm: "vm".into(),
            ..Default::default()
        })
        .unwrap();
    s.add_stream("memory", &mut &memory[..], params, &NoProgress)
        .unwrap();
    let m1 = s.commit().unwrap();
    repo.forget(&[m1.id]).unwrap();

    // The same memory with a new tail: its chunks are reused, its stream index is new.
    let mut later = memory.clone();
    later.extend_from_slice(&[7u8; 100_000]);
    let mut s = repo
        .begin_backup(BackupOptions {
            vm: "vm".into(),
            ..Default::default()
        })
        .unwrap();
    s.add_stream("memory", &mut &later[..], params, &NoProgress)
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500)); // the lease expires
    let st = prune(&repo).unwrap();
    assert!(
        st.gc.packs_deleted > 0,
        "prune judged the stalled lease dead"
    );
    match s.commit() {
        Ok(m) => {
            assert_check_ok(&repo, "a committed point must be whole");
            let _ = m;
        }
        Err(e) => println!("the stalled backup failed as it should: {e}"),
    }
    assert_check_ok(&repo, "after the stalled backup");
}

/// Defect 13 (transient store I/O errors were reported as damage, exit 3): a store that fails
/// reads with an I/O error makes `check` fail with that error; it reports no damaged restore point.
#[test]
fn a_store_read_error_is_not_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rng = Rng::new(70);
    let image = Spec::mixed(2 << 20, &mut rng);
    let d = disks(&[("sys", &image.write(&dir.join("a.img")))]);
    let root = dir.join("repo");
    init_repo(&root, false);
    let repo = open_local(&root, false, 2);
    backup(&repo, "vm", &d).unwrap();
    let failing: Arc<dyn Store> =
        Arc::new(FailingReads(Arc::new(LocalStore::open(&root).unwrap())));
    let repo = open_store(failing, false, 2);
    match repo.check(&vmkeep_repo::CheckOptions { read_data: false }, &NoProgress) {
        Err(e) => {
            assert!(!e.is_damage(), "an I/O error is not damage: {e}");
            assert!(e.to_string().contains("injected EIO"), "{e}");
        }
        Ok(r) => panic!("check hid the I/O error as damage: {:?}", r.damaged),
    }
}

/// Reads of packs fail with an I/O error (a flaky disk or network store).
#[derive(Debug)]
struct FailingReads(Arc<dyn Store>);

impl FailingReads {
    fn fail(key: &vmkeep_store::Key) -> vmkeep_store::Error {
        vmkeep_store::Error::Io {
            op: "read",
            path: key.path().into(),
            cause: std::io::Error::other("injected EIO"),
        }
    }
}

impl Store for FailingReads {
    fn location(&self) -> String {
        self.0.location()
    }
    fn get(&self, key: &vmkeep_store::Key, max_len: u64) -> vmkeep_store::Result<Vec<u8>> {
        match key.kind {
            ObjectKind::Pack => Err(Self::fail(key)),
            _ => self.0.get(key, max_len),
        }
    }
    fn get_range(&self, key: &vmkeep_store::Key, o: u64, l: u64) -> vmkeep_store::Result<Vec<u8>> {
        match key.kind {
            ObjectKind::Pack => Err(Self::fail(key)),
            _ => self.0.get_range(key, o, l),
        }
    }
    fn size(&self, key: &vmkeep_store::Key) -> vmkeep_store::Result<u64> {
        self.0.size(key)
    }
    fn put(&self, key: &vmkeep_store::Key, data: &[u8]) -> vmkeep_store::Result<()> {
        self.0.put(key, data)
    }
    fn put_if_absent(&self, key: &vmkeep_store::Key, data: &[u8]) -> vmkeep_store::Result<bool> {
        self.0.put_if_absent(key, data)
    }
    fn list(&self, kind: ObjectKind) -> vmkeep_store::Result<Vec<vmkeep_store::ObjectMeta>> {
        self.0.list(kind)
    }
    fn delete(&self, key: &vmkeep_store::Key) -> vmkeep_store::Result<()> {
        self.0.delete(key)
    }
    fn flush(&self) -> vmkeep_store::Result<()> {
        self.0.flush()
    }
}

/// The manifest's put itself outlasts the lease (a store that hangs mid-request): a prune
/// judges the backup dead and reclaims the data it reused while the put is in flight. When the
/// put returns, the backup sees its lease was lost, verifies, finds the data gone, deletes the
/// manifest it just wrote and fails: no restore point with missing data stays.
#[test]
fn a_manifest_put_that_outlasts_the_lease_is_verified_after_it_lands() {
    let Forgotten {
        _tmp,
        root,
        repo,
        d,
    } = forgotten_point(80, false);

    let (slow_repo, gates) = gated(&root, false);
    let mut t = tuning(2);
    t.lease_timeout = Duration::from_secs(1);
    t.lease_refresh = Duration::from_secs(3600); // no refresh lands while the put hangs
    let slow_repo = slow_repo.with_tuning(t.clone());
    let manifest_put = gates.arm(Op::Put, ObjectKind::Snapshot, When::Before, 0);
    let result = std::thread::scope(|s| {
        let b = s.spawn(|| backup(&slow_repo, "vm", &d));
        manifest_put.wait();
        std::thread::sleep(Duration::from_millis(1500)); // the lease expires
        let st = prune(&open_local(&root, false, 2).with_tuning(t.clone())).unwrap();
        assert!(
            st.gc.packs_deleted > 0,
            "prune judged the backup dead: {:?}",
            st.gc
        );
        manifest_put.release();
        b.join().unwrap()
    });
    let e = result.expect_err("the backup must not keep a restore point with missing data");
    assert!(matches!(e, vmkeep_repo::Error::LeaseLost { .. }), "{e}");
    assert!(
        repo.snapshots().unwrap().is_empty(),
        "the manifest was deleted again"
    );
    assert_check_ok(&repo, "after the failed backup");
}

/// A damaged GC record (bit rot, a hand edit) blocks nothing: backups ignore it (nobody can
/// sweep an unreadable record, so its packs stay), check warns, and the next prune replaces it.
#[test]
fn a_damaged_gc_record_is_replaced_by_the_next_prune() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rng = Rng::new(90);
    let a = Spec::mixed(2 << 20, &mut rng);
    let b = Spec::mixed(2 << 20, &mut rng);
    let da = disks(&[("sys", &a.write(&dir.join("a.img")))]);
    let db = disks(&[("sys", &b.write(&dir.join("b.img")))]);
    let root = dir.join("repo");
    init_repo(&root, true);
    let repo = open_local(&root, true, 2);
    let m1 = backup(&repo, "vm", &da).unwrap();
    // A record condemning m1's packs, left waiting by an open session, then damaged.
    let holder = repo
        .begin_backup(BackupOptions {
            vm: "holder".into(),
            ..Default::default()
        })
        .unwrap();
    repo.forget(&[m1.id]).unwrap();
    let st = prune(&repo).unwrap();
    assert!(st.gc.packs_waiting > 0);
    drop(holder);
    let rec = repo.store().list(ObjectKind::GcRecord).unwrap()[0]
        .key
        .clone();
    std::fs::write(root.join(rec.path()), b"VMKO garbage").unwrap();

    let m2 = backup(&repo, "vm", &db).expect("a backup ignores the damaged record");
    let r = check(&repo);
    assert!(r.ok, "{:?}", r.damaged);
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("GC record") && w.contains("damaged")),
        "{:?}",
        r.warnings
    );
    let st = prune(&repo).unwrap();
    assert_eq!(st.gc.records_damaged_removed, 1);
    assert!(
        st.gc.packs_deleted > 0,
        "m1's packs are condemned afresh and reclaimed"
    );
    assert_eq!(count(&repo, ObjectKind::GcRecord), 0);
    let r = assert_check_ok(&repo, "after the prune");
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert_restores(&repo, &m2, &db);
}

//! Backups beside forget and prune, made deterministic with the backup's hooks: a prune never
//! deletes a pack a running backup decided to reuse, a backup that starts after a prune condemned
//! packs never reuses blobs from them, and backups of several VMs with a prune all at once leave a
//! repository that checks clean and restores.
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use crossbeam_channel::bounded;
use vmkeep_core::retention::RetentionPolicy;
use vmkeep_repo::{BackupOptions, Hooks, NoProgress, PruneOptions, PruneStats, Repository};
use vmkeep_store::ObjectKind;

struct Resume(crossbeam_channel::Sender<()>);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = self.0.try_send(());
    }
}

fn prune_all_kept(repo: &Repository) -> PruneStats {
    let plan = repo.prune_plan(&PruneOptions::default()).unwrap();
    repo.prune(&plan, &NoProgress).unwrap()
}

/// (a) Backup B2 of an image sharing chunks with S1 stops right after its first reuse decision.
/// Meanwhile S1 is forgotten and a prune runs: every pack becomes garbage as far as restore
/// points go, but B2's lease predates the prune's record, so nothing is deleted. B2 resumes and
/// commits a restore point that restores; a prune after B2 ended reclaims S1's own data.
#[test]
fn prune_waits_for_a_backup_that_reuses_its_packs() {
    for encrypted in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut rng = Rng::new(100 + encrypted as u64);
        let s1 = Spec::mixed(3 << 20, &mut rng).rewrite(0..40, &mut rng);
        // B2 replaces S1's first 2.5 MiB (random) and keeps the rest. Whatever order the two
        // workers hand blobs to the packer, the first 16 blobs (the first pack) come from the
        // first two batches (chunks 0..32): S1's first pack holds only data B2 does not use.
        let s2 = s1.rewrite(0..40, &mut rng).mutate(10, &mut rng);
        let d1 = disks(&[("sys", &s1.write(&dir.join("s1.img")))]);
        let d2 = disks(&[("sys", &s2.write(&dir.join("s2.img")))]);
        let root = dir.join("repo");
        init_repo(&root, encrypted);
        let repo = open_local(&root, encrypted, 2);
        let m1 = backup(&repo, "vm1", &d1).unwrap();
        let pack_names = |repo: &Repository| -> std::collections::HashSet<String> {
            repo.store()
                .list(ObjectKind::Pack)
                .unwrap()
                .into_iter()
                .map(|m| m.key.name)
                .collect()
        };
        let packs_of_s1 = pack_names(&repo);

        let (paused_tx, paused_rx) = bounded::<()>(1);
        let (resume_tx, resume_rx) = bounded::<()>(1);
        let first = Arc::new(AtomicBool::new(false));
        let hooks = Hooks {
            after_reuse_decision: Some(Arc::new(move |_id| {
                if !first.swap(true, Ordering::SeqCst) {
                    let _ = paused_tx.send(());
                    let _ = resume_rx.recv(); // returns when resumed, or if the test gave up
                }
            })),
            before_commit: None,
        };
        // While B2 waits: forget S1 and prune. B2 is resumed before anything is asserted, so a
        // failed assertion cannot leave it blocked (and the test hanging).
        let (m2, during) = std::thread::scope(|s| {
            // Resumes B2 when dropped: also when this closure unwinds from a panic.
            let resume = Resume(resume_tx.clone());
            let b2 = s.spawn(|| {
                backup_with(
                    &repo,
                    BackupOptions {
                        vm: "vm1".into(),
                        hooks,
                        ..Default::default()
                    },
                    &d2,
                )
            });
            let during = paused_rx
                .recv_timeout(Duration::from_secs(120))
                .map_err(|e| format!("B2 did not reach a reuse decision: {e}"))
                .and_then(|()| {
                    let forgotten = repo.forget(&[m1.id]).map_err(|e| e.to_string())?;
                    let listed = repo.snapshots().map_err(|e| e.to_string())?.len();
                    let st = prune_all_kept(&repo);
                    Ok((
                        forgotten,
                        listed,
                        st,
                        pack_names(&repo),
                        count(&repo, ObjectKind::GcRecord),
                    ))
                });
            drop(resume);
            (b2.join().unwrap(), during)
        });
        let (forgotten, listed, st, packs_after, gc_records) = during.unwrap();
        assert_eq!(forgotten, vec![m1.id]);
        assert_eq!(listed, 0, "no restore point left");
        println!("prune during B2 (encrypted={encrypted}): {:?}", st.gc);
        assert!(st.gc.packs_condemned > 0, "S1's packs are unreferenced");
        assert!(st.gc.packs_waiting > 0, "B2's lease holds them back");
        assert_eq!(
            st.gc.packs_deleted, 0,
            "nothing deleted under a running backup"
        );
        // (B2 may have written a pack of its own already; not indexed yet, it is condemned too,
        // and kept alike.)
        assert!(packs_of_s1.is_subset(&packs_after), "S1's packs all kept");
        assert_eq!(gc_records, 1, "the record waits for a later prune");
        let m2 = m2.expect("B2 commits");
        assert!(m2.stats.chunks_reused > 0, "B2 reused S1's data");
        assert_eq!(
            m2.parent, None,
            "S1, B2's parent when it began, was forgotten meanwhile: B2 is relinked (to nothing older)"
        );
        assert_check_ok(&repo, "after B2");
        assert_restores(&repo, &m2, &d2);

        // B2 has ended: the record is swept. Packs holding blobs B2 references are kept; S1's
        // own first pack goes.
        let st = prune_all_kept(&repo);
        println!("prune after B2 (encrypted={encrypted}): {:?}", st.gc);
        assert!(st.gc.reclaimed_bytes > 0, "S1's unique data is reclaimed");
        assert_eq!(st.gc.packs_waiting, 0);
        assert_eq!(count(&repo, ObjectKind::GcRecord), 0);
        let r = assert_check_ok(&repo, "after the second prune");
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        assert!(dangling_index_packs(&repo).is_empty());
        assert_restores(&repo, &m2, &d2);
        // And a third prune (repacking what the sweep kept, if sparse) keeps B2 whole.
        prune_all_kept(&repo);
        assert_check_ok(&repo, "after the third prune");
        assert_restores(&repo, &m2, &d2);
    }
}

/// (b) A prune condemns packs while an unrelated backup session is open (its lease predates the
/// record, so nothing is swept). A backup that starts after the record must not reuse blobs from
/// condemned packs: it writes S1's data anew. Once the session is gone, a prune deletes the
/// condemned packs and everything still restores.
#[test]
fn backup_after_a_gc_record_does_not_reuse_condemned_packs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rng = Rng::new(200);
    let s1 = Spec::mixed(2 << 20, &mut rng);
    let sb = Spec::mixed(2 << 20, &mut rng);
    let d1 = disks(&[("sys", &s1.write(&dir.join("s1.img")))]);
    let db = disks(&[("sys", &sb.write(&dir.join("b.img")))]);
    let root = dir.join("repo");
    init_repo(&root, true);
    let repo = open_local(&root, true, 2);
    let mut refs = Refs::default();
    let m1 = backup(&repo, "vm1", &d1).unwrap();
    let mb = backup(&repo, "vmb", &db).unwrap();
    refs.add(&mb, &db);

    let holder = repo
        .begin_backup(BackupOptions {
            vm: "holder".into(),
            ..Default::default()
        })
        .unwrap();
    repo.forget(&[m1.id]).unwrap();
    let st = prune_all_kept(&repo);
    println!("prune beside an open session: {:?}", st.gc);
    assert!(st.gc.packs_condemned > 0);
    assert!(st.gc.packs_waiting > 0);
    assert_eq!(st.gc.packs_deleted, 0);
    assert_eq!(count(&repo, ObjectKind::GcRecord), 1);
    assert_check_ok(&repo, "with condemned packs waiting");
    assert_eq!(refs.verify_all(&repo, "with condemned packs waiting"), 1);

    // S1's data now lives only in condemned packs: a new backup of the same image writes it all.
    let m3 = backup(&repo, "vm1", &d1).unwrap();
    refs.add(&m3, &d1);
    assert_eq!(m3.parent, None, "S1 was forgotten");
    assert_eq!(
        m3.stats.chunks_reused, 0,
        "nothing reused from condemned packs"
    );
    assert_eq!(m3.stats.chunks_new as usize, s1.distinct_data_chunks());
    assert_check_ok(&repo, "after the new backup");

    drop(holder); // the session ends without a restore point; its lease goes
    assert_eq!(count(&repo, ObjectKind::Lock), 0);
    let st = prune_all_kept(&repo);
    println!("prune after the session ended: {:?}", st.gc);
    assert!(st.gc.packs_deleted > 0 && st.gc.reclaimed_bytes > 0);
    assert_eq!(st.gc.packs_waiting, 0);
    assert_eq!(count(&repo, ObjectKind::GcRecord), 0);
    let r = assert_check_ok(&repo, "after the sweep");
    // The dropped session may have left nothing: it wrote no pack (its packer never filled).
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert!(dangling_index_packs(&repo).is_empty());
    assert_eq!(refs.verify_all(&repo, "after the sweep"), 2);
}

/// (c) Two backups of different VMs and a prune (keep-last 2 per VM) at once, five rounds with
/// different start offsets: all succeed, and after each round the repository checks clean and
/// every restore point restores.
#[test]
fn two_backups_and_a_prune_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rng = Rng::new(300);
    let root = dir.join("repo");
    init_repo(&root, false);
    let repo = open_local(&root, false, 2);
    let mut refs = Refs::default();
    let mut specs = [
        Spec::mixed(3 << 19, &mut rng),
        Spec::mixed((3 << 19) + 4096, &mut rng),
    ];
    let vms = ["vm-a", "vm-b"];
    let write = |spec: &Spec, vm: &str, round: usize| {
        let p = spec.write(&dir.join(format!("{vm}-{round}.img")));
        disks(&[("sys", &p)])
    };
    for (spec, vm) in specs.iter().zip(vms) {
        let d = write(spec, vm, 0);
        let m = backup(&repo, vm, &d).unwrap();
        refs.add(&m, &d);
    }
    // (delay of backup a, of backup b, of the prune) in ms, and whether backup a holds its
    // commit / backup b its first reuse decision until the prune has finished (so the prune
    // surely runs while they are between lease and manifest).
    let rounds = [
        ((0, 0, 0), false, false),
        ((0, 15, 5), true, false),
        ((20, 0, 0), false, true),
        ((0, 0, 30), true, true),
        ((5, 40, 15), false, false),
    ];
    for (round, ((da, db, dp), hold_a, hold_b)) in rounds.into_iter().enumerate() {
        let round = round + 1;
        let images: Vec<Disks> = specs
            .iter_mut()
            .zip(vms)
            .map(|(spec, vm)| {
                *spec = spec.mutate(25, &mut rng);
                write(spec, vm, round)
            })
            .collect();
        // Disconnected when the prune ends: a hook waiting on it returns then.
        let (prune_done, wait_prune) = bounded::<()>(0);
        let hooks_a = Hooks {
            before_commit: hold_a.then(|| {
                let w = wait_prune.clone();
                Arc::new(move || {
                    let _ = w.recv();
                }) as Arc<dyn Fn() + Send + Sync>
            }),
            ..Default::default()
        };
        let hooks_b = Hooks {
            after_reuse_decision: hold_b.then(|| {
                let w = wait_prune.clone();
                Arc::new(move |_: &vmkeep_core::BlobId| {
                    let _ = w.recv();
                }) as Arc<dyn Fn(&vmkeep_core::BlobId) + Send + Sync>
            }),
            ..Default::default()
        };
        let delayed = |ms: u64| std::thread::sleep(Duration::from_millis(ms));
        let with = |vm: &str, hooks: Hooks| BackupOptions {
            vm: vm.into(),
            hooks,
            ..Default::default()
        };
        let repo_ref = &repo;
        let (ra, rb, rp) = std::thread::scope(|s| {
            let ha = s.spawn(|| {
                delayed(da);
                backup_with(repo_ref, with(vms[0], hooks_a), &images[0])
            });
            let hb = s.spawn(|| {
                delayed(db);
                backup_with(repo_ref, with(vms[1], hooks_b), &images[1])
            });
            let hp = s.spawn(move || {
                delayed(dp);
                let plan = repo_ref.prune_plan(&PruneOptions {
                    vm: None,
                    policy: RetentionPolicy {
                        last: Some(2),
                        ..Default::default()
                    },
                });
                let r = plan.and_then(|plan| repo_ref.prune(&plan, &NoProgress));
                drop(prune_done);
                r
            });
            (ha.join().unwrap(), hb.join().unwrap(), hp.join().unwrap())
        });
        let ma = ra.unwrap_or_else(|e| panic!("round {round}: backup a: {e}"));
        let mb = rb.unwrap_or_else(|e| panic!("round {round}: backup b: {e}"));
        let st = rp.unwrap_or_else(|e| panic!("round {round}: prune: {e}"));
        println!(
            "round {round}: forgot {} points, gc {:?}",
            st.forgotten.len(),
            st.gc
        );
        refs.add(&ma, &images[0]);
        refs.add(&mb, &images[1]);
        assert_check_ok(&repo, &format!("round {round}"));
        let n = refs.verify_all(&repo, &format!("round {round}"));
        assert!(n >= 4, "round {round}: {n} restore points");
        assert_eq!(
            count(&repo, ObjectKind::Lock),
            0,
            "round {round}: every lease released"
        );
    }
    // Quiet now: a last prune sweeps what waited, and the repository is tidy.
    let st = prune_all_kept(&repo);
    assert_eq!(st.gc.packs_waiting, 0);
    assert_eq!(count(&repo, ObjectKind::GcRecord), 0);
    let r = assert_check_ok(&repo, "final");
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert!(dangling_index_packs(&repo).is_empty());
    refs.verify_all(&repo, "final");
}

/// Releasing a lease right after taking it returns at once. (The refresher thread used to miss a
/// stop signalled before it first waited, and release then blocked for a whole refresh period:
/// 60 s by default, an hour with this test's tuning.)
#[test]
fn lease_release_is_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("repo");
    init_repo(&root, false);
    let repo = Arc::new(open_local(&root, false, 1));
    assert_eq!(repo.tuning().lease_refresh, Duration::from_secs(3600));
    let (done_tx, done_rx) = bounded::<()>(1);
    // A detached thread: if a release blocks, the test fails instead of hanging.
    let r = repo.clone();
    std::thread::spawn(move || {
        for _ in 0..50 {
            let lease =
                vmkeep_repo::lease::Lease::acquire(&r, vmkeep_repo::lease::LeaseKind::Backup)
                    .unwrap();
            lease.release().unwrap();
            // Prune and forget take and drop leases the same way.
            r.forget(&[]).unwrap();
        }
        done_tx.send(()).unwrap();
    });
    done_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("a lease release blocked for a refresh period");
    assert_eq!(count(&repo, ObjectKind::Lock), 0);
}

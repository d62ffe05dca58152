//! Live backups of the test guest (tests/guest/build.sh) through `capture::backup_vm`, restored
//! and checked block by block. The guest's seqwrite workload writes `SEQ i` to block
//! `(i*97) mod N` of vda, then of vdb, each fsynced, then the next i. A point-in-time image of a
//! disk therefore holds exactly SEQ 0..K (no gap); since the cut is one transaction over both
//! disks and the guest has one write in flight at most, vdb's K is vda's K (cut after vdb's
//! write) or one less (cut between vda's and vdb's writes of the same i).
//!
//! One QEMU at a time (flock). Assertions never depend on timing.

mod common;
mod live;

use common::qemu_lock;
use live::*;
use serde_json::Value;
use vmkeep_repo::NoProgress;

#[test]
fn point_in_time_full_then_incremental_while_writing() {
    let g = guest();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disks = make_disks(d);
    let repo = repo(d);
    let _lock = qemu_lock();
    let mut vm = boot(d, &disks, 0, Some(&g));
    vm.wait_progress(20);

    let m1 = backup(&repo, &vm, false);
    let at1 = vm.progress();
    vm.wait_progress(at1 + 30);
    let m2 = backup(&repo, &vm, false);
    let at2 = vm.progress();
    vm.wait_progress(at2 + 5); // the guest went on writing after the cut
    let bitmaps = vm.vmkeep_bitmaps();
    let left = vm.leftovers();
    vm.kill9();

    // The cut stops the guest for the milliseconds it takes to insert the copy-before-write
    // filters and switch bitmaps (generous bounds: TCG on a busy host).
    for m in [&m1, &m2] {
        assert!(m.pause_ms > 0 && m.pause_ms < 1000, "{}", m.pause_ms);
    }
    for (name, c, reason) in cbt(&m1) {
        assert_eq!(
            (c.as_str(), reason.as_deref()),
            ("none", Some("first backup")),
            "{name}"
        );
    }
    for (name, c, reason) in cbt(&m2) {
        assert_eq!(c, "used", "{name}: {reason:?}");
    }
    // One recording checkpoint per disk remains: the one of restore point 2.
    let cp2: Vec<&str> = m2
        .disks
        .iter()
        .map(|d| d.checkpoint.as_ref().unwrap().bitmap.as_str())
        .collect();
    assert_eq!(bitmaps.len(), 2, "{bitmaps:?}");
    assert!(
        bitmaps
            .iter()
            .all(|(_, n, rec)| *rec && cp2.contains(&n.as_str())),
        "{bitmaps:?}"
    );
    assert!(left.is_empty(), "capture left {left:?}");

    let (ka1, kb1) = check_cut(&repo, &m1, &d.join("r1"));
    let (ka2, kb2) = check_cut(&repo, &m2, &d.join("r2"));
    assert!(ka1 >= 20 && ka2 > ka1, "K1={ka1} K2={ka2}");
    // The first backup read both filled disks; the second exactly the chunks written between
    // the cuts (each SEQ write lands in its own 64 KiB chunk: stride 97 blocks > 16).
    assert_eq!(m1.stats.read_bytes, 2 * DISK_MIB * MIB);
    let changed = ((ka2 - ka1) + (kb2 - kb1)) as u64;
    assert_eq!(
        m2.stats.read_bytes,
        changed * CS,
        "K1=({ka1},{kb1}) K2=({ka2},{kb2})"
    );
    eprintln!(
        "cuts: ({ka1},{kb1}) then ({ka2},{kb2}); read {} then {} bytes",
        m1.stats.read_bytes, m2.stats.read_bytes
    );
}

#[test]
fn incremental_equals_full_of_the_same_instant() {
    let g = guest();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disks = make_disks(d);
    let repo = repo(d);
    let _lock = qemu_lock();
    let mut vm = boot(d, &disks, 0, Some(&g));
    vm.wait_progress(10);
    let m1 = backup(&repo, &vm, false);
    let at = vm.progress();
    vm.wait_progress(at + 20);
    vm.execute("stop", Value::Null);
    let m2 = backup(&repo, &vm, false);
    let m3 = backup(&repo, &vm, true);
    vm.execute("cont", Value::Null);
    let at = vm.progress();
    vm.wait_progress(at + 3); // running again
    vm.kill9();

    assert!(cbt(&m1).iter().all(|c| c.1 == "none"));
    assert!(cbt(&m2).iter().all(|c| c.1 == "used"), "{:?}", cbt(&m2));
    assert!(
        cbt(&m3)
            .iter()
            .all(|c| c.1 == "none" && c.2.as_deref().unwrap().contains("--full")),
        "{:?}",
        cbt(&m3)
    );
    assert!(m2.stats.read_bytes < m3.stats.read_bytes / 4);
    let r2 = restore(&repo, &m2, &d.join("r2"));
    let r3 = restore(&repo, &m3, &d.join("r3"));
    assert_eq!(r2.len(), 2);
    for ((n2, a), (n3, b)) in r2.iter().zip(&r3) {
        assert_eq!(n2, n3);
        assert!(a == b, "disk {n2}: incremental and full restores differ");
    }
    check_cut(&repo, &m2, &d.join("r2b"));
    // Same disk trees: the full backup found exactly the incremental's content.
    for (x, y) in m2.disks.iter().zip(&m3.disks) {
        assert_eq!(x.root, y.root, "disk {}", x.name);
    }
}

/// Tracking across QEMU runs: a clean shutdown keeps it (live → stopped-image backup through
/// qemu-storage-daemon → live again, all "used"); a kill -9 of QEMU loses it, reported as a
/// rescan with its reason (bitmap never written: "missing"; bitmap in use at the kill:
/// "inconsistent"), and every restore point is still an exact cut.
#[test]
fn kill9_of_qemu_means_rescan_and_a_correct_backup() {
    let g = guest();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disks = make_disks(d);
    let repo = repo(d);
    let _lock = qemu_lock();

    // Run 1: first backup, clean shutdown (the checkpoint is written into the qcow2 images).
    let mut vm = boot(d, &disks, 1, Some(&g));
    vm.wait_progress(10);
    let m1 = backup(&repo, &vm, false);
    vm.quit();
    // The VM is shut down: an image backup (qemu-storage-daemon) continues the chain, and
    // leaves its own checkpoint in the images for the next live backup.
    let images = vec![
        ("vd0".to_string(), disks[0].clone()),
        ("drive1".to_string(), disks[1].clone()),
    ];
    let opts = vmkeep_repo::BackupOptions {
        vm: "guest".into(),
        ..Default::default()
    };
    let m_off = crate::common::backup_images(&repo, opts, &images, false, &NoProgress).unwrap();
    assert!(
        cbt(&m_off).iter().all(|c| c.1 == "used"),
        "{:?}",
        cbt(&m_off)
    );
    // Exactly the chunks the guest wrote between the live cut and the shutdown.
    let (ka1, kb1) = check_cut(&repo, &m1, &d.join("r-1"));
    let (kao, kbo) = check_cut(&repo, &m_off, &d.join("r-off"));
    let changed = ((kao - ka1) + (kbo - kb1)) as u64;
    assert_eq!(m_off.stats.read_bytes, changed * CS);
    // Run 2: tracking survived the clean restart. Then QEMU is killed.
    let mut vm = boot(d, &disks, 2, Some(&g));
    vm.wait_progress(5);
    let m2 = backup(&repo, &vm, false);
    assert!(cbt(&m2).iter().all(|c| c.1 == "used"), "{:?}", cbt(&m2));
    let at = vm.progress();
    vm.wait_progress(at + 5);
    vm.kill9();
    // Run 3: the checkpoint created in run 2 was never written to the images.
    let mut vm = boot(d, &disks, 3, Some(&g));
    vm.wait_progress(5);
    let m3 = backup(&repo, &vm, false);
    for (name, c, reason) in cbt(&m3) {
        assert_eq!(c, "rescan", "{name}");
        assert!(
            reason.as_deref().unwrap().contains("missing"),
            "{name}: {reason:?}"
        );
    }
    vm.quit(); // checkpoint 3 persisted
               // Run 4: opened (bitmaps marked in-use), killed: checkpoint 3 comes back inconsistent.
    let vm = boot(d, &disks, 4, None);
    vm.execute("query-status", Value::Null); // initialised: images open, bitmaps marked in-use
    vm.kill9();
    let mut vm = boot(d, &disks, 5, Some(&g));
    vm.wait_progress(5);
    let m5 = backup(&repo, &vm, false);
    for (name, c, reason) in cbt(&m5) {
        assert_eq!(c, "rescan", "{name}");
        assert!(
            reason.as_deref().unwrap().contains("inconsistent"),
            "{name}: {reason:?}"
        );
    }
    let bitmaps = vm.vmkeep_bitmaps();
    vm.kill9();
    assert_eq!(bitmaps.len(), 2, "stale bitmaps removed: {bitmaps:?}");
    assert!(bitmaps.iter().all(|b| b.2));

    for (i, m) in [&m2, &m3, &m5].into_iter().enumerate() {
        check_cut(&repo, m, &d.join(format!("r{i}")));
    }
    // The rescans read every allocated chunk.
    assert_eq!(m3.stats.read_bytes, 2 * DISK_MIB * MIB);
    assert_eq!(m5.stats.read_bytes, 2 * DISK_MIB * MIB);
}

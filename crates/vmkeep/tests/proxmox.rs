//! vmkeep beside Proxmox's use of the monitor, with a QEMU started the way Proxmox starts it:
//! its QMP monitor on `.../qemu-server/ID.qmp` (`-chardev socket,id=qmp,...,server=on,wait=off
//! -mon chardev=qmp,mode=control`), which `qm` and `pvestatd` connect to for every command, and
//! the second monitor README's Proxmox section tells the user to add for vmkeep (`qm set ID
//! --args '-qmp unix:/run/vmkeep/ID.qmp,server=on,wait=off'`).
//!
//! Checked: while vmkeep backs the VM up through its own monitor, a pvestatd-like poller
//! (connect, `qmp_capabilities`, `query-status`, close, every 100 ms) is answered every time;
//! pointed at Proxmox's monitor while Proxmox holds it, vmkeep fails in one line naming the
//! holder's process and the `qm set` way out.

mod common;
#[path = "common/qemu.rs"]
mod qemu;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use qemu::*;
use serde_json::Value;

/// A QEMU with Proxmox's monitor and vmkeep's own (the builder's `-qmp`), running seqwrite.
fn boot_like_proxmox(d: &std::path::Path) -> (Vm, PathBuf) {
    let server = d.join("qemu-server");
    std::fs::create_dir_all(&server).unwrap();
    let pve = server.join("100.qmp");
    let disk = d.join("vda.qcow2");
    vmkeep_testkit::tools::make_qcow2(&disk, &format!("{DISK_MIB}M"));
    let vm = VmBuilder::new(d, "")
        .blockdev_qcow2(&disk, "vd0")
        .arg("-chardev")
        .arg(format!(
            "socket,id=qmp,path={},server=on,wait=off",
            pve.display()
        ))
        .args(["-mon", "chardev=qmp,mode=control"])
        .seqwrite(&guest(), None)
        .boot();
    (vm, pve)
}

#[test]
fn proxmox_keeps_its_monitor_while_vmkeep_backs_up_through_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    init(&repo, &[]);
    let _lock = qemu_lock();
    let (mut vm, pve) = boot_like_proxmox(d);
    vm.wait_progress(20);

    // pvestatd: a short connection per poll, as Proxmox's QMP client makes (more often than
    // pvestatd does, so that a backup of a fraction of a second still meets several polls).
    let stop = Arc::new(AtomicBool::new(false));
    let backing_up = Arc::new(AtomicBool::new(false));
    let poller = {
        let stop = stop.clone();
        let backing_up = backing_up.clone();
        let pve = pve.clone();
        std::thread::spawn(move || {
            let mut worst = Duration::ZERO;
            let mut polls_during_backups = 0;
            while !stop.load(Ordering::Relaxed) {
                let during = backing_up.load(Ordering::Relaxed);
                let t0 = Instant::now();
                let status = Qmp::connect(&pve).execute("query-status", Value::Null);
                assert!(status["status"].is_string(), "{status}");
                worst = worst.max(t0.elapsed());
                if during && backing_up.load(Ordering::Relaxed) {
                    polls_during_backups += 1;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (polls_during_backups, worst)
        })
    };
    for _ in 0..2 {
        backing_up.store(true, Ordering::Relaxed);
        json(
            vmkeep(&repo)
                .args(["backup", "vm", "--qmp"])
                .arg(&vm.qmp)
                .args(["--vm", "pve-100"]),
        );
        backing_up.store(false, Ordering::Relaxed);
        let now = vm.progress();
        vm.wait_progress(now + 10);
    }
    stop.store(true, Ordering::Relaxed);
    let (polls, worst) = poller.join().expect("every poll answered");
    // CI saw two backups end within 4 polls 100 ms apart: the count says the poller ran
    // while vmkeep held its own monitor, not how long a backup takes.
    assert!(polls >= 2, "only {polls} polls while vmkeep backed up");
    assert!(
        worst < Duration::from_secs(5),
        "a Proxmox poll waited {worst:?} for the monitor"
    );

    // Pointed at Proxmox's monitor while Proxmox holds it: one line naming who, and the way out.
    let held = Qmp::connect(&pve);
    let line = fails_with(
        vmkeep(&repo)
            .args(["backup", "vm", "--qmp"])
            .arg(&pve)
            .args(["--vm", "pve-100"])
            .timeout(Duration::from_secs(60)),
        &["held by another client", "qm set ID --args"],
    );
    assert!(
        line.contains(&format!("pid {}", std::process::id())),
        "the holder (this test, pid {}) is not named: {line}",
        std::process::id()
    );
    drop(held);
    assert_eq!(
        snapshots(&repo).len(),
        2,
        "the refused backup stored nothing"
    );
}

#[test]
fn another_partys_block_job_is_named_in_one_line_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    init(&repo, &[]);
    let _lock = qemu_lock();
    let (vm, _pve) = boot_like_proxmox(d);
    vm.execute(
        "blockdev-add",
        serde_json::json!({"driver": "null-co", "node-name": "elsewhere",
                           "size": DISK_MIB << 20}),
    );
    // Backup jobs as libvirt and Proxmox name them, held running by a 1 byte/s limit.
    for (job, who) in [
        ("backup-vda-libvirt-1-format", "libvirt"),
        ("drive-scsi0", "Proxmox"),
    ] {
        vm.execute(
            "blockdev-backup",
            serde_json::json!({"job-id": job, "device": "disk0", "target": "elsewhere",
                               "sync": "full", "speed": 1}),
        );
        let line = fails_with(
            vmkeep(&repo)
                .args(["backup", "vm", "--qmp"])
                .arg(&vm.qmp)
                .args(["--vm", "pve-100"]),
            &["in use by a backup job", job, who, "Nothing was changed"],
        );
        assert!(
            !line.contains("is busy"),
            "QEMU's opaque error leaked: {line}"
        );
        // Nothing of vmkeep's, and the other party's job untouched.
        assert_eq!(vm.leftovers(), vec![format!("job \"{job}\"")]);
        vm.execute(
            "block-job-cancel",
            serde_json::json!({"device": job, "force": true}),
        );
        let t0 = Instant::now();
        while vm.execute("query-block-jobs", Value::Null) != serde_json::json!([]) {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the job never ended"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    json(
        vmkeep(&repo)
            .args(["backup", "vm", "--qmp"])
            .arg(&vm.qmp)
            .args(["--vm", "pve-100"]),
    );
}

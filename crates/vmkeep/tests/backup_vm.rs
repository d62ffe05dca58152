//! `vmkeep backup vm` with the real binary against a real QEMU guest (tests/guest/build.sh):
//! the --json shape and change tracking, a monitor held by another client, a vmkeep killed
//! mid-capture (its guard puts the VM back), and --freeze on without a guest agent.
//!
//! The guest's seqwrite workload writes `SEQ i` to block (i*97) mod N of its disk, fsynced, one
//! write at a time; a point-in-time image holds exactly SEQ 0..K with no gap. One QEMU at a time
//! (flock shared with vmkeep-qemu's tests). Assertions never depend on timing, except an upper
//! bound that catches a hang.

mod common;
#[path = "common/qemu.rs"]
mod qemu;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use qemu::*;
use serde_json::Value;

/// `backup vm --qmp SOCK --vm guest [extra] --json`, which must succeed.
fn backup_vm(repo: &Path, vm: &Vm, extra: &[&str]) -> Value {
    json(
        vmkeep(repo)
            .args(["backup", "vm", "--qmp"])
            .arg(&vm.qmp)
            .args(["--vm", "guest"])
            .args(extra),
    )
}

/// Restores `id` (raw) and returns the K of its point-in-time disk vd0.
fn restored_k(repo: &Path, id: &str, target: &Path) -> i64 {
    restore(repo, id, target);
    let img = std::fs::read(target.join("vd0.raw")).expect("restored vd0.raw");
    prefix_k(&img, id)
}

fn cbt_of(v: &Value) -> Vec<(String, String, Option<String>)> {
    v["disks"]
        .as_array()
        .expect("disks is an array")
        .iter()
        .map(|d| {
            (
                d["name"].as_str().expect("disk name").to_string(),
                d["cbt"].as_str().expect("disk cbt").to_string(),
                d["reason"].as_str().map(String::from),
            )
        })
        .collect()
}

#[test]
fn json_shape_and_change_tracking() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    init(&repo, &[]);
    let _lock = qemu_lock();
    let mut vm = boot(d, true);
    vm.wait_progress(5);

    let b1 = backup_vm(&repo, &vm, &[]);
    let at = vm.progress();
    vm.wait_progress(at + 10);
    let b2 = backup_vm(&repo, &vm, &[]);
    assert!(vm.running(), "the VM runs on after the backups");
    drop(vm);

    for b in [&b1, &b2] {
        assert!(b["id"].as_str().is_some_and(|s| !s.is_empty()), "{b}");
        assert_eq!(b["vm"], "guest", "{b}");
        // The cut pauses the guest for the milliseconds it takes to insert the filters.
        let pause = b["pause_ms"].as_u64().unwrap();
        assert!(pause > 0 && pause < 1000, "pause_ms: {b}");
        for k in ["read_bytes", "stored_bytes", "seconds"] {
            assert!(b["stats"][k].is_number(), "stats.{k}: {b}");
        }
        let disks = b["disks"].as_array().unwrap();
        assert_eq!(disks.len(), 1, "{b}");
        assert_eq!(disks[0]["name"], "vd0", "disks are named by device id: {b}");
        assert!(disks[0].get("reason").is_some(), "{b}");
    }
    assert!(b1["parent"].is_null(), "{b1}");
    assert_eq!(b2["parent"], b1["id"], "{b2}");
    let (_, c1, r1) = &cbt_of(&b1)[0];
    assert_eq!(c1, "none", "{b1}");
    assert!(
        r1.as_deref().is_some_and(|r| !r.is_empty()),
        "a reason: {b1}"
    );
    let (_, c2, _) = &cbt_of(&b2)[0];
    assert_eq!(c2, "used", "{b2}");

    // Both restore points are exact cuts; the second read at most the 64 KiB chunks (default
    // chunk size) written in between, one per write.
    let k1 = restored_k(&repo, &id_of(&b1), &d.join("r1"));
    let k2 = restored_k(&repo, &id_of(&b2), &d.join("r2"));
    assert!(k1 >= 5 && k2 >= k1 + 10, "K1={k1} K2={k2}");
    // Of the disk (read_bytes also counts the VM's definition and boot files).
    let read2 = b2["stats"]["changed_bytes"].as_u64().unwrap();
    assert!(
        read2 > 0 && read2 <= (k2 - k1) as u64 * 65536,
        "the incremental read {read2} bytes for {} writes",
        k2 - k1
    );
}

#[test]
fn a_monitor_held_by_another_client_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    init(&repo, &[]);
    let _lock = qemu_lock();
    let vm = boot(d, false);
    let holder = vm.connect(); // QEMU serves one client per monitor: vmkeep gets no greeting
    let start = Instant::now();
    let line = fails_with(
        vmkeep(&repo)
            .args(["backup", "vm", "--qmp"])
            .arg(&vm.qmp)
            .args(["--vm", "guest", "--json"])
            .timeout(Duration::from_secs(60)),
        &["held by another client"],
    );
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "took {:?}",
        start.elapsed()
    );
    assert!(
        line.contains(&format!("pid {}", std::process::id())),
        "the holder (this test) is not named: {line}"
    );
    assert!(line.contains("a monitor of its own"), "{line}");
    drop(holder);
    // Free again: the backup works and nothing was stored by the refused one.
    let b = backup_vm(&repo, &vm, &[]);
    assert!(b["parent"].is_null(), "{b}");
    assert_eq!(snapshots(&repo).len(), 1);
}

#[test]
fn a_killed_vmkeep_leaves_the_vm_running_and_tracking_intact() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    init(&repo, &[]);
    let _lock = qemu_lock();
    let mut vm = boot(d, true);
    vm.wait_progress(5);
    let b1 = backup_vm(&repo, &vm, &[]);

    // Killed (abort, as kill -9) after the first disk was read, NBD export and fleecing up.
    // Its guard inherits stderr: reading stderr to its end waits for the guard too.
    let out = vmkeep_std(&repo)
        .args(["backup", "vm", "--qmp"])
        .arg(&vm.qmp)
        .args(["--vm", "guest", "--json"])
        .env("VMKEEP_KILL_AT", "capture-mid-read")
        .output()
        .unwrap();
    assert!(!out.status.success(), "not killed: {}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("VMKEEP_KILL_AT=capture-mid-read"),
        "{}",
        describe(&out)
    );
    assert!(out.stdout.is_empty(), "{}", describe(&out));
    eprintln!("killed vmkeep and its guard said:\n{stderr}");

    // The VM runs (and the guest writes) on, nothing of the capture is left.
    assert!(vm.running(), "VM not running; {}", describe(&out));
    let at = vm.progress();
    vm.wait_progress(at + 3);
    assert!(
        vm.leftovers().is_empty(),
        "{:?}; {}",
        vm.leftovers(),
        describe(&out)
    );
    assert_eq!(
        snapshots(&repo).len(),
        1,
        "the killed backup stored no restore point"
    );

    // The next backup still uses change tracking and is an exact cut.
    let b2 = backup_vm(&repo, &vm, &[]);
    drop(vm);
    assert_eq!(b2["parent"], b1["id"], "{b2}");
    assert_eq!(cbt_of(&b2)[0].1, "used", "{b2}");
    let k1 = restored_k(&repo, &id_of(&b1), &d.join("r1"));
    let k2 = restored_k(&repo, &id_of(&b2), &d.join("r2"));
    assert!(k2 > k1, "K1={k1} K2={k2}");
}

#[test]
fn freeze_on_without_a_guest_agent_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    init(&repo, &[]);
    let _lock = qemu_lock();
    let vm = boot(d, false);
    let line = fails_with(
        vmkeep(&repo)
            .args(["backup", "vm", "--qmp"])
            .arg(&vm.qmp)
            .args(["--vm", "guest", "--freeze", "on", "--json"])
            .timeout(Duration::from_secs(60)),
        &["--freeze on", "guest agent"],
    );
    eprintln!("{line}");
    assert!(snapshots(&repo).is_empty());
    assert!(vm.leftovers().is_empty(), "{:?}", vm.leftovers());
    // auto skips silently, off never asks.
    backup_vm(&repo, &vm, &["--freeze", "auto"]);
    backup_vm(&repo, &vm, &["--freeze", "off"]);
    assert_eq!(snapshots(&repo).len(), 2);
}

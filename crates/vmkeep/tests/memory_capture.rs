//! `vmkeep backup vm --memory` killed (abort, as kill -9 would) at each named point of a memory
//! capture: the guest runs on, unpaused, no migration is left running, no half restore point is
//! visible, and the next capture works. Once through the guard's undo, once with vmkeep and its
//! guard killed together (the next capture replays the dead capture's undo log).
//!
//! The real binary against the real test guest (seqwrite on one disk). One QEMU at a time.

mod common;
#[path = "common/qemu.rs"]
mod qemu;

use std::path::Path;
use std::process::Stdio;

use common::*;
use qemu::*;
use serde_json::Value;
use vmkeep_testkit::process::{children_of, wait_gone};

const POINTS: [&str; 4] = [
    "capture-after-stop",
    "capture-after-migrate-start",
    "capture-mid-memory",
    "capture-before-commit",
];

fn backup_memory(repo: &Path, vm: &Vm, tmp: &Path) -> Value {
    json(
        vmkeep(repo)
            .env("TMPDIR", tmp)
            .args(["backup", "vm", "--memory", "--qmp"])
            .arg(&vm.qmp)
            .args(["--vm", "guest"]),
    )
}

fn migration_status(vm: &Vm) -> String {
    vm.execute("query-migrate", Value::Null)["status"]
        .as_str()
        .unwrap_or("none")
        .to_string()
}

/// The VM as a capture must leave it: running, writing, nothing of ours, no migration running.
fn assert_unharmed(vm: &mut Vm, tmp: &Path, context: &str) {
    let at = vm.progress();
    vm.wait_progress(at + 2);
    assert!(vm.running(), "{context}: not running");
    assert!(vm.leftovers().is_empty(), "{context}: {:?}", vm.leftovers());
    let st = migration_status(vm);
    assert!(
        !matches!(st.as_str(), "active" | "setup" | "device" | "cancelling"),
        "{context}: migration {st}"
    );
    assert_eq!(
        std::fs::read_dir(tmp).unwrap().count(),
        0,
        "{context}: scratch left"
    );
}

#[test]
fn a_memory_capture_killed_anywhere_leaves_the_guest_running() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    init(&repo, &[]);
    let tmp = d.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let _lock = qemu_lock();
    let mut vm = boot(d, true);
    vm.wait_progress(3);
    let first = backup_memory(&repo, &vm, &tmp);
    let pause = first["pause_ms"].as_u64().unwrap();
    assert!(pause > 0 && pause < 2000, "{first}");

    for point in POINTS {
        let out = vmkeep_std(&repo)
            .env("TMPDIR", &tmp)
            .env("VMKEEP_KILL_AT", point)
            .args(["backup", "vm", "--memory", "--qmp"])
            .arg(&vm.qmp)
            .args(["--vm", "guest"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            err.contains(&format!("VMKEEP_KILL_AT={point}")),
            "{point}: {err}"
        );
        assert_unharmed(&mut vm, &tmp, &format!("{point}: {err}"));
        assert_eq!(
            snapshot_ids(&repo).len(),
            1,
            "{point}: no half restore point"
        );
    }

    // vmkeep and its guard killed together mid-capture (the VM is stopped and a migration
    // runs at that point): the next capture undoes it from the log.
    let mut child = vmkeep_std(&repo)
        .env("TMPDIR", &tmp)
        .env("VMKEEP_STOP_AT", "capture-after-migrate-start")
        .args(["backup", "vm", "--memory", "--qmp"])
        .arg(&vm.qmp)
        .args(["--vm", "guest"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_stopped(&mut child);
    let guard = children_of(child.id());
    assert_eq!(guard.len(), 1, "{guard:?}");
    // SAFETY: kill(2) with our child's child and a valid signal.
    assert_eq!(unsafe { libc::kill(guard[0], libc::SIGKILL) }, 0);
    child.kill().unwrap();
    child.wait().unwrap();
    wait_gone(guard[0]);
    assert!(!vm.running(), "stopped for the cut when both died");
    let b = backup_memory(&repo, &vm, &tmp);
    assert_eq!(b["disks"][0]["cbt"], "used", "{b}");
    assert_unharmed(&mut vm, &tmp, "after both died");
    assert_eq!(snapshot_ids(&repo).len(), 2);
}

/// The QEMU process's anonymous memory in transparent huge pages, KiB.
fn anon_huge_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("AnonHugePages:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// QEMU's background snapshot lifts its write-protection 4 KiB at a time, which splits every
/// transparent huge page of the guest the stream passes over. The capture collapses them back:
/// the guest does not run on small pages for minutes (khugepaged's pace), and the next
/// capture's pause, spent walking page tables while the VM is stopped, does not grow
/// several-fold (bench/memory_capture.py).
#[test]
fn a_memory_capture_gives_the_guest_its_huge_pages_back() {
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if thp.is_empty() || thp.contains("[never]") {
        eprintln!(
            "not run: transparent huge pages are disabled on this host ({thp:?}), so a capture \
             has none to split or restore"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    init(&repo, &[]);
    let tmp = d.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let _lock = qemu_lock();
    let g = guest();
    let disk = d.join("vda.qcow2");
    vmkeep_testkit::tools::make_qcow2(&disk, "16M");
    // 96 MiB of random data in the guest's tmpfs, rewritten 4 MiB at a time from then on.
    let vm = VmBuilder::new(d, "")
        .memory_mib(256)
        .blockdev_qcow2(&disk, "vd0")
        .kernel(
            &g.join("vmlinuz"),
            &g.join("initrd.gz"),
            "console=ttyS0 quiet panic=-1 vmkeep.workload=memfill vmkeep.fill=96 vmkeep.step=4",
        )
        .boot();
    vmkeep_testkit::guest::wait_serial_log(&vm.log, "MEMFILL DONE", |t| t.contains("MEMFILL DONE"));
    let pid = vm.qemu.0.id();
    let before = anon_huge_kib(pid);
    assert!(
        before >= 64 << 10,
        "the guest's RAM is not on huge pages before the capture ({before} KiB)"
    );
    let bandwidth = || vm.execute("query-migrate-parameters", Value::Null)["max-bandwidth"].clone();
    let limit = bandwidth();
    backup_memory(&repo, &vm, &tmp);
    // The capture lifted QEMU's bandwidth limit for its stream and put it back.
    assert_eq!(bandwidth(), limit);
    let after = anon_huge_kib(pid);
    assert!(
        after * 10 >= before * 9,
        "huge pages: {before} KiB before the capture, {after} KiB after"
    );
}

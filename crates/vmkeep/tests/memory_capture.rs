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

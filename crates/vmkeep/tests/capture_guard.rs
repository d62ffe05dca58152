//! A `vmkeep backup vm` killed (abort, as kill -9 would) at each named point of a live capture
//! never harms the VM: its guard (the binary re-executed as `backup vm --guard`) puts the VM
//! back: running, no scratch node, filter or export left, checkpoint bitmaps merged back. The
//! next backup still uses change tracking and is a correct point-in-time image. When vmkeep and
//! its guard die together (a cgroup or OOM kill takes both), the next capture finds the dead
//! capture's undo log in its scratch directory and undoes it with the same executor.
//!
//! The real binary against a real QEMU guest on two disks (vda: -blockdev, device id `vd0`;
//! vdb: -drive `drive1` on an anonymous device) running the seqwrite workload
//! (vmkeep_testkit::guest). One QEMU at a time machine-wide.

mod common;

use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::Arc;

use common::*;
use serde_json::Value;
use vmkeep_repo::{Manifest, Repository};
use vmkeep_store::LocalStore;
use vmkeep_testkit::guest::{check_two_disk_cut, guest, make_filled_disks, two_disk_vm};
use vmkeep_testkit::process::{children_of, wait_gone};
use vmkeep_testkit::vm::{qemu_lock, Vm};

/// The repository is encrypted (the guard never needs the passphrase).
const PASS: &str = "guard test passphrase";

const KILL_POINTS: [&str; 5] = [
    "capture-after-stop",
    "capture-after-fleece",
    "capture-mid-read",
    "capture-before-commit",
    "capture-after-commit",
];

/// `backup vm --qmp SOCK --vm guest --json`, which must succeed.
fn backup(repo: &Path, vm: &Vm) -> Value {
    json(
        vmkeep(repo)
            .env("VMKEEP_PASSWORD", PASS)
            .args(["backup", "vm", "--qmp"])
            .arg(&vm.qmp)
            .args(["--vm", "guest"]),
    )
}

/// The change-tracking state of each disk of a `backup vm --json` result.
fn cbt(b: &Value) -> Vec<String> {
    b["disks"]
        .as_array()
        .expect("disks is an array")
        .iter()
        .map(|d| d["cbt"].as_str().expect("disk cbt").to_string())
        .collect()
}

/// `backup vm --suspend` (so every capture kill point is reached) killed at `point`; returns
/// its stderr, which the guard shares: the output is complete once the guard is done too.
fn killed_backup(repo: &Path, vm: &Vm, point: &str) -> String {
    let out = vmkeep_std(repo)
        .env("VMKEEP_PASSWORD", PASS)
        .args(["backup", "vm", "--qmp"])
        .arg(&vm.qmp)
        .args(["--vm", "guest", "--suspend", "--json"])
        .env("VMKEEP_KILL_AT", point)
        .output()
        .unwrap();
    assert_killed(&out, point);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_killed(out: &Output, point: &str) {
    assert!(
        !out.status.success(),
        "{point}: not killed: {}",
        describe(out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("VMKEEP_KILL_AT={point}")),
        "{point}: {}",
        describe(out)
    );
    assert!(out.stdout.is_empty(), "{point}: {}", describe(out));
}

/// The latest restore point of VM `guest`, read with the library.
fn latest(repo: &Path) -> Manifest {
    let store = Arc::new(LocalStore::open(repo).unwrap());
    Repository::open(store, Some(PASS.as_bytes()))
        .unwrap()
        .latest("guest")
        .unwrap()
        .expect("a restore point of guest")
}

/// Restores `id` with the binary; both disks must be one point-in-time cut.
fn check_cut(repo: &Path, id: &str, target: &Path) {
    json(
        vmkeep(repo)
            .env("VMKEEP_PASSWORD", PASS)
            .args(["restore", id, "--target"])
            .arg(target),
    );
    let read = |disk: &str| std::fs::read(target.join(format!("{disk}.raw"))).unwrap();
    check_two_disk_cut(&read("vd0"), &read("drive1"));
}

/// vmkeep's checkpoints in the VM: exactly one per disk, recording, the ones of `latest`.
fn assert_bitmaps_of(vm: &Vm, latest: &Manifest, context: &str) {
    let bitmaps = vm.vmkeep_bitmaps();
    let want: Vec<&str> = latest
        .disks
        .iter()
        .map(|x| x.checkpoint.as_ref().unwrap().bitmap.as_str())
        .collect();
    assert_eq!(bitmaps.len(), 2, "{context}: {bitmaps:?}");
    assert!(
        bitmaps
            .iter()
            .all(|(_, n, rec)| *rec && want.contains(&n.as_str())),
        "{context}: {bitmaps:?} want {want:?}"
    );
}

#[test]
fn a_vmkeep_killed_at_each_capture_point_leaves_the_vm_unharmed() {
    let g = guest();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disks = make_filled_disks(d);
    let repo = d.join("repo");
    let created = json(
        vmkeep(&repo)
            .env("VMKEEP_PASSWORD", PASS)
            .args(["init", "--encrypt"]),
    );
    assert_eq!(created["encrypted"], true, "{created}");
    let _lock = qemu_lock();
    let mut vm = two_disk_vm(d, &disks, "0").seqwrite(&g, None).boot();
    vm.wait_progress(5);
    backup(&repo, &vm);

    for point in KILL_POINTS {
        let stderr = killed_backup(&repo, &vm, point);
        eprintln!("{point}: vmkeep and its guard said:\n{stderr}");
        // Running again (the guest makes progress), nothing left behind.
        let at = vm.progress();
        vm.wait_progress(at + 2);
        assert!(vm.running(), "{point}: VM not running; {stderr}");
        assert!(
            vm.leftovers().is_empty(),
            "{point}: {:?}; {stderr}",
            vm.leftovers()
        );
        // The latest restore point's checkpoints: the killed backup's own after its commit.
        assert_bitmaps_of(&vm, &latest(&repo), &format!("{point}; {stderr}"));
        // The next backup uses tracking and is a correct cut.
        let b = backup(&repo, &vm);
        assert!(cbt(&b).iter().all(|c| c == "used"), "{point}: {b}");
        check_cut(&repo, &id_of(&b), &d.join(format!("r-{point}")));
    }

    // vmkeep and its guard both gone: the next capture finds the dead capture's log and
    // undoes it (the VM it left stopped runs again); tracking is still used.
    let tmp = d.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    killed_with_guard(&repo, &vm, &tmp);
    let left = vm.leftovers();
    assert_eq!(
        left.len(),
        6,
        "2 scratch nodes, 2 filters, 2 snapshot nodes left: {left:?}"
    );
    assert!(!vm.running(), "--suspend left the VM stopped");
    assert_eq!(
        vm.vmkeep_bitmaps().len(),
        4,
        "old disabled + new recording per disk"
    );
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        1,
        "its scratch directory"
    );
    let b = json(
        vmkeep(&repo)
            .env("VMKEEP_PASSWORD", PASS)
            .env("TMPDIR", &tmp)
            .args(["backup", "vm", "--qmp"])
            .arg(&vm.qmp)
            .args(["--vm", "guest"]),
    );
    assert!(cbt(&b).iter().all(|c| c == "used"), "{b}");
    assert!(vm.running(), "the next capture resumed the VM");
    assert!(vm.leftovers().is_empty(), "{:?}", vm.leftovers());
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "scratch removed"
    );
    assert_bitmaps_of(&vm, &latest(&repo), "after the recovery");
    check_cut(&repo, &id_of(&b), &d.join("r-no-guard"));
    vm.kill9();
}

/// A `backup vm --suspend` stopped mid-read, then its guard and it killed (-9), the guard
/// first so it cannot undo anything.
fn killed_with_guard(repo: &Path, vm: &Vm, tmp: &Path) {
    let mut child = vmkeep_std(repo)
        .env("VMKEEP_PASSWORD", PASS)
        .env("TMPDIR", tmp)
        .args(["backup", "vm", "--qmp"])
        .arg(&vm.qmp)
        .args(["--vm", "guest", "--suspend", "--json"])
        .env("VMKEEP_STOP_AT", "capture-mid-read")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_stopped(&mut child);
    let children = children_of(child.id());
    assert_eq!(children.len(), 1, "one guard: {children:?}");
    // SAFETY: kill(2) with a pid of our child's child and a valid signal.
    assert_eq!(unsafe { libc::kill(children[0], libc::SIGKILL) }, 0);
    child.kill().unwrap();
    child.wait().unwrap();
    // The guard is gone too (reaped by init).
    wait_gone(children[0]);
}

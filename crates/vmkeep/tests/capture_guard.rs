//! A `vmkeep backup vm` killed (abort, as kill -9 would) at each named point of a live capture
//! never harms the VM: its guard (the binary re-executed as `backup vm --guard`) puts the VM
//! back: running, no scratch node, job or export left, checkpoint bitmaps merged back. The next
//! backup still uses change tracking and is a correct point-in-time image. When the guard could
//! not start either, the next capture finds the leftovers by name and undoes them the same way.
//!
//! The real binary against a real QEMU guest on two disks (vda: -blockdev, device id `vd0`;
//! vdb: -drive `drive1` on an anonymous device) running the seqwrite workload
//! (vmkeep_testkit::guest). One QEMU at a time machine-wide.

mod common;

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use vmkeep_repo::{Manifest, Repository};
use vmkeep_store::LocalStore;
use vmkeep_testkit::guest::{check_two_disk_cut, guest, make_filled_disks, two_disk_vm};
use vmkeep_testkit::process::{require, run};
use vmkeep_testkit::vm::{qemu_lock, Vm};

/// The repository is encrypted: the test without a guard hands the passphrase over a FIFO.
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

    // vmkeep and its guard both gone: the next capture finds the leftovers by name and undoes
    // them the same way; tracking is still used.
    let out = killed_without_guard(&repo, &vm, d);
    eprintln!("without a guard: {}", describe(&out));
    let left = vm.leftovers();
    assert_eq!(left.len(), 4, "2 scratch nodes and 2 jobs left: {left:?}");
    assert_eq!(
        vm.vmkeep_bitmaps().len(),
        4,
        "old disabled + new recording per disk"
    );
    let b = backup(&repo, &vm);
    assert!(cbt(&b).iter().all(|c| c == "used"), "{b}");
    assert!(vm.leftovers().is_empty(), "{:?}", vm.leftovers());
    assert_bitmaps_of(&vm, &latest(&repo), "after the recovery");
    check_cut(&repo, &id_of(&b), &d.join("r-no-guard"));
    vm.kill9();
}

/// A `backup vm --suspend` killed mid-read whose guard could not start: it runs from a copy of
/// the binary that is deleted while it runs, so re-executing itself fails ("cannot start the
/// capture guard"). The order is certain: vmkeep reads its passphrase from a FIFO before it
/// starts a guard, and the test deletes the copy before it writes the passphrase.
fn killed_without_guard(repo: &Path, vm: &Vm, d: &Path) -> Output {
    let exe = d.join("vmkeep-unguarded");
    std::fs::copy(bin(), &exe).unwrap();
    let fifo = d.join("passphrase.fifo");
    run(std::process::Command::new(require("mkfifo")).arg(&fifo));
    let mut child = vmkeep_std_at(&exe, repo)
        .env("VMKEEP_PASSWORD_FILE", &fifo)
        .args(["backup", "vm", "--qmp"])
        .arg(&vm.qmp)
        .args(["--vm", "guest", "--suspend", "--json"])
        .env("VMKEEP_KILL_AT", "capture-mid-read")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A non-blocking open for writing succeeds once vmkeep has the FIFO open for reading.
    let start = Instant::now();
    let mut writer = loop {
        match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
        {
            Ok(f) => break f,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                if let Some(st) = child.try_wait().unwrap() {
                    let out = child.wait_with_output().unwrap();
                    panic!("vmkeep exited ({st}) before reading its passphrase: {out:?}");
                }
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "vmkeep did not open its password file"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("opening {}: {e}", fifo.display()),
        }
    };
    std::fs::remove_file(&exe).unwrap();
    writer.write_all(PASS.as_bytes()).unwrap();
    drop(writer);
    let out = child.wait_with_output().unwrap();
    assert_killed(&out, "capture-mid-read");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot start the capture guard"),
        "the guard did not fail to start: {}",
        describe(&out)
    );
    out
}

//! Defects a review of live capture reproduced (issue 7), each through the real binary against
//! a real QEMU: a backup must never harm the guest, and an incremental marked `used` must never
//! restore wrong data. One QEMU at a time machine-wide.

mod common;
#[path = "common/qemu.rs"]
mod qemu;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use qemu::*;
use serde_json::{json as j, Value};
use vmkeep_testkit::process::{children_of, Tmpfs};
use vmkeep_testkit::tools::make_qcow2;

fn backup_vm(repo: &Path, vm: &Vm, extra: &[&str]) -> Value {
    json(
        vmkeep(repo)
            .args(["backup", "vm", "--qmp"])
            .arg(&vm.qmp)
            .args(["--vm", "guest"])
            .args(extra),
    )
}

fn cbt_of(v: &Value) -> Vec<(String, String, String)> {
    v["disks"]
        .as_array()
        .expect("disks")
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap().to_string(),
                d["cbt"].as_str().unwrap().to_string(),
                d["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Defect 4: QEMU running as another user (libvirt's `-run-with user=`) cannot open paths in
/// vmkeep's private scratch directory: images and the NBD socket go over as fds.
#[test]
fn qemu_running_as_another_user() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    init(&repo, &[]);
    let disk = d.join("vda.qcow2");
    make_qcow2(&disk, &format!("{DISK_MIB}M"));
    let _lock = qemu_lock();
    let mut vm = VmBuilder::new(d, "")
        .blockdev_qcow2(&disk, "vd0")
        .seqwrite(&guest(), None)
        .args(["-run-with", "user=nobody"])
        .boot();
    vm.wait_progress(3);
    let b = backup_vm(&repo, &vm, &[]);
    assert!(vm.running());
    assert!(vm.leftovers().is_empty(), "{:?}", vm.leftovers());
    drop(vm);
    let target = d.join("r");
    restore(&repo, &id_of(&b), &target);
    let img = std::fs::read(target.join("vd0.raw")).unwrap();
    assert!(prefix_k(&img, "run-with") >= 0);
}

/// Their NBD server still runs (a second start is refused); then it is stopped.
fn stop_their_server(vm: &Vm, d: &Path) {
    let again = vm
        .connect()
        .try_execute(
            "nbd-server-start",
            j!({"addr": {"type": "unix", "data": {"path": d.join("x.sock")}}}),
        )
        .unwrap_err();
    assert!(again.contains("already running"), "{again}");
    vm.execute("nbd-server-stop", Value::Null);
}

/// Defect 5: a QEMU that already runs an NBD server (libvirt's backup job, another tool): vmkeep
/// shares it (issue 11: an export of its own on their server, found among QEMU's listening
/// sockets), reads the same data as through a server of its own, and leaves their server
/// running with none of its exports; a server on TCP is named and refused with nothing changed.
/// A long scratch path (longer than a unix socket path may be) works.
#[test]
fn an_nbd_server_of_someone_else_is_shared_and_a_long_scratch_path() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    init(&repo, &[]);
    let _lock = qemu_lock();
    let vm = boot(d, false);
    let theirs = d.join("theirs.sock");
    vm.execute(
        "nbd-server-start",
        j!({"addr": {"type": "unix", "data": {"path": theirs}}}),
    );
    let shared = backup_vm(&repo, &vm, &["--full"]);
    assert!(vm.leftovers().is_empty(), "{:?}", vm.leftovers());
    let exports = vm.execute("query-block-exports", Value::Null);
    assert_eq!(exports, j!([]), "vmkeep's export removed from their server");
    stop_their_server(&vm, d);
    // The same data as through vmkeep's own server (the guest is idle).
    let own = backup_vm(&repo, &vm, &["--full"]);
    let (a, b) = (d.join("via-theirs"), d.join("via-own"));
    restore(&repo, &id_of(&shared), &a);
    restore(&repo, &id_of(&own), &b);
    assert_same_file(&a.join("vd0.raw"), &b.join("vd0.raw"));

    // On TCP: named, refused, nothing changed, never stopped.
    vm.execute(
        "nbd-server-start",
        j!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}}}),
    );
    let err = fails_with(
        vmkeep(&repo)
            .args(["backup", "vm", "--qmp"])
            .arg(&vm.qmp)
            .args(["--vm", "guest"]),
        &[
            "already runs an NBD server",
            "TCP port",
            "Nothing was changed",
        ],
    );
    assert!(vm.leftovers().is_empty(), "{err}: {:?}", vm.leftovers());
    stop_their_server(&vm, d);

    let long = d.join("s".repeat(110));
    std::fs::create_dir(&long).unwrap();
    // (TMPDIR: the default scratch location, which every vmkeep version honours.)
    let b = json(
        vmkeep(&repo)
            .env("TMPDIR", &long)
            .args(["backup", "vm", "--qmp"])
            .arg(&vm.qmp)
            .args(["--vm", "guest"]),
    );
    assert_eq!(b["disks"][0]["cbt"], "used", "{b}");
    assert_eq!(
        std::fs::read_dir(&long).unwrap().count(),
        0,
        "scratch removed"
    );
}

/// Defect 6: the bitmap of a forgotten restore point kept recording on the disk (slowing the
/// guest's writes, blocking `qemu-img snapshot -a`): after a commit only the new checkpoint is
/// left.
#[test]
fn bitmaps_of_forgotten_restore_points_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    init(&repo, &[]);
    let _lock = qemu_lock();
    let vm = boot(d, false);
    backup_vm(&repo, &vm, &[]);
    let b2 = backup_vm(&repo, &vm, &[]);
    json(vmkeep(&repo).args(["forget", &id_of(&b2)]));
    let b3 = backup_vm(&repo, &vm, &[]);
    let c = cbt_of(&b3);
    assert_eq!(c[0].1, "rescan", "{b3}");
    assert!(c[0].2.contains("forgotten"), "{b3}");
    let bitmaps = vm.vmkeep_bitmaps();
    assert_eq!(bitmaps.len(), 1, "{bitmaps:?}");
    assert!(bitmaps[0].2, "recording");
    // The next backup uses it.
    let b4 = backup_vm(&repo, &vm, &[]);
    assert_eq!(cbt_of(&b4)[0].1, "used", "{b4}");
    assert_eq!(vm.vmkeep_bitmaps().len(), 1);
}

/// Defect 7: one qcow2 v2 disk (no persistent bitmaps) made every disk's bitmaps
/// non-persistent, for good, and the reason named a raw disk. Per disk now: after QEMU
/// restarts, the v3 disk still uses tracking; the v2 disk is rescanned for the true reason.
#[test]
fn one_qcow2_v2_disk_does_not_cost_the_others_their_tracking() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    init(&repo, &[]);
    let v3 = d.join("v3.qcow2");
    make_qcow2(&v3, "8M");
    let v2 = d.join("v2.qcow2");
    vmkeep_testkit::process::run(
        std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "compat=0.10"])
            .arg(&v2)
            .arg("8M"),
    );
    let _lock = qemu_lock();
    let start = |tag: &str| {
        VmBuilder::new(d, tag)
            .blockdev_qcow2(&v3, "v3")
            .blockdev_qcow2(&v2, "v2")
            .boot()
    };
    let vm = start("a");
    let b1 = backup_vm(&repo, &vm, &[]);
    let b2 = backup_vm(&repo, &vm, &[]);
    assert!(cbt_of(&b2).iter().all(|c| c.1 == "used"), "{b2}");
    vm.quit();
    let vm = start("b");
    let b3 = backup_vm(&repo, &vm, &[]);
    let c = cbt_of(&b3);
    assert_eq!(c[0].0, "v3");
    assert_eq!(
        c[0].1, "used",
        "the v3 disk's bitmap persisted: {b3} (after {b1})"
    );
    assert_eq!(c[1].1, "rescan", "{b3}");
    assert!(c[1].2.contains("qcow2 v2"), "the true reason: {b3}");
}

/// Defect 1: scratch space running out while the backup reads must fail the backup, never the
/// guest's writes (it left the VM in `io-error`, or the guest lost writes, while vmkeep said 0).
#[test]
fn scratch_space_full_fails_the_backup_not_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    init(&repo, &[]);
    let small = d.join("small");
    let Some(_mounted) = Tmpfs::mount(&small, "1m") else {
        return;
    };
    // Written data (a fresh image's zero clusters cost the scratch image nothing).
    let [disk, _] = vmkeep_testkit::guest::make_filled_disks(d);
    let _lock = qemu_lock();
    let mut vm = VmBuilder::new(d, "")
        .blockdev_qcow2(&disk, "vd0")
        .seqwrite(&guest(), None)
        .boot();
    vm.wait_progress(3);
    let mut child = vmkeep_std(&repo)
        .args(["backup", "vm", "--qmp"])
        .arg(&vm.qmp)
        .args(["--vm", "guest"])
        .env("TMPDIR", &small)
        .env("VMKEEP_STOP_AT", "capture-after-fleece")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_stopped(&mut child);
    // Every new write copies a 64 KiB cluster to the scratch image: 40 of them overflow 1 MiB.
    let at = vm.progress();
    vm.wait_progress(at + 40);
    resume(&child);
    let t0 = Instant::now();
    let out = loop {
        if child.try_wait().unwrap().is_some() {
            break child.wait_with_output().unwrap();
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "vmkeep hangs");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        !out.status.success(),
        "the backup cannot have succeeded: {}",
        describe(&out)
    );
    // The guest never noticed: running, still writing, no failed write on its console.
    let at = vm.progress();
    vm.wait_progress(at + 5);
    assert!(vm.running(), "{}", describe(&out));
    let serial = vm.serial();
    assert!(!serial.contains("failed"), "guest I/O errors: {serial}");
    assert!(vm.leftovers().is_empty(), "{:?}", vm.leftovers());
    assert_eq!(std::fs::read_dir(&small).unwrap().count(), 0);
    // And the next backup (with room) is a correct incremental.
    let b = backup_vm(&repo, &vm, &[]);
    let target = d.join("r");
    restore(&repo, &id_of(&b), &target);
    let img = std::fs::read(target.join("vd0.raw")).unwrap();
    vmkeep_testkit::guest::prefix_k(&img, vmkeep_testkit::guest::FILL, "after a full scratch");
}

/// Defect 2: vmkeep and its guard both died after a cut (the previous checkpoint left disabled,
/// the dead capture's bitmap recording every write since), its log lost; a later capture that
/// failed after its cut re-enabled the previous checkpoint with only its own writes merged in,
/// and the next backup said `used` and missed every write in between. Now the checkpoint is
/// repaired from the dead capture's bitmap first, and a checkpoint that was not recording is
/// never re-enabled.
#[test]
fn a_stale_checkpoint_is_never_re_enabled() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    init(&repo, &[]);
    let tmp = d.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let _lock = qemu_lock();
    let mut vm = boot(d, true);
    vm.wait_progress(3);
    let qmp = vm.qmp.clone();
    let run = |extra_env: (&str, &str)| {
        vmkeep_std(&repo)
            .env("TMPDIR", &tmp)
            .env(extra_env.0, extra_env.1)
            .args(["backup", "vm", "--qmp"])
            .arg(&qmp)
            .args(["--vm", "guest"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    json(
        vmkeep(&repo)
            .env("TMPDIR", &tmp)
            .args(["backup", "vm", "--qmp"])
            .arg(&vm.qmp)
            .args(["--vm", "guest"]),
    );
    // A: cut, read, torn down, then killed with its guard before the commit.
    let at = vm.progress();
    vm.wait_progress(at + 10);
    let mut a = run(("VMKEEP_STOP_AT", "capture-before-commit"));
    wait_stopped(&mut a);
    for pid in children_of(a.id()) {
        // SAFETY: kill(2) with our child's child and a valid signal.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    a.kill().unwrap();
    a.wait().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // Its log lost too (a temp cleaner, another TMPDIR): only the bitmaps tell.
    for e in std::fs::read_dir(&tmp).unwrap() {
        std::fs::remove_dir_all(e.unwrap().path()).unwrap();
    }
    let bitmaps = vm.vmkeep_bitmaps();
    assert!(
        bitmaps.iter().any(|b| !b.2) && bitmaps.iter().any(|b| b.2),
        "one disabled checkpoint, one recording orphan: {bitmaps:?}"
    );
    // Writes only the orphan records.
    let at = vm.progress();
    vm.wait_progress(at + 30);
    // B: killed after its cut; its guard undoes it.
    let b = run(("VMKEEP_KILL_AT", "capture-mid-read"));
    let out = b.wait_with_output().unwrap();
    assert!(!out.status.success(), "{}", describe(&out));
    let at = vm.progress();
    vm.wait_progress(at + 10);
    // C: whatever it decides, its restore point is exact.
    let c = json(
        vmkeep(&repo)
            .env("TMPDIR", &tmp)
            .args(["backup", "vm", "--qmp"])
            .arg(&vm.qmp)
            .args(["--vm", "guest"]),
    );
    let target = d.join("r");
    restore(&repo, &id_of(&c), &target);
    let img = std::fs::read(target.join("vd0.raw")).unwrap();
    prefix_k(&img, &format!("after the stale checkpoint: {c}"));
    assert_eq!(vm.vmkeep_bitmaps().len(), 1, "{:?}", vm.vmkeep_bitmaps());
}

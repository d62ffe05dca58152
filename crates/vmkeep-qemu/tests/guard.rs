//! A vmkeep killed (abort, as kill -9 would) at each named point of a live capture never harms
//! the VM: its guard process puts the VM back (running, no scratch node, job or export left,
//! checkpoint bitmaps merged back), and the next backup still uses change tracking and is a
//! correct point-in-time image.
//!
//! The backup runs in a child process (this test binary re-executed on `backup_entry`), and its
//! guard is this test binary again (`guard_entry`), as the vmkeep binary re-executes itself.

mod common;
mod live;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use live::*;
use vmkeep_qemu::capture::{backup_vm, run_guard, GuardCommand, VmBackupOptions};
use vmkeep_repo::NoProgress;

#[test]
fn guard_entry() {
    let Some(done) = std::env::var_os("VMKEEP_TEST_GUARD_DONE") else {
        return; // only meaningful as the guard of `backup_entry`
    };
    let log = run_guard(std::io::stdin().lock());
    std::fs::write(done, log.join("\n")).unwrap();
}

#[test]
fn backup_entry() {
    let Some(dir) = std::env::var_os("VMKEEP_TEST_BACKUP_DIR") else {
        return; // only meaningful when started by `killed_vmkeep_leaves_the_vm_unharmed`
    };
    let dir = PathBuf::from(dir);
    let qmp = PathBuf::from(std::env::var_os("VMKEEP_TEST_QMP").unwrap());
    let done = std::env::var("VMKEEP_TEST_DONE_FILE").unwrap();
    let repo = open_repo(&dir);
    let guard = GuardCommand {
        program: std::env::current_exe().unwrap(),
        args: vec!["guard_entry".into(), "--exact".into(), "--nocapture".into()],
        env: vec![("VMKEEP_TEST_GUARD_DONE".into(), done)],
    };
    let no_guard = std::env::var_os("VMKEEP_TEST_NO_GUARD").is_some();
    backup_vm(
        &repo,
        &VmBackupOptions {
            qmp,
            vm: "guest".into(),
            suspend: true,
            guard: (!no_guard).then_some(guard),
            ..Default::default()
        },
        &NoProgress,
    )
    .unwrap();
}

fn killed_backup(d: &Path, vm: &Vm, point: &str) -> String {
    let done = d.join(format!("guard-{point}.log"));
    let st = Command::new(std::env::current_exe().unwrap())
        .args(["backup_entry", "--exact", "--nocapture"])
        .env_remove("VMKEEP_TEST_NO_GUARD")
        .env("VMKEEP_TEST_BACKUP_DIR", d)
        .env("VMKEEP_TEST_QMP", &vm.qmp)
        .env("VMKEEP_TEST_DONE_FILE", &done)
        .env("VMKEEP_KILL_AT", point)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!st.success(), "{point}: the backup was not killed");
    let start = Instant::now();
    while !done.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{point}: the guard did not finish"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::read_to_string(&done).unwrap()
}

#[test]
fn killed_vmkeep_leaves_the_vm_unharmed() {
    let g = guest();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disks = make_disks(d);
    let repo = repo(d);
    let _lock = qemu_lock();
    let mut vm = boot(d, &disks, 0, Some(&g));
    vm.wait_progress(5);
    let mut latest = backup(&repo, &vm, false);
    for point in [
        "capture-after-stop",
        "capture-after-fleece",
        "capture-mid-read",
        "capture-before-commit",
        "capture-after-commit",
    ] {
        let log = killed_backup(d, &vm, point);
        eprintln!("{point}: guard did: {}", log.replace('\n', "; "));
        // Running again (the guest makes progress), nothing left behind.
        let at = vm.progress();
        vm.wait_progress(at + 2);
        assert!(vm.running(), "{point}: VM not running; guard: {log}");
        assert!(
            vm.leftovers().is_empty(),
            "{point}: {:?}; guard: {log}",
            vm.leftovers()
        );
        if point == "capture-after-commit" {
            latest = open_repo(d).latest("guest").unwrap().unwrap();
        }
        // Exactly the latest restore point's checkpoint, recording, on each disk.
        let bitmaps = vm.vmkeep_bitmaps();
        let want: Vec<&str> = latest
            .disks
            .iter()
            .map(|x| x.checkpoint.as_ref().unwrap().bitmap.as_str())
            .collect();
        assert_eq!(bitmaps.len(), 2, "{point}: {bitmaps:?}; guard: {log}");
        assert!(
            bitmaps
                .iter()
                .all(|(_, n, rec)| *rec && want.contains(&n.as_str())),
            "{point}: {bitmaps:?} want {want:?}; guard: {log}"
        );
        // The next backup uses tracking and is a correct cut.
        let m = backup(&repo, &vm, false);
        assert!(
            cbt(&m).iter().all(|c| c.1 == "used"),
            "{point}: {:?}",
            cbt(&m)
        );
        check_cut(&repo, &m, &d.join(format!("r-{point}")));
        latest = m;
    }

    // vmkeep and its guard both gone (no guard at all here): the next capture finds the
    // leftovers by name and undoes them the same way; tracking is still used.
    let st = Command::new(std::env::current_exe().unwrap())
        .args(["backup_entry", "--exact", "--nocapture"])
        .env("VMKEEP_TEST_BACKUP_DIR", d)
        .env("VMKEEP_TEST_QMP", &vm.qmp)
        .env("VMKEEP_TEST_DONE_FILE", d.join("unused"))
        .env("VMKEEP_TEST_NO_GUARD", "1")
        .env("VMKEEP_KILL_AT", "capture-mid-read")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!st.success());
    let left = vm.leftovers();
    assert_eq!(left.len(), 4, "2 scratch nodes and 2 jobs left: {left:?}");
    assert_eq!(
        vm.vmkeep_bitmaps().len(),
        4,
        "old disabled + new recording per disk"
    );
    let m = backup(&repo, &vm, false);
    assert!(cbt(&m).iter().all(|c| c.1 == "used"), "{:?}", cbt(&m));
    assert!(vm.leftovers().is_empty(), "{:?}", vm.leftovers());
    assert_eq!(vm.vmkeep_bitmaps().len(), 2, "{:?}", vm.vmkeep_bitmaps());
    check_cut(&repo, &m, &d.join("r-no-guard"));
    vm.kill9();
}

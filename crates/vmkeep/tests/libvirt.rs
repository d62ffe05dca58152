//! `vmkeep backup vm --libvirt` with the real binary against a real libvirt 9.0 (started by the
//! test when none runs) managing a real TCG domain: the test guest on two qcow2 disks running
//! the seqwrite workload (a point-in-time image holds exactly SEQ 0..K; see
//! vmkeep_testkit::guest).
//!
//! Checked: point in time across both disks, full then incremental (`cbt: used`), with the
//! domain never paused; the domain restarted (cleanly, and with QEMU killed), a disk resized, a
//! disk added, each with what change tracking did and why; vmkeep killed mid-backup (its guard,
//! or the next backup, ends libvirt's job and nothing stays inconsistent); another tool's
//! backup job (one line naming it, nothing left behind) and the reverse; two repositories
//! alternating on one domain, both chains exact.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use vmkeep_testkit::guest::{
    check_two_disk_cut, counters, guest, make_filled_disks, wait_serial_log, SEQWRITE,
};
use vmkeep_testkit::libvirt::{virsh, virsh_ok, Domain, Libvirtd};
use vmkeep_testkit::vm::qemu_lock;

/// A running test domain and what it needs, dropped in the right order.
struct Setup {
    dom: Domain,
    _daemons: Libvirtd,
    dir: PathBuf,
    scratch: PathBuf,
    _lock: vmkeep_testkit::vm::QemuLock,
}

fn setup(d: &Path, name: &str) -> Setup {
    let lock = qemu_lock();
    let daemons = Libvirtd::ensure();
    let disks = make_filled_disks(d);
    let dom = Domain::start(d, name, &guest(), SEQWRITE, &disks);
    let scratch = d.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let s = Setup {
        dom,
        _daemons: daemons,
        dir: d.to_path_buf(),
        scratch,
        _lock: lock,
    };
    wait_counter(&s.dom, 20);
    s
}

/// Waits until the guest's seqwrite counter passes `at_least`; returns the latest.
fn wait_counter(dom: &Domain, at_least: i64) -> i64 {
    let t0 = Instant::now();
    loop {
        let c = counters(&dom.serial()).last().copied().unwrap_or(-1);
        if c >= at_least {
            return c;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "the guest never reached C {at_least}: {}",
            dom.serial()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for progress of `n` more writes.
fn more_writes(dom: &Domain, n: i64) {
    let now = counters(&dom.serial()).last().copied().unwrap_or(0);
    wait_counter(dom, now + n);
}

fn backup_cmd(s: &Setup, repo: &Path) -> assert_cmd::Command {
    let mut c = vmkeep(repo);
    c.args(["backup", "vm", "--libvirt", &s.dom.name, "--scratch-dir"])
        .arg(&s.scratch);
    c
}

fn backup(s: &Setup, repo: &Path) -> Value {
    json(&mut backup_cmd(s, repo))
}

/// (disk, cbt, reason) of a backup's JSON.
fn cbt_of(v: &Value) -> Vec<(String, String, String)> {
    v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap().to_string(),
                d["cbt"].as_str().unwrap().to_string(),
                d["reason"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn cbts(v: &Value) -> Vec<String> {
    cbt_of(v).into_iter().map(|(_, c, _)| c).collect()
}

/// Restores `id` and checks both disks are one point in time; returns vda's K.
fn restored_cut(repo: &Path, id: &str, scratch: &Path) -> i64 {
    let target = scratch.join(format!("restore-{id}"));
    restore(repo, id, &target);
    let read32 = |disk: &str| {
        let mut img = std::fs::read(target.join(format!("{disk}.raw"))).unwrap();
        // A disk grown by the test: the guest only writes its first 32 MiB.
        let tail = img.split_off((vmkeep_testkit::guest::BLOCKS * 4096) as usize);
        assert!(tail.iter().all(|b| *b == 0), "{disk}: grown part not zero");
        img
    };
    let (ka, _) = check_two_disk_cut(&read32("vda"), &read32("vdb"));
    std::fs::remove_dir_all(&target).unwrap();
    ka
}

fn no_scratch_left(s: &Setup) {
    let left: Vec<_> = std::fs::read_dir(&s.scratch)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "scratch left behind: {left:?}");
}

/// `virsh event --loop` on the domain's lifecycle events, collected until killed.
struct Events(Child, PathBuf);

impl Events {
    fn watch(dom: &Domain, dir: &Path) -> Events {
        let log = dir.join("events.log");
        let child = Command::new("virsh")
            .args(["-c", "qemu:///system", "event", "--domain", &dom.name])
            .args(["--event", "lifecycle", "--loop"])
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Events(child, log)
    }
    fn stop(mut self) -> String {
        let _ = self.0.kill();
        let _ = self.0.wait();
        std::fs::read_to_string(&self.1).unwrap()
    }
}

#[test]
fn point_in_time_incremental_and_what_tracking_does_after_restarts_resizes_and_new_disks() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let s = setup(d, "vmkeep-test-pit");
    let repo = d.join("repo");
    init(&repo, &[]);

    let events = Events::watch(&s.dom, d);
    let full = backup(&s, &repo);
    assert_eq!(full["vm"], "vmkeep-test-pit", "--vm defaults to the domain");
    assert_eq!(cbts(&full), ["none", "none"]);
    assert_eq!(full["pause_ms"], 0);
    more_writes(&s.dom, 30);
    let inc = backup(&s, &repo);
    assert_eq!(cbts(&inc), ["used", "used"], "{inc}");
    let lifecycle = events.stop();
    assert!(
        !lifecycle.contains("Suspended"),
        "the domain was paused during a disk-only backup: {lifecycle}"
    );
    let k1 = restored_cut(&repo, &id_of(&full), &s.dir);
    let k2 = restored_cut(&repo, &id_of(&inc), &s.dir);
    assert!(k2 > k1, "incremental K {k2} after full K {k1}");
    // Each write between the cuts dirtied one 64 KiB chunk per disk: nothing else was read.
    let read = inc["stats"]["read_bytes"].as_u64().unwrap();
    let bound = (k2 - k1 + 1) as u64 * 2 * 65536;
    assert!(
        read <= bound,
        "an incremental of {} writes read {read} bytes",
        k2 - k1
    );
    assert_eq!(s.dom.job_type(), "None");
    assert_eq!(s.dom.checkpoints().len(), 1, "older checkpoints retired");

    // A clean restart keeps the persistent bitmaps: tracking goes on.
    virsh_ok(&["destroy", &s.dom.name]);
    virsh_ok(&["start", &s.dom.name]);
    more_writes(&s.dom, 20);
    let after_restart = backup(&s, &repo);
    assert_eq!(cbts(&after_restart), ["used", "used"], "{after_restart}");
    restored_cut(&repo, &id_of(&after_restart), &s.dir);

    // QEMU killed: the bitmaps were never saved, and both disks are read whole, saying why.
    let pid = s.dom.qemu_pid();
    // SAFETY: kill(2) with the domain's QEMU pid and a valid signal.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    vmkeep_testkit::process::wait_gone(pid);
    let t0 = Instant::now();
    while !virsh_ok(&["domstate", &s.dom.name]).contains("shut off") {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "libvirt never saw QEMU die"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    virsh_ok(&["start", &s.dom.name]);
    more_writes(&s.dom, 20);
    let after_kill = backup(&s, &repo);
    for (disk, cbt, reason) in cbt_of(&after_kill) {
        assert_eq!(cbt, "rescan", "{disk} after QEMU was killed");
        assert!(reason.contains("missing or broken"), "{disk}: {reason}");
    }
    restored_cut(&repo, &id_of(&after_kill), &s.dir);
    more_writes(&s.dom, 10);
    let tracked_again = backup(&s, &repo);
    assert_eq!(cbts(&tracked_again), ["used", "used"]);
    restored_cut(&repo, &id_of(&tracked_again), &s.dir);

    // A disk grown, and a disk added while the domain runs.
    virsh_ok(&["blockresize", &s.dom.name, "vda", "40M"]);
    let extra = s.dir.join("c.qcow2");
    vmkeep_testkit::tools::make_qcow2(&extra, "8M");
    virsh_ok(&[
        "attach-disk",
        &s.dom.name,
        &extra.display().to_string(),
        "vdc",
        "--driver",
        "qemu",
        "--subdriver",
        "qcow2",
        "--targetbus",
        "virtio",
        "--live",
    ]);
    more_writes(&s.dom, 10);
    let changed = backup(&s, &repo);
    let by_disk = cbt_of(&changed);
    assert_eq!(by_disk.len(), 3, "{changed}");
    assert_eq!(by_disk[0].1, "rescan");
    assert!(by_disk[0].2.contains("disk resized"), "{:?}", by_disk[0]);
    assert_eq!(by_disk[1].1, "used");
    assert_eq!(
        (by_disk[2].1.as_str(), by_disk[2].2.as_str()),
        ("rescan", "new disk")
    );
    restored_cut(&repo, &id_of(&changed), &s.dir);
    no_scratch_left(&s);
}

/// The pid of `parent`'s child process whose command line contains `needle`.
fn child_with(parent: u32, needle: &str) -> Option<i32> {
    vmkeep_testkit::process::children_of(parent)
        .into_iter()
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
}

/// Waits until `child` (a vmkeep with VMKEEP_STOP_AT) stops, then SIGKILLs it and its guard
/// together, as a cgroup kill would.
fn kill_with_its_guard(mut child: Child) {
    wait_stopped(&mut child);
    let guard = child_with(child.id(), "--guard").expect("the guard runs");
    // SAFETY: kill(2) with pids we spawned and a valid signal.
    unsafe {
        libc::kill(guard, libc::SIGKILL);
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    let _ = child.wait();
    vmkeep_testkit::process::wait_gone(guard);
}

fn wait_no_job(dom: &Domain) {
    let t0 = Instant::now();
    while dom.job_type() != "None" {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "libvirt's backup job was never ended"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_killed_vmkeep_leaves_no_job_and_the_next_backup_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let s = setup(d, "vmkeep-test-kill");
    let repo = d.join("repo");
    init(&repo, &[]);
    backup(&s, &repo);
    let first_checkpoint = s.dom.checkpoints();
    assert_eq!(first_checkpoint.len(), 1);

    // vmkeep dies right after libvirt started the job: its guard ends it.
    more_writes(&s.dom, 10);
    let out = backup_cmd(&s, &repo)
        .env("VMKEEP_KILL_AT", "libvirt-after-begin")
        .output()
        .unwrap();
    assert!(!out.status.success());
    wait_no_job(&s.dom);
    let t0 = Instant::now();
    while s.dom.checkpoints() != first_checkpoint
        || std::fs::read_dir(&s.scratch).unwrap().count() > 0
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the guard left checkpoints {:?} or scratch behind",
            s.dom.checkpoints()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    more_writes(&s.dom, 10);
    let next = backup(&s, &repo);
    assert_eq!(cbts(&next), ["used", "used"]);
    restored_cut(&repo, &id_of(&next), &s.dir);

    // vmkeep and its guard both killed (a cgroup kill): the next backup ends the job it finds.
    more_writes(&s.dom, 10);
    let child = vmkeep_std(&repo)
        .args(["backup", "vm", "--libvirt", &s.dom.name, "--scratch-dir"])
        .arg(&s.scratch)
        .env("VMKEEP_STOP_AT", "libvirt-after-begin")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    kill_with_its_guard(child);
    assert_eq!(
        s.dom.job_type(),
        "Unbounded",
        "the dead vmkeep's job still runs"
    );
    more_writes(&s.dom, 10);
    let out = ok(backup_cmd(&s, &repo).arg("--json"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("aborting the backup job a killed vmkeep left"),
        "{stderr}"
    );
    let after = single_json(&out.stdout);
    assert_eq!(cbts(&after), ["used", "used"]);
    restored_cut(&repo, &id_of(&after), &s.dir);
    assert_eq!(
        s.dom.checkpoints().len(),
        1,
        "the dead capture's checkpoint retired"
    );
    assert_eq!(s.dom.job_type(), "None");
    no_scratch_left(&s);
}

#[test]
fn another_backup_job_is_named_and_two_repositories_keep_exact_chains() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let s = setup(d, "vmkeep-test-coexist");
    let a = d.join("repo-a");
    let b = d.join("repo-b");
    init(&a, &[]);
    init(&b, &[]);

    // Another tool's pull-mode backup (as virtnbdbackup runs it) holds the domain.
    let foreign = d.join("foreign.xml");
    std::fs::write(
        &foreign,
        "<domainbackup mode='pull'><server name='127.0.0.1' port='10899'/><disks>\
         <disk name='vda' backup='yes' type='file'><scratch file='/tmp/vmkeep-test-foreign-vda'/></disk>\
         <disk name='vdb' backup='no'/></disks></domainbackup>",
    )
    .unwrap();
    virsh_ok(&["backup-begin", &s.dom.name, &foreign.display().to_string()]);
    let out = backup_cmd(&s, &a).output().unwrap();
    let line = one_line_error(&out, 1);
    assert!(
        line.contains("already has a backup job") && line.contains("another tool"),
        "{line}"
    );
    assert!(
        line.contains(&format!("virsh domjobabort {}", s.dom.name)),
        "{line}"
    );
    assert!(s.dom.checkpoints().is_empty(), "nothing left behind");
    no_scratch_left(&s);
    virsh_ok(&["domjobabort", &s.dom.name]);

    // The reverse: vmkeep's job runs, the other tool is refused by libvirt, vmkeep completes.
    let mut child = vmkeep_std(&a)
        .args([
            "backup",
            "vm",
            "--libvirt",
            &s.dom.name,
            "--json",
            "--scratch-dir",
        ])
        .arg(&s.scratch)
        .env("VMKEEP_STOP_AT", "libvirt-after-begin")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_stopped(&mut child);
    let refused = virsh(&["backup-begin", &s.dom.name, &foreign.display().to_string()]);
    assert!(refused.is_err(), "libvirt let a second backup job start");
    resume(&child);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let a1 = single_json(&out.stdout);
    assert_eq!(cbts(&a1), ["none", "none"]);

    // Two repositories, alternating: each chain reads exactly what changed since its own last.
    let mut ids = vec![(a.clone(), id_of(&a1))];
    let b1 = backup(&s, &b);
    assert_eq!(cbts(&b1), ["none", "none"]);
    ids.push((b.clone(), id_of(&b1)));
    for round in 0..2 {
        for repo in [&a, &b] {
            more_writes(&s.dom, 15);
            let v = backup(&s, repo);
            assert_eq!(cbts(&v), ["used", "used"], "round {round}: {v}");
            ids.push((repo.clone(), id_of(&v)));
        }
    }
    let mut last_k = [-1i64; 2];
    for (repo, id) in &ids {
        let k = restored_cut(repo, id, &s.dir);
        let slot = usize::from(repo == &b);
        assert!(k >= last_k[slot], "{id}: K went back");
        last_k[slot] = k;
    }
    assert_eq!(
        s.dom.checkpoints().len(),
        2,
        "one checkpoint per repository"
    );
    // `schedule --when-changed` reads libvirt's count of change since the chain's checkpoint.
    let sched = |args: &[&str]| {
        let mut c = vmkeep(&a);
        c.env("VMKEEP_SCHEDULE_DIR", d.join("jobs"))
            .env("VMKEEP_STATE_DIR", d.join("state"))
            .env("VMKEEP_UNIT_DIR", d.join("units"))
            .args(args);
        String::from_utf8_lossy(&ok(&mut c).stdout).into_owned()
    };
    sched(&[
        "schedule",
        "add",
        "lv",
        "--libvirt",
        &s.dom.name,
        "--every",
        "1d",
        "--when-changed",
        "4M",
    ]);
    assert!(sched(&["schedule", "run", "lv"]).contains("(first run)"));
    let out = sched(&["schedule", "run", "lv"]);
    assert!(out.contains("not due"), "{out}");
    // Each write dirties a 64 KiB chunk on each of the two disks: 60 of them pass 4 MiB.
    more_writes(&s.dom, 60);
    let out = sched(&["schedule", "run", "lv"]);
    assert!(out.contains("changed)"), "{out}");
    no_scratch_left(&s);
}

/// `/proc/sys/vm/unprivileged_userfaultfd` set for the test, put back on drop.
struct Userfaultfd(String);

impl Userfaultfd {
    const PATH: &'static str = "/proc/sys/vm/unprivileged_userfaultfd";
    fn now() -> String {
        std::fs::read_to_string(Self::PATH)
            .unwrap()
            .trim()
            .to_string()
    }
    fn set(value: &str) -> Userfaultfd {
        let old = Self::now();
        std::fs::write(Self::PATH, value).unwrap();
        Userfaultfd(old)
    }
}

impl Drop for Userfaultfd {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.0);
    }
}

/// QEMU's migration capability `name`, through libvirt's passthrough.
fn capability(dom: &Domain, name: &str) -> bool {
    let out = virsh_ok(&[
        "qemu-monitor-command",
        &dom.name,
        r#"{"execute":"query-migrate-capabilities"}"#,
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v["return"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["capability"] == name)
        .map(|c| c["state"] == true)
        .unwrap_or(false)
}

/// After a committed capture: running, no job, one checkpoint, no scratch.
fn settled_after_commit(s: &Setup) {
    assert_eq!(virsh_ok(&["domstate", &s.dom.name]).trim(), "running");
    assert_eq!(s.dom.job_type(), "None");
    assert_eq!(s.dom.checkpoints().len(), 1, "{:?}", s.dom.checkpoints());
    no_scratch_left(s);
}

/// A recovered domain, destroyed and undefined on drop.
struct Recovered(String);

impl Drop for Recovered {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.0]);
        let _ = virsh(&["undefine", &self.0, "--nvram"]);
    }
}

#[test]
fn memory_through_the_passthrough_and_recovery_as_a_libvirt_domain() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let s = setup(d, "vmkeep-test-mem");
    let repo = d.join("repo");
    init(&repo, &[]);

    // Not allowed: refused before libvirt's passthrough is touched (no taint).
    fails_with(
        backup_cmd(&s, &repo).arg("--memory"),
        &["--allow-qmp-passthrough", "tainted"],
    );
    let info = || virsh_ok(&["dominfo", &s.dom.name]);
    assert!(!info().contains("custom monitor"), "{}", info());
    let memory_cmd = || {
        let mut c = backup_cmd(&s, &repo);
        c.args(["--memory", "--allow-qmp-passthrough"]);
        c
    };
    // QEMU as libvirt's user without userfaultfd: one line saying how to allow it, nothing
    // left changed.
    {
        let _off = Userfaultfd::set("0");
        fails_with(
            &mut memory_cmd(),
            &["vm.unprivileged_userfaultfd=1", "without --memory"],
        );
        assert!(!capability(&s.dom, "background-snapshot"));
        assert!(
            capability(&s.dom, "events"),
            "libvirt's own capability kept"
        );
        assert_eq!(virsh_ok(&["domstate", &s.dom.name]).trim(), "running");
        assert_eq!(s.dom.job_type(), "None");
        assert!(s.dom.checkpoints().is_empty(), "{:?}", s.dom.checkpoints());
        no_scratch_left(&s);
    }
    let _on = Userfaultfd::set("1");
    let settled = || {
        assert_eq!(virsh_ok(&["domstate", &s.dom.name]).trim(), "running");
        assert!(
            !capability(&s.dom, "background-snapshot"),
            "capabilities put back"
        );
        assert_eq!(s.dom.job_type(), "None");
        assert!(s.dom.checkpoints().is_empty(), "{:?}", s.dom.checkpoints());
        no_scratch_left(&s);
    };
    // vmkeep killed while the domain is suspended: its guard resumes it and puts back the
    // capabilities, ends the job, deletes the checkpoint.
    let out = memory_cmd()
        .env("VMKEEP_KILL_AT", "libvirt-after-migrate-start")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let t0 = Instant::now();
    while virsh_ok(&["domstate", &s.dom.name]).trim() != "running"
        || std::fs::read_dir(&s.scratch).unwrap().count() > 0
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the guard did not resume the domain"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    settled();
    // vmkeep and its guard both killed there: the next capture puts it all back first.
    let child = vmkeep_std(&repo)
        .args(["backup", "vm", "--libvirt", &s.dom.name, "--scratch-dir"])
        .arg(&s.scratch)
        .args(["--memory", "--allow-qmp-passthrough"])
        .env("VMKEEP_STOP_AT", "libvirt-after-suspend")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    kill_with_its_guard(child);
    assert_eq!(virsh_ok(&["domstate", &s.dom.name]).trim(), "paused");
    assert!(capability(&s.dom, "background-snapshot"));
    let out = ok(&mut memory_cmd());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("a killed vmkeep's memory capture"),
        "{stderr}"
    );
    assert!(stderr.contains("resumed domain"), "{stderr}");
    settled_after_commit(&s);
    assert!(!capability(&s.dom, "background-snapshot"));
    let before = counters(&s.dom.serial()).last().copied().unwrap();
    let b = json(&mut memory_cmd());
    let after = counters(&s.dom.serial()).last().copied().unwrap();
    let id = id_of(&b);
    let pause = b["pause_ms"].as_u64().unwrap();
    eprintln!("memory capture through libvirt: paused {pause} ms");
    assert!(pause > 0 && pause < 5000, "{b}");
    assert!(
        info().contains("custom monitor"),
        "libvirt marks the taint: {}",
        info()
    );
    assert!(
        !capability(&s.dom, "background-snapshot"),
        "capabilities put back"
    );
    assert_eq!(virsh_ok(&["domstate", &s.dom.name]).trim(), "running");
    assert_eq!(s.dom.job_type(), "None");
    no_scratch_left(&s);
    let snaps = snapshots(&repo);
    assert_eq!(snaps[0]["memory"], true, "{snaps:?}");
    // The chain goes on from the memory capture's checkpoint.
    more_writes(&s.dom, 3);
    assert_eq!(cbts(&backup(&s, &repo)), ["used", "used"]);
    let k = restored_cut(&repo, &id, &s.scratch);
    assert!(before <= k && k <= after, "{before} <= {k} <= {after}");

    // Resumed under libvirt, as a new domain beside the original (stopped: one guest at a
    // time on CI's two cores).
    virsh_ok(&["destroy", &s.dom.name]);
    let name = "vmkeep-test-mem-r";
    let _rec = Recovered(name.into());
    let _ = virsh(&["destroy", name]);
    let _ = virsh(&["undefine", name]);
    let target = d.join("recovered");
    let v = json(
        vmkeep(&repo)
            .args(["recover", &id, "--libvirt", "--name", name, "--target"])
            .arg(&target),
    );
    assert_eq!(
        (v["resumed"].as_bool(), v["domain"].as_str()),
        (Some(true), Some(name)),
        "{v}"
    );
    assert_eq!(virsh_ok(&["domstate", name]).trim(), "running");
    assert!(virsh_ok(&["dominfo", name]).contains("Persistent:     yes"));
    let serial = target.join("serial.log");
    assert_eq!(v["serial"].as_str(), Some(serial.to_str().unwrap()), "{v}");
    assert!(v["pid"].as_u64().is_some(), "{v}");
    let text = wait_serial_log(&serial, "three counter lines", |t| counters(t).len() >= 3);
    let c = counters(&text);
    assert!(
        c[0] == k || c[0] == k + 1,
        "the first number ({}) continues from the capture (disks hold SEQ 0..{k}): {text}",
        c[0]
    );
    assert!(c.windows(2).all(|w| w[1] == w[0] + 1), "{text}");
    assert!(
        !text.contains("VMKEEP READY"),
        "it resumed, it did not boot: {text}"
    );
    // Its disks are the restored files, not the original's.
    let xml = virsh_ok(&["dumpxml", name]);
    assert!(
        xml.contains(&target.join("vda.qcow2").display().to_string()),
        "{xml}"
    );
    // The name is taken now: refused before anything is written.
    fails_with(
        vmkeep(&repo)
            .args(["recover", &id, "--libvirt", "--name", name, "--target"])
            .arg(d.join("again")),
        &["already has a domain named", "--name"],
    );
    assert!(!d.join("again").exists());
    drop(_rec);

    // verify: resumed in a transient sandbox domain, watched through libvirt, recorded.
    let sandboxes = || {
        virsh_ok(&["list", "--all", "--name"])
            .lines()
            .filter(|l| l.starts_with("vmkeep-verify-lv-"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let shots = d.join("shots");
    let verify = |args: &[&str]| {
        let mut c = vmkeep(&repo);
        c.arg("verify")
            .args(args)
            .arg("--screenshots")
            .arg(&shots)
            .args(["--timeout", "120"]);
        json(&mut c)
    };
    let v = verify(&[&id, "--serial", "^C [0-9]+"]);
    let r = &v["results"][0];
    assert_eq!(
        (r["ok"].as_bool(), r["mode"].as_str()),
        (Some(true), Some("resume")),
        "{v}"
    );
    assert!(
        r["evidence"].as_str().unwrap().contains("serial line"),
        "{v}"
    );
    assert!(sandboxes().is_empty(), "{:?}", sandboxes());
    let listed = snapshots(&repo);
    let point = listed.iter().find(|p| p["id"] == id.as_str()).unwrap();
    assert_eq!(point["verified"]["ok"], true, "{point}");
    // Killed mid-verify: the sandbox domain runs on (libvirt owns it) until the next verify
    // destroys it.
    let mut child = vmkeep_std(&repo)
        .args([
            "verify",
            &id,
            "--cold",
            "--serial",
            "NEVER PRINTED",
            "--timeout",
            "300",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let running = || {
        sandboxes()
            .iter()
            .any(|n| virsh(&["domstate", n]).is_ok_and(|st| st.trim() == "running"))
    };
    while !running() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no sandbox domain runs"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let orphan = sandboxes();
    assert_eq!(orphan.len(), 1, "{orphan:?}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(virsh_ok(&["domstate", &orphan[0]]).trim(), "running");
    // A cold boot, with the weakest evidence: it ran 3 s without a sign of failure.
    let v = verify(&[&id, "--cold", "--settle", "3"]);
    let r = &v["results"][0];
    assert_eq!(
        (r["ok"].as_bool(), r["mode"].as_str()),
        (Some(true), Some("boot")),
        "{v}"
    );
    assert!(
        sandboxes().is_empty(),
        "the killed run's sandbox is gone: {:?}",
        sandboxes()
    );
    // A domain that dies is seen through libvirt: the probe stops it, the run fails with why.
    let out = vmkeep(&repo)
        .args([
            "--json",
            "verify",
            &id,
            "--cold",
            "--timeout",
            "120",
            "--probe",
        ])
        .arg(r#"virsh destroy "$VMKEEP_DOMAIN" >/dev/null; exit 1"#)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let reason = v["results"][0]["reason"].as_str().unwrap_or_default();
    // libvirt 9.0 says "destroyed" or, for a domain destroyed while it boots, "unknown".
    assert!(
        reason.contains("was destroyed") || reason.contains("stopped (shut off"),
        "{v}"
    );
    assert!(sandboxes().is_empty(), "{:?}", sandboxes());

    // Cold: booted from the same disks.
    let cold = Recovered("vmkeep-test-mem-c".into());
    let v = json(
        vmkeep(&repo)
            .args([
                "recover",
                &id,
                "--libvirt",
                "--cold",
                "--name",
                &cold.0,
                "--target",
            ])
            .arg(d.join("cold")),
    );
    assert_eq!(v["resumed"], false, "{v}");
    wait_serial_log(&d.join("cold").join("serial.log"), "a boot", |t| {
        t.contains("VMKEEP READY")
    });
}

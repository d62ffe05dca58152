//! `vmkeep schedule` with the real binary and a real QEMU guest (seqwrite): the units it
//! writes pass `systemd-analyze verify`; a `--when-changed` job backs up on its first run, is
//! not due right after, and is due once the guest wrote that much (the dirty bitmaps' count);
//! a run while the previous one still holds the job's lock is skipped, never run twice; `list`
//! shows the next run and the last result; `remove` leaves nothing. (The libvirt side of
//! `--when-changed` is in libvirt.rs.)
//!
//! systemd does not run on the test machines: the units are verified offline, and the test
//! runs `schedule run` as the timer would.

mod common;
#[path = "common/qemu.rs"]
mod qemu;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;

use common::*;
use qemu::*;
use serde_json::Value;

/// `vmkeep` with the job, state and unit folders inside the test's folder.
fn sched(repo: &Path, d: &Path) -> assert_cmd::Command {
    let mut c = vmkeep(repo);
    c.env("VMKEEP_SCHEDULE_DIR", d.join("jobs"))
        .env("VMKEEP_STATE_DIR", d.join("state"))
        .env("VMKEEP_UNIT_DIR", d.join("units"));
    c
}

fn stdout(cmd: &mut assert_cmd::Command) -> String {
    String::from_utf8_lossy(&ok(cmd).stdout).into_owned()
}

#[test]
fn a_when_changed_job_runs_when_due_and_never_twice() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    init(&repo, &[]);
    let _lock = qemu_lock();
    let mut vm = boot(d, true);
    vm.wait_progress(10);

    let added = json(
        sched(&repo, d)
            .args(["schedule", "add", "hourly", "--qmp"])
            .arg(&vm.qmp)
            .args(["--vm", "guest", "--every", "1h", "--when-changed", "4M"])
            .args(["--check-every", "30s", "--keep-last", "3", "--metrics-dir"])
            .arg(d),
    );
    assert_eq!(added["enabled"], false, "systemd does not run here");
    let units = d.join("units");
    let service = units.join("vmkeep-hourly.service");
    let timer = units.join("vmkeep-hourly.timer");
    let verify = Command::new(vmkeep_testkit::process::require("systemd-analyze"))
        .arg("verify")
        .args([&service, &timer])
        .output()
        .unwrap();
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let timer_text = std::fs::read_to_string(&timer).unwrap();
    assert!(timer_text.contains("OnUnitActiveSec=30s"), "{timer_text}");

    // First run: no backup yet, so due.
    let out = stdout(sched(&repo, d).args(["schedule", "run", "hourly"]));
    assert!(out.contains("(first run)"), "{out}");
    assert_eq!(snapshots(&repo).len(), 1);
    let prom = std::fs::read_to_string(d.join("vmkeep-hourly-backup.prom")).unwrap();
    assert!(prom.contains("vmkeep_run_success"), "{prom}");
    assert!(
        d.join("vmkeep-hourly-prune.prom").exists(),
        "--keep-last runs prune"
    );

    // Right after: too little change.
    let nd = json(sched(&repo, d).args(["schedule", "run", "hourly"]));
    assert_eq!(nd["status"], "not-due", "{nd}");
    assert!(nd["changed_bytes"].as_u64().unwrap() < 4 << 20, "{nd}");
    assert_eq!(snapshots(&repo).len(), 1);

    // The guest writes 4 KiB per counter step, each dirtying another 64 KiB cluster: 100 steps
    // are more than 4 MiB of tracked change.
    let now = vm.progress();
    vm.wait_progress(now + 100);
    let out = stdout(sched(&repo, d).args(["schedule", "run", "hourly"]));
    assert!(out.contains("changed)"), "{out}");
    assert_eq!(snapshots(&repo).len(), 2);

    // A run while the previous one holds the job's lock is skipped.
    let lock = std::fs::File::open(d.join("state/schedule/hourly.lock")).unwrap();
    // SAFETY: flock on an fd we own.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let out = stdout(sched(&repo, d).args(["schedule", "run", "hourly", "--force"]));
    assert!(out.contains("skipped"), "{out}");
    assert_eq!(snapshots(&repo).len(), 2, "never run twice at once");
    let listed = json(sched(&repo, d).args(["schedule", "list"]));
    assert_eq!(listed[0]["last_result"], "skipped");
    drop(lock);

    let out = stdout(sched(&repo, d).args(["schedule", "run", "hourly", "--force"]));
    assert!(out.contains("(forced)"), "{out}");
    let listed = json(sched(&repo, d).args(["schedule", "list"]));
    let job: &Value = &listed[0];
    assert_eq!(job["name"], "hourly");
    assert_eq!(job["last_result"], "ok");
    assert!(job["last_seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(job["last"]["trigger"], "forced");
    assert!(job["next"].is_string(), "{job}");

    json(sched(&repo, d).args(["schedule", "remove", "hourly"]));
    assert!(!service.exists() && !timer.exists());
    assert_eq!(std::fs::read_dir(d.join("jobs")).unwrap().count(), 0);
    let text = stdout(sched(&repo, d).args(["schedule", "list"]).arg("--quiet"));
    assert!(
        text.is_empty() || text.contains("no scheduled jobs"),
        "{text}"
    );
}

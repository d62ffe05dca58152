//! The real binary against the lease protocol's hardest cases (issue 6): a backup stopped
//! (SIGSTOP, as a suspended machine would be) past its lease timeout while prune reclaims the
//! data it reuses; a prune running in another PID namespace that cannot see the backup's
//! process; and a dry run whose figures must be the real ones. `VMKEEP_STOP_AT` stops the
//! backup at a named point, deterministically.
mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// An image whose first half is the forgotten restore point's whole disk and whose second half
/// is new: the backup reuses the first half and writes more than one 16 MiB pack of the second,
/// so it passes `after-first-pack` with reuse decisions made and work still to do.
fn setup(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let repo = dir.join("repo");
    ok(vmkeep(&repo).args(["init"]));
    let old = random_bytes(24 << 20, seed("stall-old"));
    let a = dir.join("a.img");
    write(&a, &old);
    let v = json(
        vmkeep(&repo)
            .args(["--json", "backup", "image", "--vm", "vm", "--disk"])
            .arg(format!("sys={}", a.display())),
    );
    ok(vmkeep(&repo).args(["forget", &id_of(&v)]));
    let mut both = old;
    both.extend_from_slice(&random_bytes(24 << 20, seed("stall-new")));
    let b = dir.join("b.img");
    write(&b, &both);
    (repo, b)
}

fn spawn_stopped_backup(repo: &Path, image: &Path, env: &[(&str, &str)]) -> Child {
    let mut c = vmkeep_std(repo);
    c.args(["--json", "backup", "image", "--vm", "vm", "--disk"])
        .arg(format!("sys={}", image.display()))
        .env("VMKEEP_STOP_AT", "after-first-pack")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().unwrap();
    wait_stopped(&mut child);
    child
}

fn check_exit(repo: &Path) -> (i32, String) {
    let out = vmkeep(repo)
        .args(["check", "--read-data"])
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), describe(&out))
}

/// Defect 2: after SIGCONT the lease refresh thread refreshed at once and reset the time the
/// commit looked at, so the stalled-backup check never fired: the backup exited 0 with a
/// restore point whose data prune had deleted, and `check` exited 3.
#[test]
fn backup_stopped_past_its_lease_timeout_never_commits_lost_data() {
    let tmp = tempfile::tempdir().unwrap();
    let (repo, b) = setup(tmp.path());
    let timeouts = [
        ("VMKEEP_LEASE_TIMEOUT_SECS", "3"),
        ("VMKEEP_LEASE_REFRESH_SECS", "1"),
    ];
    let child = spawn_stopped_backup(&repo, &b, &timeouts);
    std::thread::sleep(Duration::from_secs(5)); // past the lease timeout
    let mut prune = vmkeep(&repo);
    for (k, v) in timeouts {
        prune.env(k, v);
    }
    let st = json(prune.args(["--json", "prune"]));
    println!("prune while the backup was stopped: {st}");
    assert!(
        st["gc"]["packs_deleted"].as_u64().unwrap() > 0,
        "prune judged the stopped backup dead and reclaimed the forgotten point"
    );
    resume(&child);
    let out = child.wait_with_output().unwrap();
    println!("the resumed backup: {}", describe(&out));
    let (code, report) = check_exit(&repo);
    if out.status.success() {
        assert_eq!(
            code, 0,
            "the backup exited 0, so its restore point must be whole: {report}"
        );
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("run the backup again"), "{}", describe(&out));
        assert_eq!(
            code, 0,
            "a failed backup leaves a repository that checks clean: {report}"
        );
        assert!(
            snapshot_ids(&repo).is_empty(),
            "no restore point was committed"
        );
    }
}

/// Defect 4: a prune in another PID namespace judged the backup's live lease by its own
/// `/proc/<pid>` (same hostname), found no such process, removed the lease and swept the packs
/// the backup reuses.
#[test]
fn prune_in_another_pid_namespace_waits_for_a_live_backup() {
    let tmp = tempfile::tempdir().unwrap();
    let (repo, b) = setup(tmp.path());
    let child = spawn_stopped_backup(&repo, &b, &[]);
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(bin())
        .arg("--repo")
        .arg(&repo)
        .args(["--json", "prune"])
        .env("VMKEEP_KDF_MEM_KIB", KDF_MEM_KIB)
        .output()
        .unwrap();
    resume(&child);
    assert!(
        out.status.success(),
        "prune in a new PID namespace (needs root for unshare --pid): {}",
        describe(&out)
    );
    let st = single_json(&out.stdout);
    println!("prune from another PID namespace: {st}");
    assert_eq!(
        st["gc"]["packs_deleted"].as_u64(),
        Some(0),
        "nothing deleted under a live backup"
    );
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the backup commits: {}",
        describe(&out)
    );
    let (code, report) = check_exit(&repo);
    assert_eq!(code, 0, "{report}");
}

/// Defect 13: `prune --dry-run --json` printed a hard-coded `reclaimed_bytes: 0`. On a quiet
/// repository the dry run's figure is exactly what the real prune then reclaims.
#[test]
fn prune_dry_run_reports_what_prune_reclaims() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = dir.join("repo");
    ok(vmkeep(&repo).args(["init"]));
    let img = dir.join("a.img");
    for i in 0..3 {
        write(&img, &random_bytes(6 << 20, seed(&format!("dry-{i}"))));
        ok(vmkeep(&repo)
            .args(["backup", "image", "--vm", "vm", "--disk"])
            .arg(format!("sys={}", img.display())));
    }
    let dry = json(vmkeep(&repo).args(["--json", "prune", "--keep-last", "1", "--dry-run"]));
    let real = json(vmkeep(&repo).args(["--json", "prune", "--keep-last", "1"]));
    println!("dry run: {dry}\nreal: {real}");
    assert!(real["reclaimed_bytes"].as_u64().unwrap() > 0);
    assert_eq!(dry["reclaimed_bytes"], real["reclaimed_bytes"]);
    assert_eq!(dry["forgotten"], real["forgotten"]);
}

/// A prune stopped past its lease timeout (right after writing its GC record, before sealing
/// it) is judged dead; a second prune runs meanwhile (and seals and sweeps that record). When
/// the first resumes, it finds its lease lost and stops before changing anything else: two
/// prunes never sweep at once.
#[test]
fn a_prune_stopped_past_its_lease_stops_when_it_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let (repo, _b) = setup(tmp.path());
    let timeouts = [
        ("VMKEEP_LEASE_TIMEOUT_SECS", "2"),
        ("VMKEEP_LEASE_REFRESH_SECS", "1"),
    ];
    let mut first = vmkeep_std(&repo);
    first
        .args(["--json", "prune"])
        .env("VMKEEP_STOP_AT", "after-gc-record")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in timeouts {
        first.env(k, v);
    }
    let mut first = first.spawn().unwrap();
    wait_stopped(&mut first);
    std::thread::sleep(Duration::from_secs(3)); // past the lease timeout
    let mut second = vmkeep(&repo);
    for (k, v) in timeouts {
        second.env(k, v);
    }
    let st = json(second.args(["--json", "prune"]));
    println!("the second prune: {st}");
    assert!(st["gc"]["packs_deleted"].as_u64().unwrap() > 0, "{st}");
    resume(&first);
    let out = first.wait_with_output().unwrap();
    println!("the first prune, resumed: {}", describe(&out));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("prune was stopped longer than its lease timeout"),
        "{err}"
    );
    let (code, report) = check_exit(&repo);
    assert_eq!(code, 0, "{report}");
}

/// A prune killed in another PID namespace leaves a lease this host cannot judge by its
/// process table: `unlock` keeps it and says so (it counts until it expires), the next prune's
/// error names `--remove-all`, and `unlock --remove-all` removes it. Found by killing a prune
/// run under `unshare`: `unlock` printed `"removed": []` and nothing about the lock that still
/// blocked every prune.
#[test]
fn unlock_reports_a_lock_it_cannot_judge_and_remove_all_removes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (repo, _) = setup(tmp.path());
    let mut c = Command::new("unshare");
    // A shell as the namespace's init: its PID 1 ignores the SIGSTOP vmkeep sends itself.
    c.args(["--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL"])
        .args(["sh", "-c", "\"$@\"; true", "sh"])
        .arg(bin())
        .arg("--repo")
        .arg(&repo)
        .args(["--json", "prune"])
        .env("VMKEEP_KDF_MEM_KIB", KDF_MEM_KIB)
        .env("VMKEEP_CACHE_DIR", cache_beside(&repo))
        .env("VMKEEP_STOP_AT", "after-gc-record")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    let records = repo.join("gc");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::fs::read_dir(&records).map_or(0, |d| d.count()) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the prune in the new PID namespace wrote no GC record (needs root for unshare --pid)"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // unshare dies, and with it (--kill-child) the namespace's init, and so the prune: its
    // lease stays.
    child.kill().unwrap();
    child.wait().unwrap();
    let u = json(vmkeep(&repo).args(["--json", "unlock"]));
    assert_eq!(u["removed"], serde_json::json!([]), "{u}");
    assert_eq!(u["kept"].as_array().map(Vec::len), Some(1), "{u}");
    let out = vmkeep(&repo).args(["--json", "prune"]).output().unwrap();
    assert!(!out.status.success(), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--remove-all"), "{err}");
    let u = json(vmkeep(&repo).args(["--json", "unlock", "--remove-all"]));
    assert_eq!(u["removed"].as_array().map(Vec::len), Some(1), "{u}");
    let p = json(vmkeep(&repo).args(["--json", "prune"]));
    assert!(p["gc"]["packs_deleted"].as_u64().unwrap() > 0, "{p}");
    let (code, report) = check_exit(&repo);
    assert_eq!(code, 0, "{report}");
}

//! Objects are bounded before they are read: a huge object planted in the repository (a sparse
//! file of more than 1 GiB as a manifest, an index object or a key file) is reported as damaged
//! by `check`, skipped by restore and open, and never read into memory. Measured on the real
//! binary: the peak RSS of each child (wait4) stays far below the object's size.

mod common;

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};

use common::*;
use serde_json::Value;

/// Size of the planted objects: above every bound (index objects: 256 MiB).
const HUGE: u64 = (1 << 30) + 1;
/// What a bounded run may use; reading one planted object would take more than 1 GiB.
const RSS_LIMIT_KIB: i64 = 200 * 1024;

/// A sparse file of `HUGE` bytes (zeros) at `path`: costs no disk space.
fn plant(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(HUGE).unwrap();
}

struct Measured {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    peak_rss_kib: i64,
}

/// Runs `cmd` and reaps it with wait4 to read its own peak RSS (not the test's, nor other
/// children's).
#[allow(clippy::zombie_processes)] // reaped by wait4 below, which std's Child cannot do
fn run_measured(mut cmd: Command) -> Measured {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning vmkeep");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).unwrap();
        s
    });
    let mut stdout = String::new();
    out.read_to_string(&mut stdout).unwrap();
    let stderr = reader.join().unwrap();
    let mut status = 0;
    // SAFETY: rusage is plain data; the pid is our own unreaped child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32, "wait4 failed");
    Measured {
        status: ExitStatus::from_raw(status),
        stdout,
        stderr,
        peak_rss_kib: usage.ru_maxrss,
    }
}

fn describe_measured(m: &Measured) -> String {
    format!(
        "status {:?}, peak RSS {} KiB\n--- stdout ---\n{}\n--- stderr ---\n{}",
        m.status, m.peak_rss_kib, m.stdout, m.stderr
    )
}

#[test]
fn huge_manifest_and_index_objects_are_damage_not_memory() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init(&repo, &[]);
    let img = dir.path().join("disk.img");
    write(&img, &random_bytes(2 << 20, 17));
    let s1 = id_of(&backup(&repo, "web", &[("sda", &img)]));

    let fake_manifest = "0123456789abcdef0123456789abcdef";
    let fake_index = "ab".repeat(32);
    plant(&repo.join("snapshots").join(fake_manifest));
    plant(&repo.join("index").join(&fake_index));

    // check: the planted manifest is a damaged restore point (exit 3), the index object a
    // warning; neither is read.
    let mut c = vmkeep_std(&repo);
    c.args(["check", "--json"]);
    let m = run_measured(c);
    assert_eq!(m.status.code(), Some(3), "{}", describe_measured(&m));
    assert!(
        m.peak_rss_kib < RSS_LIMIT_KIB,
        "check read a huge object: {}",
        describe_measured(&m)
    );
    let report: Value = serde_json::from_str(&m.stdout).unwrap();
    let damaged = report["damaged"].as_array().unwrap();
    assert_eq!(damaged.len(), 1, "{report}");
    assert_eq!(damaged[0]["snapshot"], fake_manifest, "{report}");
    let reason = damaged[0]["reason"].as_str().unwrap();
    assert!(reason.contains("too large"), "{reason}");
    let warnings = report["warnings"].to_string();
    assert!(
        warnings.contains(&fake_index) && warnings.contains("too large"),
        "{report}"
    );

    // restore of the real point by id still works, within bounded memory.
    let target = dir.path().join("out");
    let mut c = vmkeep_std(&repo);
    c.args(["restore", &s1, "--json", "--target"]).arg(&target);
    let m = run_measured(c);
    assert!(m.status.success(), "{}", describe_measured(&m));
    assert!(
        m.peak_rss_kib < RSS_LIMIT_KIB,
        "restore read a huge object: {}",
        describe_measured(&m)
    );
    assert_same_file(&target.join("sda.raw"), &img);
}

#[test]
fn huge_key_file_is_skipped_when_opening() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let pass = dir.path().join("pass");
    write(&pass, b"correct horse");
    init(
        &repo,
        &["--encrypt", "--password-file", pass.to_str().unwrap()],
    );
    // Listed first (names sort), so it is tried before the real key file.
    plant(&repo.join("keys").join("00".repeat(16)));
    let mut c = vmkeep_std(&repo);
    c.args(["snapshots", "--json", "--password-file"])
        .arg(&pass);
    let m = run_measured(c);
    assert!(m.status.success(), "{}", describe_measured(&m));
    assert!(
        m.peak_rss_kib < RSS_LIMIT_KIB,
        "open read a huge key file: {}",
        describe_measured(&m)
    );
}

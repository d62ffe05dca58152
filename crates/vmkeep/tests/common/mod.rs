//! Helpers shared by the command-line tests: run the real `vmkeep` binary with a clean
//! environment, parse its JSON, make test images, compare files, look at repository folders.
//! Test data comes from the shared test kit (crates/vmkeep-testkit).
#![allow(dead_code, unused_imports)]

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use serde_json::Value;
pub use vmkeep_testkit::data::{random_bytes, seed, semi_bytes, Rng};

/// Cheap Argon2 for test repositories (stored in the key file, so later opens are cheap too).
pub const KDF_MEM_KIB: &str = "1024";

/// Environment variables the binary reads; removed so the caller's environment cannot leak in.
const SCRUB: &[&str] = &[
    "VMKEEP_REPO",
    "VMKEEP_PASSWORD",
    "VMKEEP_PASSWORD_FILE",
    "VMKEEP_NEW_PASSWORD",
    "VMKEEP_KILL_AT",
    "VMKEEP_STOP_AT",
    "VMKEEP_TOKEN",
    "VMKEEP_TOKEN_FILE",
    "VMKEEP_TLS_FINGERPRINT",
    "VMKEEP_HTTP_RETRY_SECS",
    "VMKEEP_S3_RETRY_SECS",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "VMKEEP_LOG",
    "VMKEEP_THREADS",
    "VMKEEP_LEASE_TIMEOUT_SECS",
    "VMKEEP_LEASE_REFRESH_SECS",
    "VMKEEP_NBD_TIMEOUT_SECS",
    "VMKEEP_CACHE_DIR",
    "VMKEEP_NO_CACHE",
    "VMKEEP_CACHE_MAX_MIB",
    "VMKEEP_CACHE_LOCK_SECS",
    "VMKEEP_LIST_PACKS_UP_TO",
    "XDG_CACHE_HOME",
];

/// The local cache of commands run without a repository folder of their own (under target/).
fn shared_cache() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vmkeep-cache")
}

/// The cache beside a test's repository (removed with the test's folder).
pub fn cache_beside(repo: &Path) -> PathBuf {
    if repo.to_string_lossy().contains("://") || !repo.is_absolute() {
        return shared_cache();
    }
    repo.parent()
        .map_or_else(shared_cache, |p| p.join("vmkeep-cache"))
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vmkeep"))
}

/// `vmkeep` (assert_cmd) with a scrubbed environment and no repository.
pub fn vmkeep_bare() -> assert_cmd::Command {
    let mut c = assert_cmd::Command::cargo_bin("vmkeep").expect("the vmkeep binary is built");
    for v in SCRUB {
        c.env_remove(v);
    }
    c.env("VMKEEP_KDF_MEM_KIB", KDF_MEM_KIB);
    c.env("VMKEEP_CACHE_DIR", shared_cache());
    c
}

/// `vmkeep --repo REPO` (assert_cmd; stdin is a pipe, never a terminal).
pub fn vmkeep(repo: &Path) -> assert_cmd::Command {
    let mut c = vmkeep_bare();
    c.env("VMKEEP_CACHE_DIR", cache_beside(repo));
    c.arg("--repo").arg(repo);
    c
}

/// `vmkeep --repo REPO` as a std Command (for spawning and killing), stdin null.
pub fn vmkeep_std(repo: &Path) -> std::process::Command {
    vmkeep_std_at(&bin(), repo)
}

/// [`vmkeep_std`] running the binary at `program` (a copy of [`bin`]).
pub fn vmkeep_std_at(program: &Path, repo: &Path) -> std::process::Command {
    let mut c = std::process::Command::new(program);
    for v in SCRUB {
        c.env_remove(v);
    }
    c.env("VMKEEP_KDF_MEM_KIB", KDF_MEM_KIB);
    c.env("VMKEEP_CACHE_DIR", cache_beside(repo));
    c.stdin(Stdio::null());
    c.arg("--repo").arg(repo);
    c
}

pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Run; the command must succeed.
pub fn ok(cmd: &mut assert_cmd::Command) -> Output {
    let out = cmd.output().expect("running vmkeep");
    assert!(out.status.success(), "vmkeep failed: {}", describe(&out));
    out
}

/// Parse stdout as exactly one JSON document (nothing else on stdout).
pub fn single_json(stdout: &[u8]) -> Value {
    let text = std::str::from_utf8(stdout).expect("stdout is UTF-8");
    let mut docs = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    let first = docs
        .next()
        .unwrap_or_else(|| panic!("no JSON document on stdout: {text:?}"))
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {text:?}"));
    match docs.next() {
        None => {}
        Some(r) => panic!("more than one JSON document on stdout ({r:?}): {text:?}"),
    }
    // The strict parser also refuses trailing garbage.
    serde_json::from_str::<Value>(text).expect("stdout is a single JSON document");
    first
}

/// Run with --json; the command must succeed and print one JSON document.
pub fn json(cmd: &mut assert_cmd::Command) -> Value {
    cmd.arg("--json");
    let out = ok(cmd);
    single_json(&out.stdout)
}

/// The command failed with exit status `code` and exactly one stderr line "vmkeep: error: ...",
/// no panic; returns that line.
pub fn one_line_error(out: &Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(code),
        "exit status {code} expected: {}",
        describe(out)
    );
    assert!(
        !stderr.contains("panicked"),
        "the binary panicked: {}",
        describe(out)
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "exactly one stderr line expected: {}",
        describe(out)
    );
    assert!(
        lines[0].starts_with("vmkeep: error: "),
        "the line starts with `vmkeep: error:`: {}",
        describe(out)
    );
    lines[0].to_string()
}

/// Run; expect a one-line error (exit 1) containing every needle (case-insensitive).
pub fn fails_with(cmd: &mut assert_cmd::Command, needles: &[&str]) -> String {
    let out = cmd.output().expect("running vmkeep");
    let line = one_line_error(&out, 1);
    let low = line.to_lowercase();
    for n in needles {
        assert!(
            low.contains(&n.to_lowercase()),
            "error line should mention {n:?}: {line}"
        );
    }
    line
}

pub fn write(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Overwrite `data` at `offset` in an existing file (keeps its other bytes and holes).
pub fn patch(path: &Path, offset: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
}

/// Panics with the first differing offset unless the two files have identical bytes.
pub fn assert_same_file(got: &Path, want: &Path) {
    let mut a = File::open(got).unwrap_or_else(|e| panic!("{}: {e}", got.display()));
    let mut b = File::open(want).unwrap_or_else(|e| panic!("{}: {e}", want.display()));
    let (la, lb) = (a.metadata().unwrap().len(), b.metadata().unwrap().len());
    assert_eq!(
        la,
        lb,
        "{} has {la} bytes, {} has {lb}",
        got.display(),
        want.display()
    );
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = read_full(&mut a, &mut ba);
        let m = read_full(&mut b, &mut bb);
        assert_eq!(n, m);
        if n == 0 {
            return;
        }
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap();
            panic!(
                "{} differs from {} at byte {}",
                got.display(),
                want.display(),
                off + i as u64
            );
        }
        off += n as u64;
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}

/// Object names in a repository folder (`packs` is searched one level down), hidden files
/// (temporaries) excluded.
pub fn objects(repo: &Path, kind: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let base = repo.join(kind);
    let Ok(rd) = std::fs::read_dir(&base) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with('.') {
            continue;
        }
        let ft = e.file_type().unwrap();
        if ft.is_dir() && kind == "packs" {
            for f in std::fs::read_dir(e.path()).unwrap().flatten() {
                let n = f.file_name().to_string_lossy().to_string();
                if !n.starts_with('.') {
                    out.insert(n);
                }
            }
        } else if ft.is_file() {
            out.insert(name);
        }
    }
    out
}

/// Path of a pack file by name.
pub fn pack_path(repo: &Path, name: &str) -> PathBuf {
    repo.join("packs").join(&name[..2]).join(name)
}

/// Every file below `dir` (relative path) with its size.
pub fn tree_listing(dir: &Path) -> BTreeSet<(PathBuf, u64)> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                out.insert((e.path().strip_prefix(dir).unwrap().to_path_buf(), m.len()));
            }
        }
    }
    out
}

pub fn init(repo: &Path, extra: &[&str]) -> Value {
    json(vmkeep(repo).arg("init").args(extra))
}

/// `backup image --vm VM --disk NAME=PATH...`, JSON result.
pub fn backup(repo: &Path, vm: &str, disks: &[(&str, &Path)]) -> Value {
    let mut c = vmkeep(repo);
    c.args(["backup", "image", "--vm", vm]);
    for (n, p) in disks {
        c.arg("--disk").arg(format!("{n}={}", p.display()));
    }
    json(&mut c)
}

pub fn restore(repo: &Path, snap: &str, target: &Path) -> Value {
    json(vmkeep(repo).args(["restore", snap, "--target"]).arg(target))
}

/// Restore points as `snapshots --json` lists them.
pub fn snapshots(repo: &Path) -> Vec<Value> {
    json(vmkeep(repo).arg("snapshots"))
        .as_array()
        .expect("snapshots --json is an array")
        .clone()
}

pub fn snapshot_ids(repo: &Path) -> Vec<String> {
    snapshots(repo)
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

pub fn id_of(v: &Value) -> String {
    v["id"].as_str().expect("an id").to_string()
}

/// Restore `snap` into a fresh folder under `scratch` and compare its disk `disk` with `want`.
pub fn assert_restores(repo: &Path, snap: &str, disk: &str, want: &Path, scratch: &Path) {
    let target = scratch.join(format!(
        "restore-{}-{}",
        snap.replace('@', "_"),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    restore(repo, snap, &target);
    let got = target.join(format!("{disk}.raw"));
    assert_same_file(&got, want);
    std::fs::remove_dir_all(&target).unwrap();
}

/// Wait until `child` has stopped itself at its `VMKEEP_STOP_AT` point (state T in
/// `/proc/<pid>/stat`).
pub fn wait_stopped(child: &mut std::process::Child) {
    let stat = format!("/proc/{}/stat", child.id());
    let t0 = std::time::Instant::now();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("vmkeep exited ({st}) before reaching its stop point");
        }
        let s = std::fs::read_to_string(&stat).unwrap_or_default();
        // The state follows the parenthesised command name.
        if s.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('T'))
        {
            return;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(120),
            "vmkeep never stopped"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Resume a child stopped by `VMKEEP_STOP_AT`.
pub fn resume(child: &std::process::Child) {
    // SAFETY: kill(2) with a pid we spawned and a valid signal.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGCONT) }, 0);
}

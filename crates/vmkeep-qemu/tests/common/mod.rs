//! Shared helpers of the integration tests: required programs, child processes that die with
//! the test, a machine-wide lock so only one QEMU runs at a time, reference tools.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of a required program; panics (never skips) with a hint when it is missing.
pub fn require(bin: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(bin);
        if p.is_file() {
            return p;
        }
    }
    panic!("required program `{bin}` is missing: run scripts/install-deps.sh (as root)");
}

/// Runs a command to completion, panicking with its output on failure; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    pub fn spawn(cmd: &mut Command) -> Self {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        ChildGuard(child)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until a unix socket accepts connections (the server is listening).
pub fn wait_for_socket(path: &Path, child: &mut ChildGuard) {
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        if let Ok(Some(st)) = child.0.try_wait() {
            panic!("server exited ({st}) before creating {}", path.display());
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} did not appear within 10 s",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Machine-wide lock: at most one QEMU (system emulator) at a time on this 2-core machine,
/// across test binaries and threads.
pub struct QemuLock(File);

pub fn qemu_lock() -> QemuLock {
    let f = File::create(std::env::temp_dir().join("vmkeep-qemu-tests.lock")).expect("lock file");
    // SAFETY: flock on an fd we own; released when the file is closed.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(r, 0, "flock failed");
    QemuLock(f)
}

/// Creates a qcow2 image of `size` and applies qemu-io commands to it.
pub fn make_qcow2(path: &Path, size: &str) {
    run(Command::new(require("qemu-img"))
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size));
}

pub fn qemu_io(path: &Path, cmds: &[&str]) {
    let mut c = Command::new(require("qemu-io"));
    c.args(["-f", "qcow2"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(path);
    run(&mut c);
}

/// The image's guest-visible content as raw bytes.
pub fn raw_content(img: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join(format!(
        "{}.raw",
        img.file_name().unwrap().to_string_lossy()
    ));
    run(Command::new(require("qemu-img"))
        .args(["convert", "-U", "-O", "raw"])
        .arg(img)
        .arg(&raw));
    std::fs::read(&raw).unwrap()
}

/// `nbdinfo --map[=CONTEXT]` as `(offset, length, flags)`, adjacent equal flags merged.
pub fn nbdinfo_map(uri: &str, context: Option<&str>) -> Vec<(u64, u64, u32)> {
    let map = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".into(),
    };
    let out = run(Command::new(require("nbdinfo")).arg(map).arg(uri));
    let mut v: Vec<(u64, u64, u32)> = Vec::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let (o, l, t) = (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        );
        match v.last_mut() {
            Some(last) if last.2 == t && last.0 + last.1 == o => last.1 += l,
            _ => v.push((o, l, t)),
        }
    }
    v
}

/// Turns extents into `(offset, length, flags)` starting at `start`.
pub fn with_offsets(start: u64, ext: &[vmkeep_qemu::nbd::Extent]) -> Vec<(u64, u64, u32)> {
    let mut o = start;
    ext.iter()
        .map(|e| {
            let r = (o, e.length, e.flags);
            o += e.length;
            r
        })
        .collect()
}

/// One boolean from `nbdinfo URI` output (e.g. `can_multi_conn`).
pub fn nbdinfo_flag(uri: &str, key: &str) -> bool {
    let out = run(Command::new(require("nbdinfo")).arg(uri));
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{key}:")))
        .unwrap_or_else(|| panic!("nbdinfo did not print {key}:\n{out}"));
    line.trim().ends_with("true")
}

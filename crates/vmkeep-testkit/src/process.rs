//! Programs the tests need, run to completion or kept as children that die with the test.
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

/// Runs a command to completion (stdin null), panicking with its output on failure; returns
/// stdout.
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
    /// Starts `cmd` with stdin and stdout null (stderr inherited: it shows in a failing test).
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

/// How long a server may take to listen on its socket before the test fails.
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(20);

/// Waits until a unix socket accepts connections (the server is listening); panics if the
/// server exits first or takes longer than [`SOCKET_TIMEOUT`].
pub fn wait_for_socket(path: &Path, child: &mut ChildGuard) {
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        if let Ok(Some(st)) = child.0.try_wait() {
            panic!("server exited ({st}) before creating {}", path.display());
        }
        assert!(
            start.elapsed() < SOCKET_TIMEOUT,
            "{} did not appear within {SOCKET_TIMEOUT:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The children of process `pid` (every thread's `children` list in /proc).
pub fn children_of(pid: u32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .flat_map(|t| {
                    std::fs::read_to_string(t.path().join("children"))
                        .unwrap_or_default()
                        .split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok())
                        .collect::<Vec<_>>()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `pid` is a running process (not gone, not a zombie).
pub fn is_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z"))
}

/// Waits (10 s at most) until `pid` is no longer alive.
pub fn wait_gone(pid: i32) {
    let t0 = Instant::now();
    while is_alive(pid) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "process {pid} still alive"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A tmpfs mounted for a test, unmounted (lazily) when dropped.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a 0700 tmpfs of `size` (e.g. `16m`) at `at`; None, with the reason printed,
    /// where mounting is not allowed (not root, no mount rights).
    pub fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .unwrap();
        if !out.status.success() {
            eprintln!(
                "SKIPPED: cannot mount a tmpfs (needs root): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        Some(Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A process the test did not spawn (one vmkeep started in the background, by its reported
/// pid), killed with SIGKILL when the guard is dropped.
pub struct PidGuard(pub u32);

impl Drop for PidGuard {
    fn drop(&mut self) {
        // SAFETY: kill(2) with a pid the test was given and a valid signal.
        unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
    }
}

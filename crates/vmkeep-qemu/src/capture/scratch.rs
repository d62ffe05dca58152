//! A capture's private scratch directory: the copy-before-write images, the NBD socket and the
//! undo log, under `--scratch-dir` (default: the system temp dir) as `vmkeep-capture-<token>`.
//!
//! The directory is 0700 (the scratch images hold guest data). QEMU never opens anything in it
//! by path: images and the NBD listening socket are handed over as file descriptors
//! (`add-fd`, `getfd`), so a QEMU running as another user (libvirt's `-run-with user=`) works,
//! and a long scratch path cannot exceed the unix socket path limit on QEMU's side.
//!
//! A `lock` file is flock()ed by the capture and inherited by its guard: a directory whose lock
//! can be taken belongs to a capture whose vmkeep and guard are both gone, and the next capture
//! (of any VM) finds it, undoes what its log describes when the log is about its own VM, and
//! removes it.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::undo::Pending;
use crate::error::{Error, Result};

pub const DIR_PREFIX: &str = "vmkeep-capture-";
pub const LOG_NAME: &str = "undo.log";
const LOCK_NAME: &str = "lock";
/// Unix socket paths are limited to 108 bytes (with the NUL).
const SUN_PATH_MAX: usize = 100;

/// The scratch directory of a running capture.
pub struct Scratch {
    dir: PathBuf,
    lock: File,
    /// Held open so `/proc/self/fd/N/...` can stand in for a path too long for a socket.
    dir_handle: File,
}

impl Scratch {
    /// Creates `<base>/vmkeep-capture-<token>` (0700) and takes its lock.
    pub fn create(base: &Path, token: &str) -> Result<Scratch> {
        let dir = base.join(format!("{DIR_PREFIX}{token}"));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| {
                Error::io(
                    format!(
                        "create the capture's scratch directory in {} (choose another with --scratch-dir)",
                        base.display()
                    ),
                    e,
                )
            })?;
        let lock = OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(dir.join(LOCK_NAME))
            .map_err(|e| Error::io("create the scratch lock", e))?;
        flock(&lock, false).map_err(|e| Error::io("lock the scratch directory", e))?;
        let dir_handle =
            File::open(&dir).map_err(|e| Error::io("open the scratch directory", e))?;
        Ok(Scratch {
            dir,
            lock,
            dir_handle,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join(LOG_NAME)
    }

    /// The lock's fd, for the guard to inherit.
    pub fn lock_fd(&self) -> i32 {
        self.lock.as_raw_fd()
    }

    /// A path to `name` inside the directory short enough for a unix socket.
    pub fn socket_path(&self, name: &str) -> PathBuf {
        let direct = self.dir.join(name);
        if direct.as_os_str().len() < SUN_PATH_MAX {
            direct
        } else {
            PathBuf::from(format!(
                "/proc/self/fd/{}/{name}",
                self.dir_handle.as_raw_fd()
            ))
        }
    }

    /// Creates scratch image `i` (qcow2 of `size` bytes) and opens it for QEMU.
    pub fn image(&self, i: usize, size: u64) -> Result<File> {
        let path = self.dir.join(format!("scratch{i}.qcow2"));
        super::create_qcow2(&path, size)?;
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("open {}", path.display()), e))
    }

    /// A listening socket for QEMU's NBD server (handed over with `getfd`).
    pub fn nbd_listener(&self) -> Result<(UnixListener, PathBuf)> {
        let path = self.socket_path("nbd.sock");
        let l = UnixListener::bind(&path).map_err(|e| Error::io("create the NBD socket", e))?;
        Ok((l, path))
    }

    /// Free bytes on the scratch filesystem.
    pub fn free_bytes(&self) -> Option<u64> {
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: fstatvfs writes into `st`, a valid statvfs, for an fd we own.
        let r = unsafe { libc::fstatvfs(self.dir_handle.as_raw_fd(), &mut st) };
        (r == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
    }

    /// Removes the directory (the capture is over and nothing in QEMU uses it any more).
    pub fn remove(self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            warn!(error = %e, dir = %self.dir.display(), "cannot remove the scratch directory");
        }
    }
}

fn flock(f: &File, nonblocking: bool) -> std::io::Result<()> {
    let op = libc::LOCK_EX | if nonblocking { libc::LOCK_NB } else { 0 };
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The scratch directory of a dead capture (its lock is now ours).
pub struct DeadCapture {
    pub dir: PathBuf,
    pub pending: Pending,
    _lock: Option<File>,
}

impl DeadCapture {
    pub fn remove(self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            warn!(error = %e, dir = %self.dir.display(), "cannot remove a dead capture's scratch directory");
        }
    }
}

/// A capture still running (or its guard still undoing it) in `base`.
pub struct LiveCapture {
    pub dir: PathBuf,
    pub monitor: Option<PathBuf>,
}

/// Scratch directories in `base`: dead ones (locked for the caller) and live ones.
pub fn scan(base: &Path) -> (Vec<DeadCapture>, Vec<LiveCapture>) {
    let mut dead = Vec::new();
    let mut live = Vec::new();
    let Ok(entries) = std::fs::read_dir(base) else {
        return (dead, live);
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with(DIR_PREFIX) || !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            continue;
        }
        let dir = e.path();
        let log = dir.join(LOG_NAME);
        let lock = match OpenOptions::new().write(true).open(dir.join(LOCK_NAME)) {
            Ok(l) => l,
            Err(_) => {
                // A directory of a vmkeep from before the lock (or one that died while creating
                // it): stale once nobody has touched it for a day.
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age.as_secs() > 24 * 3600);
                if old {
                    info!(dir = %dir.display(), "removing a stale scratch directory");
                    let _ = std::fs::remove_dir_all(&dir);
                }
                continue;
            }
        };
        match flock(&lock, true) {
            Ok(()) => dead.push(DeadCapture {
                pending: Pending::read(&log).unwrap_or_default(),
                dir,
                _lock: Some(lock),
            }),
            Err(_) => live.push(LiveCapture {
                monitor: Pending::read(&log)
                    .ok()
                    .and_then(|p| p.monitor().map(Path::to_path_buf)),
                dir,
            }),
        }
    }
    (dead, live)
}

/// Whether `dir` is named as a capture's scratch directory.
pub fn is_capture_dir_name(dir: &Path) -> bool {
    dir.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(DIR_PREFIX))
}

/// Whether `dir` is a capture's scratch directory whose capture is over: gone, or its lock
/// free (its vmkeep and guard both dead).
pub fn is_dead_capture_dir(dir: &Path) -> bool {
    if !is_capture_dir_name(dir) {
        return false;
    }
    match OpenOptions::new().write(true).open(dir.join(LOCK_NAME)) {
        Ok(lock) => flock(&lock, true).is_ok(),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound && !dir.exists(),
    }
}

/// Whether `socket` still has a listener (a VM behind it).
pub fn monitor_alive(socket: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(socket).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_and_live_directories() {
        let base = tempfile::tempdir().unwrap();
        let live = Scratch::create(base.path(), "live").unwrap();
        let dead = Scratch::create(base.path(), "dead").unwrap();
        let mut log = super::super::undo::UndoLog::create(&dead.log_path()).unwrap();
        log.record(super::super::undo::Undo::Monitor {
            qmp: "/m".into(),
            scratch: None,
        });
        drop(log);
        let dead_dir = dead.dir().to_path_buf();
        drop(dead); // its lock goes with the process's fd
        let (d, l) = scan(base.path());
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].dir, dead_dir);
        assert_eq!(d[0].pending.monitor(), Some(Path::new("/m")));
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].dir, live.dir());
        // A second scan while the first holds the dead one's lock sees it as live.
        let (d2, _) = scan(base.path());
        assert!(d2.is_empty());
    }

    #[test]
    fn long_paths_use_proc_fd() {
        let base = tempfile::tempdir().unwrap();
        let deep = base.path().join("x".repeat(120));
        std::fs::create_dir(&deep).unwrap();
        let s = Scratch::create(&deep, "t").unwrap();
        let (_l, path) = s.nbd_listener().unwrap();
        assert!(path.starts_with("/proc/self/fd/"));
        std::os::unix::net::UnixStream::connect(&path).unwrap();
    }
}

//! Private temporary folders of commands that may be killed (`verify`'s sandbox, `mount
//! --writable`'s overlay): each holds a `lock` file flock()ed for the command's life, so the
//! next run of such a command removes the folders whose lock it can take (their owner died).
//! A lock rather than a pid: pids mean nothing across PID namespaces.
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::{Context, Result};

const LOCK_FILE: &str = "lock";

/// A temporary folder, removed on drop, locked while this process holds it.
pub struct ScratchDir {
    dir: tempfile::TempDir,
    _lock: File,
}

impl ScratchDir {
    /// `$TMPDIR/<prefix><random>`, after removing the dead ones of that prefix.
    pub fn create(prefix: &str) -> Result<ScratchDir> {
        ScratchDir::create_in(&std::env::temp_dir(), prefix)
    }

    fn create_in(base: &Path, prefix: &str) -> Result<ScratchDir> {
        sweep_dead(base, prefix);
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(base)
            .context("creating a private temporary folder")?;
        let lock = File::create(dir.path().join(LOCK_FILE))
            .and_then(|f| lock_now(&f).map(|()| f))
            .context("locking the private temporary folder")?;
        Ok(ScratchDir { dir, _lock: lock })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// An exclusive flock, or EWOULDBLOCK at once.
fn lock_now(f: &File) -> std::io::Result<()> {
    // SAFETY: flock on a descriptor we own.
    match unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Whether the command that made the folder at `path` is gone: the folder is, or its lock can
/// be taken. A folder without a lock file is being created: alive.
pub fn is_dead(path: &Path) -> bool {
    if !path.exists() {
        return true;
    }
    match File::open(path.join(LOCK_FILE)) {
        Ok(lock) => lock_now(&lock).is_ok(),
        Err(_) => false,
    }
}

/// Removes `base/<prefix>*` folders whose lock can be taken. A folder without a lock file is
/// left alone (being created, or not ours).
fn sweep_dead(base: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        let Ok(lock) = File::open(e.path().join(LOCK_FILE)) else {
            continue;
        };
        if lock_now(&lock).is_ok() {
            let path = e.path();
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "removed a killed command's folder")
                }
                Err(err) => {
                    tracing::warn!(path = %path.display(), error = %err, "could not remove a killed command's folder")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_folders_whose_owner_is_gone_are_swept() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path();
        let live = ScratchDir::create_in(base, "vmkeep-scratch-test-").unwrap();
        let dead = ScratchDir::create_in(base, "vmkeep-scratch-test-").unwrap();
        let dead_path = dead.path().to_path_buf();
        // A killed owner: its folder stays, its lock is released.
        let ScratchDir { dir, _lock } = dead;
        let _ = dir.keep();
        drop(_lock);
        let unlocked = tmp.path().join("vmkeep-scratch-test-nolock");
        std::fs::create_dir(&unlocked).unwrap();
        let third = ScratchDir::create_in(base, "vmkeep-scratch-test-").unwrap();
        assert!(!dead_path.exists(), "swept");
        assert!(live.path().exists() && third.path().exists() && unlocked.exists());
    }
}

//! The local cache (FORMAT.md §17): what is small and read often, kept on the host so that a
//! backup's memory, start-up time and requests grow with what it writes, not with the
//! repository.
//!
//! - **The blob index** as immutable runs ([`run`]) of entries sorted by blob id, built from the
//!   repository's index objects ([`sync`]): a backup asks "is this chunk stored, where?" with
//!   one `pread` of a checksummed bucket instead of loading every index object into memory.
//! - **Tree nodes** as stored ([`objects`]), verified by their id on every use.
//! - **Manifests** as stored ([`manifests`]), used while the listing shows the version they
//!   were read at, verified as a manifest from the store is.
//!
//! One folder per repository (`<cache dir>/<repository id>/`), shared by every vmkeep process
//! on the host: changes to it happen under an exclusive `flock` on its `lock` file and are
//! published by renaming, so a reader sees an old or a new catalog, never a partial one. Every
//! file is verified before it is believed, so the cache is safe to delete (or to lose to a
//! crash) at any instant: the next run rebuilds what it needs from the repository.
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

mod build;
pub(crate) mod manifests;
pub(crate) mod objects;
mod run;
pub(crate) mod scan;
pub(crate) mod sync;
pub(crate) mod table;

pub(crate) use table::Table;

/// Where the cache lives and how large its object part may grow.
#[derive(Clone, Debug)]
pub struct CacheOptions {
    /// The cache folder shared by all repositories (`~/.cache/vmkeep` by default in the CLI).
    pub dir: PathBuf,
    /// Bound of the cached objects (tree nodes); the blob index is not counted (it is about
    /// 53 bytes per chunk of the repository and needed whole).
    pub max_object_bytes: u64,
    /// How long to wait while another process updates the cache before doing without it.
    pub lock_wait: std::time::Duration,
}

impl CacheOptions {
    pub fn new(dir: PathBuf) -> CacheOptions {
        CacheOptions {
            dir,
            max_object_bytes: 1 << 30,
            lock_wait: std::time::Duration::from_secs(120),
        }
    }
}

/// The cache folder of one repository.
#[derive(Clone, Debug)]
pub(crate) struct Cache {
    pub dir: PathBuf,
    pub max_object_bytes: u64,
    /// How long to wait for another process's update of the cache.
    pub lock_wait: std::time::Duration,
}

impl Cache {
    pub fn open(opts: &CacheOptions, repo_id: &str) -> Result<Cache> {
        // The id comes from the repository's config: only a plain hex name becomes a folder.
        let safe = !repo_id.is_empty()
            && repo_id.len() <= 64
            && repo_id.bytes().all(|b| b.is_ascii_hexdigit());
        let folder = if safe {
            repo_id.to_string()
        } else {
            blake3::hash(repo_id.as_bytes()).to_hex().to_string()
        };
        let dir = opts.dir.join(folder);
        std::fs::create_dir_all(&dir).map_err(|e| Error::cache_io(&dir, "create", e))?;
        // The cache holds index entries and tree nodes in the clear: only its owner reads it.
        // (This repository's folder, never the cache folder given, which may be shared.)
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        Ok(Cache {
            dir,
            max_object_bytes: opts.max_object_bytes,
            lock_wait: opts.lock_wait,
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Exclusive use of the cache's mutable parts until the guard drops (other processes wait).
    pub fn lock(&self) -> Result<CacheLock> {
        // Deleted while this process ran (safe at any time): made again.
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::cache_io(&self.dir, "create", e))?;
        let path = self.path("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::cache_io(&path, "open", e))?;
        // Waits while another process updates the cache, but not for ever: one stopped
        // (SIGSTOP, a debugger) while holding the lock must not stall every backup on the host.
        let deadline = std::time::Instant::now() + self.lock_wait;
        loop {
            let e = match try_lock(&file) {
                Ok(()) => return Ok(CacheLock { _file: file }),
                Err(e) => e,
            };
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Some(libc::EWOULDBLOCK) => {
                    return Err(Error::CacheBusy {
                        path,
                        waited_secs: self.lock_wait.as_secs(),
                    })
                }
                _ => return Err(Error::cache_io(&path, "lock", e)),
            }
        }
    }
}

/// An exclusive `flock` on `file` without waiting (EWOULDBLOCK when another holds it). It
/// lasts until the file closes, with the process at the latest.
pub(crate) fn try_lock(file: &File) -> std::io::Result<()> {
    // SAFETY: flock on a descriptor the caller owns.
    match unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// A cache file's bytes, at most `max_len + 1` of them (more than `max_len`: the caller's
/// bound is broken), its time refreshed when within the bound (least-recently-used trim).
pub(crate) fn read_and_touch(path: &Path, max_len: u64) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut f = OpenOptions::new().read(true).write(true).open(path).ok()?;
    let mut bytes = Vec::new();
    (&mut f).take(max_len + 1).read_to_end(&mut bytes).ok()?;
    if bytes.len() as u64 <= max_len {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
    Some(bytes)
}

pub(crate) struct CacheLock {
    _file: File,
}

/// Write `bytes` to `path` through a temporary file and a rename (no fsync: a cache file lost
/// or cut by a crash fails its verification and is rebuilt).
pub(crate) fn publish(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_beside(path);
    let r = std::fs::write(&tmp, bytes)
        .map_err(|e| Error::cache_io(&tmp, "write", e))
        .and_then(|()| {
            std::fs::rename(&tmp, path).map_err(|e| Error::cache_io(path, "rename into", e))
        });
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

pub(crate) fn temp_beside(path: &Path) -> PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("cache");
    path.with_file_name(format!(
        ".tmp-{name}-{}",
        hex::encode(vmkeep_core::SnapshotId::random().0)
    ))
}

#[cfg(test)]
mod tests;

//! The embedded default: a repository in a local directory (or any mounted filesystem).
//!
//! Crash story: `put` writes `<dir>/.tmp-<random>` and renames it over the final name (a file
//! rename inside one folder, atomic on POSIX filesystems), so a reader never sees a partial
//! object; a kill -9 leaves at most a `.tmp-*` file that `list` ignores and
//! [`Store::remove_temporaries`] removes once no live writer can own it (prune).
//!
//! Durability (power loss): every object's data is fsynced before its rename, so a durable name
//! never shows a renamed-but-empty file. A name is durable once its folder is fsynced:
//! [`Store::flush`] fsyncs every folder renamed into (or deleted from) since the last flush,
//! deepest first. A new `packs/xx` folder is fsynced into `packs/` when it is created, and
//! `packs/` is fsynced again at the next flush. Callers order their writes with flush (the
//! packer flushes its packs before writing the index object naming them; backups flush before
//! the manifest). Objects are large (packs of 16 MiB), so this costs a few fsyncs per backup;
//! a filesystem-wide `syncfs` would also flush unrelated dirty data.
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

#[path = "local_direct.rs"]
mod direct;

use crate::error::{Error, Result};
use crate::key::Key;
use crate::ObjectKind;
use crate::{ObjectMeta, Store, TemporariesRemoved, Temporary};

/// Name prefix of the files `put` writes before renaming them to their final name.
pub const TEMP_PREFIX: &str = ".tmp-";

#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
    /// Folders renamed into since the last flush.
    dirty_dirs: std::sync::Mutex<std::collections::HashSet<PathBuf>>,
}

impl LocalStore {
    /// Open an existing folder (the repository layer decides whether it is a repository).
    pub fn open(root: impl AsRef<Path>) -> Result<LocalStore> {
        let root = root.as_ref().to_path_buf();
        match fs::metadata(&root) {
            Ok(m) if m.is_dir() => Ok(LocalStore {
                root,
                dirty_dirs: Default::default(),
            }),
            Ok(_) => Err(Error::io(
                "open",
                &root,
                std::io::Error::new(ErrorKind::NotADirectory, "not a directory"),
            )),
            Err(e) => Err(Error::io("open", &root, e)),
        }
    }

    /// Create the folder (and parents) if needed. Refuses a non-empty folder.
    pub fn create(root: impl AsRef<Path>) -> Result<LocalStore> {
        let root = root.as_ref().to_path_buf();
        fs::create_dir_all(&root).map_err(|e| Error::io("create", &root, e))?;
        let mut entries = fs::read_dir(&root).map_err(|e| Error::io("read", &root, e))?;
        if entries.next().is_some() {
            return Err(Error::io(
                "create",
                &root,
                std::io::Error::new(ErrorKind::AlreadyExists, "folder is not empty"),
            ));
        }
        for kind in ObjectKind::ALL {
            if kind != ObjectKind::Config {
                let d = root.join(kind.folder());
                fs::create_dir_all(&d).map_err(|e| Error::io("create", &d, e))?;
            }
        }
        // The kind folders' names, and the repository folder's own name in its parent.
        fsync_dir(&root)?;
        if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
            fsync_dir(parent)?;
        }
        Ok(LocalStore {
            root,
            dirty_dirs: Default::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &Key) -> PathBuf {
        self.root.join(key.path())
    }

    fn temp_path(&self, final_path: &Path) -> PathBuf {
        let mut r = [0u8; 8];
        getrandom::getrandom(&mut r).expect("OS random source");
        final_path.with_file_name(format!("{TEMP_PREFIX}{}", hex::encode(r)))
    }

    /// Creates `packs/xx` if needed. A new folder is fsynced into `packs/` at once, so its
    /// entry is durable before any pack is renamed into it. `packs/` is also marked dirty for
    /// the next flush: the folder may have been created by a process killed before its fsync.
    fn pack_folder(&self, dir: &Path) -> Result<()> {
        let packs = dir.parent().expect("packs/xx has a parent");
        match fs::create_dir(dir) {
            Ok(()) => fsync_dir(packs)?,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {
                // `packs/` itself is missing; the repository folder must not be: a gone
                // repository is not made again.
                create_dir_once(packs).map_err(|e| Error::io("create", packs, e))?;
                create_dir_once(dir).map_err(|e| Error::io("create", dir, e))?;
                fsync_dir(packs)?;
                fsync_dir(&self.root)?;
            }
            Err(e) => return Err(Error::io("create", dir, e)),
        }
        self.dirty_dirs.lock().unwrap().insert(packs.to_path_buf());
        Ok(())
    }

    fn write_temp(&self, key: &Key, data: &[u8]) -> Result<(PathBuf, PathBuf)> {
        let path = self.path(key);
        let dir = path.parent().expect("object paths have a parent");
        if key.kind == ObjectKind::Pack {
            self.pack_folder(dir)?;
        }
        let tmp = self.temp_path(&path);
        let result = (|| {
            let mut f = match OpenOptions::new().write(true).create_new(true).open(&tmp) {
                Err(e) if e.kind() == ErrorKind::NotFound && key.kind != ObjectKind::Pack => {
                    // A repository created before this kind existed lacks its folder. Only
                    // the folder: a repository folder that is gone is not made again.
                    create_dir_once(dir)?;
                    fsync_dir(&self.root).map_err(std::io::Error::other)?;
                    OpenOptions::new().write(true).create_new(true).open(&tmp)?
                }
                r => r?,
            };
            if key.kind != ObjectKind::Pack || !direct::write(&f, data)? {
                f.write_all(data)?;
            }
            f.sync_data()?;
            Ok(())
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io("write", &tmp, e));
        }
        self.dirty_dirs.lock().unwrap().insert(dir.to_path_buf());
        Ok((tmp, path))
    }

    /// Every temporary file: `.tmp-*` in the root (config), in each kind's folder and in the
    /// `packs/xx` folders. Files that vanish meanwhile (published or removed) are skipped.
    fn temporaries(&self) -> Result<Vec<(PathBuf, fs::Metadata)>> {
        let mut dirs = vec![self.root.clone()];
        for kind in ObjectKind::ALL {
            if kind != ObjectKind::Config {
                dirs.push(self.root.join(kind.folder()));
            }
        }
        let packs = self.root.join(ObjectKind::Pack.folder());
        let mut out = Vec::new();
        while let Some(d) = dirs.pop() {
            let rd = match fs::read_dir(&d) {
                Ok(rd) => rd,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("list", &d, e)),
            };
            for e in rd {
                let e = e.map_err(|e| Error::io("list", &d, e))?;
                let m = match e.metadata() {
                    Ok(m) => m,
                    Err(err) if err.kind() == ErrorKind::NotFound => continue,
                    Err(err) => return Err(Error::io("stat", e.path(), err)),
                };
                if m.is_dir() {
                    if d == packs {
                        dirs.push(e.path());
                    }
                } else if e.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                    out.push((e.path(), m));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

/// Makes a folder's entries (names created, renamed or removed in it) durable.
/// Creates `dir` (not its parents: a repository folder that is gone is not made again); one
/// that exists already is fine.
fn create_dir_once(dir: &Path) -> std::io::Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() != ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io("fsync", dir, e))
}

fn meta_of(key: Key, m: &fs::Metadata) -> ObjectMeta {
    use std::os::unix::fs::MetadataExt;
    // A replacement is a new file renamed over the old one: a new inode while the old one
    // still exists, so never the same token.
    let version = format!(
        "{:x}-{:x}.{:x}-{:x}",
        m.ino(),
        m.mtime(),
        m.mtime_nsec(),
        m.len()
    );
    ObjectMeta {
        key,
        size: m.len(),
        modified: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        version: Some(version),
    }
}

impl Store for LocalStore {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn get(&self, key: &Key, max_len: u64) -> Result<Vec<u8>> {
        let p = self.path(key);
        let f = File::open(&p).map_err(|e| match e.kind() {
            ErrorKind::NotFound => Error::NotFound {
                key: key.to_string(),
            },
            _ => Error::io("open", &p, e),
        })?;
        let too_large = |size| Error::TooLarge {
            key: key.to_string(),
            kind: key.kind.name(),
            size,
            max: max_len,
        };
        // The size of the open file, so a rename over the name cannot swap in another one.
        let size = f.metadata().map_err(|e| Error::io("stat", &p, e))?.len();
        if size > max_len {
            return Err(too_large(size));
        }
        // Read at most one byte more than allowed: a file growing meanwhile is caught too.
        let mut buf = Vec::with_capacity(size as usize);
        f.take(max_len.saturating_add(1))
            .read_to_end(&mut buf)
            .map_err(|e| Error::io("read", &p, e))?;
        if buf.len() as u64 > max_len {
            return Err(too_large(buf.len() as u64));
        }
        Ok(buf)
    }

    fn get_range(&self, key: &Key, offset: u64, len: u64) -> Result<Vec<u8>> {
        let p = self.path(key);
        let f = File::open(&p).map_err(|e| match e.kind() {
            ErrorKind::NotFound => Error::NotFound {
                key: key.to_string(),
            },
            _ => Error::io("open", &p, e),
        })?;
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, offset)
            .map_err(|e| match e.kind() {
                ErrorKind::UnexpectedEof => Error::ShortRead {
                    key: key.to_string(),
                    offset,
                    len,
                },
                _ => Error::io("read", &p, e),
            })?;
        Ok(buf)
    }

    fn size(&self, key: &Key) -> Result<u64> {
        let p = self.path(key);
        fs::metadata(&p)
            .map(|m| m.len())
            .map_err(|e| match e.kind() {
                ErrorKind::NotFound => Error::NotFound {
                    key: key.to_string(),
                },
                _ => Error::io("stat", &p, e),
            })
    }

    fn put(&self, key: &Key, data: &[u8]) -> Result<()> {
        let (tmp, path) = self.write_temp(key, data)?;
        fs::rename(&tmp, &path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Error::io("rename", &path, e)
        })
    }

    fn put_if_absent(&self, key: &Key, data: &[u8]) -> Result<bool> {
        let (tmp, path) = self.write_temp(key, data)?;
        // link(2) fails with EEXIST atomically: a real conditional create on POSIX.
        let r = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match r {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(Error::io("link", &path, e)),
        }
    }

    fn list(&self, kind: ObjectKind) -> Result<Vec<ObjectMeta>> {
        let mut out = Vec::new();
        if kind == ObjectKind::Config {
            if let Ok(m) = fs::metadata(self.root.join("config")) {
                out.push(meta_of(Key::config(), &m));
            }
            return Ok(out);
        }
        let base = self.root.join(kind.folder());
        let mut dirs = vec![base.clone()];
        while let Some(d) = dirs.pop() {
            let rd = match fs::read_dir(&d) {
                Ok(rd) => rd,
                // A kind's folder may be missing (an older repository); the repository's own
                // folder may not: a share not mounted must not list as an empty repository.
                Err(e) if e.kind() == ErrorKind::NotFound && self.root.is_dir() => continue,
                Err(e) => return Err(Error::io("list", &d, e)),
            };
            for e in rd {
                let e = e.map_err(|e| Error::io("list", &d, e))?;
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                let m = match e.metadata() {
                    Ok(m) => m,
                    Err(err) if err.kind() == ErrorKind::NotFound => continue,
                    Err(err) => return Err(Error::io("stat", e.path(), err)),
                };
                if m.is_dir() {
                    if kind == ObjectKind::Pack && d == base {
                        dirs.push(e.path());
                    }
                    continue;
                }
                if let Ok(key) = Key::new(kind, name) {
                    out.push(meta_of(key, &m));
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &Key) -> Result<()> {
        let p = self.path(key);
        match fs::remove_file(&p) {
            Ok(()) => {
                if let Some(d) = p.parent() {
                    self.dirty_dirs.lock().unwrap().insert(d.to_path_buf());
                }
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("delete", &p, e)),
        }
    }

    fn list_temporaries(&self) -> Result<Vec<Temporary>> {
        Ok(self
            .temporaries()?
            .into_iter()
            .map(|(p, m)| Temporary {
                location: p.display().to_string(),
                size: m.len(),
                modified: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            })
            .collect())
    }

    fn remove_temporaries(&self, older_than: Duration) -> Result<TemporariesRemoved> {
        let mut removed = TemporariesRemoved::default();
        for (p, m) in self.temporaries()? {
            // A time in the future (clock step) counts as young: keep.
            let age = m
                .modified()
                .ok()
                .and_then(|t| t.elapsed().ok())
                .unwrap_or_default();
            if age <= older_than {
                continue;
            }
            match fs::remove_file(&p) {
                Ok(()) => {
                    removed.count += 1;
                    removed.bytes += m.len();
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("delete", &p, e)),
            }
        }
        Ok(removed)
    }

    fn flush(&self) -> Result<()> {
        let mut dirs: Vec<PathBuf> = self.dirty_dirs.lock().unwrap().drain().collect();
        // Deepest first: `packs/xx` (the packs' names) before `packs/` (the folder's name).
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for (i, d) in dirs.iter().enumerate() {
            if let Err(e) = fsync_dir(d) {
                self.dirty_dirs
                    .lock()
                    .unwrap()
                    .extend(dirs[i..].iter().cloned());
                return Err(e);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::create(dir.path().join("r")).unwrap();
        let k = Key::new(ObjectKind::Pack, "abcdef").unwrap();
        s.put(&k, b"hello").unwrap();
        assert_eq!(s.get(&k, 5).unwrap(), b"hello");
        assert_eq!(s.get_range(&k, 1, 3).unwrap(), b"ell");
        assert!(matches!(
            s.get_range(&k, 3, 5),
            Err(Error::ShortRead { .. })
        ));
        assert_eq!(s.size(&k).unwrap(), 5);
        let l = s.list(ObjectKind::Pack).unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].key, k);
        assert!(!s.put_if_absent(&k, b"other").unwrap());
        assert_eq!(s.get(&k, 5).unwrap(), b"hello");
        let k2 = Key::new(ObjectKind::Snapshot, "0123").unwrap();
        assert!(s.put_if_absent(&k2, b"x").unwrap());
        s.delete(&k).unwrap();
        s.delete(&k).unwrap();
        assert!(s.get(&k, 5).unwrap_err().is_not_found());
        s.flush().unwrap();
        assert!(
            LocalStore::create(dir.path().join("r")).is_err(),
            "non-empty folder refused"
        );
    }

    /// A repository created before a kind existed lacks its folder: the first put of that kind
    /// creates it (`refs/` and `verified/` came after repositories in use).
    #[test]
    fn a_kind_folder_missing_from_an_older_repository_is_created_on_put() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::create(dir.path()).unwrap();
        fs::remove_dir(dir.path().join("refs")).unwrap();
        let k = Key::new(ObjectKind::Refs, "abcd").unwrap();
        assert!(s.list(ObjectKind::Refs).unwrap().is_empty());
        s.put(&k, b"rec").unwrap();
        let k2 = Key::new(ObjectKind::Refs, "abef").unwrap();
        fs::remove_dir_all(dir.path().join("refs")).unwrap();
        assert!(s.put_if_absent(&k2, b"rec").unwrap());
        s.flush().unwrap();
        assert_eq!(s.get(&k2, 3).unwrap(), b"rec");
    }

    /// A repository folder gone (a share not mounted) is not made again by a put, of any kind.
    #[test]
    fn a_put_into_a_repository_that_is_gone_fails_and_makes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r");
        let s = LocalStore::create(&root).unwrap();
        fs::rename(&root, dir.path().join("away")).unwrap();
        for kind in [ObjectKind::Pack, ObjectKind::Lock, ObjectKind::Verification] {
            let k = Key::new(kind, "ab-cd").unwrap();
            assert!(s.put(&k, b"x").is_err(), "{kind:?}");
            assert!(s.put_if_absent(&k, b"x").is_err(), "{kind:?}");
            assert!(!root.exists(), "{kind:?} made the repository folder again");
        }
    }

    /// A repository folder gone (a share not mounted) is an error, not an empty listing.
    #[test]
    fn listing_a_repository_that_is_gone_fails() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::create(dir.path().join("r")).unwrap();
        fs::remove_dir(dir.path().join("r/verified")).unwrap();
        assert!(s.list(ObjectKind::Verification).unwrap().is_empty());
        fs::rename(dir.path().join("r"), dir.path().join("away")).unwrap();
        for kind in ObjectKind::ALL {
            if kind != ObjectKind::Config {
                assert!(s.list(kind).is_err(), "{kind:?}");
            }
        }
    }

    #[test]
    fn get_is_bounded_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::create(dir.path()).unwrap();
        let k = Key::new(ObjectKind::Snapshot, "abcd").unwrap();
        s.put(&k, b"12345").unwrap();
        assert_eq!(s.get(&k, 5).unwrap(), b"12345");
        assert_eq!(s.get(&k, u64::MAX).unwrap(), b"12345");
        match s.get(&k, 4) {
            Err(
                e @ Error::TooLarge {
                    size: 5, max: 4, ..
                },
            ) => {
                assert!(e.is_too_large());
                assert!(
                    e.to_string()
                        .contains("manifest snapshots/abcd is too large"),
                    "{e}"
                );
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        // A sparse 1 TiB object: refused from its size alone (reading it would take hours).
        let huge = Key::new(ObjectKind::Index, "ef01").unwrap();
        File::create(s.path(&huge))
            .unwrap()
            .set_len(1 << 40)
            .unwrap();
        assert!(s.get(&huge, 256 << 20).unwrap_err().is_too_large());
    }

    #[test]
    fn temporaries_are_invisible_listed_and_removed_by_age() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::create(dir.path()).unwrap();
        s.put(&Key::new(ObjectKind::Pack, "abcdef").unwrap(), b"pack")
            .unwrap();
        let old = SystemTime::now() - Duration::from_secs(600);
        for (path, len, modified) in [
            ("index/.tmp-dead", 7, old),
            ("packs/ab/.tmp-dead", 5, old),
            (".tmp-config", 3, old),
            ("snapshots/.tmp-live", 2, SystemTime::now()),
        ] {
            let p = dir.path().join(path);
            fs::write(&p, vec![0; len]).unwrap();
            File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(modified)
                .unwrap();
        }
        assert!(s.list(ObjectKind::Index).unwrap().is_empty());
        assert_eq!(s.list(ObjectKind::Pack).unwrap().len(), 1);
        let listed = s.list_temporaries().unwrap();
        assert_eq!(listed.len(), 4, "{listed:?}");
        assert_eq!(listed.iter().map(|t| t.size).sum::<u64>(), 17);
        let removed = s.remove_temporaries(Duration::from_secs(60)).unwrap();
        assert_eq!(
            removed,
            TemporariesRemoved {
                count: 3,
                bytes: 15
            }
        );
        let left = s.list_temporaries().unwrap();
        assert_eq!(left.len(), 1);
        assert!(left[0].location.ends_with("snapshots/.tmp-live"));
        assert_eq!(
            s.list(ObjectKind::Pack).unwrap().len(),
            1,
            "objects are untouched"
        );
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(Key::new(ObjectKind::Index, "../x").is_err());
        assert!(Key::new(ObjectKind::Index, "").is_err());
        assert!(Key::new(ObjectKind::Config, "other").is_err());
    }
}

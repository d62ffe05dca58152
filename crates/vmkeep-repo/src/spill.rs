//! A set of blob ids too large for memory: what every restore point references, for `check`
//! and `prune` of a repository of any size. Ids are gathered in a bounded buffer, which is
//! sorted, deduplicated and written to a file in the spill folder when full; reading merges
//! the files (after merging them into one when there are many) into one ascending stream of
//! distinct ids. Memory: the buffer plus one read buffer per file.
//!
//! The folder is the cache's (`.spill-<random>/`, removed when the set drops). Its `lock`
//! file is held by the process that owns it, so a folder whose lock is free was left by a
//! killed process and any later run may delete it ([`remove_abandoned`]).
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use vmkeep_core::BlobId;

use crate::error::{Error, Result};

/// Ids held in memory before a file is written (32 bytes each: 128 MiB).
pub(crate) const BUFFER_IDS: usize = 4 << 20;
/// More files than this are merged into one before reading (or when another is written).
const MAX_FILES: usize = 32;
const PREFIX: &str = ".vmkeep-spill-";

pub(crate) struct IdSpill {
    dir: PathBuf,
    _lock: File,
    files: Vec<PathBuf>,
    buf: Vec<BlobId>,
    buffer_ids: usize,
    next_name: u64,
}

impl std::fmt::Debug for IdSpill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdSpill")
            .field("dir", &self.dir)
            .field("files", &self.files.len())
            .finish()
    }
}

impl IdSpill {
    /// A new, empty set in a new folder inside `parent`, holding up to `buffer_ids` in memory.
    pub(crate) fn with_buffer(parent: &Path, buffer_ids: usize) -> Result<IdSpill> {
        let dir = parent.join(format!(
            "{PREFIX}{}",
            hex::encode(vmkeep_core::SnapshotId::random().0)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| Error::cache_io(&dir, "create", e))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::cache_io(&lock_path, "open", e))?;
        crate::cache::try_lock(&lock).map_err(|e| Error::cache_io(&lock_path, "lock", e))?;
        Ok(IdSpill {
            dir,
            _lock: lock,
            files: Vec::new(),
            buf: Vec::new(),
            buffer_ids: buffer_ids.max(1),
            next_name: 0,
        })
    }

    pub fn insert(&mut self, id: BlobId) -> Result<()> {
        self.buf.push(id);
        if self.buf.len() >= self.buffer_ids {
            self.flush()?;
        }
        Ok(())
    }

    /// Sort and write the buffer to a new file.
    fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.buf.sort_unstable();
        self.buf.dedup();
        let path = self.new_path();
        let mut w = BufWriter::new(create(&path)?);
        for id in &self.buf {
            w.write_all(&id.0)
                .map_err(|e| Error::cache_io(&path, "write", e))?;
        }
        w.flush().map_err(|e| Error::cache_io(&path, "write", e))?;
        self.buf.clear();
        self.files.push(path);
        if self.files.len() > MAX_FILES {
            self.merge_files()?;
        }
        Ok(())
    }

    fn new_path(&mut self) -> PathBuf {
        self.next_name += 1;
        self.dir.join(format!("ids-{}", self.next_name))
    }

    /// Merge every file into one.
    fn merge_files(&mut self) -> Result<()> {
        let path = self.new_path();
        let mut w = BufWriter::new(create(&path)?);
        let mut merged = Merge::open(&self.files)?;
        while let Some(id) = merged.next()? {
            w.write_all(&id.0)
                .map_err(|e| Error::cache_io(&path, "write", e))?;
        }
        w.flush().map_err(|e| Error::cache_io(&path, "write", e))?;
        drop(merged);
        for f in self.files.drain(..) {
            let _ = std::fs::remove_file(f);
        }
        self.files.push(path);
        Ok(())
    }

    /// Every id inserted so far, ascending, each once. More may be inserted afterwards and a
    /// later read includes them.
    pub fn read(&mut self) -> Result<Merge> {
        self.flush()?;
        Merge::open(&self.files)
    }
}

impl Drop for IdSpill {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn create(path: &Path) -> Result<File> {
    File::create(path).map_err(|e| Error::cache_io(path, "create", e))
}

/// The files' ids merged: ascending, each once.
pub(crate) struct Merge {
    readers: Vec<(PathBuf, BufReader<File>)>,
    heads: BinaryHeap<Reverse<(BlobId, usize)>>,
    last: Option<BlobId>,
}

impl Merge {
    fn open(files: &[PathBuf]) -> Result<Merge> {
        let mut m = Merge {
            readers: Vec::with_capacity(files.len()),
            heads: BinaryHeap::new(),
            last: None,
        };
        for (i, p) in files.iter().enumerate() {
            let f = File::open(p).map_err(|e| Error::cache_io(p, "open", e))?;
            m.readers
                .push((p.clone(), BufReader::with_capacity(1 << 16, f)));
            m.refill(i)?;
        }
        Ok(m)
    }

    fn refill(&mut self, i: usize) -> Result<()> {
        let (path, r) = &mut self.readers[i];
        let mut id = [0u8; 32];
        match r.read_exact(&mut id) {
            Ok(()) => self.heads.push(Reverse((BlobId(id), i))),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
            Err(e) => return Err(Error::cache_io(path, "read", e)),
        }
        Ok(())
    }

    pub fn next(&mut self) -> Result<Option<BlobId>> {
        while let Some(Reverse((id, i))) = self.heads.pop() {
            self.refill(i)?;
            if self.last == Some(id) {
                continue;
            }
            self.last = Some(id);
            return Ok(Some(id));
        }
        Ok(None)
    }
}

/// Delete spill folders in `dir` whose owner is gone (their lock is free).
pub(crate) fn remove_abandoned(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if !e.file_name().to_string_lossy().starts_with(PREFIX) {
            continue;
        }
        let path = e.path();
        let Ok(lock) = File::open(path.join("lock")) else {
            // No lock file: a folder cut before its lock was made (owner killed at once).
            let _ = std::fs::remove_dir_all(&path);
            continue;
        };
        if crate::cache::try_lock(&lock).is_ok() {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> BlobId {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&n.to_be_bytes());
        b[31] = (n % 7) as u8;
        BlobId(b)
    }

    fn all(m: &mut Merge) -> Vec<BlobId> {
        let mut v = Vec::new();
        while let Some(i) = m.next().unwrap() {
            v.push(i);
        }
        v
    }

    #[test]
    fn gives_distinct_ids_in_order_across_many_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = IdSpill::with_buffer(dir.path(), 7).unwrap();
        let mut want = std::collections::BTreeSet::new();
        // 40 files of 7 (> MAX_FILES, so they are merged once), with repeats across them.
        for i in 0..280u32 {
            let n = (i * 7919) % 150;
            s.insert(id(n)).unwrap();
            want.insert(id(n));
        }
        let got = all(&mut s.read().unwrap());
        assert_eq!(got, want.iter().copied().collect::<Vec<_>>());
        // More after a read: included in the next.
        s.insert(id(1000)).unwrap();
        want.insert(id(1000));
        assert_eq!(
            all(&mut s.read().unwrap()),
            want.into_iter().collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_folder_goes_with_the_set_and_abandoned_ones_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let s = IdSpill::with_buffer(dir.path(), BUFFER_IDS).unwrap();
        let held = s.dir.clone();
        // A folder with a free lock: left by a killed process.
        let left = dir.path().join(format!("{PREFIX}dead"));
        std::fs::create_dir_all(&left).unwrap();
        std::fs::write(left.join("lock"), b"").unwrap();
        remove_abandoned(dir.path());
        assert!(!left.exists(), "an abandoned folder is removed");
        assert!(held.exists(), "a folder in use is kept");
        drop(s);
        assert!(!held.exists());
    }
}

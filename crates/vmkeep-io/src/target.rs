//! Where restored data goes: a [`DiskWriter`]; and making a written target durable: the file's
//! bytes, then its final name, then the folder.
//!
//! A restore writes `DIR/<disk>.<ext>.partial`, fsyncs it ([`DiskWriter::finish`]), renames it
//! to its final name and fsyncs `DIR`, so after a power loss the final name either does not
//! exist or holds every byte. A newly created `DIR` (and each new parent) is fsynced into its
//! parent too.

use std::fs::File;
use std::io;
use std::path::Path;

/// Makes `dir`'s entries durable.
fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The folder holding `path` ("." for a bare file name).
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Creates `dir` and its missing parents; each new folder is fsynced into its parent.
pub fn create_target_dir(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut d = dir;
    while !d.as_os_str().is_empty() && !d.exists() {
        missing.push(d);
        d = parent_of(d);
    }
    std::fs::create_dir_all(dir)?;
    for new in missing.iter().rev() {
        fsync_dir(parent_of(new))?;
    }
    Ok(())
}

/// Renames the finished (already fsynced) `partial` to `path` and fsyncs the folder.
pub fn publish(partial: &Path, path: &Path) -> io::Result<()> {
    std::fs::rename(partial, path)?;
    fsync_dir(parent_of(path))
}

/// Where a restored disk goes: positional writes of whole chunks from several worker threads
/// at once (or from one thread in ascending order: [`DiskWriter::wants_ascending_writes`]), then
/// one `finish`. Ranges never written must read as zeros (a fresh sparse file, a new qcow2
/// image).
pub trait DiskWriter: Sync {
    /// Writes `data` at `offset`. Called concurrently for disjoint ranges, unless the target
    /// wants ascending writes.
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()>;
    /// Called once after every chunk was written: makes every write durable (fsync); the caller
    /// then renames the target ([`publish`]). Not called after a failure.
    fn finish(&self) -> std::io::Result<()>;
    /// What is being written, for error messages.
    fn target(&self) -> &Path;
    /// True for a format that lays data out in the order writes arrive (qcow2 appends a host
    /// cluster for each guest cluster first written): the restore then writes the chunks in
    /// ascending offset order from one thread, so the image is laid out in disk order. False
    /// (the default) lets the workers write concurrently, as they finish chunks.
    fn wants_ascending_writes(&self) -> bool {
        false
    }
}

/// An existing disk image read and written in place (`restore --onto`): raw files and block
/// devices, qcow2 through qemu-nbd. Called from several threads at once for disjoint ranges.
pub trait ImageAccess: Sync {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()>;
    /// Makes `offset..offset + len` read as zeros (unallocated where the format allows).
    fn zero_at(&self, offset: u64, len: u64) -> std::io::Result<()>;
    /// Every write durable.
    fn flush(&self) -> std::io::Result<()>;
    /// For messages: the path (and the format).
    fn describe(&self) -> String;
    /// Byte ranges that may hold data, ascending (the rest reads as zeros without being
    /// read), or None when the image cannot tell.
    fn data_extents(&self) -> std::io::Result<Option<Vec<(u64, u64)>>> {
        Ok(None)
    }
}

/// Removes `path` (nothing to do when it is absent) and makes the removal durable (its folder
/// fsynced): the counterpart of [`publish`].
pub fn unpublish(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => fsync_dir(parent_of(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes zeros over `offset..offset + len` through `write` (offset, bytes), in pieces of at
/// most 1 MiB: for targets that cannot punch a hole.
pub fn write_zeros(
    offset: u64,
    len: u64,
    mut write: impl FnMut(&[u8], u64) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(zeros.len() as u64);
        write(&zeros[..n as usize], at)?;
        at += n;
    }
    Ok(())
}

//! The raw-file target of a restore: a sparse file of the disk's full size, written under a
//! `.partial` name and renamed by the caller when complete.
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::DiskWriter;
use crate::error::{Error, Result};

/// Bytes written between two starts of write-back.
const WRITEBACK_EVERY: u64 = 32 << 20;

/// A sparse raw file at `path`, created (truncated) at `size` bytes; untouched ranges stay
/// holes.
///
/// The restore must be durable before it is renamed into place (a `sync_all` in `finish`).
/// Left to the end, that sync would write the whole disk after the last block was decoded, with
/// the CPUs idle; instead, every [`WRITEBACK_EVERY`] bytes the kernel is asked to start writing
/// back what is dirty (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait), so the
/// disk writes while the workers decode and the final sync only waits for the tail.
pub struct RawFileWriter {
    file: File,
    path: PathBuf,
    unsynced: AtomicU64,
}

impl RawFileWriter {
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        let err = |e| Error::TargetWrite {
            path: path.to_path_buf(),
            cause: e,
        };
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(err)?;
        file.set_len(size).map_err(err)?;
        Ok(RawFileWriter {
            file,
            path: path.to_path_buf(),
            unsynced: AtomicU64::new(0),
        })
    }
}

impl DiskWriter for RawFileWriter {
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)?;
        let before = self
            .unsynced
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if before < WRITEBACK_EVERY && before + data.len() as u64 >= WRITEBACK_EVERY {
            self.unsynced.store(0, Ordering::Relaxed);
            // SAFETY: a valid open descriptor; offset 0 and length 0 mean the whole file.
            // Only a hint: a failure (an fs without support) leaves the work to `finish`.
            unsafe {
                libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
            };
        }
        Ok(())
    }

    fn finish(&self) -> std::io::Result<()> {
        // The size (set_len) and every write: sync_all, not sync_data, covers the metadata.
        self.file.sync_all()
    }

    fn target(&self) -> &Path {
        &self.path
    }
}

/// An existing raw image (regular file or block device) for `restore --onto`.
pub struct RawFileImage {
    file: File,
    path: PathBuf,
    size: u64,
    regular: bool,
}

impl RawFileImage {
    /// Opens `path` for reading and writing; a regular file is first truncated or grown (with
    /// a hole) to `size`; a block device must have that size.
    pub fn open(path: &Path, size: u64) -> Result<Self> {
        let err = |e| Error::TargetWrite {
            path: path.to_path_buf(),
            cause: e,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(err)?;
        let meta = file.metadata().map_err(err)?;
        let regular = meta.is_file();
        let have = if regular {
            if meta.len() != size {
                file.set_len(size).map_err(err)?;
            }
            size
        } else {
            use std::io::{Seek, SeekFrom};
            (&file).seek(SeekFrom::End(0)).map_err(err)?
        };
        if have != size {
            return Err(Error::Invalid {
                what: "restore target",
                reason: format!(
                    "{} is a device of {have} bytes; the disk is {size}",
                    path.display()
                ),
            });
        }
        Ok(RawFileImage {
            file,
            path: path.to_path_buf(),
            size,
            regular,
        })
    }
}

impl vmkeep_io::ImageAccess for RawFileImage {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)
    }
    fn zero_at(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if self.regular {
            // SAFETY: fallocate on a descriptor we own.
            let r = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            };
            if r == 0 {
                return Ok(());
            }
        }
        // No holes here (a device, or a file system without them): write the zeros.
        vmkeep_io::write_zeros(offset, len, |z, at| self.file.write_all_at(z, at))
    }
    fn flush(&self) -> std::io::Result<()> {
        self.file.sync_all()
    }
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
    fn data_extents(&self) -> std::io::Result<Option<Vec<(u64, u64)>>> {
        if !self.regular {
            return Ok(None);
        }
        crate::backup::image::data_extents(&self.file, self.size).map(Some)
    }
}

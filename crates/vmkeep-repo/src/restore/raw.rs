//! The raw-file target of a restore: a sparse file of the disk's full size, written under a
//! `.partial` name and renamed by the caller when complete.
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::DiskWriter;
use crate::error::{Error, Result};

/// A sparse raw file at `path`, created (truncated) at `size` bytes; untouched ranges stay
/// holes.
pub struct RawFileWriter {
    file: File,
    path: PathBuf,
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
        })
    }
}

impl DiskWriter for RawFileWriter {
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn finish(&self) -> std::io::Result<()> {
        // The size (set_len) and every write: sync_all, not sync_data, covers the metadata.
        self.file.sync_all()
    }

    fn target(&self) -> &Path {
        &self.path
    }
}

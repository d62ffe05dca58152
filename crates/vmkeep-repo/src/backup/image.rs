//! Raw disk images and block devices, read directly. Sparse-aware: only extents that
//! SEEK_DATA/SEEK_HOLE report as data are read; holes become zero chunks without a read.
//! Images in container formats (qcow2, VMDK, ...) are refused: their bytes are not the disk.
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::pipeline::DiskReader;
use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    pub size: u64,
    pub block_device: bool,
    /// Byte ranges (offset, length) holding data, ascending.
    pub data: Vec<(u64, u64)>,
}

pub struct RawImage {
    file: File,
    path: PathBuf,
    info: ImageInfo,
    identity: Option<String>,
}

/// Container formats recognised by their magic, so they are never backed up as if raw.
fn container_format(head: &[u8]) -> Option<&'static str> {
    let starts = |m: &[u8]| head.len() >= m.len() && &head[..m.len()] == m;
    if starts(b"QFI\xfb") {
        Some("qcow2")
    } else if starts(b"KDMV") || starts(b"# Disk DescriptorFile") {
        Some("VMDK")
    } else if starts(b"vhdxfile") {
        Some("VHDX")
    } else if starts(b"QED\0") {
        Some("QED")
    } else if starts(b"conectix") {
        Some("VHD")
    } else if head.len() >= 0x44 && head[0x40..0x44] == [0x7f, 0x10, 0xda, 0xbe] {
        Some("VDI")
    } else {
        None
    }
}

/// Open and inspect an image: refuse non-raw formats, find its size and data extents.
pub fn probe_image(path: &Path) -> Result<RawImage> {
    let read_err = |e| Error::SourceRead {
        path: path.to_path_buf(),
        cause: e,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    let block_device = meta.file_type().is_block_device();
    if !meta.is_file() && !block_device {
        return Err(read_err(std::io::Error::other(
            "not a regular file or block device",
        )));
    }
    let size = file.seek(SeekFrom::End(0)).map_err(read_err)?;
    let mut head = vec![0u8; 512.min(size as usize)];
    file.read_exact_at(&mut head, 0).map_err(read_err)?;
    if let Some(format) = container_format(&head) {
        return Err(Error::NotRaw {
            path: path.to_path_buf(),
            format,
            hint: "only raw images are read directly; convert it with `qemu-img convert -O raw`, or back up the running VM with `vmkeep backup vm`",
        });
    }
    let data = if block_device {
        vec![(0, size)]
    } else {
        data_extents(&file, size).map_err(read_err)?
    };
    // Taken before any read: a write during the backup changes ctime, so the next backup reads.
    // Recorded only when the last change is over a second old: timestamps can be as coarse as a
    // timer tick, so a write in the same tick as the last change might not move ctime ("racy
    // clean", as git calls it); such a file is simply read in full next time.
    let ctime_ns = meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128;
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    let settled = now_ns - ctime_ns >= 1_000_000_000;
    let identity = (!block_device && settled).then(|| file_identity(&meta));
    Ok(RawImage {
        file,
        path: path.to_path_buf(),
        info: ImageInfo {
            size,
            block_device,
            data,
        },
        identity,
    })
}

/// Data extents by SEEK_DATA / SEEK_HOLE; the whole file when the filesystem cannot tell.
/// "dev:inode:size:mtime_ns:ctime_ns" of a file: changes with any write to it (ctime cannot be
/// set by user tools). Image backups and the records beside restored images use it.
pub fn file_identity(meta: &std::fs::Metadata) -> String {
    format!(
        "{}:{}:{}:{}:{}",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
        meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128
    )
}

pub(crate) fn data_extents(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < size {
        // SAFETY: lseek on a descriptor we own; it only moves the file offset.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(out), // no data after pos
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(vec![(0, size)]),
                _ => Err(e),
            };
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let end = (hole as u64).min(size);
        if end > data as u64 {
            out.push((data as u64, end - data as u64));
        }
        pos = hole;
    }
    Ok(out)
}

pub use vmkeep_io::source::chunk_runs;

impl RawImage {
    pub fn info(&self) -> &ImageInfo {
        &self.info
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// "dev:inode:size:mtime_ns:ctime_ns" of a regular file (None for block devices).
    pub fn identity(&self) -> Option<&str> {
        self.identity.as_deref()
    }

    pub fn data_runs(&self, chunk_size: u64) -> Vec<(u64, u64)> {
        chunk_runs(&self.info.data, chunk_size)
    }
}

impl DiskReader for RawImage {
    fn size(&self) -> u64 {
        self.info.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_and_cover() {
        let cs = 65536;
        assert_eq!(chunk_runs(&[(0, 1)], cs), vec![(0, 1)]);
        assert_eq!(chunk_runs(&[(0, 65536), (65536, 10)], cs), vec![(0, 2)]);
        assert_eq!(chunk_runs(&[(100, 10), (200, 10)], cs), vec![(0, 1)]);
        assert_eq!(
            chunk_runs(&[(0, 10), (3 * 65536 + 5, 65536)], cs),
            vec![(0, 1), (3, 2)]
        );
    }

    #[test]
    fn sparse_file_extents() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let f = File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 10 << 20).unwrap();
        let img = probe_image(&p).unwrap();
        assert_eq!(img.info().size, 64 << 20);
        let data: u64 = img.info().data.iter().map(|e| e.1).sum();
        assert!(data < 8 << 20, "holes detected: {:?}", img.info().data);
        assert!(img
            .info()
            .data
            .iter()
            .any(|&(o, l)| o <= 10 << 20 && o + l > 10 << 20));
    }

    #[test]
    fn qcow2_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let mut head = b"QFI\xfb".to_vec();
        head.resize(4096, 0);
        std::fs::write(&p, head).unwrap();
        assert!(matches!(
            probe_image(&p),
            Err(Error::NotRaw {
                format: "qcow2",
                ..
            })
        ));
    }
}

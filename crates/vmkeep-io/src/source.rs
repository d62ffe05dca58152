//! Where disk data comes from: a [`DiskReader`] (a raw image, a block device, an NBD export of a
//! live VM's disk) and the [`ReadPlan`] saying which chunks to read and where the rest comes from.
//! Capture drivers produce both; the repository's backup session consumes them.
use vmkeep_core::manifest::{ChangeTracking, Checkpoint};
use vmkeep_core::BlobId;

/// A disk to read: a raw image file, a block device, or (later) an NBD export.
pub trait DiskReader: Sync {
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`; the range lies inside the disk.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    /// `len` bytes from `offset` in a buffer of their own. A reader that receives its data in
    /// a buffer anyway (NBD) hands that over instead of copying it into a zeroed one.
    fn read_vec(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_at(&mut buf, offset)?;
        Ok(buf)
    }
    /// For messages: a path or an export name.
    fn describe(&self) -> String;
    /// How many `read_at` calls may usefully run at once (an NBD export over several
    /// connections); the pipeline runs that many reader threads. Local files: 1.
    fn parallel_reads(&self) -> usize {
        1
    }
}

/// What to read of a disk, and where the rest comes from.
#[derive(Clone, Debug, Default)]
pub struct ReadPlan {
    /// Tree (of a disk of the same size) supplying every chunk not read; None = zeros.
    pub base: Option<BlobId>,
    /// Chunk runs (first, count) to read, ascending and disjoint.
    pub runs: Vec<(u64, u64)>,
    /// Chunk runs (first, count), ascending and disjoint, that read as all zeros at the captured
    /// instant (from the source's allocation map; empty when unknown). The repository checks a
    /// `used` plan against them: a chunk zero now, not in `runs`, but holding data in `base`
    /// proves the change tracking missed writes, and every chunk outside them is read instead.
    pub zero_runs: Vec<(u64, u64)>,
    /// What change tracking did, recorded in the manifest.
    pub cbt: ChangeTracking,
    pub cbt_reason: Option<String>,
    pub checkpoint: Option<Checkpoint>,
    /// Identity of an image file, recorded in the manifest (see DiskEntry::source_identity).
    pub source_identity: Option<String>,
}

/// Chunk runs (first, count) covering byte extents, merged where they touch.
pub fn chunk_runs(extents: &[(u64, u64)], chunk_size: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &(off, len) in extents {
        if len == 0 {
            continue;
        }
        let first = off / chunk_size;
        let last = (off + len - 1) / chunk_size;
        match runs.last_mut() {
            Some((s, n)) if *s + *n >= first => {
                let end = (*s + *n).max(last + 1);
                *n = end - *s;
            }
            _ => runs.push((first, last - first + 1)),
        }
    }
    runs
}

/// Chunk runs (first, count) lying wholly inside the byte ranges `zeros` (ascending, disjoint)
/// of a disk of `size` bytes; the last chunk may be short. A chunk only partly inside is not
/// included: it holds data, or zeros the allocation map cannot vouch for.
pub fn zero_chunk_runs(zeros: &[(u64, u64)], size: u64, chunk_size: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &(off, len) in zeros {
        let end = off.saturating_add(len).min(size);
        let first = off.div_ceil(chunk_size);
        let last = if end == size {
            size.div_ceil(chunk_size)
        } else {
            end / chunk_size
        };
        if last <= first {
            continue;
        }
        match runs.last_mut() {
            Some((s, n)) if *s + *n >= first => *n = last.max(*s + *n) - *s,
            _ => runs.push((first, last - first)),
        }
    }
    runs
}

/// Errors of a source (a capture driver's own error type, boxed so the repository need not
/// know it; callers downcast when they must tell errors apart).
pub type SourceError = Box<dyn std::error::Error + Send + Sync>;

/// A disk of a [`VmSource`].
#[derive(Debug, Clone)]
pub struct SourceDisk {
    pub name: String,
    pub size: u64,
}

/// A VM captured at one instant, as the repository consumes it (a capture driver: QEMU through
/// QMP, images through qemu-storage-daemon, later libvirt).
///
/// A new source is prepared, not yet cut. The consumer takes the memory stream
/// ([`take_memory`](Self::take_memory)) and reads it WHILE [`cut`](Self::cut) runs on another
/// thread (QEMU cannot resume the guest while its migration waits for a reader; the guest's
/// writes to RAM wait on it too), checks it ([`memory_done`](Self::memory_done)), then reads
/// each disk ([`open_disk`](Self::open_disk)), releases the VM ([`release`](Self::release)),
/// commits, and settles the checkpoints with [`finish`](Self::finish)`(committed)`. Dropping a
/// source undoes the capture. A failed cut ends the memory stream with an error.
pub trait VmSource: Send {
    /// Takes the VM's instant (disks, and memory when asked for).
    fn cut(&mut self) -> Result<(), SourceError>;
    /// The disks, in the order [`open_disk`](Self::open_disk) takes.
    fn disks(&self) -> Vec<SourceDisk>;
    /// The memory and device state stream, once (None when not captured).
    fn take_memory(&mut self) -> Option<Box<dyn std::io::Read + Send>>;
    /// Small named streams describing the VM (its definition, the files it boots from), stored
    /// beside its disks; read after the memory stream.
    fn config_streams(&mut self) -> Vec<(String, Box<dyn std::io::Read + Send>)> {
        Vec::new()
    }
    /// After the memory stream's end: whether the capture held (one instant, no guest error).
    fn memory_done(&mut self) -> Result<(), SourceError>;
    /// A reader of disk `i` at the captured instant, and what to read of it.
    fn open_disk(
        &mut self,
        i: usize,
    ) -> Result<(Box<dyn DiskReader + Send>, ReadPlan), SourceError>;
    /// Everything is read: the VM no longer carries the capture.
    fn release(&mut self) -> Result<(), SourceError>;
    /// Milliseconds the guest was paused for the cut.
    fn pause_ms(&self) -> u64;
    /// After the commit (or its failure): checkpoints settled, everything else undone.
    fn finish(self: Box<Self>, committed: bool) -> Result<(), SourceError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_chunks_are_whole_chunks_inside_zero_ranges() {
        let k = 65536;
        // chunk 0 partly zero, 1-2 zero, 3 data, 4 zero; the short last chunk (5) zero
        let size = 5 * k + 100;
        let zeros = [(4096, 3 * k - 4096), (4 * k, k + 100)];
        assert_eq!(zero_chunk_runs(&zeros, size, k), vec![(1, 2), (4, 2)]);
        // a zero range inside one chunk covers none; one ending mid-chunk stops before it
        assert_eq!(zero_chunk_runs(&[(10, 100)], size, k), vec![]);
        assert_eq!(zero_chunk_runs(&[(0, k + 5)], size, k), vec![(0, 1)]);
        // touching ranges merge
        assert_eq!(zero_chunk_runs(&[(0, k), (k, k)], size, k), vec![(0, 2)]);
        assert_eq!(zero_chunk_runs(&[], size, k), vec![]);
    }
}

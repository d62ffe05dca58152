//! A disk served to block-device clients without restoring it (`vmkeep mount`, instant
//! recovery): the repository side implements [`ServedDisk`] over a restore point, the NBD
//! server (vmkeep-qemu) serves any [`ServedDisk`]. Neither knows the other.
use std::io;

/// One extent of a served disk: `len` bytes that either hold data or read as zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServedExtent {
    pub len: u64,
    /// The range reads as zeros and costs nothing to read (a ZERO chunk, never fetched).
    pub zero: bool,
}

/// A fixed-size disk image read at byte offsets by several threads at once.
pub trait ServedDisk: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `offset` (`offset + buf.len() <= size()`, checked by the
    /// caller). Data that cannot be read or verified is an error, never wrong bytes.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// The extents from `offset` on, covering at least one byte and at most `len` bytes
    /// (`offset < size()`, `offset + len <= size()`), in order, adjacent ones of the same kind
    /// merged. May stop early: the caller asks again for the rest.
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<ServedExtent>>;
    /// The granularity of `extents` and the size reads are best aligned to (a power of two).
    fn block_size(&self) -> u32;
}

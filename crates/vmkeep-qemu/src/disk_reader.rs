//! An NBD export as a [`vmkeep_repo::DiskReader`], and read plans from NBD block status.
//!
//! The backup pipeline reads from one plain thread with synchronous calls; [`NbdDisk`] runs
//! each read on a tokio runtime (through a [`Handle`], so the caller must not itself be inside
//! that runtime). The export's `base:allocation` map is fetched once: ranges that read as zeros
//! are filled with zeros without asking the server.

use tokio::runtime::Handle;

use crate::error::Result;
use crate::nbd::{dirty_bitmap_context, Extent, NbdClient, STATE_DIRTY, STATE_ZERO};

/// Meta context of the allocation map.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// A read-only view of one NBD export for the backup pipeline.
pub struct NbdDisk {
    client: NbdClient,
    /// More connections to the same export when the server allows several (multi-conn);
    /// reads are spread over all of them.
    extra: Vec<NbdClient>,
    next: std::sync::atomic::AtomicUsize,
    handle: Handle,
    /// `(offset, length)` ranges that read as zeros, ascending, merged.
    zeros: Vec<(u64, u64)>,
    /// Extents of `base:allocation` as fetched at open.
    allocation: Vec<Extent>,
    what: String,
}

impl NbdDisk {
    /// Wraps a connected client (which must have negotiated `base:allocation`) and fetches the
    /// allocation map. Runs on `handle`; call from outside the runtime.
    pub fn new(handle: Handle, client: NbdClient, what: impl Into<String>) -> Result<Self> {
        let size = client.size();
        let allocation = if size == 0 {
            Vec::new()
        } else {
            handle.block_on(client.block_status(BASE_ALLOCATION, 0, size))?
        };
        let zeros = ranges_with(&allocation, |f| f & STATE_ZERO != 0);
        Ok(NbdDisk {
            client,
            extra: Vec::new(),
            next: Default::default(),
            handle,
            zeros,
            allocation,
            what: what.into(),
        })
    }

    /// Connects to `export` on a unix socket with `base:allocation` and, if given, the dirty
    /// bitmap `bitmap`, and fetches the allocation map.
    pub fn connect_unix(
        handle: Handle,
        socket: &std::path::Path,
        export: &str,
        bitmap: Option<&str>,
        what: impl Into<String>,
    ) -> Result<Self> {
        let ctx = bitmap.map(dirty_bitmap_context);
        let mut contexts = vec![BASE_ALLOCATION];
        if let Some(c) = &ctx {
            contexts.push(c);
        }
        let client = handle.block_on(NbdClient::connect_unix(socket, export, &contexts))?;
        let multi = client.can_multi_conn();
        let mut disk = Self::new(handle, client, what)?;
        if multi {
            // The server promises consistent results across connections: read over two (the
            // pipeline runs a reader thread per connection).
            let extra = disk.handle.block_on(NbdClient::connect_unix(
                socket,
                export,
                &[BASE_ALLOCATION],
            ))?;
            disk.extra.push(extra);
        }
        Ok(disk)
    }

    /// The connection for the next read (round robin).
    fn pick(&self) -> &NbdClient {
        let i =
            self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % (1 + self.extra.len());
        if i == 0 {
            &self.client
        } else {
            &self.extra[i - 1]
        }
    }

    /// Number of connections reads are spread over.
    pub fn connections(&self) -> usize {
        1 + self.extra.len()
    }

    pub fn client(&self) -> &NbdClient {
        &self.client
    }

    /// Chunk runs holding anything but zeros (every chunk touching such an extent).
    pub fn allocated_runs(&self, chunk_size: u64) -> Vec<(u64, u64)> {
        allocated_runs(&self.allocation, chunk_size)
    }

    /// Chunk runs that read wholly as zeros (see [`vmkeep_io::ReadPlan::zero_runs`]).
    pub fn zero_runs(&self, chunk_size: u64) -> Vec<(u64, u64)> {
        vmkeep_io::zero_chunk_runs(&self.zeros, self.client.size(), chunk_size)
    }

    /// Chunk runs touched by the dirty bitmap `bitmap` (negotiated at connect).
    pub fn dirty_runs(&self, bitmap: &str, chunk_size: u64) -> Result<Vec<(u64, u64)>> {
        let size = self.client.size();
        if size == 0 {
            return Ok(Vec::new());
        }
        let ext = self.handle.block_on(self.client.block_status(
            &dirty_bitmap_context(bitmap),
            0,
            size,
        ))?;
        Ok(dirty_runs(&ext, chunk_size))
    }

    /// Closes the connection politely.
    pub fn disconnect(self) -> Result<()> {
        let NbdDisk {
            client,
            extra,
            handle,
            ..
        } = self;
        for c in extra {
            handle.block_on(c.disconnect())?;
        }
        handle.block_on(client.disconnect())
    }
}

impl vmkeep_io::DiskReader for NbdDisk {
    fn size(&self) -> u64 {
        self.client.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset + buf.len() as u64;
        // Walk the zero ranges overlapping [offset, end); read only the gaps between them.
        let start_idx = self.zeros.partition_point(|&(o, l)| o + l <= offset);
        let mut pos = offset;
        let fill = |from: u64, to: u64, buf: &mut [u8]| -> std::io::Result<()> {
            if to <= from {
                return Ok(());
            }
            let data = self
                .handle
                .block_on(self.pick().read(from, to - from))
                .map_err(std::io::Error::other)?;
            let a = (from - offset) as usize;
            buf[a..a + data.len()].copy_from_slice(&data);
            Ok(())
        };
        for &(zo, zl) in &self.zeros[start_idx..] {
            if zo >= end {
                break;
            }
            let zs = zo.max(offset);
            let ze = (zo + zl).min(end);
            fill(pos, zs, buf)?;
            if ze > zs {
                buf[(zs - offset) as usize..(ze - offset) as usize].fill(0);
            }
            pos = pos.max(ze);
        }
        fill(pos, end, buf)
    }

    fn read_vec(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let end = offset + len as u64;
        let i = self.zeros.partition_point(|&(o, l)| o + l <= offset);
        if self.zeros.get(i).is_some_and(|&(o, _)| o < end) {
            // Zeros inside: fill those without asking the server.
            let mut buf = vec![0u8; len];
            self.read_at(&mut buf, offset)?;
            return Ok(buf);
        }
        let data = self
            .handle
            .block_on(self.pick().read(offset, len as u64))
            .map_err(std::io::Error::other)?;
        if data.len() != len {
            return Err(std::io::Error::other(format!(
                "NBD read of {len} bytes at {offset} returned {}",
                data.len()
            )));
        }
        Ok(data)
    }

    fn describe(&self) -> String {
        self.what.clone()
    }

    fn parallel_reads(&self) -> usize {
        // Requests are pipelined by cookie, so even one connection serves two readers.
        2.max(self.connections())
    }
}

/// Absolute `(offset, length)` ranges of the extents whose flags satisfy `pred`, merged.
pub fn ranges_with(extents: &[Extent], pred: impl Fn(u32) -> bool) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut o = 0u64;
    for e in extents {
        if pred(e.flags) && e.length > 0 {
            match out.last_mut() {
                Some((po, pl)) if *po + *pl == o => *pl += e.length,
                _ => out.push((o, e.length)),
            }
        }
        o += e.length;
    }
    out
}

/// Chunk runs `(first, count)` covering every chunk that touches a `base:allocation` extent
/// not flagged as reading zeros (holes that do not read as zeros are read too).
pub fn allocated_runs(extents: &[Extent], chunk_size: u64) -> Vec<(u64, u64)> {
    vmkeep_io::chunk_runs(&ranges_with(extents, |f| f & STATE_ZERO == 0), chunk_size)
}

/// Chunk runs covering every chunk that touches a dirty extent of a
/// `qemu:dirty-bitmap:NAME` map (any granularity: a partial touch marks the whole chunk).
pub fn dirty_runs(extents: &[Extent], chunk_size: u64) -> Vec<(u64, u64)> {
    vmkeep_io::chunk_runs(&ranges_with(extents, |f| f & STATE_DIRTY != 0), chunk_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(v: &[(u64, u32)]) -> Vec<Extent> {
        v.iter()
            .map(|&(length, flags)| Extent { length, flags })
            .collect()
    }

    #[test]
    fn allocated_skips_zero_reads_holes_that_are_not_zero() {
        let k = 65536;
        // data 0..4K, zero hole to 3 chunks, non-zero hole (flags 1) in chunk 3, zero rest
        let e = ext(&[(4096, 0), (3 * k - 4096, 3), (k, 1), (4 * k, 2)]);
        assert_eq!(allocated_runs(&e, k), vec![(0, 1), (3, 1)]);
    }

    #[test]
    fn dirty_marks_every_touched_chunk() {
        let k = 65536;
        let g = 4096;
        // fine granularity, extent straddling chunks 1 and 2
        let e = ext(&[(k + 60 * 1024, 0), (2 * g, 1), (10 * k, 0)]);
        assert_eq!(dirty_runs(&e, k), vec![(1, 2)]);
        // coarse granularity (1 MiB bitmap, 64 KiB chunks)
        let m = 1 << 20;
        let e = ext(&[(m, 0), (m, 1), (m, 0)]);
        assert_eq!(dirty_runs(&e, k), vec![(16, 16)]);
        assert_eq!(ranges_with(&e, |f| f == 1), vec![(m, m)]);
    }
}

//! Reading many blobs with few requests. A window of a disk's chunks is planned into read jobs:
//! its blobs sorted by pack and offset, and those lying close together in one pack read with
//! one ranged request (the gaps read and dropped). A full backup stores a disk's chunks in disk
//! order, so a job is usually a long run of one pack; after an incremental, a window's chunks
//! come from a few packs, each read once, as restic reads whole packs. On object storage
//! requests are the time, so windows and gaps are larger there than in a local folder.
use vmkeep_core::BlobId;

use crate::error::Result;
use crate::index::{BlobIndex, Location};
use crate::Repository;

/// One read job covers at most this much of a pack.
const MAX_SPAN: u64 = 16 << 20;

/// A window's bytes at most, for a target written in ascending order: its reorder buffer holds
/// up to two windows ([`super::ordered`]).
const ORDERED_WINDOW_BYTES: u64 = 8 << 20;

/// How reads are grouped for a store.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ReadShape {
    /// Chunks planned together.
    pub window: usize,
    /// Blobs of a pack this far apart (or closer) are read together.
    pub max_gap: u64,
    /// One read job covers at most this much of a pack.
    pub max_span: u64,
}

impl ReadShape {
    pub fn for_store(concurrency: usize) -> ReadShape {
        if concurrency > 1 {
            // ~20 ms a request against 100+ MB/s: reading 1 MiB more beats a request.
            ReadShape {
                window: 4096,
                max_gap: 1 << 20,
                max_span: MAX_SPAN,
            }
        } else {
            ReadShape {
                window: 64,
                max_gap: 64 << 10,
                max_span: MAX_SPAN,
            }
        }
    }

    /// This shape for a target written in ascending order by one writer
    /// ([`super::ordered`]): windows of at most [`ORDERED_WINDOW_BYTES`] (128 chunks of 64
    /// KiB, so the reorder buffer stays within 16 MiB even where windows are 4096 chunks), and
    /// jobs cut so that a window feeds every one of `threads` workers (at least 1 MiB each),
    /// since only two windows are in flight at a time.
    pub fn ordered(self, chunk_size: u64, threads: usize) -> ReadShape {
        let window = self
            .window
            .min((ORDERED_WINDOW_BYTES / chunk_size.max(1)).max(1) as usize);
        let share = window as u64 * chunk_size / threads.max(1) as u64;
        ReadShape {
            window,
            max_span: share.clamp(1 << 20, MAX_SPAN),
            ..self
        }
    }
}

/// Blobs of one pack read with one request: (caller's tag, id, location), by offset.
pub(crate) struct ReadJob<T> {
    pub items: Vec<(T, BlobId, Location)>,
    span_end: u64,
}

impl Repository {
    /// Group `window` into read jobs.
    pub(crate) fn plan_reads<T: Copy>(
        &self,
        index: &BlobIndex,
        window: &[(T, BlobId)],
        shape: ReadShape,
    ) -> Result<Vec<ReadJob<T>>> {
        let mut located = Vec::with_capacity(window.len());
        for (t, id) in window {
            located.push((*t, *id, index.locate(id)?));
        }
        located.sort_by_key(|(_, _, l)| (l.pack, l.offset));
        let mut jobs: Vec<ReadJob<T>> = Vec::new();
        for item in located {
            let l = item.2;
            let (start, end) = (l.offset as u64, l.offset as u64 + l.length as u64);
            if let Some(job) = jobs.last_mut() {
                let first = job.items[0].2;
                if first.pack == l.pack
                    && start <= job.span_end + shape.max_gap
                    && end.max(job.span_end) - first.offset as u64 <= shape.max_span
                {
                    job.span_end = job.span_end.max(end);
                    job.items.push(item);
                    continue;
                }
            }
            jobs.push(ReadJob {
                items: vec![item],
                span_end: end,
            });
        }
        Ok(jobs)
    }

    /// Read, decrypt, decompress and verify the blobs of one job and hand each to `f`, in the
    /// job's order (one blob's plaintext in memory at a time, besides the job's stored bytes).
    pub(crate) fn read_job<T: Copy>(
        &self,
        job: &ReadJob<T>,
        mut f: impl FnMut(T, &BlobId, Vec<u8>) -> Result<()>,
    ) -> Result<()> {
        let (t0, id0, first) = job.items[0];
        if job.items.len() == 1 {
            return f(t0, &id0, self.read_blob_at(&id0, &first)?);
        }
        let base = first.offset as u64;
        let span = self.read_stored_blob(
            &id0,
            &Location {
                length: u32::try_from(job.span_end - base).expect("spans are at most 16 MiB"),
                ..first
            },
        )?;
        for (t, id, loc) in &job.items {
            let at = (loc.offset as u64 - base) as usize;
            let stored = &span[at..at + loc.length as usize];
            f(*t, id, self.decode_stored(id, loc, stored)?)?;
        }
        Ok(())
    }
}

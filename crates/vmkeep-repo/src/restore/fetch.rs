//! Reading many blobs with few requests: the blobs of a batch are sorted by pack and offset,
//! and those lying close together in one pack come in one ranged read. A full backup stores a
//! disk's chunks in disk order, so a batch of consecutive chunks is usually one request: on
//! object storage that is the difference between one request per 64 KiB and one per few MiB.
use vmkeep_core::blob;
use vmkeep_core::BlobId;

use crate::error::{Error, Result};
use crate::index::{pack_key, BlobIndex, Location};
use crate::Repository;

/// Blobs this far apart (or closer) in a pack are read together (the gap is read and dropped).
const MAX_GAP: u64 = 64 << 10;
/// One read covers at most this much of a pack.
const MAX_SPAN: u64 = 16 << 20;

impl Repository {
    /// Read, decrypt, decompress and verify the blobs of `batch` (tagged with the caller's
    /// numbers), returned in the batch's order.
    pub(crate) fn read_blobs<T: Copy>(
        &self,
        index: &BlobIndex,
        batch: &[(T, BlobId)],
    ) -> Result<Vec<(T, Vec<u8>)>> {
        let mut located = Vec::with_capacity(batch.len());
        for (n, (_, id)) in batch.iter().enumerate() {
            let loc = index.get(id).ok_or_else(|| match index.failure() {
                Some(reason) => Error::CacheFailed { reason },
                None => Error::BlobMissing { id: id.to_hex() },
            })?;
            located.push((n, loc));
        }
        located.sort_by_key(|(_, l)| (l.pack, l.offset));
        let mut out: Vec<Option<Vec<u8>>> = vec![None; batch.len()];
        let mut start = 0;
        while start < located.len() {
            let first = located[start].1;
            let mut end = start + 1;
            let mut span_end = first.offset as u64 + first.length as u64;
            while end < located.len() {
                let l = located[end].1;
                let (o, e) = (l.offset as u64, l.offset as u64 + l.length as u64);
                if l.pack != first.pack
                    || o > span_end + MAX_GAP
                    || e.max(span_end) - first.offset as u64 > MAX_SPAN
                {
                    break;
                }
                span_end = span_end.max(e);
                end += 1;
            }
            self.read_group(batch, &located[start..end], span_end, &mut out)?;
            start = end;
        }
        Ok(batch
            .iter()
            .zip(out)
            .map(|((t, _), data)| (*t, data.expect("every blob was read")))
            .collect())
    }

    /// One ranged read of `group` (blobs of one pack, by offset) up to `span_end`.
    fn read_group<T>(
        &self,
        batch: &[(T, BlobId)],
        group: &[(usize, Location)],
        span_end: u64,
        out: &mut [Option<Vec<u8>>],
    ) -> Result<()> {
        let first = group[0].1;
        if group.len() == 1 {
            let (n, loc) = group[0];
            out[n] = Some(self.read_blob_at(&batch[n].1, &loc)?);
            return Ok(());
        }
        let base = first.offset as u64;
        let (id0, key) = (batch[group[0].0].1, pack_key(&first.pack));
        let span = self.read_stored_blob(
            &id0,
            &Location {
                offset: first.offset,
                length: u32::try_from(span_end - base).expect("spans are at most 16 MiB"),
                ..first
            },
        )?;
        for (n, loc) in group {
            let id = &batch[*n].1;
            let at = (loc.offset as u64 - base) as usize;
            let stored = &span[at..at + loc.length as usize];
            let plain = blob::decode(&self.keys, loc.kind, id, loc.raw_len, stored)
                .map_err(|e| Error::corrupt(format!("blob {id} in {key}"), e))?;
            out[*n] = Some(plain);
        }
        Ok(())
    }
}
